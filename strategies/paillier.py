"""Paillier encryption with ``g = n + 1``, fast randomizers and CRT, for packed updates.

Flower-free: keys, encryption, homomorphic addition, decryption and the wire format
(fixed-width big-endian ``uint8`` rows) of Paillier ciphertexts. The plaintexts are
the packed integers of :mod:`strategies.encoding`.

Speed, without changing what a ciphertext is (``c = (1 + n)^m * r^n mod n^2``):

* ``(1 + n)^m = 1 + m * n mod n^2``: no exponentiation for the message.
* Damgård–Jurik–Nielsen randomizers: the ``r^n`` factor is ``hs^a mod n^2`` with
  ``hs = h^n mod n^2``, ``h = -x^2 mod n`` for a random ``x``, and a short random
  exponent ``a`` (see :class:`Encryptor` for the security argument and exponent size).
* ``hs`` is a fixed base, so ``hs^a`` uses precomputed tables of
  ``hs^(d * 256^i)`` (fixed-base windowing, Menezes, van Oorschot and Vanstone,
  *Handbook of Applied Cryptography*, §14.6.3): one multiplication per byte of ``a``.
* An encrypting party that holds the private key (clients, in this project's threat
  model) computes ``hs^a`` modulo ``p^2`` and ``q^2`` and recombines by CRT.
* Decryption uses CRT modulo ``p^2`` and ``q^2`` (Paillier, EUROCRYPT 1999).

Multi-core helpers (:meth:`Encryptor.encrypt_to_array`, :meth:`PrivateKey.decrypt_array`,
:func:`aggregate_arrays`) split work over ``spawn``-started worker processes. Work
crosses to those local processes with :mod:`multiprocessing`'s own serialization;
nothing in this module pickles or evaluates data that comes from the network: keys
travel as JSON-able dicts of hex strings, ciphertexts as ``uint8`` arrays.

Caveat: gmpy2 arithmetic is not constant-time; timing side channels on the machine
that encrypts or decrypts are out of scope.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import gmpy2
import numpy as np
from gmpy2 import mpz

from .encoding import EncodingParams

__all__ = [
    "MIN_KEY_BITS",
    "PublicKey",
    "PrivateKey",
    "generate_keypair",
    "Encryptor",
    "djn_exponent_bits",
    "ciphertexts_to_array",
    "check_ciphertext_array",
    "ciphertexts_from_array",
    "add_ciphertexts",
    "aggregate_arrays",
    "check_fingerprint",
    "wire_metadata",
    "parse_wire_metadata",
]

MIN_KEY_BITS = 2048
"""Smallest modulus accepted without ``allow_insecure=True`` (NIST SP 800-57: 112-bit security)."""

_MPZ = type(mpz(0))
_PUBLIC_TYPE = "paillier-public-key"
_PRIVATE_TYPE = "paillier-private-key"
_FORMAT_VERSION = 1
_FINGERPRINT_KEY = "paillier-key-fingerprint"
_ENCODING_PREFIX = "encoding-"


def _as_int(value: object, name: str) -> mpz:
    if isinstance(value, bool) or not isinstance(value, (int, _MPZ, np.integer)):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    return mpz(int(value))


def _check_modulus_size(n_bits: int, allow_insecure: bool) -> None:
    if n_bits < MIN_KEY_BITS and not allow_insecure:
        raise ValueError(
            f"a {n_bits}-bit Paillier modulus is insecure: use at least {MIN_KEY_BITS} bits "
            "(allow_insecure=True is for tests only)")


def _hex(value: int) -> str:
    return format(int(value), "x")


def _parse_hex(data: Mapping[str, object], key: str, what: str) -> mpz:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: '{key}' must be a non-empty hex string")
    try:
        return mpz(int(value, 16))
    except ValueError:
        raise ValueError(f"{what}: '{key}' is not a hex string") from None


def _check_dict_header(data: Mapping[str, object], kind: str, keys: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{kind}: expected a dict, got {type(data).__name__}")
    if data.get("type") != kind:
        raise ValueError(f"expected a dict of type '{kind}', got type {data.get('type')!r}")
    if data.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{kind}: unsupported version {data.get('version')!r}")
    if set(data) != keys:
        raise ValueError(f"{kind}: expected keys {sorted(keys)}, got {sorted(data)}")


class PublicKey:
    """A Paillier public key: the modulus ``n`` (and ``g = n + 1`` implicitly).

    Parameters
    ----------
    n
        The modulus, an odd product of two primes.
    allow_insecure
        Accept moduli below :data:`MIN_KEY_BITS` bits (tests only).
    """

    __slots__ = ("n", "nsquare", "n_bits", "n_bytes")

    def __init__(self, n: int, *, allow_insecure: bool = False) -> None:
        n = _as_int(n, "n")
        if n < 15 or n % 2 == 0:
            raise ValueError("n must be an odd composite modulus")
        _check_modulus_size(n.bit_length(), allow_insecure)
        self.n = n
        self.nsquare = n * n
        self.n_bits = int(n.bit_length())
        self.n_bytes = -(-self.n_bits // 8)

    @property
    def ciphertext_bytes(self) -> int:
        """Width of one ciphertext on the wire: ``2 * n_bytes``."""
        return 2 * self.n_bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of ``n`` (big-endian, ``n_bytes`` bytes), as 64 hex digits."""
        return hashlib.sha256(int(self.n).to_bytes(self.n_bytes, "big")).hexdigest()

    def to_dict(self) -> dict[str, str | int]:
        """JSON-able form: ``n`` as hex, with the fingerprint for checking."""
        return {"type": _PUBLIC_TYPE, "version": _FORMAT_VERSION, "n": _hex(self.n),
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, allow_insecure: bool = False) -> PublicKey:
        """Inverse of :meth:`to_dict`; checks the fingerprint."""
        _check_dict_header(data, _PUBLIC_TYPE, {"type", "version", "n", "fingerprint"})
        key = cls(_parse_hex(data, "n", _PUBLIC_TYPE), allow_insecure=allow_insecure)
        if data["fingerprint"] != key.fingerprint:
            raise ValueError(f"{_PUBLIC_TYPE}: fingerprint does not match n (corrupted key file?)")
        return key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.n == other.n

    def __hash__(self) -> int:
        return hash(int(self.n))

    def __repr__(self) -> str:
        return f"PublicKey(n_bits={self.n_bits}, fingerprint={self.fingerprint[:16]}...)"


class PrivateKey:
    """A Paillier private key: the primes ``p`` and ``q``, with CRT decryption.

    Parameters
    ----------
    p, q
        Distinct primes of the modulus ``n = p * q``.
    allow_insecure
        Accept moduli below :data:`MIN_KEY_BITS` bits (tests only).
    """

    __slots__ = ("public_key", "p", "q", "psquare", "qsquare", "_hp", "_hq", "_q_inv_p",
                 "_qsquare_inv_psquare")

    def __init__(self, p: int, q: int, *, allow_insecure: bool = False) -> None:
        p, q = _as_int(p, "p"), _as_int(q, "q")
        if p == q:
            raise ValueError("p and q must be distinct primes")
        if p < 3 or q < 3 or not gmpy2.is_prime(p, 40) or not gmpy2.is_prime(q, 40):
            raise ValueError("p and q must be odd primes")
        n = p * q
        if gmpy2.gcd(n, (p - 1) * (q - 1)) != 1:
            raise ValueError("gcd(n, (p-1)(q-1)) must be 1: choose primes of equal length")
        self.public_key = PublicKey(n, allow_insecure=allow_insecure)
        self.p, self.q = p, q
        self.psquare, self.qsquare = p * p, q * q
        g = n + 1
        self._hp = gmpy2.invert((gmpy2.powmod(g, p - 1, self.psquare) - 1) // p, p)
        self._hq = gmpy2.invert((gmpy2.powmod(g, q - 1, self.qsquare) - 1) // q, q)
        self._q_inv_p = gmpy2.invert(q, p)
        self._qsquare_inv_psquare = gmpy2.invert(self.qsquare, self.psquare)

    @property
    def fingerprint(self) -> str:
        """The public key's fingerprint."""
        return self.public_key.fingerprint

    def decrypt(self, ciphertext: int) -> int:
        """The plaintext ``m`` in ``[0, n)`` of one ciphertext."""
        c = _as_int(ciphertext, "ciphertext")
        if not 0 < c < self.public_key.nsquare:
            raise ValueError("a ciphertext must lie in (0, n^2)")
        return self._decrypt(c)

    def _decrypt(self, c: mpz) -> int:
        p, q = self.p, self.q
        mp = (gmpy2.powmod(c, p - 1, self.psquare) - 1) // p * self._hp % p
        mq = (gmpy2.powmod(c, q - 1, self.qsquare) - 1) // q * self._hq % q
        return int(mq + q * ((mp - mq) * self._q_inv_p % p))

    def decrypt_many(self, ciphertexts: Sequence[int]) -> list[int]:
        """Decrypt a sequence of ciphertexts in this process."""
        return [self.decrypt(c) for c in ciphertexts]

    def decrypt_array(
        self, array: np.ndarray, *, count: int | None = None, workers: int | None = 1
    ) -> list[int]:
        """Validate a wire array (see :func:`check_ciphertext_array`) and decrypt it.

        ``workers > 1`` (``None``: all cores) splits the rows over worker processes.
        """
        array = check_ciphertext_array(self.public_key, array, count)
        workers = _resolve_workers(workers, array.shape[0])
        if workers == 1:
            return [self._decrypt(c) for c in _rows_to_mpz(array)]
        chunks = _split(array.shape[0], workers)
        with _pool(workers, _init_decrypt_worker, (int(self.p), int(self.q))) as pool:
            parts = pool.map(_decrypt_chunk, [array[a:b] for a, b in chunks])
            return [m for part in parts for m in part]

    def to_dict(self) -> dict[str, str | int]:
        """JSON-able form: ``p`` and ``q`` as hex, with the public key's fingerprint.
        Keep it secret: it is the decryption key."""
        return {"type": _PRIVATE_TYPE, "version": _FORMAT_VERSION, "p": _hex(self.p),
                "q": _hex(self.q), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, allow_insecure: bool = False) -> PrivateKey:
        """Inverse of :meth:`to_dict`; checks the primes and the fingerprint."""
        _check_dict_header(data, _PRIVATE_TYPE, {"type", "version", "p", "q", "fingerprint"})
        key = cls(_parse_hex(data, "p", _PRIVATE_TYPE), _parse_hex(data, "q", _PRIVATE_TYPE),
                  allow_insecure=allow_insecure)
        if data["fingerprint"] != key.fingerprint:
            raise ValueError(f"{_PRIVATE_TYPE}: fingerprint does not match p * q")
        return key

    def __repr__(self) -> str:  # never print the primes
        return (f"PrivateKey(n_bits={self.public_key.n_bits}, "
                f"fingerprint={self.fingerprint[:16]}...)")


def _random_prime(bits: int) -> mpz:
    """A random prime ``p = 3 (mod 4)`` of exactly ``bits`` bits with its two top
    bits set, so the product of two such primes has exactly ``2 * bits`` bits."""
    while True:
        candidate = mpz(secrets.randbits(bits)) | (mpz(3) << (bits - 2)) | 1
        prime = gmpy2.next_prime(candidate)
        while prime % 4 != 3:
            prime = gmpy2.next_prime(prime)
        if prime.bit_length() == bits and gmpy2.is_prime(prime, 40):
            return prime


def generate_keypair(
    n_bits: int = 2048, *, allow_insecure: bool = False
) -> tuple[PublicKey, PrivateKey]:
    """Generate a Paillier key pair with an ``n_bits``-bit modulus (even, >= 2048).

    The primes are random primes of ``n_bits / 2`` bits from the OS's CSPRNG
    (``secrets``), as in python-paillier, chosen to make ``n`` an "admissible"
    modulus for DJN randomizers as in secretflow/heu's DJN-optimised Paillier:
    ``p = q = 3 (mod 4)`` and ``gcd(p - 1, q - 1) = 2``. They are not safe primes.
    """
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or n_bits % 2 or n_bits < 64:
        raise ValueError(f"n_bits must be an even int >= 64, got {n_bits!r}")
    _check_modulus_size(n_bits, allow_insecure)
    half = n_bits // 2
    while True:
        p, q = _random_prime(half), _random_prime(half)
        if p != q and gmpy2.gcd(p - 1, q - 1) == 2 and gmpy2.gcd(p * q, (p - 1) * (q - 1)) == 1:
            private = PrivateKey(p, q, allow_insecure=allow_insecure)
            return private.public_key, private


def djn_exponent_bits(n_bits: int) -> int:
    """Bits of the short DJN exponent for a modulus of ``n_bits`` bits: four times
    the NIST SP 800-57 security strength of the modulus (448 bits for 2048-bit n)."""
    strength = 112 if n_bits < 3072 else 128 if n_bits < 7680 else 192 if n_bits < 15360 else 256
    return 4 * strength


def _fixed_base_table(base: mpz, modulus: mpz, digits: int) -> list[list[mpz]]:
    """``table[i][d] = base^(d * 256^i) mod modulus`` for ``d`` in ``[0, 256)``."""
    table = []
    g = base % modulus
    for _ in range(digits):
        row = [mpz(1), g]
        for _ in range(2, 256):
            row.append(row[-1] * g % modulus)
        table.append(row)
        g = row[-1] * g % modulus  # base^(256^(i+1))
    return table


def _fixed_base_pow(table: list[list[mpz]], exponent: bytes, modulus: mpz) -> mpz:
    """``base^a mod modulus`` with ``a = int.from_bytes(exponent, "little")``."""
    acc = mpz(1)
    for row, digit in zip(table, exponent):
        if digit:
            acc = acc * row[digit] % modulus
    return acc


class Encryptor:
    """Fast Paillier encryption under one public key.

    Each encryptor draws its own ``h = -x^2 mod n`` (``x`` uniform in ``Z_n^*``)
    and precomputes ``hs = h^n mod n^2``; a ciphertext is
    ``(1 + m n) * hs^a mod n^2`` with ``a`` uniform in ``[0, 2^k)``. This is the
    randomizer of Damgård, Jurik and Nielsen, "A generalization of Paillier's
    public-key system with applications to electronic voting" (Int. J. Inf. Secur.
    9, 2010), as implemented e.g. by secretflow/heu ("Paillier with DJN
    optimization", exponents of ``n_bits / 2`` bits).

    Security argument (DJN): ``hs^a`` is an ``n``-th power, like ``r^n``. With
    ``a`` uniform over the order of ``<h>`` the ciphertext is distributed like a
    standard one whose randomizer is confined to ``<h>^n``, and semantic security
    follows from the decisional composite residuosity (DCR) assumption; drawing
    ``a`` short instead is indistinguishable under the assumption that ``h^a``
    for short ``a`` cannot be told from a uniform element of ``<h>``
    (short-exponent indistinguishability, cf. Koshiba and Kurosawa, PKC 2004).
    DJN state the reduction for ``n`` a product of safe primes, where ``<h>`` is
    the whole group of Jacobi symbol 1 with overwhelming probability. Our keys
    (:func:`generate_keypair`) have ``p = q = 3 (mod 4)`` and
    ``gcd(p - 1, q - 1) = 2``, so ``h`` has Jacobi symbol 1 and is not a square,
    but the primes are not safe: that ``<h>`` is large holds with overwhelming
    probability, and that step of the argument is heuristic. Generic attacks on
    a ``k``-bit exponent cost about ``2^(k/2)``, so ``k`` defaults to four times
    the modulus's security strength (448 bits for 2048-bit ``n``, twice what
    those attacks need), see :func:`djn_exponent_bits`. Pass
    ``exponent_bits=n_bits // 2`` for heu's more conservative choice (about
    twice the encryption time).

    Parameters
    ----------
    public_key
        The key to encrypt under.
    private_key
        If given (it must match ``public_key``), ``hs^a`` is computed modulo
        ``p^2`` and ``q^2`` and recombined by CRT, about twice as fast.
    exponent_bits
        Length ``k`` of the random exponent, rounded up to whole bytes; defaults
        to :func:`djn_exponent_bits`. Values below 2x the security strength are
        refused.
    """

    def __init__(
        self,
        public_key: PublicKey,
        private_key: PrivateKey | None = None,
        *,
        exponent_bits: int | None = None,
    ) -> None:
        if not isinstance(public_key, PublicKey):
            raise ValueError(f"public_key must be a PublicKey, got {type(public_key).__name__}")
        if private_key is not None and private_key.public_key != public_key:
            raise ValueError("private_key does not belong to public_key (fingerprints differ)")
        minimum = djn_exponent_bits(public_key.n_bits) // 2
        if exponent_bits is None:
            exponent_bits = djn_exponent_bits(public_key.n_bits)
        if exponent_bits < minimum:
            raise ValueError(f"exponent_bits must be at least {minimum} for a "
                             f"{public_key.n_bits}-bit key, got {exponent_bits}")
        self.public_key = public_key
        self.private_key = private_key
        self._exponent_bytes = -(-exponent_bits // 8)
        n, nsquare = public_key.n, public_key.nsquare
        while True:
            x = mpz(secrets.randbelow(int(n) - 2) + 2)
            if gmpy2.gcd(x, n) == 1:
                break
        h = n - x * x % n
        digits = self._exponent_bytes
        if private_key is None:
            hs = gmpy2.powmod(h, n, nsquare)
            self._tables = (_fixed_base_table(hs, nsquare, digits),)
        else:
            psq, qsq = private_key.psquare, private_key.qsquare
            self._tables = (_fixed_base_table(gmpy2.powmod(h, n, psq), psq, digits),
                            _fixed_base_table(gmpy2.powmod(h, n, qsq), qsq, digits))

    @property
    def exponent_bits(self) -> int:
        """Length of the random DJN exponent ``a``."""
        return 8 * self._exponent_bytes

    def obfuscator(self) -> mpz:
        """A fresh ``hs^a mod n^2`` (the ``r^n`` factor of a ciphertext)."""
        a = secrets.token_bytes(self._exponent_bytes)
        if self.private_key is None:
            return _fixed_base_pow(self._tables[0], a, self.public_key.nsquare)
        sk = self.private_key
        rp = _fixed_base_pow(self._tables[0], a, sk.psquare)
        rq = _fixed_base_pow(self._tables[1], a, sk.qsquare)
        return rq + sk.qsquare * ((rp - rq) * sk._qsquare_inv_psquare % sk.psquare)

    def encrypt(self, plaintext: int) -> mpz:
        """Encrypt one integer ``m`` in ``[0, n)``."""
        m = _as_int(plaintext, "plaintext")
        pk = self.public_key
        if not 0 <= m < pk.n:
            raise ValueError(f"a plaintext must lie in [0, n), got one of {m.bit_length()} bits")
        return (1 + m * pk.n) * self.obfuscator() % pk.nsquare

    def encrypt_many(self, plaintexts: Sequence[int]) -> list[mpz]:
        """Encrypt a sequence of integers in this process."""
        return [self.encrypt(m) for m in plaintexts]

    def encrypt_to_array(
        self, plaintexts: Sequence[int], *, workers: int | None = 1
    ) -> np.ndarray:
        """Encrypt and return the wire array (see :func:`ciphertexts_to_array`).

        ``workers > 1`` (``None``: all cores) splits the plaintexts over worker
        processes, each with its own encryptor (its own ``h``) for the same key.
        """
        plaintexts = list(plaintexts)
        workers = _resolve_workers(workers, len(plaintexts))
        if workers == 1:
            return ciphertexts_to_array(self.public_key, self.encrypt_many(plaintexts))
        sk = self.private_key
        initargs = (int(self.public_key.n),
                    None if sk is None else (int(sk.p), int(sk.q)),
                    self.exponent_bits)
        chunks = _split(len(plaintexts), workers)
        with _pool(workers, _init_encrypt_worker, initargs) as pool:
            parts = list(pool.map(_encrypt_chunk,
                                  [[int(m) for m in plaintexts[a:b]] for a, b in chunks]))
        return np.concatenate(parts, axis=0)


# -- wire format ------------------------------------------------------------------


def ciphertexts_to_array(public_key: PublicKey, ciphertexts: Sequence[int]) -> np.ndarray:
    """Ciphertexts as a ``uint8`` array of shape ``(len(ciphertexts), 2 * n_bytes)``,
    one big-endian ciphertext per row."""
    width = public_key.ciphertext_bytes
    nsquare = public_key.nsquare
    parts = []
    for i, c in enumerate(ciphertexts):
        c = _as_int(c, "ciphertext")
        if not 0 < c < nsquare:
            raise ValueError(f"ciphertext {i} does not lie in (0, n^2)")
        parts.append(c.to_bytes(width, "big"))
    buf = bytearray(b"".join(parts))
    return np.frombuffer(buf, dtype=np.uint8).reshape(len(parts), width)


def check_ciphertext_array(
    public_key: PublicKey, array: object, count: int | None = None
) -> np.ndarray:
    """Validate a wire array of ciphertexts and return it (C-contiguous).

    Raises ``ValueError`` unless ``array`` is a 2-D ``uint8`` array with rows of
    ``2 * n_bytes`` bytes, ``count`` rows (if given), and every row a big-endian
    integer in ``(0, n^2)``.
    """
    if not isinstance(array, np.ndarray):
        raise ValueError(f"ciphertexts must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(f"ciphertexts must be a uint8 array, got dtype {array.dtype}")
    width = public_key.ciphertext_bytes
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(
            f"ciphertexts must have shape (count, {width}) for a {public_key.n_bits}-bit key, "
            f"got {array.shape}: wrong key size?")
    if count is not None and array.shape[0] != count:
        raise ValueError(f"expected {count} ciphertexts, got {array.shape[0]}")
    array = np.ascontiguousarray(array)
    if array.shape[0] == 0:
        return array
    if not array.any(axis=1).all():
        raise ValueError(f"ciphertext {int(np.argmin(array.any(axis=1)))} is zero")
    limit = np.frombuffer(int(public_key.nsquare).to_bytes(width, "big"), dtype=np.uint8)
    differs = array != limit
    first = differs.argmax(axis=1)
    below = differs.any(axis=1) & (array[np.arange(array.shape[0]), first] < limit[first])
    if not below.all():
        raise ValueError(f"ciphertext {int(np.argmin(below))} is not below n^2: corrupted or "
                         "made under another key")
    return array


def _rows_to_mpz(array: np.ndarray) -> list[mpz]:
    buf = array.tobytes()
    width = array.shape[1]
    return [mpz.from_bytes(buf[i : i + width], "big") for i in range(0, len(buf), width)]


def ciphertexts_from_array(
    public_key: PublicKey, array: np.ndarray, count: int | None = None
) -> list[mpz]:
    """Validate a wire array (see :func:`check_ciphertext_array`) and return its ciphertexts."""
    return _rows_to_mpz(check_ciphertext_array(public_key, array, count))


# -- homomorphic addition -----------------------------------------------------------


def add_ciphertexts(public_key: PublicKey, vectors: Sequence[Sequence[int]]) -> list[mpz]:
    """Elementwise homomorphic sum of equally long ciphertext vectors
    (product modulo ``n^2``): it decrypts to the sum of the plaintexts modulo ``n``."""
    if not vectors:
        raise ValueError("need at least one ciphertext vector to add")
    length = len(vectors[0])
    for i, vec in enumerate(vectors):
        if len(vec) != length:
            raise ValueError(f"vector {i} holds {len(vec)} ciphertexts, vector 0 holds {length}")
    nsquare = public_key.nsquare
    total = [mpz(c) for c in vectors[0]]
    for vec in vectors[1:]:
        total = [a * b % nsquare for a, b in zip(total, vec)]
    return total


def aggregate_arrays(
    public_key: PublicKey,
    arrays: Sequence[np.ndarray],
    *,
    count: int | None = None,
    workers: int | None = 1,
) -> np.ndarray:
    """Validate clients' wire arrays and return the wire array of their homomorphic sum.

    Parameters
    ----------
    public_key
        The key all arrays were encrypted under (the server needs nothing more).
    arrays
        One ``(count, 2 * n_bytes)`` uint8 array per client.
    count
        Expected number of ciphertexts per array; by default that of the first.
    workers
        Worker processes (``None``: all cores); 1 works in this process.
    """
    if not arrays:
        raise ValueError("need at least one ciphertext array to aggregate")
    checked = []
    for i, arr in enumerate(arrays):
        try:
            checked.append(check_ciphertext_array(public_key, arr, count))
        except ValueError as err:
            raise ValueError(f"array {i}: {err}") from None
        count = checked[0].shape[0]
    workers = _resolve_workers(workers, count)
    if workers == 1:
        return _aggregate_rows(public_key, checked)
    chunks = _split(count, workers)
    with _pool(workers, _init_aggregate_worker, (int(public_key.n),)) as pool:
        parts = list(pool.map(_aggregate_chunk, [[arr[a:b] for arr in checked] for a, b in chunks]))
    return np.concatenate(parts, axis=0)


def _aggregate_rows(public_key: PublicKey, arrays: Sequence[np.ndarray]) -> np.ndarray:
    total = add_ciphertexts(public_key, [_rows_to_mpz(arr) for arr in arrays])
    return ciphertexts_to_array(public_key, total)


# -- metadata sent beside the ciphertexts ----------------------------------------------


def check_fingerprint(public_key: PublicKey, fingerprint: str) -> None:
    """Raise ``ValueError`` unless ``fingerprint`` is that of ``public_key``."""
    if fingerprint != public_key.fingerprint:
        raise ValueError(
            f"ciphertexts were made under key {str(fingerprint)[:16]}..., but this key is "
            f"{public_key.fingerprint[:16]}...: all clients must use the same key pair")


def wire_metadata(params: EncodingParams, fingerprint: str) -> dict[str, int | str]:
    """Encoding parameters and key fingerprint as a flat dict of str/int values,
    e.g. for a Flower ``ConfigRecord`` next to the ciphertext array."""
    if not isinstance(params, EncodingParams):
        raise ValueError(f"params must be EncodingParams, got {type(params).__name__}")
    _check_fingerprint_format(fingerprint)
    meta: dict[str, int | str] = {_FINGERPRINT_KEY: fingerprint}
    meta.update({_ENCODING_PREFIX + k: v for k, v in params.to_dict().items()})
    return meta


def parse_wire_metadata(meta: Mapping[str, Any]) -> tuple[EncodingParams, str]:
    """Inverse of :func:`wire_metadata`: ``(params, fingerprint)``. Keys other
    than the ``encoding-*`` ones and the fingerprint are ignored."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(meta).__name__}")
    if _FINGERPRINT_KEY not in meta:
        raise ValueError(f"metadata lacks '{_FINGERPRINT_KEY}'")
    fingerprint = meta[_FINGERPRINT_KEY]
    _check_fingerprint_format(fingerprint)
    enc = {k[len(_ENCODING_PREFIX):]: v for k, v in meta.items() if k.startswith(_ENCODING_PREFIX)}
    return EncodingParams.from_dict(enc), fingerprint


def _check_fingerprint_format(fingerprint: object) -> None:
    if (not isinstance(fingerprint, str) or len(fingerprint) != 64
            or any(ch not in "0123456789abcdef" for ch in fingerprint)):
        raise ValueError("a key fingerprint must be 64 lowercase hex digits (SHA-256)")


# -- worker processes -------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _resolve_workers(workers: int | None, items: int) -> int:
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None (all cores), got {workers!r}")
    # A worker process costs a start-up and a table precomputation: not worth it for little work.
    return max(1, min(workers, items // 64))


def _split(items: int, workers: int) -> list[tuple[int, int]]:
    pieces = min(items, 4 * workers)  # a few chunks per worker balance noisy cores
    bounds = [items * i // pieces for i in range(pieces + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _pool(workers: int, initializer: Any, initargs: tuple) -> ProcessPoolExecutor:
    # spawn, not fork: safe in processes that run threads (gRPC, Ray).
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=initializer, initargs=initargs)


def _init_encrypt_worker(n: int, primes: tuple[int, int] | None, exponent_bits: int) -> None:
    public_key = PublicKey(n, allow_insecure=True)
    private_key = None if primes is None else PrivateKey(*primes, allow_insecure=True)
    _WORKER["encryptor"] = Encryptor(public_key, private_key, exponent_bits=exponent_bits)


def _encrypt_chunk(plaintexts: list[int]) -> np.ndarray:
    return _WORKER["encryptor"].encrypt_to_array(plaintexts)


def _init_decrypt_worker(p: int, q: int) -> None:
    _WORKER["private_key"] = PrivateKey(p, q, allow_insecure=True)


def _decrypt_chunk(array: np.ndarray) -> list[int]:
    key = _WORKER["private_key"]
    return [key._decrypt(c) for c in _rows_to_mpz(array)]


def _init_aggregate_worker(n: int) -> None:
    _WORKER["public_key"] = PublicKey(n, allow_insecure=True)


def _aggregate_chunk(arrays: list[np.ndarray]) -> np.ndarray:
    return _aggregate_rows(_WORKER["public_key"], arrays)

