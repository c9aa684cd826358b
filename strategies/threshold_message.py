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

The node keys are those of :mod:`strategies.threshold_node`; the round logic,
shared with the legacy-API adapter :mod:`strategies.threshold_legacy`, is
:mod:`strategies.threshold_rounds`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from .aggregation import InvalidUpdate
from .fedavg import aggregate_metrics, evaluate_metrics
from .node_errors import NodeError, reports_errors
from .node_settings import PLAINTEXT_METRICS, node_setting, refuse_evaluation
from .paillier_node import resumed_run, open_sealed_model, round_config
from .paillier_protocol import DecryptionRefused, EncryptedModel
from .records import (WEIGHT_KEY, array_record, own_train_reply, record_arrays, screen,
                      train_reply)
from .screening import SECURE_EMPTY_ROUNDS
from .threshold_node import (NodeKeys, answer_combine, answer_decrypt, answer_view,
                             contribute, node_keys)
from .threshold_paillier import ThresholdPublicKey
from .threshold_protocol import DecryptRequest, SealError, ThresholdRefused, View, is_sealed
from .threshold_rounds import (CombineRequest, Combined, StageRequest, ThresholdRounds,
                               read_request, read_signature, read_view, request_arrays,
                               request_fields, signature_fields, view_text)

STAGE_KEY = "threshold"  # the ConfigRecord of a stage request, and of a train reply's signature
STAGE_MESSAGE_TYPE = MessageType.TRAIN


def _bytes_record(value: bytes) -> ArrayRecord:
    return array_record({"bytes": np.frombuffer(value, np.uint8).copy()})


def _record_bytes(record: ArrayRecord) -> bytes:
    arrays = record_arrays(record)
    if set(arrays) != {"bytes"} or arrays["bytes"].dtype != np.uint8:
        raise ValueError("expected one uint8 array named 'bytes'")
    return arrays["bytes"].tobytes()


# ------------------------------------------------------------------ strategy
class ThresholdPaillierFedAvg(ThresholdRounds, FedAvg):
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
    payload : {"masked", "paillier"} (default: "masked")
        What a contribution carries: its levels masked under a fresh Ring-LWE secret,
        with only the secret encrypted (:mod:`strategies.ring_masks`: the decryptors
        decrypt 33 ciphertexts a round, whatever the model's size), or its levels
        packed into Paillier plaintexts and encrypted (security on DCR alone; the
        decryptors decrypt every ciphertext, about 17 ms each on one core).
    stage_timeout : float (default: 600)
        Seconds to wait for each stage's replies (with the ``paillier`` payload a
        partial decryption of a large model takes minutes: about 17 ms per ciphertext
        on one core).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimums).

    A round needs at least ``T + 1`` valid contributions (the decryptors refuse fewer:
    :mod:`strategies.threshold_protocol`), a view signed by all of them, ``T`` partials
    and one combiner; otherwise it is skipped with a warning and the model stays as it
    was (:class:`strategies.threshold_rounds.ThresholdRounds`). Share holders are known
    from their train replies (a reply says which share, if any, its node holds), so the
    first round's sampling must reach ``T`` of them.
    """

    def __init__(self, public_key: ThresholdPublicKey, *, clip: float,
                 max_total_weight: int = 65536, weight_unit: int = 1, value_bits: int = 16,
                 extra_decryptors: int = 1, stage_timeout: float = 600.0,
                 payload: str = "masked",
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_threshold(public_key, clip, max_total_weight, weight_unit, value_bits,
                             extra_decryptors, stage_timeout, max_empty_rounds, payload)
        self._grid: Grid | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Threshold Paillier: %s", self._describe_threshold())

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
        self._remember_global(record_arrays(arrays))
        config = ConfigRecord({**config, **round_config(
            self.params, self.public_key.fingerprint, self.weight_unit, server_round,
            self.resumed_run, masked=self.masked)})
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_sum = self._round_sum(server_round)
        signed: dict = {}

        def accept(msg: Message) -> None:
            arrays, _ = train_reply(msg, self.weighted_by_key)
            signature = read_signature(msg.content.config_records.get(STAGE_KEY),
                                       "threshold_paillier_mod")
            self._accept(round_sum, signed, msg.metadata.src_node_id, arrays, signature)

        valid = screen(server_round, replies, self.watch, accept)
        log(INFO, "aggregate_train: %d valid encrypted replies of %d", len(valid), len(replies))
        sealed = self._seal_round(server_round, round_sum, signed, self._grid.get_node_ids,
                                  self._exchange)
        if sealed is None:
            return None, None
        metrics = aggregate_metrics(self.train_metrics_aggr_fn, [m.content for m in valid],
                                    self.weighted_by_key)
        return array_record(sealed), metrics

    def _exchange(self, requests: dict[int, StageRequest], stage: str
                  ) -> dict[int, bytes | Combined | None]:
        """Send one stage's requests as train messages; the answers without error, read."""
        contents: dict[int, RecordDict] = {}  # by request: a decrypt request is encoded once
        messages = []
        for node, request in requests.items():
            if id(request) not in contents:
                contents[id(request)] = _request_content(request)
            messages.append(Message(RecordDict(dict(contents[id(request)].items())),
                                    dst_node_id=node, message_type=STAGE_MESSAGE_TYPE))
        answers = {}
        for reply in self._grid.send_and_receive(messages, timeout=self.stage_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.watch.node_failed(node, reply.error.reason, stage)
            else:
                answers[node] = _read_answer(stage, reply.content)
        return answers

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return evaluate_metrics(self, replies, self.watch)


def _request_content(request: StageRequest) -> RecordDict:
    """A stage request as a train message's content: its text in the ``threshold``
    ConfigRecord, contributions, aggregate and partials as ArrayRecords."""
    if isinstance(request, View):
        return RecordDict({STAGE_KEY: ConfigRecord({"stage": "view",
                                                    "view": view_text(request)})})
    if isinstance(request, DecryptRequest):
        return RecordDict({STAGE_KEY: ConfigRecord({"stage": "decrypt",
                                                    **request_fields(request)}),
                           **{name: array_record(arrays)
                              for name, arrays in request_arrays(request).items()}})
    return RecordDict({STAGE_KEY: ConfigRecord({"stage": "combine"}),
                       "aggregate": array_record(request.aggregate.to_arrays()),
                       **{f"partial-{node}": _bytes_record(blob)
                          for node, blob in request.partials.items()}})


def _read_answer(stage: str, content: RecordDict) -> bytes | Combined | None:
    """A node's answer to a stage request; ``None`` if it cannot be read."""
    try:
        if stage == "view":
            return bytes.fromhex(str(content.config_records[STAGE_KEY]["signature"]))
        if stage == "decrypt":
            return _record_bytes(content.array_records["partial"])
        left_out = json.loads(str(content.config_records[STAGE_KEY].get("left-out", "[]")))
        return Combined(record_arrays(content.array_records["model"]),
                        [int(node) for node in left_out])
    except (KeyError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------ client mod


def _answer_stage(msg: Message, context: Context, keys: NodeKeys) -> Message:
    config = msg.content.config_records[STAGE_KEY]
    stage = config.get("stage")
    out: dict = {}
    if stage == "view":
        signature = answer_view(read_view(config.get("view")), keys, context)
        out[STAGE_KEY] = ConfigRecord({"signature": signature.hex()})
    elif stage == "decrypt":
        out["partial"] = _bytes_record(answer_decrypt(_decrypt_request(msg, keys), keys, context))
    elif stage == "combine":
        aggregate = EncryptedModel.from_arrays(
            record_arrays(msg.content.array_records["aggregate"]), keys.public)
        sealed = {int(name[len("partial-"):]): _record_bytes(record)
                  for name, record in msg.content.array_records.items()
                  if name.startswith("partial-") and name[len("partial-"):].isdigit()}
        combined = answer_combine(CombineRequest(aggregate, sealed), keys, context)
        out["model"] = array_record(combined.model)
        out[STAGE_KEY] = ConfigRecord({"left-out": json.dumps(combined.left_out)})
    else:
        raise NodeError(f"unknown threshold stage {stage!r}: server and node run different "
                        "versions")
    return Message(RecordDict(out), reply_to=msg)


def _decrypt_request(msg: Message, keys: NodeKeys) -> DecryptRequest:
    return read_request(msg.content.config_records[STAGE_KEY], lambda name: record_arrays(
        msg.content.array_records[name]), keys.public)


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
    resumed = resumed_run(next(iter(msg.content.config_records.values()), {}))
    for name, record in list(msg.content.array_records.items()):
        arrays = record_arrays(record)
        if is_sealed(arrays):
            layout, plain, released = open_sealed_model(keys.group, arrays, msg.metadata.run_id,
                                                        resumed)
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
    contribution = contribute(dict(config), list(arrays), list(arrays.values()), weight,
                              keys, context, run=msg.metadata.run_id, metrics=own)
    reply.content[name] = array_record(contribution.model.to_arrays())
    if node_setting(context.node_config, PLAINTEXT_METRICS):
        metrics.update(released)
    else:
        reply.content[metrics_name] = MetricRecord({WEIGHT_KEY: weight, **released})
    reply.content[STAGE_KEY] = ConfigRecord(signature_fields(
        keys.identity.key.public, contribution, keys.share_index))
