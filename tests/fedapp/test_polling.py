"""Shorter waits on real nodes (fedapp.polling): the ServerApp's grid polls for replies
with Flower's public push/pull calls and honours the timeout; the SuperNode's sleeps
are capped; object pulls retry sooner; the cap is checked."""

from __future__ import annotations

import time

import pytest
from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.inflatable import inflatable_utils

from fedapp import polling


def reply_to(message_id: str) -> Message:
    return Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id="", src_node_id=2, dst_node_id=0,
        reply_to_message_id=message_id, group_id="", created_at=0.0, ttl=60.0,
        message_type="train"))


class SlowGrid:
    """Replies to message ``i`` after ``i`` pulls; never to ids in ``silent``."""

    def __init__(self, silent: set[str] = frozenset()) -> None:
        self.pulls = 0
        self.silent = silent
        self.node_ids = [7, 8]

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [reply_to(m) for m in message_ids
                if m not in self.silent and int(m[1:]) < self.pulls]

    def get_node_ids(self):
        return self.node_ids


def test_grid_collects_every_reply_as_it_arrives():
    inner = SlowGrid()
    grid = polling.PollingGrid(inner, poll_seconds=0.001)
    replies = list(grid.send_and_receive([object(), object(), object()], timeout=10))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pulls == 3
    assert list(grid.get_node_ids()) == [7, 8]  # the rest is the wrapped grid's


def test_grid_polls_fast_right_after_sending_then_every_poll_seconds(monkeypatch):
    now, slept = [0.0], []
    monkeypatch.setattr(polling.time, "monotonic", lambda: now[0])

    def sleep(seconds):
        slept.append(seconds)
        now[0] += 0.5
    monkeypatch.setattr(polling.time, "sleep", sleep)
    inner = SlowGrid()
    grid = polling.PollingGrid(inner)
    grid.send_and_receive([object() for _ in range(7)])
    assert inner.pulls == 7  # the last reply came at the 7th pull, 3 s on
    fast = polling.GRID_FAST_POLL_SECONDS
    assert slept == [fast] * 4 + [polling.GRID_POLL_SECONDS] * 2


def test_grid_returns_what_came_when_the_timeout_passes():
    grid = polling.PollingGrid(SlowGrid(silent={"m1"}), poll_seconds=0.01)
    started = time.monotonic()
    replies = list(grid.send_and_receive([object(), object()], timeout=0.2))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.2 <= time.monotonic() - started < 2


def test_node_sleeps_follow_the_runs_bursts(monkeypatch):
    now, slept = [100.0], []
    monkeypatch.setattr(polling.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(polling.time, "sleep", slept.append)
    node = polling._node_time(0.25, 0.05)
    assert node.time is time.time
    node.sleep(3)  # idle since it started: asks every second, not every 3
    node.sleep(0.5)  # a message came: waiting for the local reply, in this process
    node.sleep(3)  # ... the next stage's message may come at once
    now[0] += polling.FAST_SECONDS
    node.sleep(3)  # ... or soon
    now[0] += polling.BURST_SECONDS
    node.sleep(3)  # a minute without one: idle again
    assert slept == [polling.NODE_IDLE_POLL_SECONDS, polling.LOCAL_WAIT_SECONDS, 0.05, 0.25,
                     polling.NODE_IDLE_POLL_SECONDS]


def test_cadence_is_active_for_the_burst_after_work(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(polling.time, "monotonic", lambda: now[0])
    cadence = polling.Cadence(0.1, 0.5, burst=60)
    assert cadence.interval() == 0.5
    cadence.busy()
    now[0] += 59.9
    assert cadence.interval() == 0.1
    now[0] += 0.2
    assert cadence.interval() == 0.5


def test_cadence_is_fast_right_after_work(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(polling.time, "monotonic", lambda: now[0])
    cadence = polling.Cadence(0.25, 1.0, burst=60, fast=0.05, fast_window=2)
    assert cadence.interval() == 1.0
    cadence.busy()
    now[0] += 1.9
    assert cadence.interval() == 0.05
    now[0] += 0.2
    assert cadence.interval() == 0.25
    # a fast interval above the active one is the active one
    assert polling.Cadence(0.25, 1.0, fast=0.5).fast == 0.25
    assert polling.Cadence(0.25, 1.0).fast == 0.25


@pytest.mark.parametrize(("env", "read", "default"), [
    (polling.NODE_POLL_ENV, polling.node_poll_seconds, polling.NODE_POLL_SECONDS),
    (polling.NODE_FAST_POLL_ENV, polling.node_fast_poll_seconds, polling.NODE_FAST_POLL_SECONDS),
])
def test_node_poll_settings_are_checked(monkeypatch, env, read, default):
    monkeypatch.delenv(env, raising=False)
    assert read() == default
    monkeypatch.setenv(env, "0.5")
    assert read() == 0.5
    for bad in ("0", "5", "fast", "nan"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match="between 0.01 and 3"):
            read()


def test_node_heartbeat_setting_is_checked_and_reaches_flowers_sender(monkeypatch):
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    monkeypatch.delenv(polling.NODE_HEARTBEAT_ENV, raising=False)
    assert polling.node_heartbeat_seconds() == 10.0
    for bad in ("9", "1801", "often", "nan"):
        monkeypatch.setenv(polling.NODE_HEARTBEAT_ENV, bad)
        with pytest.raises(ValueError, match="between 10 and 1800"):
            polling.node_heartbeat_seconds()
    for module in (heartbeat, fleet_http_connection):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL",
                            module.HEARTBEAT_DEFAULT_INTERVAL)
    polling.heartbeat_every(12.0)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 12.0  # what the node promises
    # Flower's sender waits (interval - call timeout) x 0.8 +- 0.1 between heartbeats
    waits = []
    sender = heartbeat.HeartbeatSender(lambda: True)
    monkeypatch.setattr(sender._stop_event, "wait",
                        lambda s: (waits.append(s), sender._stop_event.set()))
    sender._run()
    assert 0.7 * 7 <= waits[0] <= 0.9 * 7


def test_object_pulls_retry_sooner(monkeypatch):
    pulls = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    for pull in pulls:
        for key in ("initial_backoff", "backoff_cap", "max_tries_per_object"):
            monkeypatch.setitem(pull.__kwdefaults__, key, pull.__kwdefaults__[key])
    polling.fast_object_pulls()
    for pull in pulls:
        assert pull.__kwdefaults__["initial_backoff"] == 0.01
        assert pull.__kwdefaults__["backoff_cap"] == 0.05
        # as patient as Flower: bounded by its time limit, not by 500 quick tries
        assert pull.__kwdefaults__["max_tries_per_object"] is None
        assert pull.__kwdefaults__["max_time"] >= 3600


def test_a_late_object_is_still_pulled_after_more_than_500_quick_tries(monkeypatch):
    """The pull that failed every node of a 30-node deployment: objects stored 30 s late."""
    pull = inflatable_utils.pull_objects
    for key in ("initial_backoff", "backoff_cap", "max_tries_per_object"):
        monkeypatch.setitem(pull.__kwdefaults__, key, pull.__kwdefaults__[key])
    polling.fast_object_pulls()
    monkeypatch.setitem(pull.__kwdefaults__, "backoff_cap", 0.0)  # no real waiting here
    monkeypatch.setitem(pull.__kwdefaults__, "initial_backoff", 0.0)
    tries = {"n": 0}

    def pull_object(object_id):
        tries["n"] += 1
        if tries["n"] <= 600:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    assert pull(["a"], pull_object) == {"a": b"content"} and tries["n"] == 601


class LostNodeGrid:
    """Node 7 answers; for node 9 the SuperLink answers, as Flower does for a node that
    missed its heartbeats: an error reply from node 1."""

    def push_messages(self, messages):
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's grids do
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids):
        ok = Message(RecordDict(), reply_to=self.sent[0])
        lost = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Node Unavailable"), metadata=Metadata(
            run_id=1, message_id="", src_node_id=SUPERLINK_NODE_ID,
            dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id="m1", group_id="",
            created_at=time.time(), ttl=60.0, message_type="train"))
        return [ok, lost]


def test_a_lost_node_is_named_by_its_own_id():
    inner = LostNodeGrid()
    inner.sent = [Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=node,
        reply_to_message_id="", group_id="", created_at=time.time(), ttl=60.0,
        message_type="train")) for node in (7, 9)]
    replies = polling.PollingGrid(inner, poll_seconds=0.001).send_and_receive(inner.sent,
                                                                             timeout=5)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_node) == [7, 9]
    assert by_node[9].has_error() and by_node[9].error.code == ErrorCode.NODE_UNAVAILABLE
    assert by_node[9].error.reason == "Node Unavailable"
    assert by_node[9].metadata.reply_to_message_id == "m1" and not by_node[7].has_error()
