"""The long-lived ClientApp worker (fedapp.node_worker) with the SuperNode's Runtime API
stood in for: it loads each app bundle's ClientApp once, answers every task, reports a
ClientApp that raises as flwr-clientapp does (an error reply and a failed task) and goes
on with the next task. Its in-process Runtime API checks task tokens as Flower's routes
do, on a real NodeState. Real nodes run it in tests/runs/test_real_nodes.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode, SubStatus

from fedapp import node_worker


def task_message() -> Message:
    return Message(RecordDict(), metadata=Metadata(
        run_id=1, message_id="abc", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train"))


class Node:
    """The SuperNode's side of the Runtime API, as the worker's calls see it."""

    def __init__(self, fab_hashes: list[str]) -> None:
        self.fab_hashes = fab_hashes
        self.pushed: list[Message] = []
        self.outputs: list[tuple[str, str]] = []

    def pull_task_input(self, client):
        context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(),
                          run_config={})
        run = SimpleNamespace(fab_id="fedprivacy", fab_version="0.1.0")
        return task_message(), context, run, SimpleNamespace(hash_str=self.fab_hashes.pop(0),
                                                             content=b"")


@pytest.fixture
def node(monkeypatch, task_identity) -> Node:
    node = Node(["h1", "h1", "h2"])
    monkeypatch.setattr(node_worker, "HeartbeatSender", lambda fn: SimpleNamespace(
        start=lambda: None, stop=lambda: None))
    monkeypatch.setattr(node_worker, "pull_task_input", node.pull_task_input)
    monkeypatch.setattr(node_worker, "push_message",
                        lambda client, message, context: node.pushed.append(message))
    monkeypatch.setattr(node_worker, "push_task_output", lambda client, context, sub_status,
                        details: node.outputs.append((sub_status, details)))
    monkeypatch.setattr(node_worker, "install_from_fab", lambda content, skip_prompt: None)
    return node


def test_each_bundle_is_loaded_once_and_every_task_answered(node):
    loads, calls = [], []

    def app(message, context):
        calls.append(message.metadata.message_type)
        return Message(RecordDict(), reply_to=message)

    worker = node_worker.ClientAppWorker(state=None)
    worker._load = lambda fab_id, version, fab_hash: loads.append(fab_hash) or app
    assert [worker.run_task("t") for _ in range(3)] == [True, True, True]
    assert loads == ["h1", "h2"] and calls == ["train"] * 3
    assert [m.metadata.reply_to_message_id for m in node.pushed] == ["abc"] * 3
    assert node.outputs == [(SubStatus.COMPLETED, "")] * 3


def test_a_raising_clientapp_fails_its_task_only(node):
    answers = iter([ZeroDivisionError("boom"), None, None])

    def app(message, context):
        if (err := next(answers)) is not None:
            raise err
        return Message(RecordDict(), reply_to=message)

    worker = node_worker.ClientAppWorker(state=None)
    worker._load = lambda *a: app
    assert [worker.run_task("t") for _ in range(3)] == [False, True, True]
    error = node.pushed[0]
    assert error.has_error() and error.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom" in error.error.reason
    assert node.outputs[0][0] == SubStatus.FAILED and node.outputs[1][0] == SubStatus.COMPLETED


def test_a_task_whose_input_never_comes_does_not_hold_up_the_next(node, monkeypatch):
    """A message of a run that stopped before the SuperNode had its objects: its task
    waits for them in its own thread while the tasks after it run."""
    import threading

    release = threading.Event()
    pull = node.pull_task_input

    def pull_task_input(client):
        if client.token == "stuck":
            release.wait(30)
            raise RuntimeError("objects never came")
        return pull(client)

    class Stop(Exception):
        pass

    tokens = iter(["stuck", "t1", "t2"])

    def next_token():
        token = next(tokens, None)
        if token is None:
            if len(node.outputs) < 2:
                return None  # nothing claimed: poll again
            raise Stop
        return token

    monkeypatch.setattr(node_worker, "pull_task_input", pull_task_input)
    worker = node_worker.ClientAppWorker(state=None)
    worker._load = lambda *a: (lambda message, context: Message(RecordDict(), reply_to=message))
    worker.next_token = next_token
    with pytest.raises(Stop):
        worker.serve(poll_seconds=0.01)
    assert node.outputs == [(SubStatus.COMPLETED, "")] * 2  # while the first still waits
    release.set()
    # its thread ends while Flower's functions are still stood in for
    for _ in range(500):
        if len(node.outputs) == 3:
            break
        threading.Event().wait(0.01)
    assert node.outputs[2][0] == SubStatus.FAILED


def test_a_node_whose_supernode_exits_stops_its_worker_and_says_why(capfd):
    """``fedapp client``: when the SuperNode exits, its exit code is passed on and its
    output relayed with the likely cause; nothing is left running."""
    import os
    import sys

    from fedapp import launch

    failing = [sys.executable, "-c", "import time; time.sleep(1); print('ssl.SSLCertVerifica"
               "tionError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
               "unable to get local issuer certificate'); raise SystemExit(3)"]
    before = set(launch.process_table())
    assert launch.run_node(failing, launch.flower_env()) == 3
    out = capfd.readouterr()
    assert "CERTIFICATE_VERIFY_FAILED" in out.out
    assert "likely cause: the server's certificate is not signed by this node's CA" in out.out
    assert "the SuperNode (pid" in out.err and "exited with 3" in out.err
    mine = {pid for pid, (parent, _) in launch.process_table().items() if parent == os.getpid()}
    assert not (mine - before), "the worker was left running"


def test_the_in_process_runtime_answers_only_the_claimed_task_token():
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        AcquireTaskRequest, SendTaskHeartbeatRequest)
    from flwr.supercore.constant import TaskType
    from flwr.supercore.error import FlowerError
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    state = NodeStateFactory(ObjectStoreFactory()).state()
    control = node_worker.InProcessRuntime(state)
    wanted = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    assert not control.AcquireTask(wanted).HasField("task")  # nothing to claim yet
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=7, fab_hash="h")
    claimed = control.AcquireTask(wanted)
    assert claimed.task.task_id == task_id and claimed.token
    assert not control.AcquireTask(wanted).HasField("task")  # claimed once only
    beat = SendTaskHeartbeatRequest()
    assert node_worker.InProcessRuntime(state, claimed.token).SendTaskHeartbeat(beat).success
    for token in (None, "", claimed.token[::-1]):
        with pytest.raises(FlowerError, match="authentication failed"):
            node_worker.InProcessRuntime(state, token).SendTaskHeartbeat(beat)
    with pytest.raises(AttributeError):
        node_worker.InProcessRuntime(state, claimed.token).CreateTask


def test_a_worker_that_cannot_serve_stops_its_supernode(monkeypatch):
    """A node whose worker died would take tasks and never run them: it stops instead."""
    import signal

    killed = []
    monkeypatch.setattr(node_worker.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    worker = node_worker.ClientAppWorker(state=None)
    worker.next_token = lambda: (_ for _ in ()).throw(OSError("state is gone"))
    node_worker._serve_or_stop(worker, 0.01)
    assert killed == [(node_worker.os.getpid(), signal.SIGTERM)]
