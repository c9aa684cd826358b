"""Weighted FedAvg under a threshold Paillier key, Flower-free: what a contributor
signs, the view every contributor signs once a round, what a decryptor checks before
its partial decryption, and how one combiner turns ``T`` partials into the model,
sealed so that only the clients can read it.

The roles, each round (:mod:`strategies.threshold_message` moves them over Flower):

1. **Contributors** encrypt their weighted update under the threshold public key
   (:func:`strategies.paillier_protocol.encrypt_update`, tags keyed by the group
   key), prove that they know what it encrypts (:mod:`strategies.plaintext_proofs`)
   and sign its digest and the proof with their Ed25519 identity key
   (:mod:`strategies.secagg_identity`): a :class:`Contribution`.
2. **View.** The server lists the contributions it will add up, as ``(node,
   identity, digest)``: a :class:`View`. Every contributor in it signs it
   (:func:`sign_view`) after checking that its own contribution is listed, that the
   view is large enough and that it has signed no other view of this round.
3. **Decryptors** (``T`` or a few more of the key-share holders) receive the view,
   its signatures and every contribution; :func:`check_request` verifies all of it
   and recomputes the aggregate itself; :func:`decrypt_share` then returns the
   partial decryption with its proof (:mod:`strategies.threshold_paillier`), sealed
   under the **group key**: a 32-byte key every client holds and the server does
   not (AES-256-GCM, subkeys by HKDF-SHA256, the round bound as associated data).
4. **One combiner** (a decryptor) opens the partials, verifies their proofs, combines
   ``T`` good ones, checks the tag, decodes the average and seals it under the group
   key (:func:`combine_sealed`). The server relays the sealed model; each client opens
   it with one AES pass (:func:`open_model`) instead of decrypting the aggregate.

Why the server cannot get less than an aggregate of several honest clients decrypted
(the argument the decryptors' checks implement). The server, colluding with at most
``c <= T - 1`` clients (fewer than ``T`` shares, so no decryption without honest
decryptors), asks honest decryptors to decrypt. A decryptor decrypts only the product
of contributions each signed, for this run and round, by a distinct roster identity
that also signed the view listing exactly these contributions, each with a valid proof
that its signer knows its plaintexts, and only views of at least ``max(min_contributors,
T + 1)`` entries. Identities cannot be forged, so each honest contributor appears with
its one contribution; an honest contributor signs one view per round, so two decrypted
aggregates of a round cannot share an honest contributor, and no difference of two
aggregates isolates one; every decrypted aggregate holds at least ``T + 1 - c >= 2``
honest contributions. The colluders' contributions are plaintexts known to them: without
the proofs, a colluder could sign the honest contributions' ciphertexts inverted
(Paillier is malleable) and cancel all honest updates but one; a proof for such a
ciphertext needs the honest plaintexts. So the server learns sums of two or more honest
updates, never one. The server alone cannot open the partials (group key), so it
learns no aggregate at all. A client colluding with the server can (every client
learns the aggregate); that is the price of the group key and no more.

Masked payload (:mod:`strategies.ring_masks`; the strategies' default). A contribution's
ciphertexts then encrypt its fresh ring secret (and its metric sums and tag), and its
masked levels travel beside them, covered by its digest, hence by its signature, the view
and the partials' context. The argument above holds with "secret" for "update": the
decryptors decrypt only the sum ``S`` of the view's secrets, each proven known to its
signer, and ``S`` unmasks only the sum of the view's masked vectors. A masked vector that
a colluder or the server shifts by anything built from the honest ones still carries the
honest secrets' masks that ``S`` does not remove, so nothing isolates one update (and the
combiner's bound check refuses it). The decryptors see only ciphertexts and masked
vectors; the combiner sees the aggregate, as before.

Distributed DP (``dp-mode = "distributed"``). Each contributor adds its share of
discrete Gaussian noise to its levels before encrypting and names it in its header
(:class:`strategies.paillier_protocol.ClientNoise`: std, quorum ``k``, clip); the
header is inside the digest it signs and the noise inside the plaintexts its tag
covers. A decryptor (:func:`check_request`) and the combiner (:func:`combine_sealed`)
go on only if every contribution declares the same noise, the aggregate has at least
``k`` contributors (so it carries at least the mechanism's noise), no noise offset
beyond the contributors' own, and a multiplier at or above the node's own
``dp-min-noise-multiplier`` (:func:`check_noise`). The server cannot strip or shrink
the noise (it would change a signed digest, and the tag), lower the quorum (the same),
or pass off a partial sum (fewer than ``k`` contributions are refused; a subset of a
signed view is not what its contributors signed).

Central DP (server noise, :class:`ServerNoise`). A ciphertext the server adds as
"noise" could be ``E(-sum of the others)``, computed from their ciphertexts, which would
leave one client's update decrypted. So the server proves it knows the plaintexts of its
noise, bound to the view and the offset, as contributors do theirs
(:mod:`strategies.plaintext_proofs`); every decrypted aggregate is then the view's honest
and colluding contributions plus a value the server knows, and the argument above holds.
A node adds server noise only with its ``paillier-accept-server-noise``, as under the
single key: it cannot check the noise's size, so the server can shift the model and learn
whether decoding succeeds (one bit of the aggregate per round), never an update.

Replays: contributions, views and partials bind the run and the round; a
contribution of another round or run, or a view signed for another, is refused.
Decryptors also remember the view they decrypted for each round and decrypt no other
(they repeat the same one if asked again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import struct
from collections.abc import Mapping, MutableMapping
import dataclasses
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from gmpy2 import mpz

from .aggregation import InvalidUpdate, Layout
from .checks import is_int
from .encoding import encode_noise
from .paillier import aggregate_arrays, ciphertexts_from_array
from .paillier_protocol import EncryptedModel, aggregate, payload, read_aggregate
from .paillier_tags import TagKey
from .plaintext_proofs import InvalidProof, PlaintextProof, ProvingEncryptor, verify_plaintexts
from .secagg_identity import NodeIdentity, Roster, verify
from .threshold_paillier import (KeyShare, PartialDecryption, ThresholdEncryptor,
                                 ThresholdPublicKey, combine, partial_decrypt)

__all__ = ["GroupKey", "SealError", "View", "ThresholdRefused", "Contribution",
           "proof_context", "ServerNoise", "add_server_noise",
           "sign_view", "DecryptRequest", "check_request", "check_noise", "decrypt_share",
           "combine_sealed", "seal_model", "open_model", "SEALED_KEY", "SEALED_HEADER_KEY"]

GROUP_KEY_BYTES = 32
SEALED_KEY = "threshold-sealed-model"
SEALED_HEADER_KEY = "threshold-sealed-header"
MAX_SEALED_HEADER_BYTES = 1 << 20
_GROUP_TYPE = "fedapp-paillier-group-key"
_NONCE_BYTES = 12
_SERVER_NOISE_REFUSED = ("the aggregate carries noise the server added (central DP), which "
                         "this node accepts only with paillier-accept-server-noise = true "
                         "(docs/threat-model.md)")


class SealError(ValueError):
    """A sealed value that does not open: another group key, another round, or altered."""


class ThresholdRefused(ValueError):
    """A client refuses a view or a decryption request; the message says why and holds
    nothing secret (every check is on public values and signatures), so the mods pass it
    to the server."""


@dataclass(frozen=True)
class GroupKey:
    """The clients' shared symmetric key for one Paillier key (``fingerprint``): it
    seals the partial decryptions and the decrypted model, and keys the threshold mode's
    tags. Every client holds it; the server never does (``fedapp keygen --threshold``
    writes it beside the shares; in the single-holder mode every key holder derives it,
    :meth:`of_private_key`)."""

    secret: bytes
    fingerprint: str

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != GROUP_KEY_BYTES:
            raise ValueError(f"a group key has {GROUP_KEY_BYTES} bytes")

    @staticmethod
    def generate(fingerprint: str) -> GroupKey:
        return GroupKey(os.urandom(GROUP_KEY_BYTES), fingerprint)

    def _derive(self, purpose: str) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt=None,
                    info=f"fedapp threshold group key v1/{purpose}/{self.fingerprint}".encode()
                    ).derive(self.secret)

    def seal(self, purpose: str, context: bytes, data: bytes) -> bytes:
        """AES-256-GCM of ``data`` under the subkey for ``purpose``, ``context`` as
        associated data: a random 96-bit nonce, then the ciphertext and its tag."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + AESGCM(self._derive(purpose)).encrypt(nonce, data, context)

    def open(self, purpose: str, context: bytes, sealed: bytes) -> bytes:
        """Inverse of :meth:`seal`; :class:`SealError` unless ``sealed`` was made by
        this key for this purpose and context, unaltered."""
        if len(sealed) < _NONCE_BYTES + 16:
            raise SealError(f"the sealed {purpose} is truncated")
        try:
            return AESGCM(self._derive(purpose)).decrypt(sealed[:_NONCE_BYTES],
                                                         sealed[_NONCE_BYTES:], context)
        except InvalidTag:
            raise SealError(f"the sealed {purpose} does not open under this federation's "
                            "group key for this run and round (another key, another round, "
                            "or altered)") from None

    @staticmethod
    def of_private_key(key) -> GroupKey:
        """The single-holder mode's group key: every key holder derives the same one from
        the Paillier private key (HMAC-SHA256 of its primes), and the server cannot."""
        p, q = sorted((int(key.p), int(key.q)))
        width = (q.bit_length() + 7) // 8
        secret = hmac.new(b"fedapp paillier group key v1",
                          p.to_bytes(width, "big") + q.to_bytes(width, "big"),
                          hashlib.sha256).digest()
        return GroupKey(secret, key.fingerprint)

    def tag_key(self, modulus: int) -> TagKey:
        """The key of the aggregate tags (:mod:`strategies.paillier_tags`)."""
        return TagKey(self._derive("tags"), modulus)

    def to_dict(self) -> dict:
        return {"type": _GROUP_TYPE, "version": 1, "key": self.secret.hex(),
                "public-key-fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> GroupKey:
        if not isinstance(data, Mapping) or data.get("type") != _GROUP_TYPE \
                or data.get("version") != 1:
            raise ValueError(f"not a {_GROUP_TYPE} of version 1")
        try:
            secret = bytes.fromhex(str(data["key"]))
            return cls(secret, str(data["public-key-fingerprint"]))
        except (KeyError, ValueError):
            raise ValueError(f"a malformed {_GROUP_TYPE}: expected 'key' (64 hex digits) and "
                             "'public-key-fingerprint'") from None

    def __repr__(self) -> str:  # never print the secret
        return f"GroupKey(for {self.fingerprint[:16]}...)"


def proof_context(model: EncryptedModel) -> bytes:
    """What a contribution's proof of plaintext knowledge is bound to: the update's
    digest, which covers the run, round, key, encoding, layout, its node id and weight,
    and every ciphertext (so a proof cannot be moved to another node or round)."""
    return b"fedapp threshold contribution proof v1\x00" + bytes.fromhex(model.digest())


@dataclass(frozen=True)
class Contribution:
    """One contributor's update, its proof that it knows what the update encrypts
    (:mod:`strategies.plaintext_proofs`) and its Ed25519 signature of both."""

    model: EncryptedModel
    proof: PlaintextProof
    signature: bytes

    @staticmethod
    def make(model: EncryptedModel, prover: ProvingEncryptor, identity: NodeIdentity
             ) -> Contribution:
        """A contributor's signed contribution of ``model``, which ``prover`` encrypted."""
        proof = prover.prove(model.ciphertexts, proof_context(model))
        return Contribution(model, proof, identity.key.sign(_statement(model, proof)))

    def fault(self, public: ThresholdPublicKey, identity: bytes) -> str | None:
        """Why this contribution is not ``identity``'s, or not one its signer knows the
        plaintexts of; ``None`` if it is."""
        if not verify(identity, _statement(self.model, self.proof), self.signature):
            return "it is not the one its identity signed (the signature does not verify)"
        try:
            verify_plaintexts(public, ciphertexts_from_array(public, self.model.ciphertexts),
                              self.proof, proof_context(self.model))
        except InvalidProof as err:
            return (f"{err}: a ciphertext derived from other clients' could isolate one "
                    "update, so none is added without this proof")
        return None


def _statement(model: EncryptedModel, proof: PlaintextProof) -> bytes:
    """What a contributor signs: its update's digest and its proof."""
    return (b"fedapp threshold contribution v2\x00" + bytes.fromhex(model.digest())
            + proof.to_text().encode())


@dataclass(frozen=True)
class View:
    """The contributions the server will add up in one round: ``entries`` of ``(node,
    identity public key, contribution digest)``, sorted by node."""

    run: int
    server_round: int
    fingerprint: str
    entries: tuple[tuple[int, bytes, str], ...]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def statement(self) -> bytes:
        """What each contributor signs."""
        return b"fedapp threshold view v1\x00" + bytes.fromhex(self.digest())

    def to_dict(self) -> dict:
        return {"run": self.run, "round": self.server_round, "fingerprint": self.fingerprint,
                "entries": [[node, key.hex(), digest] for node, key, digest in self.entries]}

    @classmethod
    def from_dict(cls, data: object) -> View:
        """Parse a view that arrived over the network (``ValueError`` naming the fault)."""
        try:
            if not isinstance(data, dict) or set(data) != {"run", "round", "fingerprint",
                                                            "entries"}:
                raise ValueError("expected run, round, fingerprint and entries")
            entries = []
            for node, key, digest in data["entries"]:
                key = bytes.fromhex(key)
                if not is_int(node) or not 0 <= node < 2**64 or len(key) != 32 \
                        or len(bytes.fromhex(digest)) != 32:
                    raise ValueError("an entry is not (node id, 32-byte key, SHA-256 digest)")
                entries.append((node, key, digest))
            for name in ("run", "round"):
                if not is_int(data[name]) or not 0 <= data[name] < 2**64:
                    raise ValueError(f"{name} must be an unsigned 64-bit int")
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed view: {err}") from None
        if [e[0] for e in entries] != sorted({e[0] for e in entries}):
            raise ValueError("malformed view: entries must be sorted by node, each node once")
        return cls(data["run"], data["round"], str(data["fingerprint"]), tuple(entries))


def _check_view(view: View, roster: Roster, minimum: int, threshold: int) -> None:
    needed = max(minimum, threshold + 1)
    if len(view.entries) < needed:
        raise ThresholdRefused(
            f"the view lists {len(view.entries)} contributions, this node decrypts "
            f"aggregates of at least {needed} (its paillier-min-contributors and the key's "
            f"threshold {threshold} + 1, so that T - 1 colluders leave two honest updates)")
    keys = [key for _, key, _ in view.entries]
    if len(set(keys)) != len(keys):
        raise ThresholdRefused("the view lists one identity for two contributions")
    if any(key not in roster for key in keys):
        raise ThresholdRefused("the view lists an identity outside the federation's roster")


def sign_view(view: View, identity: NodeIdentity, own: Mapping[str, object],
              signed: MutableMapping[str, str], *, minimum: int, threshold: int) -> bytes:
    """A contributor's signature of ``view``, after its checks.

    Parameters
    ----------
    own : Mapping
        What this node contributed (``run``, ``round``, ``digest``), kept in its state.
    signed : MutableMapping
        This node's record of the view it signed per ``run:round``; updated.
    minimum, threshold : int
        The node's ``paillier-min-contributors`` and the key's ``T``.

    Raises
    ------
    ThresholdRefused
        If the view is of another round, omits or alters this node's contribution, is
        too small, repeats or invents an identity, or differs from the view this node
        already signed for the round.
    """
    if (view.run, view.server_round) != (own.get("run"), own.get("round")):
        raise ThresholdRefused(f"the view is for run {view.run} round {view.server_round}, "
                               "this node contributed to no such round")
    mine = [e for e in view.entries if e[1] == identity.key.public]
    if len(mine) != 1 or mine[0][2] != own.get("digest"):
        raise ThresholdRefused("the view does not list this node's contribution as it sent it")
    _check_view(view, identity.roster, minimum, threshold)
    slot = f"{view.run}:{view.server_round}"
    if signed.setdefault(slot, view.digest()) != view.digest():
        raise ThresholdRefused(f"this node signed another view of round {view.server_round} "
                               "already: it signs one per round")
    return identity.key.sign(view.statement())


def _noise_context(view: View, offset: int, masked: np.ndarray | None) -> bytes:
    out = (b"fedapp threshold server noise v1\x00" + bytes.fromhex(view.digest())
           + offset.to_bytes(16, "big"))
    if masked is not None:
        out += hashlib.sha256(np.ascontiguousarray(masked, dtype="<u8").data).digest()
    return out


@dataclass(frozen=True)
class ServerNoise:
    """Central DP: the server's noise for one view's aggregate, the offset that decoding
    subtracts, and the server's proof that it knows the plaintexts of its ciphertexts
    (:mod:`strategies.plaintext_proofs`), bound to the view, the offset and the masked
    vector. Packed payload: one ciphertext per packed model plaintext (none for the
    metric sums and the tag). Masked payload: the noise masked under a fresh ring
    secret of the server's (``masked``) and the secret's ciphertexts, so the decryptors,
    who see the aggregate before and after, learn nothing of the noise either."""

    ciphertexts: np.ndarray
    offset: int
    proof: PlaintextProof
    masked: np.ndarray | None = None

    @staticmethod
    def make(encryptor: ThresholdEncryptor, model: EncryptedModel, view: View,
             noise: np.ndarray, bound: int) -> ServerNoise:
        """The server's noise: ``noise`` (integers, in levels of the sum, clipped to
        ``[-bound, bound]``) encoded for ``model``'s slots, encrypted (or masked) and
        proven.

        Raises
        ------
        encoding.EncodingOverflow
            If the noise does not fit the slots' headroom.
        """
        values, offset = encode_noise(noise, bound, model.total_weight, model.params)
        prover = ProvingEncryptor(encryptor)
        plaintexts, masked = payload(model, values)
        cts = prover.encrypt_to_array(plaintexts)
        return ServerNoise(cts, offset, prover.prove(cts, _noise_context(view, offset, masked)),
                           masked)

    def added_to(self, public: ThresholdPublicKey, model: EncryptedModel) -> EncryptedModel:
        """``model`` with this noise in its payload rows (and masked vector) and its
        offset, unchecked (the server adding the noise it made; decryptors use
        :func:`add_server_noise`)."""
        rows = model.payload_rows
        summed = aggregate_arrays(public, [model.ciphertexts[:rows], self.ciphertexts])
        masked = {} if not model.masks else {
            "masked": model.ring.add([model.masked, self.masked]), "masks": model.masks + 1}
        return dataclasses.replace(model, ciphertexts=np.concatenate(
            [summed, model.ciphertexts[rows:]]), noise_offset=model.noise_offset + self.offset,
            **masked)


def add_server_noise(public: ThresholdPublicKey, model: EncryptedModel, view: View,
                     noise: ServerNoise) -> EncryptedModel:
    """``model`` with the server's ``noise`` in its packed rows, once its proof holds for
    ``view``: what the decryptors decrypt and the server names in its combine request.

    Raises
    ------
    ThresholdRefused
        If the noise has the wrong rows, an offset the slots cannot hold, or a proof that
        does not verify (the server does not know what it adds: it could be the inverse
        of the other contributions, leaving one update).
    """
    rows = model.payload_rows
    try:
        model.params.check_noise_offset(model.noise_offset + noise.offset, model.total_weight)
        cts = ciphertexts_from_array(public, noise.ciphertexts)
        if len(cts) != rows:
            raise ValueError(f"{len(cts)} noise ciphertexts for {rows} payload rows")
        if model.masks and (noise.masked is None or noise.masked.shape != model.masked.shape):
            raise ValueError("a masked aggregate needs masked noise of its length")
        if not model.masks and noise.masked is not None:
            raise ValueError("masked noise for an aggregate that is not masked")
        verify_plaintexts(public, cts, noise.proof,
                          _noise_context(view, noise.offset, noise.masked))
        return noise.added_to(public, model)
    except (InvalidProof, ValueError) as err:  # EncodingOverflow is a ValueError
        raise ThresholdRefused(f"the server's noise is refused: {err}") from None


@dataclass(frozen=True)
class DecryptRequest:
    """What a decryptor receives: the view, each listed identity's signature of it,
    each listed node's contribution with its signature, and under central DP the
    server's noise."""

    view: View
    view_signatures: Mapping[bytes, bytes]
    contributions: Mapping[int, Contribution]
    noise: ServerNoise | None = None


def check_noise(model: EncryptedModel, min_noise: float, accept_noise: bool = False) -> None:
    """Refuse an aggregate that may carry less distributed-DP noise than its
    contributors declared or than this node accepts, or server noise the node does not
    accept (see the module docstring).

    Parameters
    ----------
    model : EncryptedModel
        The aggregate, its header as the contributors signed it.
    min_noise : float
        The node's ``dp-min-noise-multiplier`` (0: no noise required): distributed-DP
        noise it can check (the server's it cannot).
    accept_noise : bool
        The node's ``paillier-accept-server-noise``: central DP's server noise accepted.

    Raises
    ------
    ThresholdRefused
        If it has server noise not accepted, fewer contributors than the quorum its
        noise is shared among, or a distributed-DP noise multiplier below ``min_noise``.
    """
    if model.server_noise and not accept_noise:
        raise ThresholdRefused(_SERVER_NOISE_REFUSED)
    noise, n = model.client_noise, len(model.contributors)
    if noise is not None and n < noise.quorum:
        raise ThresholdRefused(f"the aggregate has {n} contributions, its distributed-DP "
                               f"noise is shared among a quorum of {noise.quorum}: fewer "
                               "carry less than the declared noise")
    multiplier = noise.multiplier(model.params.step) if noise is not None else 0.0
    if multiplier < min_noise:
        raise ThresholdRefused(f"the aggregate carries distributed-DP noise of multiplier "
                               f"{multiplier:.4g}, below this node's dp-min-noise-multiplier "
                               f"{min_noise:g}: it takes part in no decryption of it")


def check_request(public: ThresholdPublicKey, roster: Roster, request: DecryptRequest, *,
                  minimum: int, min_noise: float = 0.0, accept_noise: bool = False
                  ) -> EncryptedModel:
    """The aggregate a decryptor may decrypt: the product of exactly the view's
    contributions, each signed by its identity with a valid proof of plaintext
    knowledge, with the view signed by every one of them, all declaring the same
    distributed-DP noise and enough of them for it, and the server's noise if the node
    accepts it (:func:`check_noise`, against the node's ``min_noise`` and
    ``accept_noise``; see the module docstring for why).

    Raises
    ------
    ThresholdRefused
        Naming the first check that fails.
    """
    view = request.view
    if view.fingerprint != public.fingerprint:
        raise ThresholdRefused("the view is for another threshold key")
    _check_view(view, roster, minimum, public.threshold)
    if set(request.contributions) != {node for node, _, _ in view.entries}:
        raise ThresholdRefused("the contributions sent are not exactly the view's")
    updates = []
    for node, key, digest in view.entries:
        if not verify(key, view.statement(), request.view_signatures.get(key, b"")):
            raise ThresholdRefused(f"node {node} did not sign this view")
        contribution = request.contributions[node]
        model = contribution.model
        if model.digest() != digest:
            raise ThresholdRefused(f"node {node}'s contribution is not the one the view lists")
        fault = contribution.fault(public, key)
        if fault:
            raise ThresholdRefused(f"node {node}'s contribution is refused: {fault}")
        if (model.run, model.server_round) != (view.run, view.server_round) \
                or dict(model.contributors) != {node: model.total_weight}:
            raise ThresholdRefused(f"node {node}'s contribution was made for another run, "
                                   "round or node")
        if model.server_noise:
            raise ThresholdRefused(f"node {node}'s contribution carries a noise offset")
        if model.masks > 1:
            raise ThresholdRefused(f"node {node}'s contribution claims {model.masks} ring "
                                   "secrets, one contributor has one")
        if updates and model.client_noise != updates[0].client_noise:
            raise ThresholdRefused(f"node {node}'s contribution declares other distributed-DP "
                                   "noise than the others")
        updates.append(model)
    try:
        summed = aggregate(public, updates)
    except (InvalidUpdate, ValueError) as err:
        raise ThresholdRefused(f"the contributions do not add up: {err}") from None
    if request.noise is not None:
        if not accept_noise:  # before the proof's work
            raise ThresholdRefused(_SERVER_NOISE_REFUSED)
        summed = add_server_noise(public, summed, view, request.noise)
    check_noise(summed, min_noise, accept_noise)
    return summed


def _partial_context(model: EncryptedModel) -> bytes:
    return b"fedapp threshold partial v1\x00" + bytes.fromhex(model.digest())


def _partial_to_bytes(partial: PartialDecryption, width: int) -> bytes:
    head = json.dumps({"index": partial.index, "challenge": partial.challenge,
                       "response": partial.response, "count": len(partial.values)}).encode()
    return struct.pack(">I", len(head)) + head + b"".join(
        int(v).to_bytes(width, "big") for v in partial.values)


def _partial_from_bytes(data: bytes, width: int) -> PartialDecryption:
    (size,), rest = struct.unpack(">I", data[:4]), data[4:]
    head = json.loads(rest[:size])
    body = rest[size:]
    if len(body) != head["count"] * width:
        raise ValueError("a partial decryption of the wrong length")
    return PartialDecryption(head["index"], tuple(
        mpz.from_bytes(body[i:i + width], "big") for i in range(0, len(body), width)),
        head["challenge"], head["response"])


def decrypt_share(share: KeyShare, group_key: GroupKey, roster: Roster,
                  request: DecryptRequest, decrypted: MutableMapping[str, str], *,
                  minimum: int, min_noise: float = 0.0, accept_noise: bool = False) -> bytes:
    """A decryptor's sealed partial decryption of the request's aggregate, after
    :func:`check_request` (``minimum`` contributors, ``min_noise`` its distributed-DP
    floor, ``accept_noise`` its consent to server noise); ``decrypted`` (its state)
    records the view decrypted per ``run:round``, and another view of the same round is
    refused."""
    if group_key.fingerprint != share.public.fingerprint:
        raise ThresholdRefused("this node's group key belongs to another threshold key")
    model = check_request(share.public, roster, request, minimum=minimum,
                          min_noise=min_noise, accept_noise=accept_noise)
    view = request.view
    slot = f"{view.run}:{view.server_round}"
    if decrypted.setdefault(slot, view.digest()) != view.digest():
        raise ThresholdRefused(f"this node decrypted another aggregate of round "
                               f"{view.server_round} already: it decrypts one per round")
    context = _partial_context(model)
    partial = partial_decrypt(share, ciphertexts_from_array(share.public, model.ciphertexts),
                              context)
    return group_key.seal("partial", context,
                          _partial_to_bytes(partial, share.public.ciphertext_bytes))


def combine_sealed(public: ThresholdPublicKey, group_key: GroupKey, model: EncryptedModel,
                   sealed: Mapping[int, bytes], *, min_noise: float = 0.0,
                   accept_noise: bool = False) -> tuple[dict[str, np.ndarray], list[int]]:
    """The combiner: check the aggregate's noise (:func:`check_noise`, against its
    ``min_noise`` floor and ``accept_noise``), open the decryptors' sealed partials (keyed by
    node), verify and combine ``T`` good ones, check the tag (which binds the noise and
    the contributors) and decode; returns the sealed model (:func:`seal_model`) and the
    nodes whose partials were left out.

    Raises
    ------
    ThresholdRefused
        If the aggregate's noise does not hold, fewer than ``T`` partials are good, or
        the aggregate's tag does not check.
    """
    check_noise(model, min_noise, accept_noise)
    context, width = _partial_context(model), public.ciphertext_bytes
    partials, by_index, bad = [], {}, []
    for node, blob in sealed.items():
        try:
            partial = _partial_from_bytes(group_key.open("partial", context, blob), width)
        except (SealError, ValueError, KeyError, TypeError, struct.error):
            bad.append(node)
            continue
        partials.append(partial)
        by_index.setdefault(partial.index, []).append(node)
    try:
        plaintexts, bad_indices = combine(
            public, ciphertexts_from_array(public, model.ciphertexts), partials, context)
    except ValueError as err:
        raise ThresholdRefused(f"cannot decrypt the aggregate: {err}; sealed partials that "
                               f"did not open: {len(bad)}") from None
    bad += [node for i in bad_indices for node in by_index.get(i, [])]
    arrays, sums = read_aggregate(model, plaintexts, group_key.tag_key(public.n))
    means = {k: v / model.total_weight for k, v in sums.items()}
    return seal_model(group_key, model, arrays, means), sorted(bad)


def _sealed_header(model: EncryptedModel) -> dict:
    return {"version": 1, "fingerprint": model.fingerprint, "run": model.run,
            "round": model.server_round, "layout": model.layout.to_json(),
            "contributors": len(model.contributors)}


def _header_context(header: dict) -> bytes:
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).digest()


def seal_model(group_key: GroupKey, model: EncryptedModel, arrays: list[np.ndarray],
               means: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The decrypted average of ``model`` and the means of its metrics, sealed under the
    group key, as two uint8 arrays: the sealed bytes and the header (run, round, key,
    layout; public, and bound as associated data)."""
    header = _sealed_header(model)
    meta = json.dumps({"means": dict(means)}).encode()
    body = b"".join(np.ascontiguousarray(a, np.dtype(d).newbyteorder("<")).tobytes()
                    for a, d in zip(arrays, model.layout.dtypes, strict=True))
    sealed = group_key.seal("model", _header_context(header),
                            struct.pack(">I", len(meta)) + meta + body)
    raw = json.dumps(header, sort_keys=True).encode()
    return {SEALED_KEY: np.frombuffer(sealed, np.uint8).copy(),
            SEALED_HEADER_KEY: np.frombuffer(raw, np.uint8).copy()}


def is_sealed(arrays: Mapping[str, object]) -> bool:
    return SEALED_KEY in arrays and SEALED_HEADER_KEY in arrays


def sealed_layout(arrays: Mapping[str, np.ndarray]) -> Layout:
    """The layout a sealed model's public header names (for the server)."""
    return Layout.from_json(_read_header(arrays)["layout"])


def _read_header(arrays: Mapping[str, np.ndarray]) -> dict:
    raw = arrays.get(SEALED_HEADER_KEY)
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1 \
            or raw.size > MAX_SEALED_HEADER_BYTES:
        raise ValueError("a sealed model's header must be a 1-D uint8 array of at most 1 MiB")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(header, dict) or header.get("version") != 1:
            raise ValueError("expected a version-1 header")
        Layout.from_json(header["layout"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed sealed-model header: {err}") from None
    return header


def sealed_run(arrays: Mapping[str, np.ndarray]) -> int | None:
    """The run a sealed model's public header names (for a resumed run's server)."""
    run = _read_header(arrays).get("run")
    return run if isinstance(run, int) else None


def open_model(group_key: GroupKey, arrays: Mapping[str, np.ndarray], *, run: int | None,
               resumed: int | None = None
               ) -> tuple[Layout, list[np.ndarray], dict[str, float], int]:
    """A client opens the sealed model: its layout, arrays, the released metric means
    and the round it aggregates. ``run``: the run it must belong to (``None``: any, for
    a saved model); ``resumed``: the run this one resumes, whose last sealed model the
    first round of this run sends. The server names that run, so a server can replay
    an earlier run's sealed model into a resumed run: that costs correctness (which
    model the clients train on, which the server decides anyway), not privacy, as only
    the clients open it.

    Raises
    ------
    SealError
        If it is not this group key's, this run's, or was altered.
    ValueError
        If its header is malformed or names another key.
    """
    if set(arrays) != {SEALED_KEY, SEALED_HEADER_KEY}:
        raise ValueError(f"expected arrays {SEALED_KEY} and {SEALED_HEADER_KEY}")
    header = _read_header(arrays)
    if header.get("fingerprint") != group_key.fingerprint:
        raise ValueError("the sealed model is for another threshold key")
    if run is not None and header.get("run") not in (run, resumed):
        raise SealError(f"the sealed model is of run {header.get('run')!r}, this is run {run}"
                        + (f", resuming run {resumed}" if resumed is not None else ""))
    sealed = arrays[SEALED_KEY]
    if not isinstance(sealed, np.ndarray) or sealed.dtype != np.uint8:
        raise ValueError("the sealed model must be a uint8 array")
    data = group_key.open("model", _header_context(header), sealed.tobytes())
    (size,) = struct.unpack(">I", data[:4])
    means = json.loads(data[4:4 + size])["means"]
    layout = Layout.from_json(header["layout"])
    out, start = [], 4 + size
    for shape, dtype in zip(layout.shapes, layout.dtypes, strict=True):  # each in its dtype
        dtype = np.dtype(dtype).newbyteorder("<")
        end = start + math.prod(shape) * dtype.itemsize
        out.append(np.frombuffer(data[start:end], dtype).reshape(shape).astype(dtype.name))
        start = end
    if start != len(data):
        raise SealError("the sealed model does not match its layout")
    return layout, out, means, header["round"]
