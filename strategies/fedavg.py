"""Weighted FedAvg on Flower's Message API that survives bad replies.

Flower's ``FedAvg`` raises on the first inconsistent reply, which ends the
run. ``WeightedFedAvg`` checks each reply against the model it sent, logs the
node and the reason for each one it leaves out, and aggregates the rest. The
secure strategies aggregate their clients' metrics with the same helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregation import InvalidUpdate, check_update, check_weight, weighted_average
from .records import screen, train_reply
from .screening import PLAINTEXT_EMPTY_ROUNDS, RoundWatch


class WeightedFedAvg(FedAvg):
    """FedAvg weighted by ``num-examples``, dropping malformed replies.

    Parameters
    ----------
    max_empty_rounds : int (default: 3)
        Rounds in a row without a usable update after which the run fails
        (:class:`strategies.screening.NoUsableUpdate`).
    *args, **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.

    A reply is left out (and logged with its node id) if it carries an error, has
    not exactly one ArrayRecord and one MetricRecord, lacks a positive integer
    weight, or its arrays differ from the global model in number, shape or dtype,
    or hold NaN or infinity. If no reply is left, the round keeps the model. Nodes
    that failed are logged once per round and cause.
    """

    server_sees = "plain"

    def __init__(self, *args, max_empty_rounds: int = PLAINTEXT_EMPTY_ROUNDS,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.watch = RoundWatch(max_empty_rounds)
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def _accept(self, msg: Message) -> None:
        arrays, _ = train_reply(msg, self.weighted_by_key)
        if self._sent is not None:
            if list(arrays) != list(self._sent.keys()):
                raise InvalidUpdate("array names differ from the global model's")
            check_update(list(arrays.values()), self._sent.to_numpy_ndarrays())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = screen(server_round, replies, self.watch, self._accept)
        log(INFO, "aggregate_train: %d valid replies of %d", len(valid), len(replies))
        self.watch.end_round(server_round, bool(valid))
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        weights = [int(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        updates = [next(iter(c.array_records.values())).to_numpy_ndarrays() for c in contents]
        keys = list(next(iter(contents[0].array_records.values())).keys())
        averaged = weighted_average(updates, weights)
        arrays = ArrayRecord({k: Array(a) for k, a in zip(keys, averaged, strict=True)})
        return arrays, aggregate_metrics(self.train_metrics_aggr_fn, contents,
                                         self.weighted_by_key)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return evaluate_metrics(self, replies, self.watch)


def aggregate_metrics(aggregate: Callable[[list[RecordDict], str], MetricRecord],
                      contents: list[RecordDict], weighted_by_key: str) -> MetricRecord | None:
    """``aggregate(contents, weighted_by_key)``, or ``None`` with a warning if the
    replies' metrics cannot be averaged together (a list where another reply sends a
    number, lists of other lengths): clients choose their metrics, and one bad
    metric must not end the round."""
    try:
        return aggregate(contents, weighted_by_key)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        log(WARNING, "Left out this round's client metrics, they do not aggregate: %s", err)
        return None


def evaluate_metrics(strategy: FedAvg, replies: Iterable[Message],
                     watch: RoundWatch) -> MetricRecord | None:
    """The evaluation metrics of ``replies`` aggregated by ``strategy``'s function,
    weighted by ``strategy.weighted_by_key``; a reply with an error (logged through
    ``watch``, once per cause), not exactly one MetricRecord or no positive int weight
    is left out (Flower's FedAvg raises instead, which ends the run)."""
    valid = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            watch.node_failed(node, msg.error.reason, "evaluate")
            continue
        records = msg.content.metric_records
        try:
            if len(records) != 1:
                raise InvalidUpdate(f"{len(records)} MetricRecords, expected 1")
            check_weight(next(iter(records.values())).get(strategy.weighted_by_key))
        except InvalidUpdate as err:
            log(WARNING, "Left out the evaluation of node %s: %s", node, err)
            continue
        valid.append(msg.content)
    watch.flush()
    if not valid:
        return None
    return aggregate_metrics(strategy.evaluate_metrics_aggr_fn, valid, strategy.weighted_by_key)
