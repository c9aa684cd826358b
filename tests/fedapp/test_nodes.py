"""A node's partition from its node config (fedapp.nodes)."""

from __future__ import annotations

import pytest


def test_node_config_is_checked():
    from fedapp.nodes import node_partition

    assert node_partition({"partition-id": 2, "num-partitions": 3}) == (2, 3)
    with pytest.raises(ValueError, match="outside"):
        node_partition({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ValueError, match="--node-config"):
        node_partition({"num-partitions": 3})
