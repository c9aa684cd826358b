"""The masking strategy and mod of the Message API (strategies.secagg_message), with
the nodes run in-process behind a fake Grid: every message goes through the real
mod, the node secrets through each node's own ``context.state``.

Checked: the aggregate is the survivors' weighted average within the error bound;
nodes failing or silent at any stage are left out (recovered when enough remain);
bad replies are left out naming the node; too many dropouts skip the round and
return no model; a node never sends a plaintext update to a non-masking server."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from hypothesis import given
from hypothesis import strategies as st

from strategies.keyfiles import KEY_DIR_ENV
from strategies.records import record_arrays
from strategies.screening import NoUsableUpdate
from strategies.secagg_message import SecAggFedAvg, secagg_mod
from strategies.secagg_protocol import HEADER_KEY, MASKED_KEY, PAYLOAD_KEY
from strategies.secure_sums import WEIGHT, sum_slots
from tests.helpers import CLIP, SHAPES, new_context
from tests.helpers.fuzzing import (BAD, MASK_LENGTH, MASK_NODES, MASK_PARAMS, WS, XS,
                                   bad_masked_reply, fuzz, no_hang, warnings_of)
from tests.helpers.fakes import ModGrid
from tests.helpers.masking import NODES, expected, local_model, weight


def train_fn(msg: Message, context: Context) -> Message:
    node = msg.metadata.dst_node_id
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in
                                                 local_model(node).items()}),
                          "metrics": MetricRecord({"num-examples": weight(node),
                                                   "train-loss": 1.0})})
    return Message(content, reply_to=msg)


class Node:
    """A simulated node: the mod around ``train_fn``; ``fail`` / ``silent`` name the
    stages (advertise, share, unmask, train) where it errs or never answers;
    ``tamper`` rewrites its train reply."""

    def __init__(self, node: int, fail: str = "", silent: str = "",
                 tamper: Callable[[Message], None] | None = None, mod=secagg_mod) -> None:
        self.node, self.fail, self.silent, self.tamper, self.mod = node, fail, silent, tamper, mod
        self.context = new_context(node)

    def handle(self, msg: Message) -> Message | None:
        record = msg.content.config_records.get("secagg")
        stage = "train"
        if record is not None:
            stage = json.loads(record[PAYLOAD_KEY])["stage"]
        if stage == self.silent:
            return None
        if stage == self.fail:
            return Message(Error(code=0, reason=f"node {self.node} crashed at {stage}"),
                           reply_to=msg)
        try:
            reply = self.mod(msg, self.context, train_fn)
        except Exception as err:  # as Flower does: the exception becomes an error reply
            return Message(Error(code=0, reason=repr(err)), reply_to=msg)
        if stage == "train" and self.tamper is not None:
            self.tamper(reply)
        return reply


class FakeGrid:
    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.node: n for n in nodes}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.nodes[m.metadata.dst_node_id].handle(m) for m in messages]
        return [r for r in replies if r is not None]


def global_arrays() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def run_round(nodes: list[Node], **kwargs) -> tuple[ArrayRecord | None, list[Message]]:
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=len(nodes),
                            min_train_nodes=len(nodes), **kwargs)
    grid = FakeGrid(nodes)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord({"lr": 0.1}),
                                             grid))
    replies = grid.send_and_receive(messages)
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays, messages


def assert_average_of(arrays: ArrayRecord, nodes: list[int]) -> None:
    bound = SecAggFedAvg(clip=CLIP).params.error_bound
    got = record_arrays(arrays)
    assert list(got) == list(SHAPES)
    for (name, value), exp in zip(got.items(), expected(nodes), strict=True):
        assert value.dtype == np.float32 and value.shape == SHAPES[name]
        np.testing.assert_allclose(value, exp, rtol=0, atol=bound + 1e-6)


def test_message_api_round_gives_the_weighted_average(task_identity):
    arrays, messages = run_round([Node(u) for u in NODES])
    assert len(messages) == len(NODES)
    assert all(m.content["config"]["lr"] == 0.1 and PAYLOAD_KEY in m.content["config"]
               for m in messages)
    assert_average_of(arrays, NODES)


def test_message_api_survives_dropouts_at_every_stage(task_identity, flwr_caplog):
    nodes = [Node(101, fail="advertise"), Node(202, silent="share"), Node(303, fail="train"),
             Node(404), Node(505), Node(606), Node(707), Node(808, silent="train"), Node(909)]
    arrays, messages = run_round(nodes)  # threshold 5 of 9
    assert {m.metadata.dst_node_id for m in messages} == {303, 404, 505, 606, 707, 808, 909}
    assert_average_of(arrays, [404, 505, 606, 707, 909])
    assert "2 dropped and recovered" in flwr_caplog.text
    assert "node 101 failed the advertise stage" in flwr_caplog.text


def test_message_api_too_many_dropouts_skip_the_round(task_identity, flwr_caplog):
    nodes = [Node(u, fail="train" if u in NODES[:3] else "") for u in NODES]
    arrays, _ = run_round(nodes, max_empty_rounds=2)
    assert arrays is None
    assert "Round 1 skipped, the model stays as it was: only 3 masked updates" in flwr_caplog.text
    # by default the first empty round ends the run, naming what the nodes said
    with pytest.raises(NoUsableUpdate, match="node 101 failed the train stage: node 101 "
                                             "crashed at train"):
        run_round([Node(u, fail="train" if u in NODES[:3] else "") for u in NODES])


def test_message_api_dropouts_in_the_unmask_stage_skip_the_round(task_identity, flwr_caplog):
    nodes = [Node(u, silent="unmask" if u in NODES[:3] else "") for u in NODES]
    arrays, _ = run_round(nodes, max_empty_rounds=2)
    assert arrays is None and "too many dropouts" in flwr_caplog.text


def test_message_api_too_few_keys_send_no_train_message(task_identity, flwr_caplog):
    nodes = [Node(u, fail="advertise" if u in NODES[:5] else "") for u in NODES]
    arrays, messages = run_round(nodes, max_empty_rounds=2)
    assert messages == [] and arrays is None
    assert "1 of 6 nodes finished the advertise stage, 2 needed" in flwr_caplog.text
    with pytest.raises(NoUsableUpdate, match="node 101 failed the advertise stage"):
        run_round([Node(u, fail="advertise" if u in NODES[:5] else "") for u in NODES])


def keyless(node: int) -> Node:
    """A node whose key directory holds no identity key nor roster."""
    out = Node(node)
    out.context.node_config.clear()
    return out


def test_nodes_without_identity_keys_fail_closed(task_identity, flwr_caplog, tmp_path,
                                                 monkeypatch):
    """No key on the nodes: every node refuses (one line each, no traceback), the server
    logs the cause once for all of them and the run stops at the first round; with
    ``secagg-allow-unauthenticated`` the round runs, unauthenticated, and the server
    says so."""
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path))  # empty: no key on any node
    with pytest.raises(NoUsableUpdate, match="needs this node's identity key"):
        run_round([keyless(u) for u in NODES])
    line = (f"nodes {', '.join(map(str, NODES))} failed the advertise stage: secure "
            "aggregation needs this node's identity key and the federation's roster")
    assert line in flwr_caplog.text and "Traceback" not in flwr_caplog.text

    allowed = [keyless(u) for u in NODES]
    for node in allowed:
        node.context.node_config["secagg-allow-unauthenticated"] = True
    arrays, _ = run_round(allowed)
    assert_average_of(arrays, NODES)
    assert "0 of 6 nodes' key advertisements are signed" in flwr_caplog.text


def test_a_node_outside_the_roster_is_refused_by_its_neighbors(task_identity, flwr_caplog,
                                                               tmp_path):
    """A node with an identity key of its own that the others' roster does not list:
    its neighbors refuse its keys, and it refuses to take part with a roster that
    lacks it; the others finish the round without it."""
    from strategies.keyfiles import write_identity

    nodes = [Node(u) for u in NODES]
    _, stranger_key = write_identity(tmp_path)
    nodes[0].context.node_config["secagg-identity-key"] = str(stranger_key)
    arrays, _ = run_round(nodes)
    assert_average_of(arrays, NODES[1:])
    assert "this node's identity key is not in the roster" in flwr_caplog.text


def _set_masked(reply: Message, vector: np.ndarray) -> None:
    (name, record), = reply.content.array_records.items()
    header = record[HEADER_KEY].numpy()
    reply.content[name] = ArrayRecord({MASKED_KEY: Array(vector), HEADER_KEY: Array(header)})


def _header_node(reply: Message, node: int) -> None:
    _set_header(reply, "node", node)


def _header_sums(reply: Message, names: list[str]) -> None:
    _set_header(reply, "sums", names)


def _set_header(reply: Message, key: str, value: object) -> None:
    (name, record), = reply.content.array_records.items()
    header = json.loads(record[HEADER_KEY].numpy().tobytes())
    header[key] = value
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8).copy()
    reply.content[name] = ArrayRecord({MASKED_KEY: record[MASKED_KEY], HEADER_KEY: Array(raw)})


BAD_REPLIES = {
    "short": (lambda r: _set_masked(r, record_arrays(next(iter(
        r.content.array_records.values())))[MASKED_KEY][:-1]),
        f"of shape ({123 + sum_slots(['secagg-clipped', 'train-loss', WEIGHT])},)"),
    "uint64": (lambda r: _set_masked(r, record_arrays(next(iter(
        r.content.array_records.values())))[MASKED_KEY].astype(np.uint64)), "uint32"),
    "for another node": (lambda r: _header_node(r, 101), "may only answer for itself"),
    "plaintext": (lambda r: r.content.__setitem__("arrays", ArrayRecord(
        {k: Array(v) for k, v in local_model(1).items()})), "is secagg_mod on the ClientApp"),
    "no weight sum": (lambda r: _header_sums(r, ["train-loss"]), "sums must include 'weight'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_message_api_bad_replies_are_left_out_naming_the_node(kind, task_identity,
                                                              flwr_caplog):
    tamper, message = BAD_REPLIES[kind]
    nodes = [Node(u, tamper=tamper if u == 606 else None) for u in NODES]
    arrays, _ = run_round(nodes)
    assert_average_of(arrays, NODES[:5])  # 606 left out, then recovered as a dropout
    assert "Left out the reply of node 606 in round 1" in flwr_caplog.text
    assert message in flwr_caplog.text


def test_a_node_without_the_mod_fails_the_key_stages(task_identity, flwr_caplog):
    def no_mod(msg, context, call_next):
        raise ValueError("No train function registered for this payload")

    nodes = [Node(u, mod=no_mod if u == 101 else secagg_mod) for u in NODES]
    arrays, messages = run_round(nodes)
    assert len(messages) == 5 and "node 101 failed the advertise stage" in flwr_caplog.text
    assert_average_of(arrays, NODES[1:])


def test_the_mod_refuses_to_train_for_a_plaintext_server(task_identity):
    msg = Message(RecordDict({"arrays": global_arrays(), "config": ConfigRecord()}),
                  dst_node_id=101, message_type="train")
    called = []
    reply = secagg_mod(msg, new_context(101), lambda m, c: called.append(m))
    assert reply.has_error() and "server sent no secure-aggregation payload" in \
        reply.error.reason
    assert called == []  # never trained, so nothing could leak


def test_the_mod_answers_evaluate_messages_only_if_the_node_allows_it(task_identity):
    """A node's own evaluation would reach the server in plaintext: refused by
    default, passed to the app with the node setting ``plaintext-metrics``."""
    msg = Message(RecordDict({"arrays": global_arrays()}), dst_node_id=101,
                  message_type="evaluate")
    called = []
    reply = secagg_mod(msg, new_context(101), lambda m, c: called.append(m))
    assert reply.has_error() and "plaintext-metrics=true" in reply.error.reason
    assert called == []
    context = new_context(101)
    context.node_config["plaintext-metrics"] = True
    assert secagg_mod(msg, context, lambda m, c: "called") == "called"


def test_strategy_refuses_bad_arguments():
    assert SecAggFedAvg(clip=1.0, max_total_weight=2**20).params.mod_bits == 64
    with pytest.raises(ValueError, match="does not fit"):
        SecAggFedAvg(clip=1.0, max_total_weight=2**50, value_bits=16)
    with pytest.raises(ValueError, match="threshold"):
        SecAggFedAvg(clip=1.0, threshold_fraction=1.0)
    with pytest.raises(ValueError, match="num_neighbors"):
        SecAggFedAvg(clip=1.0, num_neighbors=-1)
    with pytest.raises(ValueError, match="clip"):
        SecAggFedAvg(clip=0.0)


# ------------------------------------------------------------------ pre-advertised keys
class CountingGrid(FakeGrid):
    """A FakeGrid that records the stage of every key-stage message it sends."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(nodes)
        self.stages: list[str] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            record = m.content.config_records.get("secagg")
            if record is not None:
                self.stages.append(json.loads(record[PAYLOAD_KEY])["stage"])
        return super().send_and_receive(messages, timeout=timeout)


def test_message_api_later_rounds_skip_the_key_stages(task_identity, flwr_caplog):
    """From the second round on, the nodes send their keys for the next round with the
    check and their shares with the unmask reply: a round is train, check and unmask.
    A node that missed the unmask stage made no shares: the next round starts afresh."""
    nodes = [Node(u, silent="unmask" if u == 101 else "") for u in NODES + [707]]
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=7, min_train_nodes=7)
    grid = CountingGrid(nodes)
    for rnd in (1, 2, 3):
        grid.stages.clear()
        messages = list(strategy.configure_train(rnd, global_arrays(), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        assert_average_of(arrays, NODES + [707])
        if rnd < 3:  # round 2: 101 was silent at the unmask stage of round 1
            assert grid.stages == ["advertise"] * 7 + ["share"] * 7 + ["check"] * 7 + \
                ["unmask"] * 7
        else:
            assert grid.stages == ["check"] * 7 + ["unmask"] * 7
        nodes[0].silent = ""  # 101 answers from round 2 on
    assert "advertise and share stages skipped, all 7 nodes" in flwr_caplog.text


def test_message_api_every_node_preadvertised_skips_the_stages(task_identity, flwr_caplog):
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=6, min_train_nodes=6)
    grid = CountingGrid([Node(u) for u in NODES])
    for rnd in (1, 2):
        grid.stages.clear()
        messages = list(strategy.configure_train(rnd, global_arrays(), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        assert_average_of(arrays, NODES)
    assert grid.stages == ["check"] * 6 + ["unmask"] * 6
    assert "advertise and share stages skipped, all 6 nodes sent their keys and shares" in \
        flwr_caplog.text


def test_message_api_a_node_that_lost_its_state_drops_out_then_advertises(task_identity,
                                                                          flwr_caplog):
    """A restarted node lost the shares it made for the next round: it refuses that
    round's train message (a dropout the others survive: its shares are with them),
    and the round after starts afresh."""
    nodes = [Node(u) for u in NODES + [707]]
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=7, min_train_nodes=7)
    grid = CountingGrid(nodes)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    nodes[0].context = new_context(101)  # restarted: its state is gone
    messages = list(strategy.configure_train(2, global_arrays(), ConfigRecord(), grid))
    assert 101 in {m.metadata.dst_node_id for m in messages}
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(messages))
    assert_average_of(arrays, NODES[1:] + [707])
    assert "out of order" in flwr_caplog.text
    grid.stages.clear()
    messages = list(strategy.configure_train(3, global_arrays(), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(3, grid.send_and_receive(messages))
    assert_average_of(arrays, NODES + [707])
    assert grid.stages.count("advertise") == 7


# ------------------------------------------------------------------ fuzzing
def secagg_train(msg: Message, context: Context) -> Message:
    node = msg.metadata.dst_node_id
    arrays = ArrayRecord({"w": Array(XS[node].astype(np.float32))})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": WS[node], "train-loss": 1.0})}), reply_to=msg)


def secagg_grid() -> ModGrid:
    """Nodes that run secagg_mod in-process and answer every message."""
    return ModGrid(secagg_mod, secagg_train, MASK_NODES)


@pytest.mark.usefixtures("task_identity")
@fuzz(25)
@given(data=st.data())
def test_secagg_strategy_leaves_out_bad_replies(caplog_flwr, data):
    strategy = SecAggFedAvg(clip=MASK_PARAMS.clip, max_total_weight=1000,
                            min_available_nodes=5, min_train_nodes=5,
                            max_empty_rounds=2)  # an aborted round is the subject here
    grid = secagg_grid()
    start = ArrayRecord({"w": Array(np.zeros(MASK_LENGTH, np.float32))})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"lr": 0.1}), grid))
    replies = grid.send_and_receive(messages)
    i = next(i for i, r in enumerate(replies) if r.metadata.src_node_id == BAD)
    replies[i], must_fail = data.draw(bad_masked_reply(replies[i]))
    caplog_flwr.clear()
    with no_hang():
        arrays, _ = strategy.aggregate_train(1, replies)
    if arrays is None:  # only a reply that looked valid may make the round abort
        assert not must_fail, warnings_of(caplog_flwr)
        return
    left_out = any(f"node {BAD} " in w.lower() for w in warnings_of(caplog_flwr))
    assert left_out or not must_fail, "a malformed reply was aggregated"
    if left_out:
        others = [u for u in MASK_NODES if u != BAD]
        expected = sum(WS[u] * XS[u] for u in others) / sum(WS[u] for u in others)
        got = record_arrays(arrays)["w"]
        assert np.abs(got - expected).max() <= MASK_PARAMS.error_bound + 1e-6


def test_message_api_sparse_rounds_draw_the_graph_from_the_coins(task_identity):
    """A sparse round (14 nodes, 4 neighbors each) runs the coin stage, and advertises
    afresh each round: every member's coin is needed, so keys pre-advertised a round
    earlier, by nodes that may since have gone, are not used."""
    ids = [1000 + 17 * i for i in range(14)]
    strategy = SecAggFedAvg(clip=CLIP, num_neighbors=4, min_available_nodes=14,
                            min_train_nodes=14)
    grid = CountingGrid([Node(u) for u in ids])
    for rnd in (1, 2):
        grid.stages.clear()
        messages = list(strategy.configure_train(rnd, global_arrays(), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        assert_average_of(arrays, ids)
        assert grid.stages.count("advertise") == grid.stages.count("coin") == 14
