"""Build this node's NumPyClient from the run config and the node config.

In simulation Flower sets ``partition-id`` / ``num-partitions`` in the node
config; on real nodes they come from ``flower-supernode --node-config`` (the
``fedapp client`` command writes them), together with an optional ``data-dir``
that overrides the run config's for this node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import Context

if TYPE_CHECKING:
    from clients.numpy_clients import TaskClient


def node_partition(node_config: dict) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from a node config, checked."""
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node config lacks {err}: start the SuperNode with --node-config "
            "\"partition-id=I num-partitions=N\" (fedapp client does this)") from err
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} is outside 0..{n - 1}")
    return pid, n


def make_client(context: Context) -> TaskClient:
    """The NumPyClient for this node's task and partition.

    It gets the node's ``context.state``, which outlives the client (rebuilt for
    every message): DP-SGD keeps its privacy accountant there between rounds.
    """
    # torch loads here, not at import: a process that only answers secure-aggregation key
    # stages never needs it (Flower's own flwr-clientapp starts one per message).
    from clients.numpy_clients import CLIENTS
    from clients.tasks import load_client_data

    from .config import RunSettings

    settings = RunSettings.from_run_config(dict(context.run_config))
    pid, n = node_partition(dict(context.node_config))
    data_dir = context.node_config.get("data-dir")
    spec = settings.data_spec(n, None if data_dir is None else str(data_dir))
    train, test = load_client_data(spec, pid)
    return CLIENTS[settings.task](spec, train, test, seed=settings.seed + pid,
                                 state=context.state)
