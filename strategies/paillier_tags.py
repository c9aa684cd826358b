"""Authenticated Paillier aggregates: a linear MAC only the key holders can make or check
(Flower-free).

The server holds the public key, so it can encrypt anything and combine ciphertexts
at will: ``C_v * Enc(d)`` decrypts to ``P_v + d``. Without a check, a key holder
asked to decrypt "the global model" would decrypt whatever the server built, one
client's update included, and whether decoding then fails (a slot past its range)
tells the server one bit about that update per message: a decryption oracle.

Each client therefore sends, beside its packed plaintexts ``P_1..P_m``, one more
ciphertext holding the tag

    t = sum_k alpha_k P_k + beta(node, weight)   (mod n)

where ``alpha_k`` and ``beta`` are pseudorandom functions, keyed by a secret the
key holders derive from the private key, of the round's context (run, round, key,
encoding and layout) and, for ``beta``, of the node and its weight. Tags add up
with the plaintexts, so an honest aggregate of the nodes ``S`` carries
``T = sum_k alpha_k sum_S P_k + sum_S beta``. A key holder decrypts everything and
compares ``T`` with the value it computes for the contributors the header names;
only then does it decode (and any failure after decryption is one fixed answer).

Why the server cannot pass the check with anything but an honest aggregate of this
round's contributions, listed as they are (the argument of a linear one-time MAC,
as in SPDZ's MACs, Damgard et al. CRYPTO 2012): everything the server can build
from ciphertexts is an affine combination, ``P' = sum_i c_i P_i + d`` and
``T' = sum_i c_i t_i + e``. It passes iff ``sum_k alpha_k d_k = sum_i c_i beta_i + e
- sum_S beta``. Ciphertexts hide ``alpha`` and ``beta`` (semantic security), so
for ``d != 0`` the left side is a fresh uniform value mod ``n`` (each ``alpha_k``
is uniform and unknown): the check fails but with probability about ``1/p``. For
``d = 0`` the server must hit the unknown sum ``sum_S beta``, and ``beta`` is a PRF
of (context, node, weight): only ``c_i = 1`` for exactly the listed contributions
of this round works. So contributions cannot be replayed into another round or
run, claimed under another node or weight, dropped silently, counted twice or
shifted. Whether a tag check fails does not depend on the plaintexts, so a refusal
tells the server nothing.

What it does not give: the key holders all derive the same tag key, so a client
colluding with the server can forge tags (it can decrypt every update anyway with
the shared private key; threshold keys are the fix for both). Noise the server adds
for central DP is a term ``d`` no key holder can check; nodes accept it only when
their own settings say so (:mod:`strategies.paillier_node`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

from gmpy2 import mpz

__all__ = ["TagKey", "round_context"]

_INFO = b"fedapp paillier aggregate tag v1"
_EXTRA_BYTES = 16  # PRF output beyond the modulus: reducing mod n leaves a bias below 2^-128


def round_context(run: int, server_round: int, fingerprint: str, encoding: Mapping,
                  layout: object) -> bytes:
    """SHA-256 of what binds a contribution: run, round, key, encoding and layout."""
    data = {"run": run, "round": server_round, "fingerprint": fingerprint,
            "encoding": dict(encoding), "layout": layout}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).digest()


class TagKey:
    """The tag key of a federation's Paillier key holders.

    Parameters
    ----------
    secret
        32 secret bytes; :meth:`from_private_key` derives them from the private key
        every key holder has, so no new key file is needed.
    modulus
        The public modulus ``n``: tags live in ``Z_n``, as plaintexts do.
    """

    def __init__(self, secret: bytes, modulus: int) -> None:
        if len(secret) != 32:
            raise ValueError("a tag key has 32 bytes")
        self._secret = secret
        self.modulus = mpz(modulus)
        self._width = (int(modulus).bit_length() + 7) // 8 + _EXTRA_BYTES

    @classmethod
    def from_private_key(cls, key) -> TagKey:
        """HMAC-SHA256 of the private primes (sorted) under a fixed label."""
        p, q = sorted((int(key.p), int(key.q)))
        width = (max(p, q).bit_length() + 7) // 8
        material = p.to_bytes(width, "big") + q.to_bytes(width, "big")
        return cls(hmac.new(_INFO, material, hashlib.sha256).digest(), p * q)

    def __repr__(self) -> str:  # never print the secret
        return f"TagKey(modulus of {int(self.modulus).bit_length()} bits)"

    def _prf(self, label: bytes, data: bytes, count: int) -> list[mpz]:
        """``count`` values uniform in ``Z_n`` (SHAKE-256 keyed by prefix, a PRF)."""
        stream = hashlib.shake_256(self._secret + label + data).digest(count * self._width)
        w, n = self._width, self.modulus
        return [mpz(int.from_bytes(stream[i * w:(i + 1) * w], "big")) % n
                for i in range(count)]

    def _beta(self, context: bytes, node: int, weight: int) -> mpz:
        return self._prf(b"beta", context + node.to_bytes(8, "big")
                         + weight.to_bytes(8, "big"), 1)[0]

    def _weighted_sum(self, plaintexts: Sequence[int], context: bytes) -> mpz:
        alphas = self._prf(b"alpha", context, len(plaintexts))
        total = mpz(0)
        for a, p in zip(alphas, plaintexts, strict=True):
            total += a * mpz(p)
        return total

    def tag(self, plaintexts: Sequence[int], context: bytes, node: int, weight: int) -> int:
        """The tag of one node's packed plaintexts for the round of ``context``."""
        return int((self._weighted_sum(plaintexts, context)
                    + self._beta(context, node, weight)) % self.modulus)

    def verify(self, plaintexts: Sequence[int], tag: int, context: bytes,
               contributors: Mapping[int, int]) -> bool:
        """Whether ``tag`` is the tag of an aggregate of exactly ``contributors``
        (node -> weight), each counted once, for the round of ``context``."""
        expected = self._weighted_sum(plaintexts, context)
        for node, weight in contributors.items():
            expected += self._beta(context, node, weight)
        return int(expected % self.modulus) == int(tag) % int(self.modulus)
