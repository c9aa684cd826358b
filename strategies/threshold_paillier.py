"""Threshold Paillier: any ``T`` of ``N`` key-share holders decrypt together, ``T - 1``
learn nothing, and every partial decryption carries a proof that it is correct.

Flower-free core. The scheme is Damgard and Jurik's threshold Paillier for ``s = 1``
("A Generalisation, a Simplification and Some Applications of Paillier's Probabilistic
Public-Key System", PKC 2001, §4), which is Fouque, Poupard and Stern's ("Sharing
Decryption in the Context of Voting or Lotteries", FC 2000) with Shoup's technique for
threshold RSA ("Practical Threshold Signatures", EUROCRYPT 2000):

* A **dealer** picks safe primes ``p = 2p' + 1``, ``q = 2q' + 1``, ``n = pq``,
  ``m = p'q'``, and the secret ``d`` with ``d = 0 (mod m)``, ``d = 1 (mod n)``. It
  shares ``d`` with a random polynomial ``f`` of degree ``T - 1`` over ``Z_(nm)``
  (``f(0) = d``): share ``i`` is ``s_i = f(i)``. It publishes a random square ``v``
  of ``Z_(n^2)^*`` and the verification keys ``v_i = v^(Delta s_i)``,
  ``Delta = N!``, then forgets ``p``, ``q``, ``m``, ``d`` and ``f``.
* **Encryption** is Paillier's with ``g = n + 1``; ciphertexts are those of
  python-paillier (``phe``) under the same ``n``. The randomizer is ``hs^a`` with
  ``hs = h^n mod n^2``, ``h = -x^2 mod n`` public and ``a`` of ``|n| + 128`` bits,
  Damgard, Jurik and Nielsen's faster encryption ("A generalization of Paillier's
  public-key system with applications to electronic voting", IJIS 2010, §4.1) with
  full-length exponents, so semantic security rests on the DCR assumption alone;
  ``hs^a`` comes from a fixed-base table, one multiplication per exponent byte.
* **Partial decryption** of ``c`` by share ``i``: ``c_i = c^(2 Delta s_i) mod n^2``.
* **Combination** of any ``T`` partials (set ``S``): ``c' = prod c_i^(2 lambda_i)``
  with the integer Lagrange coefficients ``lambda_i = Delta prod_(j in S, j != i)
  j / (j - i)``, so ``c' = c^(4 Delta^2 d) = (1 + n)^(4 Delta^2 M)`` and ``M = L(c')
  (4 Delta^2)^-1 mod n``.
* **Proof of a correct partial** (Damgard-Jurik §4, after Shoup): equality of discrete
  logarithms, ``log_(c^4)(c_i^2) = log_v(v_i)``, non-interactive by Fiat-Shamir
  (SHA-256, bound to a caller's context such as the run and round). One proof covers a
  whole vector of ciphertexts: the statement is checked on random linear combinations
  ``prod c_j^(rho_j)`` with 128-bit ``rho_j`` drawn from a hash of every ciphertext and
  every partial (the small-exponent batch test of Bellare, Garay and Rabin, EUROCRYPT
  1998). The group of squares mod ``n^2`` has order ``n p' q'``, with no prime factor
  below 2^1000, so one wrong value passes with probability at most 2^-128.

Squaring ``c_i`` (and raising ``c`` to the 4th) removes elements of order 2, which a
proof over the squares cannot see; the combination uses ``c_i^2`` for the same reason.

**The dealer** is whoever runs ``deal_threshold_key`` (``fedapp keygen --threshold``):
it sees ``d`` and must forget it (this module never writes it; the shares are written
one file per holder and the dealer's process ends). A distributed key generation would
remove the dealer; it is not built.

Caveat: gmpy2 arithmetic is not constant-time; timing side channels on a share
holder's machine are out of scope.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass
from functools import cached_property
from fractions import Fraction

import gmpy2
import numpy as np
from gmpy2 import mpz

from .checks import is_int
from .paillier import (MIN_KEY_BITS, _fixed_base_pow, _fixed_base_table, _hex, _multi_pow,
                       _parse_hex, ciphertexts_to_array)

__all__ = [
    "ThresholdPublicKey",
    "KeyShare",
    "PartialDecryption",
    "deal_threshold_key",
    "ThresholdEncryptor",
    "partial_decrypt",
    "verify_partial",
    "combine",
    "InvalidPartial",
]

_PUBLIC_TYPE = "fedapp-threshold-paillier-public-key"
_SHARE_TYPE = "fedapp-threshold-paillier-key-share"
_VERSION = 1
_STATISTICAL_BITS = 128
_CHALLENGE_BITS = 256
_BATCH_BITS = 128
_MAX_SHARES = 64  # Delta = N! grows fast; 64! has 296 bits


class InvalidPartial(ValueError):
    """A partial decryption whose proof does not verify, or that is malformed."""


def _check_header(data: Mapping[str, object], kind: str, keys: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{kind}: expected a dict, got {type(data).__name__}")
    if data.get("type") != kind:
        raise ValueError(f"expected a dict of type '{kind}', got type {data.get('type')!r}")
    if data.get("version") != _VERSION:
        raise ValueError(f"{kind}: unsupported version {data.get('version')!r}")
    if set(data) != keys:
        raise ValueError(f"{kind}: expected keys {sorted(keys)}, got {sorted(data)}")


def _check_counts(threshold: object, shares: object) -> None:
    if not is_int(shares) or not 2 <= shares <= _MAX_SHARES:
        raise ValueError(f"shares must be an int in [2, {_MAX_SHARES}], got {shares!r}")
    if not is_int(threshold) or not 2 <= threshold <= shares:
        raise ValueError(f"threshold must be an int in [2, shares = {shares}], got "
                         f"{threshold!r} (threshold 1 would let one holder decrypt alone)")


def _hash_int(bits: int, *parts: object) -> int:
    """A ``bits``-bit integer from SHA-256 in counter mode over ``parts``."""
    seed = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else _hex(part).encode() \
            if isinstance(part, (int, type(mpz(0)))) else str(part).encode()
        seed.update(len(data).to_bytes(8, "big") + data)
    digest, out, counter = seed.digest(), b"", 0
    while len(out) * 8 < bits:
        out += hashlib.sha256(digest + counter.to_bytes(4, "big")).digest()
        counter += 1
    return int.from_bytes(out, "big") >> (len(out) * 8 - bits)


@dataclass(frozen=True, eq=False)
class ThresholdPublicKey:
    """The public part of a threshold key: what the server, the encrypting clients and
    every verifier hold.

    Attributes
    ----------
    n : mpz
        The modulus, a product of two safe primes.
    h : mpz
        ``-x^2 mod n``, base of the encryption randomizers.
    threshold, shares : int
        ``T`` partials decrypt; ``N`` shares exist, numbered 1 to ``N``.
    v : mpz
        A random square modulo ``n^2``: the base of the verification keys.
    verification : tuple[mpz, ...]
        ``v_i = v^(Delta s_i) mod n^2`` for share ``i`` at position ``i - 1``.
    allow_insecure : bool
        Accept a modulus below 2048 bits (tests of the mechanics only).
    """

    n: mpz
    h: mpz
    threshold: int
    shares: int
    v: mpz
    verification: tuple[mpz, ...]
    allow_insecure: InitVar[bool] = False

    def __post_init__(self, allow_insecure: bool) -> None:
        _check_counts(self.threshold, self.shares)
        if self.n.bit_length() < MIN_KEY_BITS and not allow_insecure:
            raise ValueError(f"a {self.n.bit_length()}-bit modulus is insecure: use at least "
                             f"{MIN_KEY_BITS} bits")
        if len(self.verification) != self.shares:
            raise ValueError(f"{self.shares} shares need {self.shares} verification keys, "
                             f"got {len(self.verification)}")
        for value in (self.v, *self.verification):
            if not 1 < value < self.nsquare or gmpy2.gcd(value, self.n) != 1:
                raise ValueError("a verification key is not an element of Z_(n^2)^*")

    @property
    def nsquare(self) -> mpz:
        return self.n * self.n

    @cached_property
    def hs(self) -> mpz:
        """``h^n mod n^2``, the base of the randomizers."""
        return gmpy2.powmod(self.h, self.n, self.nsquare)

    @property
    def randomizer_bits(self) -> int:
        """Bits of the randomizer exponents: ``|n| + 128``."""
        return int(self.n.bit_length()) + _STATISTICAL_BITS

    @property
    def delta(self) -> int:
        """``Delta = N!``."""
        return math.factorial(self.shares)

    @property
    def n_bits(self) -> int:
        return int(self.n.bit_length())

    @property
    def n_bytes(self) -> int:
        return -(-self.n_bits // 8)

    @property
    def ciphertext_bytes(self) -> int:
        """Width of one ciphertext on the wire, as :class:`strategies.paillier.PublicKey`'s
        (the wire format of :mod:`strategies.paillier` serves both kinds of key)."""
        return 2 * self.n_bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 over every public value, as 64 hex digits."""
        return hashlib.sha256(":".join(
            [str(self.threshold), str(self.shares)]
            + [_hex(x) for x in (self.n, self.h, self.v, *self.verification)]
        ).encode()).hexdigest()

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, with the fingerprint for checking."""
        return {"type": _PUBLIC_TYPE, "version": _VERSION, "n": _hex(self.n),
                "h": _hex(self.h), "threshold": self.threshold, "shares": self.shares,
                "v": _hex(self.v), "verification": [_hex(x) for x in self.verification],
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, allow_insecure: bool = False
                  ) -> ThresholdPublicKey:
        """Inverse of :meth:`to_dict`; checks the fingerprint.

        Raises
        ------
        ValueError
            Naming what is wrong with the dict.
        """
        _check_header(data, _PUBLIC_TYPE, {"type", "version", "n", "h", "threshold",
                                           "shares", "v", "verification", "fingerprint"})
        raw = data["verification"]
        if not isinstance(raw, list):
            raise ValueError(f"{_PUBLIC_TYPE}: 'verification' must be a list of hex strings")
        key = cls(
            _parse_hex(data, "n", _PUBLIC_TYPE), _parse_hex(data, "h", _PUBLIC_TYPE),
            data["threshold"], data["shares"], _parse_hex(data, "v", _PUBLIC_TYPE),
            tuple(_parse_hex({"x": x}, "x", _PUBLIC_TYPE) for x in raw), allow_insecure)
        if data["fingerprint"] != key.fingerprint:
            raise ValueError(f"{_PUBLIC_TYPE}: fingerprint does not match the key (corrupted "
                             "key file?)")
        return key

    def __repr__(self) -> str:
        return (f"ThresholdPublicKey(n_bits={self.n.bit_length()}, {self.threshold} of "
                f"{self.shares}, fingerprint={self.fingerprint[:16]}...)")


@dataclass(frozen=True, eq=False)
class KeyShare:
    """One holder's share ``s_i`` of the decryption key, with the public key.

    Attributes
    ----------
    public : ThresholdPublicKey
        The key the share belongs to.
    index : int
        ``i``, from 1 to ``N``.
    secret : mpz
        ``s_i = f(i) mod n m``. Never printed.
    """

    public: ThresholdPublicKey
    index: int
    secret: mpz

    def __post_init__(self) -> None:
        if not is_int(self.index) or not 1 <= self.index <= self.public.shares:
            raise ValueError(f"a share index must be in [1, {self.public.shares}], got "
                             f"{self.index!r}")
        expected = self.public.verification[self.index - 1]
        if gmpy2.powmod(self.public.v, self.public.delta * self.secret,
                        self.public.nsquare) != expected:
            raise ValueError(f"key share {self.index} does not belong to this public key "
                             f"(fingerprint {self.public.fingerprint[:16]}...): its "
                             "verification key does not match")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: the public key, the index and the share as hex."""
        return {"type": _SHARE_TYPE, "version": _VERSION, "index": self.index,
                "share": _hex(self.secret), "public-key": self.public.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, allow_insecure: bool = False
                  ) -> KeyShare:
        """Inverse of :meth:`to_dict`; refuses a share that does not match its public key.

        Raises
        ------
        ValueError
            Naming what is wrong (a public key given where a share is expected included).
        """
        if isinstance(data, Mapping) and data.get("type") == _PUBLIC_TYPE:
            raise ValueError("this is a threshold public key, not a key share: give the "
                             "share file made for this holder by 'fedapp keygen --threshold'")
        _check_header(data, _SHARE_TYPE, {"type", "version", "index", "share", "public-key"})
        public = ThresholdPublicKey.from_dict(data["public-key"],  # type: ignore[arg-type]
                                              allow_insecure=allow_insecure)
        return cls(public, data["index"], _parse_hex(data, "share", _SHARE_TYPE))

    def __repr__(self) -> str:  # never print the share
        return f"KeyShare(index={self.index}, key={self.public.fingerprint[:16]}...)"


def _random_below(bound: int) -> mpz:
    return mpz(secrets.randbelow(int(bound)))


def _safe_prime(bits: int) -> mpz:
    """A random safe prime ``2 p' + 1`` of exactly ``bits`` bits (two top bits set)."""
    sieve = [int(p) for p in range(3, 5000) if gmpy2.is_prime(p)]
    while True:
        half = mpz(secrets.randbits(bits - 1)) | (mpz(3) << (bits - 3)) | 1
        if any(half % s in (0, (s - 1) // 2) for s in sieve):  # half or 2 half + 1 divisible
            continue
        if gmpy2.is_prime(half, 2) and gmpy2.is_prime(2 * half + 1, 2) \
                and gmpy2.is_prime(half, 40) and gmpy2.is_prime(2 * half + 1, 40):
            return 2 * half + 1


def deal_threshold_key(threshold: int, shares: int, n_bits: int = 2048, *,
                       allow_insecure: bool = False
                       ) -> tuple[ThresholdPublicKey, list[KeyShare]]:
    """The dealer: a fresh threshold key, ``threshold`` of ``shares`` to decrypt.

    Everything from the OS's CSPRNG (``secrets``). The primes, ``m``, ``d`` and the
    polynomial exist only inside this call.

    Parameters
    ----------
    threshold : int
        ``T``, the number of partial decryptions that decrypt (at least 2).
    shares : int
        ``N``, the number of key shares (at most 64).
    n_bits : int
        Bits of the modulus (at least 2048).
    allow_insecure : bool
        Accept smaller moduli (tests of the mechanics only).

    Returns
    -------
    tuple[ThresholdPublicKey, list[KeyShare]]
        The public key and the shares, share ``i`` at position ``i - 1``.
    """
    _check_counts(threshold, shares)
    if not is_int(n_bits) or n_bits % 2 or n_bits < 128:
        raise ValueError(f"n_bits must be an even int >= 128, got {n_bits!r}")
    if n_bits < MIN_KEY_BITS and not allow_insecure:
        raise ValueError(f"a {n_bits}-bit modulus is insecure: use at least {MIN_KEY_BITS}")
    while True:
        p, q = _safe_prime(n_bits // 2), _safe_prime(n_bits // 2)
        if p != q:
            break
    n, m = p * q, ((p - 1) // 2) * ((q - 1) // 2)
    nm, nsquare = n * m, n * n
    d = m * gmpy2.invert(m, n)  # 0 mod m, 1 mod n
    coefficients = [d] + [_random_below(nm) for _ in range(threshold - 1)]
    secrets_ = [sum(a * mpz(i) ** k for k, a in enumerate(coefficients)) % nm
                for i in range(1, shares + 1)]
    delta = math.factorial(shares)
    while True:
        r = _random_below(nsquare)
        if r > 1 and gmpy2.gcd(r, n) == 1:
            break
    v = r * r % nsquare
    while True:
        x = _random_below(n)
        if x > 1 and gmpy2.gcd(x, n) == 1:
            break
    h = (-x * x) % n
    public = ThresholdPublicKey(n, h, threshold, shares, v,
                                tuple(gmpy2.powmod(v, delta * s, nsquare) for s in secrets_),
                                allow_insecure)
    return public, [KeyShare(public, i + 1, s) for i, s in enumerate(secrets_)]


class ThresholdEncryptor:
    """Encryption under a threshold key: ``c = (1 + M n) hs^a mod n^2``, ``a`` of
    ``|n| + 128`` bits (see the module docstring)."""

    def __init__(self, public: ThresholdPublicKey) -> None:
        self.public = self.public_key = public
        self._bits = public.randomizer_bits
        self._window = 8
        self._table = _fixed_base_table(public.hs, public.nsquare, self._bits, self._window)

    def encrypt(self, plaintext: int) -> mpz:
        """Encrypt one integer in ``[0, n)``."""
        return self.encrypt_with(plaintext, secrets.randbits(self._bits))

    def encrypt_with(self, plaintext: int, randomizer: int) -> mpz:
        """Encrypt one integer in ``[0, n)`` with the randomizer exponent ``a`` given
        (``0 <= a < 2^public.randomizer_bits``, uniform for semantic security): for a caller
        that proves knowledge of what it encrypted
        (:class:`strategies.plaintext_proofs.ProvingEncryptor`)."""
        n = self.public.n
        if not is_int(plaintext) or not 0 <= plaintext < n:
            raise ValueError("a plaintext must be an int in [0, n)")
        if not is_int(randomizer) or not 0 <= randomizer < 1 << self._bits:
            raise ValueError(f"a randomizer must be an int of at most {self._bits} bits")
        r = _fixed_base_pow(self._table, randomizer, self.public.nsquare, self._window)
        return (1 + mpz(plaintext) * n) * r % self.public.nsquare

    def encrypt_to_array(self, plaintexts: Sequence[int], *, workers: int | None = 1
                         ) -> np.ndarray:
        """Encrypt into the wire array of :func:`strategies.paillier.ciphertexts_to_array`
        (in this process: ``workers`` is accepted for :class:`~strategies.paillier.Encryptor`'s
        signature)."""
        return ciphertexts_to_array(self.public, [self.encrypt(int(m)) for m in plaintexts])


@dataclass(frozen=True)
class PartialDecryption:
    """Share ``index``'s partial decryptions of a vector of ciphertexts, with one proof
    (``challenge``, ``response``) that all of them are correct."""

    index: int
    values: tuple[mpz, ...]
    challenge: int
    response: int


def _check_ciphertexts(public: ThresholdPublicKey, ciphertexts: Sequence[int]) -> list[mpz]:
    out = []
    for c in ciphertexts:
        c = mpz(c)
        if not 0 < c < public.nsquare or gmpy2.gcd(c, public.n) != 1:
            raise ValueError("a ciphertext is not an element of Z_(n^2)^*")
        out.append(c)
    if not out:
        raise ValueError("no ciphertexts to decrypt")
    return out


def _batched(public: ThresholdPublicKey, context: bytes, index: int,
             ciphertexts: Sequence[mpz], values: Sequence[mpz]) -> tuple[mpz, mpz]:
    """``C^4`` and ``C_i^2`` of the random linear combinations (exponents from a hash of
    everything, so they are fixed only after every value is)."""
    nsquare = public.nsquare
    digest = hashlib.sha256(b"".join(
        int(x).to_bytes(2 * public.n_bytes, "big") for x in (*ciphertexts, *values))).digest()
    rhos = [_hash_int(_BATCH_BITS, b"batch", public.fingerprint, context, index, digest, j)
            for j in range(len(ciphertexts))]
    big_c, big_ci = _multi_pow(ciphertexts, rhos, nsquare), _multi_pow(values, rhos, nsquare)
    return gmpy2.powmod(big_c, 4, nsquare), gmpy2.powmod(big_ci, 2, nsquare)


def _challenge(public: ThresholdPublicKey, context: bytes, index: int, c4, ci2, a, b) -> int:
    return _hash_int(_CHALLENGE_BITS, b"dleq", public.fingerprint, context, index,
                     c4, ci2, public.v, public.verification[index - 1], a, b)


def partial_decrypt(share: KeyShare, ciphertexts: Sequence[int], context: bytes
                    ) -> PartialDecryption:
    """Share ``i``'s partial decryption ``c^(2 Delta s_i) mod n^2`` of each ciphertext,
    and a proof of their correctness bound to ``context``.

    Parameters
    ----------
    share : KeyShare
        This holder's share.
    ciphertexts : Sequence[int]
        What to decrypt (the caller decides it is a legitimate aggregate).
    context : bytes
        What the proof is bound to (e.g. run, round and the aggregate's digest): a
        proof does not verify under another context.
    """
    public = share.public
    cs = _check_ciphertexts(public, ciphertexts)
    nsquare, exponent = public.nsquare, 2 * public.delta * share.secret
    values = tuple(gmpy2.powmod(c, exponent, nsquare) for c in cs)
    c4, ci2 = _batched(public, context, share.index, cs, values)
    witness = public.delta * share.secret
    r = mpz(secrets.randbits(int(witness.bit_length()) + _CHALLENGE_BITS + _STATISTICAL_BITS))
    a, b = gmpy2.powmod(c4, r, nsquare), gmpy2.powmod(public.v, r, nsquare)
    e = _challenge(public, context, share.index, c4, ci2, a, b)
    return PartialDecryption(share.index, values, e, int(r + e * witness))


def verify_partial(public: ThresholdPublicKey, ciphertexts: Sequence[int],
                   partial: PartialDecryption, context: bytes) -> None:
    """Check ``partial`` against ``ciphertexts``, its holder's verification key and
    ``context``.

    Raises
    ------
    InvalidPartial
        Naming the share index, when anything is malformed or the proof fails.
    """
    who = f"partial decryption of share {partial.index!r}"
    if not is_int(partial.index) or not 1 <= partial.index <= public.shares:
        raise InvalidPartial(f"{who}: no such share (1 to {public.shares})")
    try:
        cs = _check_ciphertexts(public, ciphertexts)
        values = _check_ciphertexts(public, partial.values)
    except ValueError as err:
        raise InvalidPartial(f"{who}: {err}") from None
    if len(values) != len(cs):
        raise InvalidPartial(f"{who}: {len(values)} values for {len(cs)} ciphertexts")
    e, z = partial.challenge, partial.response
    if not (is_int(e) and is_int(z) and 0 <= e < 1 << _CHALLENGE_BITS and z >= 0):
        raise InvalidPartial(f"{who}: malformed proof")
    nsquare = public.nsquare
    c4, ci2 = _batched(public, context, partial.index, cs, values)
    try:
        a = gmpy2.powmod(c4, z, nsquare) * gmpy2.invert(gmpy2.powmod(ci2, e, nsquare),
                                                       nsquare) % nsquare
        b = gmpy2.powmod(public.v, z, nsquare) * gmpy2.invert(
            gmpy2.powmod(public.verification[partial.index - 1], e, nsquare), nsquare) % nsquare
    except ZeroDivisionError:
        raise InvalidPartial(f"{who}: malformed values") from None
    if _challenge(public, context, partial.index, c4, ci2, a, b) != e:
        raise InvalidPartial(f"{who}: the proof of correct decryption does not verify")


def _lagrange(indices: Sequence[int], delta: int) -> dict[int, int]:
    """``lambda_i = Delta prod_(j != i) j / (j - i)``: integers, since ``Delta = N!``."""
    out = {}
    for i in indices:
        value = Fraction(delta)
        for j in indices:
            if j != i:
                value *= Fraction(j, j - i)
        if value.denominator != 1:  # N! clears every denominator of indices <= N
            raise ValueError(f"share indices {sorted(indices)} exceed the key's share count")
        out[i] = int(value)
    return out


def combine(public: ThresholdPublicKey, ciphertexts: Sequence[int],
            partials: Sequence[PartialDecryption], context: bytes
            ) -> tuple[list[int], list[int]]:
    """The plaintexts of ``ciphertexts`` from ``threshold`` verified partials.

    Every partial is verified; one that fails is left out, and the first
    ``threshold`` good ones from different shares decrypt.

    Returns
    -------
    tuple[list[int], list[int]]
        The plaintexts, and the indices of the partials left out as invalid.

    Raises
    ------
    ValueError
        When fewer than ``threshold`` good partials from different shares remain.
    """
    good: dict[int, PartialDecryption] = {}
    bad: list[int] = []
    for partial in partials:
        if partial.index in good:
            continue
        try:
            verify_partial(public, ciphertexts, partial, context)
        except InvalidPartial:
            bad.append(partial.index)
            continue
        good[partial.index] = partial
        if len(good) == public.threshold:
            break
    if len(good) < public.threshold:
        raise ValueError(f"{len(good)} valid partial decryptions from different shares, "
                         f"{public.threshold} needed (left out as invalid: {bad or 'none'})")
    n, nsquare = public.n, public.nsquare
    lambdas = _lagrange(sorted(good), public.delta)
    unscale = gmpy2.invert(4 * mpz(public.delta) ** 2, n)
    plaintexts = []
    for j in range(len(ciphertexts)):
        acc = mpz(1)
        for i, lam in lambdas.items():
            base = good[i].values[j]
            if lam < 0:
                base, lam = gmpy2.invert(base, nsquare), -lam
            acc = acc * gmpy2.powmod(base, 2 * lam, nsquare) % nsquare
        plaintexts.append(int((acc - 1) // n * unscale % n))
    return plaintexts, bad
