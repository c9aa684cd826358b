"""Key-homomorphic masks from Ring-LWE: a client hides a vector of integers under a mask
that only its fresh secret removes, and the masked vectors of many clients add up to the
sum of their vectors under the mask of the sum of their secrets.

Flower-free core. It lets a threshold Paillier key decrypt the sum of the clients'
*secrets* (a few dozen ciphertexts) instead of the whole model (thousands): the
expensive threshold decryption then costs next to nothing, and the model travels and
is added up as plain integers of 32 to 64 bits. This is hybrid encryption with a key-homomorphic
data layer, the idea of key-homomorphic PRFs (Boneh, Lewi, Montgomery and
Raghunathan, CRYPTO 2013) as used for secure aggregation by Stevens et al. ("Efficient
Differentially Private Secure Aggregation for Federated Learning via Hardness of
Learning with Errors", USENIX Security 2022).

**The scheme.** The ring is ``R_q = Z_q[X]/(X^N + 1)`` with ``N = 4096`` and ``q = 2^k``,
``k`` the fewest whole bytes that hold the sums, 32 to 64 (:class:`Ring`; a value
travels as ``k / 8`` bytes).
For a round's ``context`` (the caller binds the key, run and round), public
polynomials ``a_1 .. a_r`` are expanded by SHAKE-128 from the context: nobody chooses
them, so a server cannot pick a weak one. A client packs its integer levels ``m`` into
``r`` polynomials, draws a fresh secret ``s`` (uniform ternary) and errors ``e_j``
(centered binomial, ``eta = 21``: standard deviation 3.24, ``|e| <= 21``) and sends::

    y_j = 2^20 m_j + a_j s + e_j   (mod q)

Adding ``K`` clients' vectors gives ``2^20 M_j + a_j S + E_j`` with ``M = sum m``,
``S = sum s`` and ``|E| <= 21 K`` coefficient-wise, so whoever knows ``S`` gets ``M``
exactly: ``M_j = round((sum y_j - a_j S) / 2^20)`` while ``21 K < 2^19`` (``K`` up to
24,966) and ``|M| < 2^(k - 21)``. The remainder must then lie within ``21 K`` of a
multiple of ``2^20``; :meth:`Ring.unmask` checks it, so a wrong ``S`` or a tampered sum is refused (for
a wrong one each coefficient passes with probability about ``2^-20 * 43 K``), short of a
shift by whole multiples of ``2^20``, which only moves the result as added noise would.

**Security.** Each ``(a_j, a_j s + e_j)`` is a Ring-LWE sample; decision Ring-LWE is as
hard as worst-case problems on ideal lattices for any modulus (Peikert, Regev and
Stephens-Davidowitz, STOC 2017). For ``N = 4096``, ternary secrets and error standard
deviation 3.2, the Homomorphic Encryption Security Standard (Albrecht et al., 2018,
Table 1) gives 128-bit classical security up to ``log q = 109``; here ``log q <= 64`` (a
smaller ``q`` at the same error is harder still).
A secret is used for one vector and then dropped. What the sum of the secrets tells
is the sum of the vectors, no more: ``sum y - a S`` is ``2^20 M + E``.

**Arithmetic.** ``a_j s`` is a negacyclic convolution, computed in double-precision
FFTs of length ``N / 2`` (``R[X]/(X^N + 1)`` embeds in ``C[X]/(X^(N/2) - i)``; the
substitution ``X = w Y``, ``w = exp(i pi / N)``, makes it cyclic). ``a`` is split into
limbs small enough that every product coefficient stays below ``2^40``, far inside
what the FFT computes exactly, and each result is checked to lie within 1/4 of an
integer before it is rounded: an inexact product stops with an error instead of
unmasking wrongly.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from .checks import is_int

__all__ = ["RING_DEGREE", "SCALE_BITS", "ERROR_BOUND", "MAX_CONTRIBUTORS", "MaskError", "Ring",
           "rows_for", "public_polynomials", "new_secret", "secret_rows", "secret_plaintexts",
           "secret_sum"]

RING_DEGREE = 4096
SCALE_BITS = 20
ERROR_BOUND = 21  # eta of the centered binomial errors: |e| <= 21, variance 21 / 2
MAX_CONTRIBUTORS = ((1 << (SCALE_BITS - 1)) - 1) // ERROR_BOUND  # 21 K < 2^19
MIN_BITS = 32  # the smallest ring modulus, 2^32: 11-bit messages
SECRET_SLOT_BITS = 16  # a contributor's secret coefficient + 1 in {0, 1, 2}; sums < 2^16
_PRODUCT_BITS = 40  # N * limb * |s| below this: the FFT's result is exact
_A_DOMAIN = b"fedapp-ring-mask-a-v1"


class MaskError(ValueError):
    """A masked sum that does not unmask: wrong secret sum, tampered vector, or too many
    contributors for the error bound."""


def rows_for(length: int) -> int:
    """Polynomials that hold ``length`` values (the last one zero-padded)."""
    if length < 0:
        raise ValueError("a length cannot be negative")
    return max(1, -(-length // RING_DEGREE))


def public_polynomials(context: bytes, rows: int, degree: int = RING_DEGREE) -> np.ndarray:
    """The public ``a_1 .. a_rows`` of ``context``: uniform in ``Z_(2^64)``, SHAKE-128
    of the context, shape ``(rows, degree)``, ``uint64`` (:meth:`Ring.public_polynomials`
    reduces them)."""
    stream = hashlib.shake_128(_A_DOMAIN + len(context).to_bytes(8, "big") + context)
    return np.frombuffer(stream.digest(8 * rows * degree), "<u8").reshape(rows, degree)


def new_secret(degree: int = RING_DEGREE) -> np.ndarray:
    """A fresh uniform ternary secret (``int64`` in ``{-1, 0, 1}``) from the OS's CSPRNG."""
    out = np.empty(0, np.int64)
    while out.size < degree:
        draw = np.frombuffer(os.urandom(degree + 64), np.uint8)
        out = np.concatenate([out, draw[draw < 255].astype(np.int64) % 3 - 1])
    return out[:degree]


def _errors(shape: tuple[int, ...]) -> np.ndarray:
    """Centered binomial errors, ``eta = ERROR_BOUND``: popcount of 21 random bits minus
    that of 21 others."""
    count = int(np.prod(shape))
    bits = np.frombuffer(os.urandom(8 * count), "<u4").reshape(2, count)
    keep = np.uint32((1 << ERROR_BOUND) - 1)
    e = np.bitwise_count(bits[0] & keep).astype(np.int64) - np.bitwise_count(bits[1] & keep)
    return e.reshape(shape)


def _negacyclic(a: np.ndarray, s: np.ndarray, bits: int = 64) -> np.ndarray:
    """``a_j * s mod (X^N + 1, 2^64)`` for every row ``a_j`` of ``a`` (``uint64`` below
    ``2^bits``, shape ``(rows, N)``) and one small integer polynomial ``s`` (``int64``,
    length ``N``, a power of two >= 2)."""
    degree = a.shape[1]
    half = degree // 2
    s_bits = max(1, int(np.abs(s).max(initial=0)).bit_length())
    limb_bits = _PRODUCT_BITS - degree.bit_length() - s_bits
    if limb_bits < 4:
        raise MaskError(f"a secret of {s_bits} bits is too large for exact products")
    twist = np.exp(1j * np.pi * np.arange(half) / degree)
    s_hat = np.fft.fft((s[:half] + 1j * s[half:]) * twist)
    out = np.zeros(a.shape, np.uint64)
    for shift in range(0, bits, limb_bits):
        limb = ((a >> np.uint64(shift)) & np.uint64((1 << limb_bits) - 1)).astype(np.float64)
        folded = np.fft.fft((limb[:, :half] + 1j * limb[:, half:]) * twist, axis=1)
        product = np.fft.ifft(folded * s_hat, axis=1) * twist.conj()
        exact = np.concatenate([product.real, product.imag], axis=1)
        rounded = np.rint(exact)
        if exact.size and np.abs(exact - rounded).max() > 0.25:
            raise MaskError("a ring product was not computed exactly; nothing was unmasked")
        out += rounded.astype(np.int64).astype(np.uint64) << np.uint64(shift)
    return out


def _check_secret(secret: np.ndarray, contributors: int) -> None:
    if not isinstance(secret, np.ndarray) or secret.shape != (RING_DEGREE,) \
            or secret.dtype.kind != "i":
        raise ValueError(f"a secret is an int array of {RING_DEGREE} coefficients")
    if secret.size and int(np.abs(secret).max()) > contributors:
        raise MaskError(f"a sum of {contributors} ternary secrets has coefficients in "
                        f"[-{contributors}, {contributors}]")


@dataclass(frozen=True)
class Ring:
    """The masks' ring ``Z_q[X]/(X^4096 + 1)`` with ``q = 2^bits``: as few whole bytes
    as the levels' sums need (:meth:`for_levels`), since a masked vector travels as
    ``bits / 8`` bytes a value."""

    bits: int = 64

    def __post_init__(self) -> None:
        if not is_int(self.bits) or self.bits % 8 or not MIN_BITS <= self.bits <= 64:
            raise ValueError(f"ring modulus bits must be a multiple of 8 in {MIN_BITS}..64, "
                             f"got {self.bits!r}")

    @classmethod
    def for_levels(cls, level_bits: int) -> Ring:
        """The smallest ring whose messages hold sums below ``2^level_bits``."""
        bits = -(-(level_bits + SCALE_BITS + 1) // 8) * 8
        if bits > 64:
            raise ValueError(f"{level_bits}-bit sums do not fit the masks (at most "
                             f"{63 - SCALE_BITS} bits)")
        return cls(max(bits, MIN_BITS))

    @property
    def message_bits(self) -> int:
        """``|sum of levels| < 2^message_bits`` unmasks exactly."""
        return self.bits - 1 - SCALE_BITS

    @property
    def _modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    def public_polynomials(self, context: bytes, rows: int) -> np.ndarray:
        """:func:`public_polynomials` reduced into this ring."""
        return public_polynomials(context, rows) & self._modulus_mask

    def mask(self, levels: np.ndarray, secret: np.ndarray, context: bytes) -> np.ndarray:
        """``2^20 m + a s + e``: ``levels`` (integers, ``|m| < 2^message_bits``) masked
        under ``secret`` with the public polynomials of ``context``.

        Returns
        -------
        numpy.ndarray
            ``uint64`` below ``2^bits``, ``rows_for(len(levels)) * RING_DEGREE`` values
            (the padding is masked too).
        """
        levels = np.asarray(levels)
        if levels.ndim != 1 or levels.dtype.kind not in "iu":
            raise ValueError("levels must be a flat integer array")
        if levels.size and int(np.abs(levels.astype(np.int64)).max()) >= 1 << self.message_bits:
            raise ValueError(f"a level of {self.message_bits} bits or more does not fit the "
                             f"mask")
        _check_secret(secret, 1)
        rows = rows_for(levels.size)
        m = np.zeros(rows * RING_DEGREE, np.int64)
        m[:levels.size] = levels
        a = self.public_polynomials(context, rows)
        noisy = (m.reshape(rows, RING_DEGREE) << SCALE_BITS) + _errors((rows, RING_DEGREE))
        return ((_negacyclic(a, secret, self.bits) + noisy.astype(np.uint64))
                & self._modulus_mask).reshape(-1)

    def add(self, masked: list[np.ndarray]) -> np.ndarray:
        """The sum, modulo ``2^bits``, of masked vectors of one round (``uint64``, one
        length)."""
        if not masked:
            raise ValueError("nothing to add")
        total = np.zeros_like(masked[0], dtype=np.uint64)
        for vector in masked:
            if vector.dtype != np.uint64 or vector.shape != total.shape:
                raise ValueError("masked vectors of one round have one length and dtype "
                                 "uint64")
            total += vector
        return total & self._modulus_mask

    def unmask(self, total: np.ndarray, secret_sum: np.ndarray, contributors: int,
               context: bytes, length: int) -> np.ndarray:
        """The sum of ``contributors`` vectors from the sum of their masked vectors and
        of their secrets.

        Raises
        ------
        MaskError
            If the remainder is not within the errors' bound of ``2^20 M``: the secret
            sum or the vector is not what the contributors sent (or they were more than
            stated).
        """
        if not 1 <= contributors <= MAX_CONTRIBUTORS:
            raise MaskError(f"{contributors} contributors: the errors' bound allows 1 to "
                            f"{MAX_CONTRIBUTORS}")
        rows = rows_for(length)
        if total.dtype != np.uint64 or total.shape != (rows * RING_DEGREE,):
            raise MaskError(f"a masked sum of {length} values has {rows * RING_DEGREE} "
                            f"uint64 entries")
        _check_secret(secret_sum, contributors)
        a = self.public_polynomials(context, rows)
        rest = (total.reshape(rows, RING_DEGREE) - _negacyclic(a, secret_sum, self.bits)) \
            & self._modulus_mask
        top = np.uint64(64 - self.bits)
        rest = (rest << top).view(np.int64) >> top.astype(np.int64)  # centered lift
        half = np.int64(1 << (SCALE_BITS - 1))
        levels = (rest + half) >> SCALE_BITS  # round to nearest; arithmetic shift on int64
        error = rest - (levels << SCALE_BITS)
        if np.abs(error).max() > ERROR_BOUND * contributors:
            raise MaskError("the masked sum does not unmask under this secret sum: a secret, "
                            "a vector or the contributor count is not what the contributors "
                            "sent")
        return levels.reshape(-1)[:length]

    def to_bytes(self, masked: np.ndarray) -> np.ndarray:
        """A masked vector as it travels: ``bits / 8`` little-endian bytes a value."""
        wide = np.ascontiguousarray(masked, dtype="<u8").view(np.uint8).reshape(-1, 8)
        return np.ascontiguousarray(wide[:, :self.bits // 8]).reshape(-1)

    def from_bytes(self, raw: object, length: int) -> np.ndarray:
        """Inverse of :meth:`to_bytes` for a vector of ``length`` values (``rows_for`` x
        ``RING_DEGREE`` entries); ``ValueError`` if ``raw`` is not one."""
        entries, width = rows_for(length) * RING_DEGREE, self.bits // 8
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 \
                or raw.shape != (entries * width,):
            raise ValueError(f"the masked vector of a {length}-value model must be a 1-D "
                             f"uint8 array of {entries * width} bytes")
        wide = np.zeros((entries, 8), np.uint8)
        wide[:, :width] = raw.reshape(entries, width)
        return wide.view("<u8").reshape(-1).astype(np.uint64)


def secret_rows(plaintext_bits: int) -> int:
    """Plaintexts of :func:`secret_plaintexts` for plaintexts of ``plaintext_bits`` bits."""
    return -(-RING_DEGREE // (plaintext_bits // SECRET_SLOT_BITS))


def secret_plaintexts(secret: np.ndarray, plaintext_bits: int) -> list[int]:
    """A ternary secret as Paillier plaintexts of at most ``plaintext_bits`` bits (below
    the modulus): each coefficient plus one in a 16-bit slot, so sums of up to
    ``MAX_CONTRIBUTORS`` secrets add slot-wise without carries."""
    _check_secret(secret, 1)
    per = plaintext_bits // SECRET_SLOT_BITS
    slots = (secret + 1).astype(">u2")
    return [int.from_bytes(slots[i:i + per].tobytes(), "big")
            for i in range(0, slots.size, per)]


def secret_sum(plaintexts: list[int], contributors: int, plaintext_bits: int
               ) -> np.ndarray:
    """The sum of ``contributors`` secrets from the decrypted sum of their
    :func:`secret_plaintexts`."""
    if not 1 <= contributors <= MAX_CONTRIBUTORS:
        raise MaskError(f"{contributors} contributors: the errors' bound allows 1 to "
                        f"{MAX_CONTRIBUTORS}")
    per, rows = plaintext_bits // SECRET_SLOT_BITS, secret_rows(plaintext_bits)
    if len(plaintexts) != rows:
        raise MaskError(f"a secret sum is {rows} plaintexts, got {len(plaintexts)}")
    out = []
    for i, value in enumerate(plaintexts):
        count = min(per, RING_DEGREE - i * per)
        if not 0 <= int(value) < 1 << (SECRET_SLOT_BITS * count):
            raise MaskError("a decrypted secret sum is out of range")
        out.append(np.frombuffer(int(value).to_bytes(2 * count, "big"), ">u2"))
    return np.concatenate(out).astype(np.int64) - contributors
