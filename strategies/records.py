"""Message-API replies: named numpy arrays in and out of Flower's ``ArrayRecord``, and
the one screening loop every Message-API strategy runs over its train replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.constant import SType
from flwr.common.logger import log

from .aggregation import InvalidUpdate, check_weight
from .legacy_wire import load_npy
from .screening import RoundWatch

WEIGHT_KEY = "num-examples"  # a train reply's weight, as the clients' mods write it


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of ``record`` by name, in order.

    Raises
    ------
    InvalidUpdate
        If an array is not numpy ``.npy`` bytes of plain values (a sender can put any
        bytes in an ``Array``); nothing is unpickled.
    """
    out = {}
    for name, array in record.items():
        if array.stype != SType.NUMPY:
            raise InvalidUpdate(f"array {name!r} is serialized as {array.stype!r}, not as "
                                f"{SType.NUMPY!r}")
        out[name] = load_npy(array.data, f"{name!r}")
    return out


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of named arrays, in order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def own_train_reply(reply: Message) -> tuple[str, dict[str, np.ndarray], str, MetricRecord,
                                             int]:
    """What a node's ClientApp answered to a train message, for a secure mod to rewrite
    before it leaves the node: the name and arrays of its one ArrayRecord, the name and
    record of its one MetricRecord, and its weight.

    Raises
    ------
    ValueError
        Unless it holds exactly one of each and a positive int weight.
    """
    if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
        raise ValueError("a train reply must hold one ArrayRecord and one MetricRecord")
    (name, record), = reply.content.array_records.items()
    (metrics_name, metrics), = reply.content.metric_records.items()
    return name, record_arrays(record), metrics_name, metrics, check_weight(
        metrics.get(WEIGHT_KEY))


def train_reply(msg: Message, weighted_by_key: str) -> tuple[dict[str, np.ndarray], int]:
    """The arrays (by name) and the weight of a train reply.

    Raises
    ------
    InvalidUpdate
        Unless it holds exactly one ArrayRecord and one MetricRecord, whose
        ``weighted_by_key`` is a positive int, and arrays of plain ``.npy`` values.
    """
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        raise InvalidUpdate(f"expected one ArrayRecord and one MetricRecord, got "
                            f"{len(content.array_records)} and {len(content.metric_records)}")
    weight = check_weight(next(iter(content.metric_records.values())).get(weighted_by_key))
    return record_arrays(next(iter(content.array_records.values()))), weight


def screen(server_round: int, replies: Iterable[Message], watch: RoundWatch,
           accept: Callable[[Message], object]) -> list[Message]:
    """The replies ``accept`` takes: an error reply goes to ``watch`` (logged once per
    round and cause), a reply ``accept`` refuses (``ValueError``, ``TypeError``) is left
    out with a warning naming the node and the reason."""
    valid = []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            watch.node_failed(node, msg.error.reason)
            continue
        try:
            accept(msg)
        except (ValueError, TypeError) as err:
            log(WARNING, "Left out the reply of node %s in round %d: %s", node, server_round,
                err)
            continue
        valid.append(msg)
    return valid
