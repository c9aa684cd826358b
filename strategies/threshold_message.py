"""Weighted FedAvg under a threshold Paillier key on Flower's Message API: a strategy
and a client mod. No node holds the whole private key; ``T`` share holders decrypt
each round's aggregate together, and one of them seals the model for the clients.

Switch an existing Message-API project with two changes::

    strategy = ThresholdPaillierFedAvg(load_threshold_public_key(path), clip=1.0, ...)
    app = ClientApp(mods=[threshold_paillier_mod])

Each round, after the train replies (each an update encrypted under the threshold key
and signed by its node's identity key), the strategy runs three short stages
(:mod:`strategies.threshold_protocol`): every contributor signs the view of the
round's contributions; ``T`` + ``extra_decryptors`` share holders each check the
view, the signatures and the contributions, recompute the aggregate and return a
partial decryption sealed under the clients' group key; one of them combines ``T``
verified partials and returns the average, sealed. The server relays sealed bytes
and never holds a share, the group key or the model: the global model it sends is
the sealed one (the initial model, random weights, excepted). Stage messages travel
as ``train`` messages holding a ``threshold`` ConfigRecord, which the mod answers
without calling the app.

The node keys are those of :mod:`strategies.threshold_node`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from .aggregation import InvalidUpdate, Layout
from .fedavg import aggregate_metrics, evaluate_metrics
from .node_errors import NodeError, reports_errors
from .node_settings import PLAINTEXT_METRICS, node_setting, refuse_evaluation
from .paillier_node import PaillierRounds, open_sealed_model, round_config
from .paillier_protocol import DecryptionRefused, EncryptedModel, RoundSum, aggregate
from .records import (WEIGHT_KEY, array_record, own_train_reply, record_arrays, screen,
                      train_reply)
from .screening import SECURE_EMPTY_ROUNDS
from .secagg_identity import verify
from .threshold_node import NodeKeys, answer_decrypt, answer_view, contribute, node_keys
from .threshold_paillier import ThresholdPublicKey
from .threshold_protocol import (DecryptRequest, SealError, ThresholdRefused, View,
                                 combine_sealed, contribution_statement, is_sealed,
                                 sealed_layout)

STAGE_KEY = "threshold"  # the ConfigRecord of a stage request, and of a train reply's signature
STAGE_MESSAGE_TYPE = MessageType.TRAIN


class RoundFailed(Exception):
    """A stage lost too many nodes: the round is skipped and the model stays."""


def _bytes_record(value: bytes) -> ArrayRecord:
    return array_record({"bytes": np.frombuffer(value, np.uint8).copy()})


def _record_bytes(record: ArrayRecord) -> bytes:
    arrays = record_arrays(record)
    if set(arrays) != {"bytes"} or arrays["bytes"].dtype != np.uint8:
        raise ValueError("expected one uint8 array named 'bytes'")
    return arrays["bytes"].tobytes()


# ------------------------------------------------------------------ strategy
class ThresholdPaillierFedAvg(PaillierRounds, FedAvg):
    """Weighted FedAvg under a threshold Paillier key: no single key holder, the server
    blind to the updates and to the model.

    Parameters
    ----------
    public_key : ThresholdPublicKey
        The threshold public key (``strategies.keyfiles.load_threshold_public_key``).
    clip, max_total_weight, weight_unit, value_bits, max_empty_rounds
        As for :class:`strategies.paillier_message.PaillierFedAvg`.
    extra_decryptors : int (default: 1)
        Share holders asked beyond ``T`` each round, so that that many may drop out.
    stage_timeout : float (default: 600)
        Seconds to wait for each stage's replies (a partial decryption of a large model
        takes minutes: about 28 ms per ciphertext on one core).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimums).

    A round needs at least ``T + 1`` valid contributions (the decryptors refuse fewer:
    :mod:`strategies.threshold_protocol`), a view signed by all of them, ``T`` partials
    and one combiner; otherwise it is skipped with a warning and the model stays as it
    was. Share holders are known from their train replies (a reply says which share, if
    any, its node holds), so the first round's sampling must reach ``T`` of them.
    """

    server_sees = "sealed"

    def __init__(self, public_key: ThresholdPublicKey, *, clip: float,
                 max_total_weight: int = 65536, weight_unit: int = 1, value_bits: int = 16,
                 extra_decryptors: int = 1, stage_timeout: float = 600.0,
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(public_key, ThresholdPublicKey):
            raise ValueError("public_key must be a ThresholdPublicKey (fedapp keygen "
                             "--threshold T --shares N writes paillier-threshold.pub.json)")
        if extra_decryptors < 0:
            raise ValueError(f"extra_decryptors must be >= 0, got {extra_decryptors}")
        self._init_paillier(public_key, clip, max_total_weight, weight_unit, value_bits,
                            max_empty_rounds)
        self.extra_decryptors, self.stage_timeout = extra_decryptors, stage_timeout
        self.share_holders: dict[int, int] = {}  # node id -> share index, as announced
        self._grid: Grid | None = None

    def summary(self) -> None:
        super().summary()
        key = self.public_key
        log(INFO, "\t└──> Threshold Paillier: %d of %d shares decrypt, %d extra asked; %s",
            key.threshold, key.shares, self.extra_decryptors, self._describe())

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Flower's round loop; the result's ``arrays`` are the final model sealed under
        the clients' group key (a client opens it, ``fedapp decrypt --group-key``)."""
        if evaluate_fn is not None:
            raise ValueError("ThresholdPaillierFedAvg cannot take an evaluate_fn: the server "
                             "never holds the model. Evaluate on the clients "
                             "(fraction_evaluate > 0)")
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                             evaluate_config)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        plain = record_arrays(arrays)
        self._layout = sealed_layout(plain) if is_sealed(plain) \
            else Layout.of(list(plain), list(plain.values()))
        config = ConfigRecord({**config, **round_config(
            self.params, self.public_key.fingerprint, self.weight_unit, server_round)})
        return super().configure_train(server_round, arrays, config, grid)

    def _round_sum(self, server_round: int) -> RoundSum:
        return RoundSum(self.public_key, self.params, self._layout, server_round,
                        min_contributors=self.public_key.threshold + 1)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_sum = self._round_sum(server_round)
        signed: dict[int, tuple[EncryptedModel, bytes, bytes]] = {}

        def accept(msg: Message) -> None:
            node = msg.metadata.src_node_id
            arrays, _ = train_reply(msg, self.weighted_by_key)
            identity, signature, share = _signature_of(msg)
            if any(identity == other for _, other, _ in signed.values()):
                raise InvalidUpdate("another node of this round signed with the same identity")
            update = round_sum.add(node, arrays)
            if not verify(identity, contribution_statement(update), signature):
                raise InvalidUpdate("the update's signature does not verify under the identity "
                                    "it names (the decryptors would refuse the round)")
            signed[node] = (update, identity, signature)
            if share:
                self.share_holders[node] = share

        valid = screen(server_round, replies, self.watch, accept)
        log(INFO, "aggregate_train: %d valid encrypted replies of %d", len(valid), len(replies))
        sealed = None
        if len(signed) < round_sum.min_contributors:
            log(WARNING, "Round %d skipped, the model stays as it was: %d valid updates, the "
                "decryptors need at least %d (T + 1)", server_round, len(signed),
                round_sum.min_contributors)
        else:
            try:
                # the sum of exactly the signed updates the view will list
                summed = aggregate(self.public_key, [u for u, _, _ in signed.values()])
                sealed = self._decrypt(server_round, signed, summed)
            except RoundFailed as err:
                log(WARNING, "Round %d skipped, the model stays as it was: %s",
                    server_round, err)
        self.watch.end_round(server_round, sealed is not None)
        if sealed is None:
            return None, None
        metrics = aggregate_metrics(self.train_metrics_aggr_fn, [m.content for m in valid],
                                    self.weighted_by_key)
        return array_record(sealed), metrics

    def _exchange(self, requests: dict[int, RecordDict], stage: str) -> dict[int, RecordDict]:
        """Send one stage's requests; the contents of the replies without error."""
        messages = [Message(content, dst_node_id=node, message_type=STAGE_MESSAGE_TYPE)
                    for node, content in requests.items()]
        start, answers = time.monotonic(), {}
        for reply in self._grid.send_and_receive(messages, timeout=self.stage_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.watch.node_failed(node, reply.error.reason, stage)
            else:
                answers[node] = reply.content
        self.watch.flush()
        log(INFO, "Threshold Paillier: %s stage, %d of %d nodes answered in %.2f s", stage,
            len(answers), len(messages), time.monotonic() - start)
        return answers

    def _decrypt(self, server_round: int, signed: dict, summed: EncryptedModel
                 ) -> dict[str, np.ndarray]:
        view = View(summed.run, server_round, self.public_key.fingerprint, tuple(sorted(
            (node, identity, update.digest()) for node, (update, identity, _) in signed.items())))
        view_json = json.dumps(view.to_dict())
        answers = self._exchange({node: RecordDict({STAGE_KEY: ConfigRecord(
            {"stage": "view", "view": view_json})}) for node in signed}, "view")
        view_signatures = {}
        for node, (_, identity, _) in signed.items():
            signature = _answer_bytes(answers.get(node), "signature")
            if not verify(identity, view.statement(), signature):
                raise RoundFailed(f"node {node} did not sign the view, and every contributor "
                                  "must (a view is decrypted whole or not at all)")
            view_signatures[identity.hex()] = signature.hex()
        request = {"stage": "decrypt", "view": view_json,
                   "view-signatures": json.dumps(view_signatures),
                   "signatures": json.dumps({str(node): sig.hex()
                                             for node, (_, _, sig) in signed.items()})}
        contributions = {f"contribution-{node}": array_record(update.to_arrays())
                         for node, (update, _, _) in signed.items()}
        decryptors = self._decryptors()
        answers = self._exchange({node: RecordDict({STAGE_KEY: ConfigRecord(request),
                                                    **contributions}) for node in decryptors},
                                 "decrypt")
        partials = {}
        for node, content in answers.items():
            try:
                partials[node] = _record_bytes(content.array_records["partial"])
            except (KeyError, ValueError):
                log(WARNING, "Threshold Paillier: node %s sent no sealed partial", node)
        if len(partials) < self.public_key.threshold:
            raise RoundFailed(f"{len(partials)} partial decryptions, {self.public_key.threshold}"
                              f" needed (asked {len(decryptors)} share holders)")
        combine = RecordDict({STAGE_KEY: ConfigRecord({"stage": "combine"}),
                              "aggregate": array_record(summed.to_arrays()),
                              **{f"partial-{node}": _bytes_record(blob)
                                 for node, blob in partials.items()}})
        for combiner in partials:  # one at a time: the first that succeeds
            content = self._exchange({combiner: combine}, "combine").get(combiner)
            if content is None or "model" not in content.array_records:
                continue
            model = record_arrays(content.array_records["model"])
            if not is_sealed(model) or sealed_layout(model) != self._layout:
                log(WARNING, "Threshold Paillier: combiner %s sent a malformed model", combiner)
                continue
            left_out = json.loads(content.config_records[STAGE_KEY].get("left-out", "[]"))
            if left_out:
                log(WARNING, "Threshold Paillier: the partial decryptions of nodes %s failed "
                    "their proofs and were left out", left_out)
            return model
        raise RoundFailed("no combiner returned the model")

    def _decryptors(self) -> list[int]:
        connected = set(self._grid.get_node_ids())
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

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return evaluate_metrics(self, replies, self.watch)


def _answer_bytes(content: RecordDict | None, name: str) -> bytes:
    try:
        return bytes.fromhex(str(content.config_records[STAGE_KEY][name]))
    except (AttributeError, KeyError, ValueError):
        return b""


def _signature_of(msg: Message) -> tuple[bytes, bytes, int]:
    """A train reply's identity key, signature and announced share (0: none)."""
    record = msg.content.config_records.get(STAGE_KEY)
    try:
        identity = bytes.fromhex(str(record["identity"]))
        signature = bytes.fromhex(str(record["signature"]))
        share = record["share"]
    except (TypeError, KeyError, ValueError):
        raise InvalidUpdate("the reply holds no threshold signature: add "
                            "threshold_paillier_mod to the ClientApp") from None
    if len(identity) != 32 or len(signature) != 64 or not isinstance(share, int) or share < 0:
        raise InvalidUpdate("the reply's threshold signature is malformed")
    return identity, signature, share


# ------------------------------------------------------------------ client mod


def _answer_stage(msg: Message, context: Context, keys: NodeKeys) -> Message:
    config = msg.content.config_records[STAGE_KEY]
    stage = config.get("stage")
    out: dict = {}
    if stage == "view":
        signature = answer_view(View.from_dict(json.loads(str(config["view"]))), keys, context)
        out[STAGE_KEY] = ConfigRecord({"signature": signature.hex()})
    elif stage == "decrypt":
        out["partial"] = _bytes_record(answer_decrypt(_decrypt_request(msg, keys), keys, context))
    elif stage == "combine":
        aggregate = EncryptedModel.from_arrays(
            record_arrays(msg.content.array_records["aggregate"]), keys.public)
        sealed = {int(name[len("partial-"):]): _record_bytes(record)
                  for name, record in msg.content.array_records.items()
                  if name.startswith("partial-") and name[len("partial-"):].isdigit()}
        model, left_out = combine_sealed(keys.public, keys.group, aggregate, sealed)
        out["model"] = array_record(model)
        out[STAGE_KEY] = ConfigRecord({"left-out": json.dumps(left_out)})
    else:
        raise NodeError(f"unknown threshold stage {stage!r}: server and node run different "
                        "versions")
    return Message(RecordDict(out), reply_to=msg)


def _decrypt_request(msg: Message, keys: NodeKeys) -> DecryptRequest:
    config = msg.content.config_records[STAGE_KEY]
    try:
        view = View.from_dict(json.loads(str(config["view"])))
        view_signatures = {bytes.fromhex(k): bytes.fromhex(v) for k, v in
                           json.loads(str(config["view-signatures"])).items()}
        signatures = {int(k): bytes.fromhex(v)
                      for k, v in json.loads(str(config["signatures"])).items()}
        contributions = {}
        for node, signature in signatures.items():
            arrays = record_arrays(msg.content.array_records[f"contribution-{node}"])
            contributions[node] = (EncryptedModel.from_arrays(arrays, keys.public), signature)
    except (KeyError, ValueError, AttributeError, TypeError) as err:
        raise ThresholdRefused(f"malformed decryption request: {err}") from None
    return DecryptRequest(view, view_signatures, contributions)


@reports_errors(PermissionError, DecryptionRefused, SealError, InvalidUpdate, ThresholdRefused)
def threshold_paillier_mod(msg: Message, context: Context, call_next: ClientAppCallable
                           ) -> Message:
    """Open the sealed global model on the way in; encrypt and sign the train update on
    the way out; answer the view, decrypt and combine stages. Train metrics travel
    inside the encrypted update; in plaintext the node sends its weight and the metric
    means of the model it opened (``released-*``), and answers no evaluation unless its
    ``plaintext-metrics`` allows it.

    Fails closed: without the threshold public key, the group key, its identity key or
    the roster, or when the server sends no Paillier parameters, the node answers with
    an error naming the cause and the fix, and never sends plaintext."""
    keys = node_keys(context)
    if msg.metadata.message_type == STAGE_MESSAGE_TYPE \
            and STAGE_KEY in msg.content.config_records:
        return _answer_stage(msg, context, keys)
    category = msg.metadata.message_type.split(".")[0]
    if category == MessageType.EVALUATE:
        refuse_evaluation(context.node_config, "threshold Paillier")
    released: dict[str, float] = {}
    for name, record in list(msg.content.array_records.items()):
        arrays = record_arrays(record)
        if is_sealed(arrays):
            layout, plain, released = open_sealed_model(keys.group, arrays, msg.metadata.run_id)
            msg.content[name] = array_record(dict(zip(layout.names, plain, strict=True)))
    reply = call_next(msg, context)
    if category == MessageType.TRAIN and reply.has_content():
        _encrypt_reply(msg, reply, keys, context, released)
    return reply


def _encrypt_reply(msg: Message, reply: Message, keys: NodeKeys, context: Context,
                   released: dict[str, float]) -> None:
    config = next(iter(msg.content.config_records.values()), {})
    name, arrays, metrics_name, metrics, weight = own_train_reply(reply)
    own = {k: v for k, v in metrics.items() if k != WEIGHT_KEY}
    update, signature = contribute(dict(config), list(arrays), list(arrays.values()), weight,
                                   keys, context, run=msg.metadata.run_id, metrics=own)
    reply.content[name] = array_record(update.to_arrays())
    if node_setting(context.node_config, PLAINTEXT_METRICS):
        metrics.update(released)
    else:
        reply.content[metrics_name] = MetricRecord({WEIGHT_KEY: weight, **released})
    reply.content[STAGE_KEY] = ConfigRecord({
        "identity": keys.identity.key.public.hex(), "signature": signature.hex(),
        "share": keys.share_index})
