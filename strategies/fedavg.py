"""Weighted FedAvg on Flower's Message API that survives bad replies.

Flower's ``FedAvg`` raises on the first inconsistent reply, which ends the
run. ``WeightedFedAvg`` checks each reply against the model it sent, logs the
node and the reason for each one it leaves out, and aggregates the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregation import InvalidUpdate, check_update, check_weight, weighted_average


class WeightedFedAvg(FedAvg):
    """FedAvg weighted by ``num-examples``, dropping malformed replies.

    Takes the same arguments as :class:`flwr.serverapp.strategy.FedAvg`. A reply
    is left out (and logged with its node id) if it carries an error, has not
    exactly one ArrayRecord and one MetricRecord, lacks a positive integer
    weight, or its arrays differ from the global model in number, shape or dtype,
    or hold NaN or infinity. If no reply is left, the round keeps the model.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sent: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def _valid(self, replies: Iterable[Message], with_arrays: bool) -> list[Message]:
        reference = self._sent.to_numpy_ndarrays() if with_arrays and self._sent else None
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "Node %s failed: %s", node, msg.error.reason)
                continue
            try:
                content = msg.content
                if len(content.metric_records) != 1:
                    raise InvalidUpdate(f"{len(content.metric_records)} MetricRecords, expected 1")
                metrics = next(iter(content.metric_records.values()))
                check_weight(metrics.get(self.weighted_by_key))
                if with_arrays:
                    if len(content.array_records) != 1:
                        raise InvalidUpdate(f"{len(content.array_records)} ArrayRecords, expected 1")
                    record = next(iter(content.array_records.values()))
                    if reference is not None:
                        if list(record.keys()) != list(self._sent.keys()):
                            raise InvalidUpdate("array names differ from the global model's")
                        check_update(record.to_numpy_ndarrays(), reference)
            except (InvalidUpdate, ValueError, TypeError) as err:
                log(WARNING, "Left out the reply of node %s: %s", node, err)
                continue
            valid.append(msg)
        return valid

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = self._valid(replies, with_arrays=True)
        log(INFO, "aggregate_train: %d valid replies of %d", len(valid), len(replies))
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        weights = [int(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        updates = [next(iter(c.array_records.values())).to_numpy_ndarrays() for c in contents]
        keys = list(next(iter(contents[0].array_records.values())).keys())
        averaged = weighted_average(updates, weights)
        arrays = ArrayRecord({k: Array(a) for k, a in zip(keys, averaged, strict=True)})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid = self._valid(replies, with_arrays=False)
        if not valid:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
