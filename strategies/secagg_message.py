"""Masked secure aggregation (weighted FedAvg) on Flower's Message API: a strategy
and a client mod.

Switch an existing Message-API project with two changes::

    strategy = SecAggFedAvg(clip=1.0, ...)          # server
    app = ClientApp(mods=[secagg_mod])              # clients

In its first round the strategy runs two short key stages with the sampled nodes
before the train messages (``train`` messages holding only a ``secagg`` record, which
the mod answers itself without calling the app), puts the relayed shares in each
train message's config, and after the masked replies runs a consistency check and
an unmask stage (:mod:`strategies.secagg_protocol`). The check and unmask replies
carry the survivors' keys and shares for the next round, so from the second round on
a round is the train messages, the check and the unmask stage (the key stages come
back when the sample changes). The server only ever sees masked vectors and the sum.
Node secrets stay in the node's ``context.state``.

Each node signs its key advertisements and its consistency-check answer with its own
Ed25519 identity key, and accepts its neighbors' only under keys of the federation's
roster (:mod:`strategies.secagg_identity`): node config ``secagg-identity-key=PATH`` and
``secagg-roster=PATH``, else ``secagg-identity.key`` (in a simulation
``secagg-identity-<partition-id>.key``) and ``secagg-roster.json`` in the node's key
directory (:func:`strategies.keyfiles.node_key_file`; make them with ``fedapp keygen
--secagg`` and ``fedapp roster``, or ``fedapp keygen --secagg --simulation N``). The
server holds neither private key. A node without them refuses to take part (fail
closed) unless its own node setting ``secagg-allow-unauthenticated = true``
(:mod:`strategies.node_settings`): then the server is trusted to relay keys honestly
(semi-honest server) and the node says so once in its log.

Legacy-API projects use :mod:`strategies.secagg_legacy`; both build on
:mod:`strategies.secagg_rounds` (server) and :mod:`strategies.secagg_node` (nodes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregation import InvalidUpdate, Layout
from .fedavg import evaluate_metrics
from .secagg_masks import SecAggError
from .node_errors import reports_errors
from .node_settings import refuse_evaluation
from .records import WEIGHT_KEY, array_record, own_train_reply, record_arrays, screen
from .screening import SECURE_EMPTY_ROUNDS
from .secagg_node import answer_stage, mask_model, model_digest, require_payload
from .secagg_protocol import PAYLOAD_KEY, RoundAborted
from .secagg_rounds import SecAggRounds
from .secagg_wire import STAGE_RECORD_KEY, layout_digest, masked_arrays

# Flower routes a message to a registered function, and the mods wrap those: the
# key stages travel as "train" messages (every training project registers one)
# holding a "secagg" ConfigRecord, which the mod answers without calling the app.
STAGE_MESSAGE_TYPE = MessageType.TRAIN


# ------------------------------------------------------------------ strategy
class SecAggFedAvg(SecAggRounds, FedAvg):
    """Weighted FedAvg by secure aggregation: the server sees only masked updates.

    Parameters
    ----------
    clip : float
        Model values are clipped to ``[-clip, clip]`` before quantization.
    max_total_weight : int (default: 65536)
        Largest sum of client weights (examples) in one round; sets the headroom.
    value_bits : int (default: 16)
        Quantization bits per value (error bound ``2 clip / (2^bits - 1)``).
    num_neighbors : int (default: 0)
        Neighbors each node masks with and shares its secrets among; 0 takes
        SecAgg+'s ``2 ceil(log2 n) + 2`` (all nodes for 10 or fewer).
    threshold_fraction : float (default: 0.5)
        A node's secrets need shares from more than this fraction of its share
        group (itself and its neighbors): the dropouts tolerated per group, and
        the number of colluders with the server it withstands.
    stage_timeout : float (default: 300)
        Seconds to wait for the replies of each key stage.
    max_empty_rounds : int (default: 1)
        Rounds in a row without a usable update after which the run fails
        (:class:`strategies.screening.NoUsableUpdate`).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimums).

    A round whose key stages or unmasking lose too many nodes is skipped with a
    warning and the global model stays as it was (it counts as an empty round);
    malformed, replayed or mis-addressed replies (evaluation replies too) are left
    out naming the node.
    """

    def __init__(self, *, clip: float, max_total_weight: int = 65536, value_bits: int = 16,
                 num_neighbors: int = 0, threshold_fraction: float = 0.5, stage_timeout: float = 300.0,
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_masking(clip, max_total_weight, value_bits, num_neighbors, threshold_fraction,
                           stage_timeout, max_empty_rounds)
        self._grid: Grid | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> SecAgg: %s", self._describe())

    def _exchange(self, requests: dict[int, str], stage: str) -> dict[int, str]:
        """Send one key stage's requests; the payloads of the nodes that answered."""
        messages = [Message(RecordDict({STAGE_RECORD_KEY: ConfigRecord({PAYLOAD_KEY: text})}),
                            dst_node_id=u, message_type=STAGE_MESSAGE_TYPE)
                    for u, text in requests.items()]
        answers = {}
        start = time.monotonic()
        for reply in self._grid.send_and_receive(messages, timeout=self.stage_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.watch.node_failed(node, reply.error.reason, stage)
            elif STAGE_RECORD_KEY not in reply.content.config_records:
                log(WARNING, "Secure aggregation: node %s sent no %s payload", node, stage)
            else:
                answers[node] = reply.content.config_records[STAGE_RECORD_KEY].get(PAYLOAD_KEY)
        self.watch.flush()
        log(INFO, "Secure aggregation: %s stage, %d of %d nodes answered in %.2f s", stage,
            len(answers), len(messages), time.monotonic() - start)
        return answers

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid, self._round = grid, None
        plain = record_arrays(arrays)
        self._layout = Layout.of(list(plain), list(plain.values()))
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        if not sampled:
            return []
        try:
            rnd = self._new_round([m.metadata.dst_node_id for m in sampled])
            self._key_stages(rnd, self._exchange)
        except RoundAborted as err:
            log(WARNING, "Round %d skipped, the model stays as it was: %s", server_round, err)
            return []
        self._round = rnd
        base = dict(sampled[0].content.config_records[self.configrecord_key])
        return [Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key:
                                    ConfigRecord({**base, PAYLOAD_KEY: payload})}),
                        dst_node_id=u, message_type=MessageType.TRAIN)
                for u, payload in rnd.mask_payloads().items()]

    def _accept(self, msg: Message) -> None:
        if len(msg.content.array_records) != 1:
            raise InvalidUpdate(f"expected one ArrayRecord, got {len(msg.content.array_records)}")
        vector, header = masked_arrays(record_arrays(next(iter(
            msg.content.array_records.values()))))
        if header.get("layout") != layout_digest(self._layout):
            raise InvalidUpdate("the masked model's arrays (names, shapes, dtypes) differ from "
                                "the global model's")
        self._round.receive_masked(msg.metadata.src_node_id, vector, header)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._round is None:  # the key stages lost too many nodes
            self.watch.end_round(server_round, False)
            return None, None
        screen(server_round, replies, self.watch, self._accept)
        rnd, self._round = self._round, None
        self.watch.flush()
        try:
            average, self.last_total_weight, metrics = self._unmask(rnd, self._exchange)
        except RoundAborted as err:
            log(WARNING, "Round %d skipped, the model stays as it was: %s", server_round, err)
            self.watch.end_round(server_round, False)
            return None, None
        self.watch.end_round(server_round, True)
        arrays = array_record(dict(zip(self._layout.names, self._layout.unflatten(average),
                                       strict=True)))
        return arrays, MetricRecord(metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return evaluate_metrics(self, replies, self.watch)


# ------------------------------------------------------------------ client mod


@reports_errors(SecAggError, PermissionError)
def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer the key stages; mask the train update and its metrics on the way out
    (the server learns the metrics only as sums); refuse federated evaluation unless
    the node's ``plaintext-metrics`` allows it.

    Fails closed: without its identity key and roster (unless allowed), or when the server
    sends no masking payload, the node answers with an error naming the cause and the
    fix, and never sends plaintext; other failures reach the server as their type only
    (:mod:`strategies.node_errors`)."""
    node = msg.metadata.dst_node_id
    if msg.metadata.message_type == STAGE_MESSAGE_TYPE and \
            STAGE_RECORD_KEY in msg.content.config_records:
        reply = answer_stage(msg.content.config_records[STAGE_RECORD_KEY].get(PAYLOAD_KEY), context,
                             node)
        return Message(RecordDict({STAGE_RECORD_KEY: ConfigRecord({PAYLOAD_KEY: reply})}),
                       reply_to=msg)
    kind = msg.metadata.message_type.split(".")[0]
    if kind == MessageType.EVALUATE:
        refuse_evaluation(context.node_config, "masking")
    if kind != MessageType.TRAIN:
        return call_next(msg, context)
    config = next(iter(msg.content.config_records.values()), {})
    payload = require_payload(dict(config))
    received = model_digest({k: v for r in msg.content.array_records.values()
                             for k, v in record_arrays(r).items()}, dict(config))
    reply = call_next(msg, context)
    if reply.has_content():
        name, plain, metrics_name, metrics, weight = own_train_reply(reply)
        reply.content[name] = array_record(mask_model(
            payload, context, node, list(plain), list(plain.values()), weight, received,
            {k: v for k, v in metrics.items() if k != WEIGHT_KEY}, dict(config)))
        reply.content[metrics_name] = MetricRecord()  # the server learns only their sums
    return reply
