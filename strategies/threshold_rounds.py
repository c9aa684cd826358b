"""The server side of threshold Paillier shared by both Flower APIs, and the text forms
of what its stages carry.

:class:`ThresholdRounds` is what both threshold strategies hold and do: the public key
and the encoding (:class:`strategies.paillier_node.PaillierRounds`), the share holders
the nodes announced, the checks of each signed train reply, and a round's view,
decrypt and combine stages (:mod:`strategies.threshold_protocol`): which nodes are
asked, what each must answer, which partials and combiners are tried, when the round
is skipped. The adapters, :mod:`strategies.threshold_message` (Message API) and
:mod:`strategies.threshold_legacy` (legacy API), only supply the ``exchange`` that
carries the stage requests (:class:`~strategies.threshold_protocol.View`,
:class:`~strategies.threshold_protocol.DecryptRequest`, :class:`CombineRequest`) to
the nodes and their answers back, using the text forms below; neither imports the
other. This module imports no Flower.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np

from .aggregation import InvalidUpdate, Layout
from .discrete_gaussian import discrete_gaussian
from .encoding import EncodingOverflow
from .paillier import check_ciphertext_array
from .paillier_node import PaillierRounds
from .paillier_protocol import EncryptedModel, RoundSum, aggregate, check_maskable
from .secagg_identity import verify
from .threshold_paillier import ThresholdEncryptor, ThresholdPublicKey
from .plaintext_proofs import InvalidProof, PlaintextProof
from .threshold_protocol import (Contribution, DecryptRequest, ServerNoise, ThresholdRefused,
                                 View, is_sealed, sealed_layout)

# Flower's logger by name: its lines show where Flower's do, without importing Flower
log = logging.getLogger("flwr").log


class RoundFailed(Exception):
    """A stage lost too many nodes: the round is skipped and the model stays."""


@dataclass(frozen=True)
class CombineRequest:
    """What the combiner receives: the round's aggregate and the decryptors' sealed
    partial decryptions, by node."""

    aggregate: EncryptedModel
    partials: Mapping[int, bytes]


@dataclass(frozen=True)
class Combined:
    """The combiner's answer: the model sealed under the group key
    (:func:`strategies.threshold_protocol.seal_model`) and the nodes whose partials
    were left out."""

    model: dict[str, np.ndarray]
    left_out: list[int]


StageRequest = View | DecryptRequest | CombineRequest
#: An adapter's ``exchange(requests, stage)``: send each node its request; return the
#: answers of the nodes that replied without an error (it reports the others to the
#: strategy's ``watch``), decoded: the view signature (bytes), the sealed partial
#: (bytes) or a :class:`Combined`; ``None`` for an answer it could not read.
Exchange = Callable[[dict[int, StageRequest], str], dict[int, "bytes | Combined | None"]]


# ------------------------------------------------------------------ text forms
NOISE_ARRAYS = "server-noise"
#: What a contribution carries (``payload=``): ``masked``, the levels masked under a ring
#: secret and the secret encrypted (:mod:`strategies.ring_masks`), or ``paillier``, the
#: levels packed into Paillier plaintexts and encrypted.
PAYLOADS = ("masked", "paillier")


def signature_fields(identity: bytes, contribution: Contribution, share: int
                     ) -> dict[str, str | int]:
    """What a train reply carries beside its update: the node's identity public key,
    its proof and signature (:class:`~strategies.threshold_protocol.Contribution`) and
    the number of the key share it holds (0: none)."""
    return {"identity": identity.hex(), "signature": contribution.signature.hex(),
            "proof": contribution.proof.to_text(), "share": share}


@dataclass(frozen=True)
class Signed:
    """What a train reply's fields say beside its update (:func:`read_signature`)."""

    identity: bytes
    signature: bytes
    proof: PlaintextProof
    share: int


def read_signature(fields: Mapping[str, object] | None, mod: str) -> Signed:
    """Inverse of :func:`signature_fields`.

    Raises
    ------
    InvalidUpdate
        If they are missing (naming ``mod``, the client mod that adds them) or malformed.
    """
    try:
        identity = bytes.fromhex(str(fields["identity"]))
        signature = bytes.fromhex(str(fields["signature"]))
        proof, share = fields["proof"], fields["share"]
    except (TypeError, KeyError, ValueError):
        raise InvalidUpdate(f"the reply holds no threshold signature and proof: add {mod} to "
                            "the ClientApp (of this version: older ones send no proof)"
                            ) from None
    if len(identity) != 32 or len(signature) != 64 or not isinstance(share, int) \
            or isinstance(share, bool) or share < 0:
        raise InvalidUpdate("the reply's threshold signature is malformed")
    try:
        return Signed(identity, signature, PlaintextProof.from_text(proof), share)
    except InvalidProof as err:
        raise InvalidUpdate(str(err)) from None


def view_text(view: View) -> str:
    """A view as it travels (JSON)."""
    return json.dumps(view.to_dict())


def read_view(text: object) -> View:
    """Inverse of :func:`view_text`; :class:`ThresholdRefused` if malformed."""
    try:
        data = json.loads(str(text))
    except ValueError as err:
        raise ThresholdRefused(f"malformed view: {err}") from None
    try:
        return View.from_dict(data)
    except ValueError as err:  # its message says "malformed view: ..."
        raise ThresholdRefused(str(err)) from None


def request_fields(request: DecryptRequest) -> dict[str, str]:
    """The text of a decryption request: the view, its signatures, the contributions'
    signatures and proofs, and the server noise's offset and proof (the ciphertexts
    travel as arrays: :func:`request_arrays`)."""
    noise = request.noise
    extra = {} if noise is None else {"noise-offset": str(noise.offset),
                                      "noise-proof": noise.proof.to_text()}
    return {**extra, "view": view_text(request.view),
            "view-signatures": json.dumps({key.hex(): sig.hex() for key, sig in
                                           request.view_signatures.items()}),
            "signatures": json.dumps({str(node): c.signature.hex() for node, c in
                                      request.contributions.items()}),
            "proofs": json.dumps({str(node): c.proof.to_text() for node, c in
                                  request.contributions.items()})}


def request_arrays(request: DecryptRequest) -> dict[str, dict[str, np.ndarray]]:
    """The ciphertexts of a decryption request, by name: each contribution's arrays and
    the server's noise."""
    out = {f"contribution-{node}": c.model.to_arrays()
           for node, c in request.contributions.items()}
    noise = request.noise
    if noise is not None:
        out[NOISE_ARRAYS] = {"ciphertexts": noise.ciphertexts}
        if noise.masked is not None:  # in the ring of the contributions it is added to
            ring = next(iter(request.contributions.values())).model.ring
            out[NOISE_ARRAYS]["masked"] = ring.to_bytes(noise.masked)
    return out


def read_request(fields: Mapping[str, object],
                 arrays: Callable[[str], Mapping[str, np.ndarray]],
                 public: ThresholdPublicKey) -> DecryptRequest:
    """Inverse of :func:`request_fields` and :func:`request_arrays`; ``arrays(name)``
    gives the arrays the request sent under ``name``.

    Raises
    ------
    ThresholdRefused
        If any of it is missing or malformed.
    """
    try:
        view = View.from_dict(json.loads(str(fields["view"])))
        view_signatures = {bytes.fromhex(k): bytes.fromhex(v) for k, v in
                           json.loads(str(fields["view-signatures"])).items()}
        signatures = {int(k): bytes.fromhex(v)
                      for k, v in json.loads(str(fields["signatures"])).items()}
        proofs = {int(k): PlaintextProof.from_text(v)
                  for k, v in json.loads(str(fields["proofs"])).items()}
        if set(proofs) != set(signatures):
            raise ValueError("a proof for every signed contribution, and no other")
        contributions = {node: Contribution(
            EncryptedModel.from_arrays(arrays(f"contribution-{node}"), public), proofs[node],
            signature) for node, signature in signatures.items()}
        noise = None
        if "noise-proof" in fields:
            noise_arrays = arrays(NOISE_ARRAYS)
            cts = check_ciphertext_array(public, noise_arrays["ciphertexts"])
            masked = None
            if "masked" in noise_arrays:
                first = next(iter(contributions.values()), None)
                if first is None:
                    raise ValueError("masked noise without contributions")
                masked = first.model.ring.from_bytes(noise_arrays["masked"],
                                                     first.model.layout.size)
            noise = ServerNoise(cts, int(str(fields["noise-offset"])),
                                PlaintextProof.from_text(fields["noise-proof"]), masked)
    except (KeyError, ValueError, AttributeError, TypeError) as err:
        raise ThresholdRefused(f"malformed decryption request: {err}") from None
    return DecryptRequest(view, view_signatures, contributions, noise)


# ------------------------------------------------------------------ server
class ThresholdRounds(PaillierRounds):
    """What both threshold strategies (Message API and legacy) hold and do; see the
    module docstring. The strategy keeps ``watch`` and ``_layout`` as every Paillier
    strategy does, and ``share_holders``: node id -> announced share number."""

    server_sees = "sealed"

    def _init_threshold(self, public_key: ThresholdPublicKey, clip: float,
                        max_total_weight: int, weight_unit: int, value_bits: int,
                        extra_decryptors: int, stage_timeout: float,
                        max_empty_rounds: int, payload: str) -> None:
        if not isinstance(public_key, ThresholdPublicKey):
            raise ValueError("public_key must be a ThresholdPublicKey (fedapp keygen "
                             "--threshold T --shares N writes paillier-threshold.pub.json)")
        if extra_decryptors < 0:
            raise ValueError(f"extra_decryptors must be >= 0, got {extra_decryptors}")
        if payload not in PAYLOADS:
            raise ValueError(f"payload must be one of {', '.join(PAYLOADS)}, got {payload!r}")
        self._init_paillier(public_key, clip, max_total_weight, weight_unit, value_bits,
                            max_empty_rounds)
        self.masked = payload == "masked"
        if self.masked:
            check_maskable(self.params)
        self.extra_decryptors, self.stage_timeout = extra_decryptors, stage_timeout
        self.share_holders: dict[int, int] = {}
        # the aggregate the clients decrypted last (public: ciphertexts and header), for
        # the DP wrapper's accounting of the noise it carries
        self.last_aggregate: EncryptedModel | None = None
        # central DP (set by the DP wrapper each round): the std of the noise to add, in
        # levels of the sum, and its clip bound; the encryptor for it, made when needed
        self.server_noise: tuple[float, int] | None = None
        self._noise_encryptor: ThresholdEncryptor | None = None

    def _describe_threshold(self) -> str:
        key = self.public_key
        return (f"{key.threshold} of {key.shares} shares decrypt, {self.extra_decryptors} "
                f"extra asked, {'masked' if self.masked else 'packed'} payload; "
                f"{self._describe()}")

    def _remember_global(self, arrays: Mapping[str, np.ndarray]) -> None:
        """The layout of the global model sent this round: a sealed model's public
        header says it; the initial model (public: random weights) is plaintext, its
        arrays named as they travel."""
        self._layout = sealed_layout(arrays) if is_sealed(arrays) \
            else Layout.of(list(arrays), list(arrays.values()))

    def _round_sum(self, server_round: int) -> RoundSum:
        """The round's checks of the train replies: ``T + 1`` contributions at least
        and, under distributed DP (``client_noise``, set by the DP wrapper), the noise
        every update must carry and its quorum."""
        return RoundSum(self.public_key, self.params, self._layout, server_round,
                        min_contributors=self.public_key.threshold + 1,
                        client_noise=self.client_noise, masked=self.masked)

    def _accept(self, round_sum: RoundSum, signed: dict, node: int,
                arrays: Mapping[str, np.ndarray], fields: Signed) -> None:
        """Keep one train reply of ``node`` in ``signed`` (node -> contribution,
        identity) and note its share, if its update passes the round's checks and its
        signature and proof (:func:`read_signature`) verify, as the decryptors will
        check them.

        Raises
        ------
        InvalidUpdate
            Naming what fails: the reply is left out.
        """
        if any(fields.identity == other for _, other in signed.values()):
            raise InvalidUpdate("another node of this round signed with the same identity")
        contribution = Contribution(round_sum.check(node, arrays), fields.proof,
                                    fields.signature)
        fault = contribution.fault(self.public_key, fields.identity)
        if fault:  # not kept: it takes nothing from the round's weight budget
            raise InvalidUpdate(f"{fault}; the decryptors would refuse the round")
        round_sum.keep(contribution.model)
        signed[node] = (contribution, fields.identity)
        if fields.share:
            self.share_holders[node] = fields.share

    def _seal_round(self, server_round: int, round_sum: RoundSum, signed: dict,
                    connected: Callable[[], Iterable[int]], exchange: Exchange
                    ) -> dict[str, np.ndarray] | None:
        """The round's average sealed by the clients (the view, decrypt and combine
        stages through ``exchange``; ``connected()`` lists the nodes that could
        decrypt), or ``None`` with a warning if the round is skipped. Closes the round
        on ``watch``."""
        sealed = None
        if len(signed) < round_sum.min_contributors:
            log(WARNING, "Round %d skipped, the model stays as it was: %d valid updates, the "
                "decryptors need at least %d (%s)", server_round, len(signed),
                round_sum.min_contributors, "T + 1" if round_sum.min_contributors
                == self.public_key.threshold + 1 else "the distributed-DP quorum")
        else:
            try:
                # the sum of exactly the signed updates the view will list
                summed = aggregate(self.public_key, [c.model for c, _ in signed.values()])
                sealed = self._decrypt(server_round, signed, summed, connected, exchange)
            except RoundFailed as err:
                log(WARNING, "Round %d skipped, the model stays as it was: %s",
                    server_round, err)
        self.watch.end_round(server_round, sealed is not None)
        return sealed

    def _stage(self, exchange: Exchange, requests: dict[int, StageRequest], stage: str
               ) -> dict:
        start = time.monotonic()
        answers = exchange(requests, stage)
        self.watch.flush()
        log(INFO, "Threshold Paillier: %s stage, %d of %d nodes answered in %.2f s", stage,
            len(answers), len(requests), time.monotonic() - start)
        return answers

    def _decrypt(self, server_round: int, signed: dict, summed: EncryptedModel,
                 connected: Callable[[], Iterable[int]], exchange: Exchange
                 ) -> dict[str, np.ndarray]:
        view = View(summed.run, server_round, self.public_key.fingerprint, tuple(sorted(
            (node, identity, c.model.digest()) for node, (c, identity) in signed.items())))
        answers = self._stage(exchange, {node: view for node in signed}, "view")
        view_signatures = {}
        for node, (_, identity) in signed.items():
            signature = answers.get(node)
            if not isinstance(signature, bytes) or not verify(identity, view.statement(),
                                                              signature):
                raise RoundFailed(f"node {node} did not sign the view, and every contributor "
                                  "must (a view is decrypted whole or not at all)")
            view_signatures[identity] = signature
        noise = self._noise(summed, view)
        if noise is not None:  # what the decryptors will decrypt (its own: unchecked)
            summed = noise.added_to(self.public_key, summed)
        request = DecryptRequest(view, view_signatures,
                                 {node: c for node, (c, _) in signed.items()}, noise)
        decryptors = self._decryptors(connected())
        log(INFO, "Threshold Paillier: round %d aggregates %d contributions, %s payload: %d "
            "ciphertexts to decrypt", server_round, len(signed),
            "masked" if summed.masks else "packed", summed.ciphertexts.shape[0])
        partials = {}
        for node, partial in self._stage(exchange, {node: request for node in decryptors},
                                         "decrypt").items():
            if isinstance(partial, bytes) and partial:
                partials[node] = partial
            else:
                log(WARNING, "Threshold Paillier: node %s sent no sealed partial", node)
        if len(partials) < self.public_key.threshold:
            raise RoundFailed(f"{len(partials)} partial decryptions, {self.public_key.threshold}"
                              f" needed (asked {len(decryptors)} share holders)")
        # decrypted: whoever combines sees it, even if no model comes back (DP counts it)
        self.last_aggregate = summed
        combine = CombineRequest(summed, partials)
        for combiner in partials:  # one at a time: the first that succeeds
            answers = self._stage(exchange, {combiner: combine}, "combine")
            if combiner not in answers:  # it failed: the watch has its reason
                continue
            combined = answers[combiner]
            if not isinstance(combined, Combined) or not self._fits(combined.model):
                log(WARNING, "Threshold Paillier: combiner %s sent a malformed model", combiner)
                continue
            if combined.left_out:
                log(WARNING, "Threshold Paillier: the partial decryptions of nodes %s failed "
                    "their proofs and were left out", combined.left_out)
            return combined.model
        raise RoundFailed("no combiner returned the model")

    def _noise(self, summed: EncryptedModel, view: View) -> ServerNoise | None:
        """Central DP: the round's server noise, encrypted and proven for ``view``."""
        if self.server_noise is None:
            return None
        sigma, bound = self.server_noise
        start = time.monotonic()
        if self._noise_encryptor is None:
            self._noise_encryptor = ThresholdEncryptor(self.public_key)
        try:
            noise = ServerNoise.make(self._noise_encryptor, summed, view,
                                     discrete_gaussian(sigma, summed.layout.size), bound)
        except EncodingOverflow as err:
            raise RoundFailed(f"central DP: {err}") from None
        log(INFO, "Threshold Paillier: central DP noise encrypted with its proof (std %.4g "
            "levels, %d ciphertexts) in %.2f s", sigma, len(noise.ciphertexts),
            time.monotonic() - start)
        return noise

    def _fits(self, model: Mapping[str, np.ndarray]) -> bool:
        """``model`` is sealed, and its header names this round's layout."""
        try:
            return is_sealed(model) and sealed_layout(model) == self._layout
        except ValueError:
            return False

    def _decryptors(self, connected: Iterable[int]) -> list[int]:
        """``T`` + ``extra_decryptors`` connected share holders, one per share."""
        connected = set(connected)
        holders = sorted((index, node) for node, index in self.share_holders.items()
                         if node in connected)
        chosen, indices = [], set()
        for index, node in holders:  # one node per share
            if index not in indices:
                chosen.append(node)
                indices.add(index)
        wanted = self.public_key.threshold + self.extra_decryptors
        if len(chosen) < self.public_key.threshold:
            raise RoundFailed(f"{len(chosen)} connected nodes announced a key share, "
                              f"{self.public_key.threshold} needed: start the share holders' "
                              "nodes, or sample more nodes per round")
        return chosen[:wanted]
