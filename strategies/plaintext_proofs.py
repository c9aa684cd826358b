"""Proofs that whoever made a vector of threshold-Paillier ciphertexts knows what they
encrypt (Flower-free).

Why threshold mode needs them. The server holds every contribution's ciphertexts, and
Paillier is malleable: from honest contributions ``E(x_1) ... E(x_k)`` anyone computes
``E(-x_2 - ... - x_k)`` without a key. A client colluding with the server could sign
that as its own contribution; the view ``{1, ..., k, colluder}`` then adds up to
``x_1`` plus what the colluder knows, so the decryptors would decrypt one honest
update. Signatures and tags do not stop it (the colluder signs its own contribution
and, holding the group key, tags it). What stops it is that a contributor must prove
it knows the plaintexts of the ciphertexts it signs, which a ciphertext derived from
someone else's does not allow: then every decrypted aggregate is a sum of plaintexts
each known to the party that signed them, and an honest contributor's is its update.

The proof. A ciphertext under the threshold key (:mod:`strategies.threshold_paillier`)
is ``c_j = (1 + n)^(m_j) hs^(a_j) mod n^2``. The prover shows it knows ``m_j`` for
every ``j`` at once, by the Sigma protocol for knowledge of a Paillier plaintext
(Cramer, Damgard and Nielsen, "Multiparty Computation from Threshold Homomorphic
Encryption", EUROCRYPT 2001; Damgard and Jurik, PKC 2001, §5) applied to a random
linear combination ``C = prod c_j^(rho_j)`` with 128-bit ``rho_j`` drawn from a hash
of every ciphertext and the caller's context (batching as in Bellare, Garay and Rabin,
EUROCRYPT 1998, and for proofs of knowledge Gennaro, Leigh, Sundaram and Yerazunis,
ASIACRYPT 2004), made non-interactive by Fiat-Shamir (SHA-256):

* commitment ``A = (1 + n)^u hs^w``, ``u`` uniform mod ``n``, ``w`` uniform of
  ``|a| + 128 + 128 + log2(k) + 128`` bits;
* challenge ``e``, 128 bits from a hash of the context, the ciphertexts and ``A``;
* responses ``z_m = u + e sum_j rho_j m_j mod n`` and ``z_a = w + e sum_j rho_j a_j``
  (an integer);
* the verifier checks ``(1 + z_m n) hs^(z_a) = A C^e (mod n^2)``.

Soundness: two accepting answers for one ``A`` and challenges ``e != e'`` give
``(1 + n)^(z_m - z_m') hs^(z_a - z_a') = C^(e - e')``; raising both sides to
``phi(n)`` removes ``hs`` (``hs = h^n`` and ``h^phi(n) = 1 mod n``), so the plaintext
of ``C`` is ``(z_m - z_m') / (e - e') mod n``: ``e - e'`` is below ``2^128`` and ``n``
has no factor that small. So a prover that answers knows ``sum_j rho_j m_j``; as the
``rho_j`` are fixed only after the ciphertexts, answering for most of them means
knowing every ``m_j``. A row built from a ciphertext the prover cannot decrypt enters
``C`` with a random 128-bit coefficient, so its proof fails except with probability
about ``2^-128``. Zero knowledge: ``z_m`` is uniform mod ``n`` and ``z_a`` is within
statistical distance ``2^-128`` of uniform on its range, so the proof tells nothing
about the plaintexts (a contributor's noise for distributed DP included).

Costs: the prover one exponentiation (``hs^w``) and ``k`` products; the verifier a
``k``-base multi-exponentiation with 128-bit exponents (Pippenger's buckets,
:func:`strategies.paillier._multi_pow`) and two exponentiations.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import gmpy2
import numpy as np
from gmpy2 import mpz

from .checks import is_int
from .paillier import _hex, _multi_pow, ciphertexts_from_array, ciphertexts_to_array
from .threshold_paillier import (ThresholdEncryptor, ThresholdPublicKey, _check_ciphertexts,
                                 _hash_int)

__all__ = ["PlaintextProof", "InvalidProof", "ProvingEncryptor", "prove_plaintexts",
           "verify_plaintexts"]

_RHO_BITS = 128
_CHALLENGE_BITS = 128
_STATISTICAL_BITS = 128
_MAX_TEXT = 1 << 16


class InvalidProof(ValueError):
    """A proof of plaintext knowledge that is malformed or does not verify."""


@dataclass(frozen=True)
class PlaintextProof:
    """A proof of knowledge of the plaintexts of a vector of ciphertexts: the commitment
    ``A`` and the responses ``z_m`` (mod ``n``) and ``z_a`` (see the module docstring)."""

    commitment: int
    z_message: int
    z_random: int

    def to_text(self) -> str:
        """The proof as it travels: JSON of hex integers."""
        return json.dumps({"A": _hex(self.commitment), "zm": _hex(self.z_message),
                           "za": _hex(self.z_random)}, sort_keys=True)

    @classmethod
    def from_text(cls, text: object) -> PlaintextProof:
        """Inverse of :meth:`to_text`; :class:`InvalidProof` naming what is malformed."""
        if not isinstance(text, str) or len(text) > _MAX_TEXT:
            raise InvalidProof(f"a proof of plaintext knowledge is a JSON text of at most "
                               f"{_MAX_TEXT} characters")
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or set(data) != {"A", "zm", "za"}:
                raise ValueError("expected the keys A, zm and za")
            return cls(*(int(str(data[k]), 16) for k in ("A", "zm", "za")))
        except ValueError as err:
            raise InvalidProof(f"malformed proof of plaintext knowledge: {err}") from None


def _combination(public: ThresholdPublicKey, ciphertexts: Sequence[mpz], context: bytes
                 ) -> tuple[bytes, list[int]]:
    """A digest of the statement and the ``rho_j``, fixed by every ciphertext."""
    width = public.ciphertext_bytes
    digest = hashlib.sha256(b"".join(int(c).to_bytes(width, "big") for c in ciphertexts))
    statement = hashlib.sha256(b"fedapp plaintext proof v1\x00" + context + digest.digest()
                               + public.fingerprint.encode()).digest()
    return statement, [_hash_int(_RHO_BITS, b"rho", statement, j)
                       for j in range(len(ciphertexts))]


def _mask_bits(public: ThresholdPublicKey, count: int) -> int:
    return (public.randomizer_bits + _RHO_BITS + int(count).bit_length() + _CHALLENGE_BITS
            + _STATISTICAL_BITS)


def _challenge(statement: bytes, commitment: int) -> int:
    return _hash_int(_CHALLENGE_BITS, b"challenge", statement, commitment)


def prove_plaintexts(public: ThresholdPublicKey, plaintexts: Sequence[int],
                     randomizers: Sequence[int], ciphertexts: Sequence[int], context: bytes
                     ) -> PlaintextProof:
    """A proof, bound to ``context``, that the prover knows the plaintexts of
    ``ciphertexts``, where ``ciphertexts[j]`` encrypts ``plaintexts[j]`` with the
    randomizer exponent ``randomizers[j]``
    (:meth:`strategies.threshold_paillier.ThresholdEncryptor.encrypt_with`)."""
    cs = _check_ciphertexts(public, ciphertexts)
    if not len(plaintexts) == len(randomizers) == len(cs):
        raise ValueError("one plaintext and one randomizer per ciphertext")
    n, nsquare = public.n, public.nsquare
    statement, rhos = _combination(public, cs, context)
    message = sum(mpz(r) * m for r, m in zip(rhos, plaintexts)) % n
    random = sum(mpz(r) * a for r, a in zip(rhos, randomizers))
    u, w = mpz(secrets.randbelow(int(n))), mpz(secrets.randbits(_mask_bits(public, len(cs))))
    commitment = (1 + u * n) * gmpy2.powmod(public.hs, w, nsquare) % nsquare
    e = _challenge(statement, commitment)
    return PlaintextProof(int(commitment), int((u + e * message) % n), int(w + e * random))


def verify_plaintexts(public: ThresholdPublicKey, ciphertexts: Sequence[int],
                      proof: PlaintextProof, context: bytes) -> None:
    """Check ``proof`` for ``ciphertexts`` and ``context``.

    Raises
    ------
    InvalidProof
        If the proof is malformed or does not verify: whoever made the ciphertexts did
        not show it knows their plaintexts.
    """
    try:
        cs = _check_ciphertexts(public, ciphertexts)
    except ValueError as err:
        raise InvalidProof(str(err)) from None
    n, nsquare = public.n, public.nsquare
    a, zm, za = proof.commitment, proof.z_message, proof.z_random
    if not (is_int(a) and is_int(zm) and is_int(za)) or not 0 <= zm < n \
            or not 0 <= za < 1 << (_mask_bits(public, len(cs)) + 1) \
            or not 0 < a < nsquare or gmpy2.gcd(a, n) != 1:
        raise InvalidProof("a proof of plaintext knowledge with values out of range")
    statement, rhos = _combination(public, cs, context)
    e = _challenge(statement, a)
    left = (1 + mpz(zm) * n) * gmpy2.powmod(public.hs, za, nsquare) % nsquare
    right = mpz(a) * gmpy2.powmod(_multi_pow(cs, rhos, nsquare), e, nsquare) % nsquare
    if left != right:
        raise InvalidProof("the proof that the sender knows its plaintexts does not verify")


class ProvingEncryptor:
    """Encrypts like a :class:`~strategies.threshold_paillier.ThresholdEncryptor` and
    keeps each plaintext and randomizer, so the caller can then :meth:`prove` it knows
    what it encrypted. One per contribution; it holds the plaintexts, so it is dropped
    after the proof."""

    def __init__(self, encryptor: ThresholdEncryptor) -> None:
        self.encryptor, self.public_key = encryptor, encryptor.public
        self.plaintexts: list[int] = []
        self.randomizers: list[int] = []
        self.ciphertexts: list[mpz] = []

    def encrypt_to_array(self, plaintexts: Sequence[int], *, workers: int | None = 1
                         ) -> np.ndarray:
        """Encrypt and remember, as
        :meth:`~strategies.threshold_paillier.ThresholdEncryptor.encrypt_to_array`."""
        bits = self.public_key.randomizer_bits
        for m in plaintexts:
            a = secrets.randbits(bits)
            self.plaintexts.append(int(m))
            self.randomizers.append(a)
            self.ciphertexts.append(self.encryptor.encrypt_with(int(m), a))
        return ciphertexts_to_array(self.public_key, self.ciphertexts)

    def prove(self, ciphertexts: np.ndarray, context: bytes) -> PlaintextProof:
        """The proof for the wire array this encryptor made (all it encrypted)."""
        if ciphertexts_from_array(self.public_key, ciphertexts) != self.ciphertexts:
            raise ValueError("these are not the ciphertexts this encryptor made")
        return prove_plaintexts(self.public_key, self.plaintexts, self.randomizers,
                                self.ciphertexts, context)
