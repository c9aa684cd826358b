"""The simulation's message index hands each node what Flower's own scan would, and
looks only at that node's messages."""

from __future__ import annotations

import dataclasses
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.common.constant import (HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID,
                                   SUPERLINK_NODE_ID)
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedapp.message_index import index_messages_by_node
from fedapp.polling import PollingGrid

NODES = 4
RUN_ID, TASK_ID = 7, 11


@pytest.fixture(autouse=True, scope="module")
def serverapp_identity():
    """Messages are created as the ServerApp's task, as Flower's runtime sets it."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = TASK_ID, RUN_ID, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def simulation_grid(nodes: int = NODES) -> tuple[InMemoryGrid, list[int]]:
    """A grid and state set up the way Flower 1.42's ``_run_simulation`` and
    ``vce_api._register_nodes`` set them up."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = dataclasses.replace(Run.create_empty(RUN_ID), federation_id=NOOP_FEDERATION_ID,
                              primary_task_id=TASK_ID)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[TASK_ID] = Task(task_id=TASK_ID, run_id=run.run_id)
    node_ids = []
    for _ in range(nodes):
        node_id = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME,
                                    secrets.token_bytes(32),
                                    heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node_id,
                                         heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        node_ids.append(node_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, node_ids


def message(dst: int, tag: int) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"tag": tag})}), dst, "train",
                   group_id="1")


def tags(messages: list[Message]) -> list[int]:
    return [m.content["c"]["tag"] for m in messages]


# push to a node, ask for a node's next message(s), or answer (delete) what was delivered
operation = st.one_of(
    st.tuples(st.just("push"), st.integers(0, NODES - 1)),
    st.tuples(st.just("get"), st.integers(0, NODES - 1), st.sampled_from([1, 2, None])),
    st.tuples(st.just("answer")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=40), st.integers(0, 5))
def test_each_node_gets_what_flowers_own_scan_gives_it(operations, index_after):
    """The same operations on an indexed and a plain state hand out the same messages,
    whether the index was installed before or after messages were stored."""
    plain, plain_nodes = simulation_grid()
    indexed, indexed_nodes = simulation_grid()
    for step, op in enumerate(operations):
        if step == index_after:
            assert index_messages_by_node(indexed)
        if op[0] == "push":
            for grid, nodes in ((plain, plain_nodes), (indexed, indexed_nodes)):
                assert grid.push_messages([message(nodes[op[1]], step)])
        elif op[0] == "get":
            got = [tags(grid.state.get_message_ins(nodes[op[1]], op[2]))
                   for grid, nodes in ((plain, plain_nodes), (indexed, indexed_nodes))]
            assert got[0] == got[1]
        else:
            for grid in (plain, indexed):
                delivered = [i for i, m in grid.state.message_ins_store.items()
                             if m.metadata.delivered_at]
                grid.state.delete_messages(set(delivered))
    assert (sorted(tags(list(plain.state.message_ins_store.values())))
            == sorted(tags(list(indexed.state.message_ins_store.values()))))


def test_an_ask_looks_only_at_its_own_nodes_messages():
    """With 200 messages stored for other nodes, asking for one node's checks only
    that node's (Flower's scan checks all 201)."""
    grid, nodes = simulation_grid(nodes=201)
    grid.push_messages([message(node, i) for i, node in enumerate(nodes)])
    state = grid.state
    checked: list[str] = []
    check = state._check_stored_messages

    def counting(message_ids, run_id=None):
        checked.extend(message_ids)
        return check(message_ids, run_id)

    state._check_stored_messages = counting
    assert len(state.get_message_ins(nodes[-1], limit=1)) == 1
    assert len(checked) == 201  # Flower's own scan
    checked.clear()
    assert index_messages_by_node(grid)
    assert tags(state.get_message_ins(nodes[0], limit=1)) == [0]
    assert len(checked) == 1
    assert state.get_message_ins(nodes[0], limit=1) == []  # delivered once


def test_an_expired_message_is_dropped_not_delivered():
    grid, nodes = simulation_grid()
    assert index_messages_by_node(grid)
    expired = message(nodes[0], 1)
    grid.push_messages([expired])
    expired.metadata.__dict__["_created_at"] -= 10 * expired.metadata.ttl
    assert grid.state.get_message_ins(nodes[0], limit=1) == []
    assert not grid.state.message_ins_store


def test_only_a_simulations_grid_is_indexed():
    grid, _ = simulation_grid()
    assert not index_messages_by_node(object())
    assert index_messages_by_node(grid)
    assert index_messages_by_node(grid)  # once
    PollingGrid(grid)  # what the ServerApp wraps its grid in also indexes it
    other, _ = simulation_grid()
    PollingGrid(other)
    assert "get_message_ins" in vars(other.state)
