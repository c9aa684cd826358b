"""The cryptographic core of masked secure aggregation (Flower-free).

Fixed-point encoding in a power-of-two modulus, a cryptographic PRG for masks,
X25519 + HKDF key agreement, authenticated encryption of shares and Shamir
secret sharing, as used by Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017) and Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS 2020).

Why each piece is what it is:

- Arithmetic is in ``Z_{2^b}`` with ``b`` = 32 or 64 so that masking and
  summing are plain wrapping ``uint32``/``uint64`` numpy adds; the encoding
  leaves headroom so that the honest weighted sum never wraps, and anything
  above it is reported as overflow (never a silent wrap).
- The PRG is AES-256 in counter mode keyed by a 256-bit seed (NIST SP 800-90A's
  CTR_DRBG core; AES-NI makes it stream GB/s), from ``cryptography``.
- Shamir sharing is written here (about 30 lines): ``cryptography`` has none and
  no maintained Python library does it over a field large enough for 256-bit
  secrets. Shares live in GF(p) with the Mersenne prime p = 2^521 - 1.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .fixed_point import FixedPointParams
from .checks import is_int, is_number

SEED_BYTES = 32
PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)
_DTYPES = {32: np.uint32, 64: np.uint64}


class SecAggError(ValueError):
    """Key material, shares or a masked vector that fail a check (the message says which)."""


class MaskOverflow(SecAggError):
    """The unmasked sum is outside the range an honest weighted sum can take."""


# ------------------------------------------------------------------ encoding
@dataclass(frozen=True)
class SecAggParams(FixedPointParams):
    """Fixed-point encoding of weighted model values in ``Z_{2^mod_bits}``.

    A value ``x`` in ``[-clip, clip]`` becomes ``q = (x + clip) / step`` rounded
    stochastically to an integer in ``[0, 2^value_bits - 1]``, with
    ``step = 2 clip / (2^value_bits - 1)``. A client sends ``w * q`` (plus masks)
    for its integer weight ``w``; the sum of the weighted values of clients with
    total weight ``W <= max_total_weight`` is at most ``W (2^value_bits - 1)``,
    which is below ``2^mod_bits``: it never wraps.
    """

    clip: float
    value_bits: int
    max_total_weight: int
    mod_bits: int

    @staticmethod
    def derive(clip: float, max_total_weight: int = 65536, value_bits: int = 16,
               mod_bits: int | None = None) -> SecAggParams:
        """The smallest modulus (32 or 64 bits) with headroom for ``max_total_weight``,
        unless ``mod_bits`` is given."""
        if mod_bits is None:
            mod_bits = next((b for b in (32, 64) if max_total_weight * (2**value_bits - 1)
                             < 2**b), 64)
        params = SecAggParams(float(clip), int(value_bits), int(max_total_weight), int(mod_bits))
        params.check()
        return params

    def check(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggError(f"clip must be a positive number, got {self.clip}")
        if not 2 <= self.value_bits <= 32:
            raise SecAggError(f"value_bits must be in [2, 32], got {self.value_bits}")
        if self.mod_bits not in _DTYPES:
            raise SecAggError(f"mod_bits must be 32 or 64, got {self.mod_bits}")
        if self.max_total_weight < 1:
            raise SecAggError(f"max_total_weight must be >= 1, got {self.max_total_weight}")
        if self.max_total_weight * (2**self.value_bits - 1) >= 2**self.mod_bits:
            raise SecAggError(
                f"max_total_weight {self.max_total_weight} x {self.value_bits}-bit values does "
                f"not fit in {self.mod_bits} bits: lower value_bits or max_total_weight")

    @property
    def dtype(self) -> type:
        return _DTYPES[self.mod_bits]

    @property
    def error_bound(self) -> float:
        """Worst-case absolute error of a decoded weighted average against the exact
        weighted average of the clipped values: one quantization step (each value is
        rounded by less than a step, and a weighted average keeps that bound)."""
        return self.step

    def to_dict(self) -> dict[str, int | float]:
        return {"clip": self.clip, "value-bits": self.value_bits,
                "max-total-weight": self.max_total_weight, "mod-bits": self.mod_bits}

    @staticmethod
    def from_dict(data: dict) -> SecAggParams:
        """Inverse of :meth:`to_dict`; :class:`SecAggError` if malformed."""
        try:
            clip = data["clip"]
            if not is_number(clip):
                raise TypeError(f"clip must be a number, got {clip!r}")
            params = SecAggParams(float(clip), _as_int(data["value-bits"]),
                                   _as_int(data["max-total-weight"]), _as_int(data["mod-bits"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SecAggError(f"malformed masking parameters {data!r}: {err}") from None
        params.check()
        return params


def _as_int(value: object) -> int:
    if not is_int(value):
        raise TypeError(f"expected an int, got {value!r}")
    return int(value)


def quantize(values: np.ndarray, params: SecAggParams, rng: np.random.Generator) -> np.ndarray:
    """Clip to ``[-clip, clip]`` and round stochastically to ``[0, levels]`` (unbiased;
    :meth:`FixedPoint.quantize`), in the modulus's dtype."""
    return params.fixed_point.quantize(values, rng, dtype=params.dtype)


def encode_weighted(values: np.ndarray, weight: int, params: SecAggParams,
                    rng: np.random.Generator) -> np.ndarray:
    """``weight * quantize(values)`` in the modulus; ``weight`` must be in
    ``[1, max_total_weight]``."""
    if not 1 <= weight <= params.max_total_weight:
        raise SecAggError(f"weight {weight} outside [1, {params.max_total_weight}]: raise "
                           "max_total_weight or give the client a smaller weight")
    values = np.asarray(values)
    if values.dtype.kind != "f":  # float32 models are checked as they are, without a copy
        values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise SecAggError(f"{int(np.count_nonzero(~np.isfinite(values)))} model values are "
                           "NaN or infinite: the local training diverged; lower the learning "
                           "rate")
    return params.fixed_point.quantize(values, rng, weight, params.dtype)


def decode_sum(total: np.ndarray, total_weight: int, params: SecAggParams) -> np.ndarray:
    """The weighted average from the unmasked sum of weighted values.

    Raises
    ------
    MaskOverflow
        If ``total_weight`` exceeds ``max_total_weight`` or an element exceeds what
        clients of that total weight can produce (a wrong mask or a dishonest
        client; never decoded as if it were right).
    """
    if not 1 <= total_weight <= params.max_total_weight:
        raise MaskOverflow(f"total weight {total_weight} outside [1, {params.max_total_weight}]"
                           ": raise max_total_weight")
    limit = params.fixed_point.max_sum(total_weight)
    if total.size and int(total.max()) > limit:
        bad = int(np.count_nonzero(total > limit))
        raise MaskOverflow(f"{bad} summed values exceed {limit}, the most clients of total "
                           f"weight {total_weight} can send: a mask did not cancel or a client "
                           "sent values out of range")
    return params.fixed_point.dequantize(total, total_weight)


NOISE_TAILS = 40.0  # a noisy sum further than this many noise stds out was not made honestly


def centred_sum(total: np.ndarray, total_weight: int, params: SecAggParams,
                noise_std: float) -> np.ndarray:
    """The integer sum of weighted levels plus integer noise of std ``noise_std``
    (distributed DP), read from ``Z_{2^mod_bits}`` as the representative nearest the
    centre ``W levels / 2`` (int64). Wrapping around the modulus would need noise
    ``2^(mod_bits - 1)`` out, which a reading this far away is refused before.

    Raises
    ------
    MaskOverflow
        If ``total_weight`` is out of range, or a value is further than ``W levels / 2 +
        NOISE_TAILS noise_std`` from the centre (a mask did not cancel, or a client sent
        values out of range).
    """
    if not 1 <= total_weight <= params.max_total_weight:
        raise MaskOverflow(f"total weight {total_weight} outside [1, {params.max_total_weight}]"
                           ": raise max_total_weight")
    half = params.fixed_point.max_sum(total_weight) // 2
    signed = np.dtype(params.dtype).str.replace("u", "i")
    offset = (np.asarray(total, params.dtype) - params.dtype(half)).view(signed)
    reach = half + 1 + NOISE_TAILS * noise_std
    if offset.size and int(np.abs(offset.astype(np.float64)).max()) > reach:
        bad = int(np.count_nonzero(np.abs(offset.astype(np.float64)) > reach))
        raise MaskOverflow(f"{bad} summed values are further than {reach:.0f} from the centre "
                           f"{half} of what clients of total weight {total_weight} send with "
                           "their noise: a mask did not cancel or a client sent values out of "
                           "range")
    return offset.astype(np.int64) + half


# ------------------------------------------------------------------ PRG
def prg(seed: bytes, length: int, dtype: type) -> np.ndarray:
    """``length`` pseudorandom elements of ``dtype`` (uniform in ``Z_{2^bits}``)
    from AES-256-CTR keyed by the 32-byte ``seed``."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"a PRG seed has {SEED_BYTES} bytes, got {len(seed)}")
    nbytes = length * np.dtype(dtype).itemsize
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(stream.update(bytes(nbytes)), dtype=dtype)


# ------------------------------------------------------------------ key agreement
@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair (raw 32-byte encodings)."""

    private: bytes
    public: bytes

    @staticmethod
    def generate() -> KeyPair:
        key = X25519PrivateKey.generate()
        return KeyPair(key.private_bytes_raw(), key.public_key().public_bytes_raw())


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def check_public_key(public: bytes) -> None:
    """:class:`SecAggError` unless ``public`` is an X25519 public key a node can agree
    on a secret with: not one of the low-order points that make every secret zero."""
    if len(public) != 32:
        raise SecAggError(f"an X25519 public key has 32 bytes, got {len(public)}")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise SecAggError("a public key of low order: every secret agreed with it would be "
                           "zero") from None


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret,
    bound to ``info`` (the round and the purpose)."""
    if len(peer_public) != 32:
        raise SecAggError(f"an X25519 public key has 32 bytes, got {len(peer_public)}")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # the all-zero shared secret of a low-order point
        raise SecAggError(f"unusable peer public key: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce followed by the ciphertext and tag."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Inverse of :func:`seal`; :class:`SecAggError` if it was altered or is
    addressed to another pair of nodes or round."""
    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)
    except (InvalidTag, ValueError):
        raise SecAggError("a sealed share failed authentication (altered, or sealed for "
                           "another node or round)") from None


def commitment(secret: bytes) -> bytes:
    """SHA-256 of a 256-bit random secret: lets the server check a reconstruction
    without learning the secret."""
    return hashlib.sha256(b"fedapp-secagg-commit" + secret).digest()


# ------------------------------------------------------------------ Shamir
def share_secret(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shamir shares of ``secret`` at the points ``xs`` (distinct, in [1, p)); any
    ``threshold`` of them give it back, fewer reveal nothing."""
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise SecAggError("share points must be distinct and in [1, p)")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                     for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def reconstruct_secret(shares: dict[int, bytes], threshold: int, length: int = SEED_BYTES
                       ) -> bytes:
    """The secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Uses the first ``threshold`` shares; the caller checks the result against a
    commitment or public key, since a wrong share gives a wrong secret.
    """
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = []
    for x, y in list(shares.items())[:threshold]:
        if len(y) != SHARE_BYTES or not 0 < x < PRIME:
            raise SecAggError(f"malformed share at point {x}")
        points.append((x, int.from_bytes(y, "big")))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * length):
        raise SecAggError("the shares do not reconstruct a secret of the expected size")
    return secret.to_bytes(length, "big")


# ------------------------------------------------------------------ graph
def neighbor_graph(nodes: list[int], degree: int, seed: bytes) -> dict[int, list[int]]:
    """SecAgg+'s sparse communication graph: the nodes in a random order on a ring,
    each joined to ``max(1, degree // 2)`` nodes on either side (a Harary graph of
    even degree; complete when ``degree >= len(nodes) - 1``). ``seed`` fixes the order."""
    n = len(nodes)
    if degree >= n - 1:
        return {u: [v for v in nodes if v != u] for u in nodes}
    half = max(1, degree // 2)
    order = sorted(nodes, key=lambda u: hashlib.sha256(seed + u.to_bytes(8, "big")).digest())
    graph: dict[int, set[int]] = {u: set() for u in nodes}
    for i, u in enumerate(order):
        for d in range(1, half + 1):
            v = order[(i + d) % n]
            graph[u].add(v)
            graph[v].add(u)
    return {u: sorted(vs) for u, vs in graph.items()}


def default_degree(num_nodes: int) -> int:
    """SecAgg+'s logarithmic degree: 2 ceil(log2 n) + 2 neighbors, at most all others."""
    if num_nodes <= 1:
        return 0
    return min(num_nodes - 1, 2 * math.ceil(math.log2(num_nodes)) + 2)


def threshold_for(group_size: int, fraction: float) -> int:
    """Shares needed to reconstruct: more than ``fraction`` of a share group
    (a node and its neighbors), at least 1, at most the group."""
    return max(1, min(group_size, math.floor(fraction * group_size) + 1))
