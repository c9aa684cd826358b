"""Per-node identity keys for masked secure aggregation, and the roster (Flower-free).

Bonawitz et al. (CCS 2017) secure masking against an actively malicious server with a
PKI: each node signs its key advertisement and its consistency-check answer with a
long-term signing key, and every node knows the others' public keys. With one key
shared by the federation (an HMAC key), any client could speak for any other, so a
client colluding with the server could forge the consistency check and the server
could unmask a node again (issue 14).

Here each node holds an Ed25519 key (RFC 8032, from ``cryptography``) of its own; the
**roster** is the list of the federation's public identity keys, made at setup and
given to every node (``fedapp keygen --secagg`` on each node, ``fedapp roster`` to
collect the public keys; ``fedapp keygen --secagg --simulation N`` for simulations).
A node accepts a neighbor's keys only if they are signed by a roster key that no other
neighbor of the round uses, and counts a consistency signature only under the key
that signed that neighbor's advertisement: no node, and not the server, can speak for
another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (Ed25519PrivateKey,
                                                               Ed25519PublicKey)

KEY_BYTES = 32
SIGNATURE_BYTES = 64
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class IdentityError(ValueError):
    """An identity key or roster that fails a check (the message says which)."""


@dataclass(frozen=True)
class Identity:
    """A node's Ed25519 signing key (32 private bytes): never leaves the node."""

    private: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.private, bytes) or len(self.private) != KEY_BYTES:
            raise IdentityError(f"an identity key has {KEY_BYTES} bytes")

    @staticmethod
    def generate() -> Identity:
        return Identity(Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))

    @property
    def public(self) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).public_key().public_bytes(*_RAW)

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(message)

    def __repr__(self) -> str:  # never print the private key
        return f"Identity(public={self.public.hex()[:16]}...)"


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public``'s Ed25519 signature of ``message``."""
    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Roster:
    """The federation's public identity keys."""

    keys: frozenset[bytes]

    @staticmethod
    def of(keys: Iterable[bytes]) -> Roster:
        """A roster of distinct 32-byte public keys.

        Raises
        ------
        IdentityError
            If a key has the wrong length, one appears twice or there is none.
        """
        keys = list(keys)
        if not keys or any(not isinstance(k, bytes) or len(k) != KEY_BYTES for k in keys):
            raise IdentityError(f"a roster holds one or more {KEY_BYTES}-byte public keys")
        if len(set(keys)) != len(keys):
            raise IdentityError("a roster lists a public key twice: each node needs its own")
        for key in keys:
            try:
                Ed25519PublicKey.from_public_bytes(key)
            except ValueError:
                raise IdentityError(f"{key.hex()} is not an Ed25519 public key") from None
        return Roster(frozenset(keys))

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"Roster({len(self.keys)} keys)"


@dataclass(frozen=True)
class NodeIdentity:
    """What a node signs with and checks against: its own key and the roster (which
    must list it)."""

    key: Identity
    roster: Roster

    def __post_init__(self) -> None:
        if self.key.public not in self.roster:
            raise IdentityError("this node's identity key is not in the roster: add its public "
                                "key (fedapp roster) and give every node the new roster")
