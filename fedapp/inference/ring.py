"""Fixed-point numbers in the ring Z_2^64, additive shares, and the PRG behind them.

A real number ``x`` is the ring element ``round(x * 2**f) mod 2**64``, read back as a
two's-complement int64 over ``2**f``. Shares are uniform: ``x = x0 + x1 mod 2**64``,
so either share alone is a uniformly random word whatever ``x`` is.

Products carry ``2f`` fraction bits and are brought back with SecureML's local
truncation (Mohassel and Zhang, IEEE S&P 2017, Theorem 1): each party shifts its own
share. The result is the value rounded down to ``2**-f``, or one step less, except with
probability about ``|x| * 2**(2f) / 2**63`` per value, when the two shares wrap. With
``f = 14`` and values below 2**8, that is 2**-27 per value. See ``DEFAULT_FRACTION_BITS``.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: Fraction bits of the fixed-point encoding. 14 bits keep the rounding step at
#: 6.1e-5 and a wrong truncation at 2**(8 + 28 + 1 - 64) = 2**-27 per value of
#: magnitude up to 2**8: about 3e-4 per MNIST CNN image of 38,000 truncated
#: values. 16 bits would make that 16x likelier; 12 bits coarsen the weights.
DEFAULT_FRACTION_BITS = 14
#: The largest magnitude :func:`encode` accepts, so sums of a few encodings cannot wrap.
MAX_MAGNITUDE_BITS = 40
SEED_BYTES = 32
WORD = np.uint64


class Prg:
    """A cryptographic PRG: AES-256 in counter mode over a 32-byte seed.

    numpy's generators are predictable from their output; shares must not be.
    Both sides of a seed draw the same words in the same order.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
        self._stream = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()

    def words(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform ring elements of ``shape``."""
        count = int(np.prod(shape))
        raw = self._stream.update(bytes(8 * count))
        return np.frombuffer(raw, dtype="<u8").astype(WORD, copy=False).reshape(shape)

    def bits(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform bits (0 or 1) of ``shape``, as ring elements."""
        count = int(np.prod(shape))
        raw = np.frombuffer(self._stream.update(bytes(count)), dtype=np.uint8)
        return (raw & 1).astype(WORD).reshape(shape)


def encode(values: np.ndarray, fraction_bits: int) -> np.ndarray:
    """Real values as ring elements with ``fraction_bits`` fraction bits.

    Raises
    ------
    ValueError
        If a value is not finite or its encoding needs more than ``MAX_MAGNITUDE_BITS``
        bits (``2**(40 - f)``: 6.7e7 at ``f = 14``).
    """
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("cannot encode NaN or infinity")
    scaled = np.rint(x * float(2**fraction_bits))
    limit = float(2**MAX_MAGNITUDE_BITS)
    if x.size and np.abs(scaled).max() >= limit:
        raise ValueError(f"a value of magnitude {np.abs(x).max():.3g} does not fit "
                         f"{MAX_MAGNITUDE_BITS - fraction_bits} integer bits of the "
                         f"fixed-point encoding (fraction bits {fraction_bits})")
    return scaled.astype(np.int64).view(WORD)


def decode(words: np.ndarray, fraction_bits: int) -> np.ndarray:
    """Ring elements read as two's-complement fixed-point numbers."""
    return np.asarray(words, dtype=WORD).view(np.int64).astype(np.float64) / 2**fraction_bits


def split(secret: np.ndarray, prg: Prg) -> tuple[np.ndarray, np.ndarray]:
    """Shares of ``secret``: the first drawn from ``prg``, the second the difference."""
    first = prg.words(secret.shape)
    return first, np.asarray(secret, dtype=WORD) - first


def reconstruct(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    return np.asarray(first, dtype=WORD) + np.asarray(second, dtype=WORD)


def truncate(share: np.ndarray, bits: int) -> np.ndarray:
    """One party's step of the local truncation: an arithmetic shift of its share."""
    return (share.view(np.int64) >> bits).view(WORD)
