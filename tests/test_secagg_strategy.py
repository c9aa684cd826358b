"""Fast tests of the masking strategies and mods of both Flower APIs, with the nodes
run in-process behind a fake Grid / fake client proxies: every message goes through
the real mods, the node secrets through each node's own ``context.state``.

Checked: the aggregate is the survivors' weighted average within the error bound;
nodes failing or silent at any stage are left out (recovered when enough remain);
bad replies are left out naming the node; too many dropouts skip the round and
return no model; a node never sends a plaintext update to a non-masking server.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.client import NumPyClient
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from strategies.aggregation import weighted_average
from strategies.keyfiles import KEY_DIR_ENV
from strategies.screening import NoUsableUpdate
from strategies.records import record_arrays
from strategies.secagg_message import SecAggFedAvg, secagg_mod
from strategies.secagg_protocol import HEADER_KEY, MASKED_KEY, PAYLOAD_KEY
from strategies.secagg_legacy import TENSOR_TYPE, LegacySecAggFedAvg, legacy_secagg_mod

CLIP = 2.0
SHAPES = {"w": (40, 3), "b": (3,)}
NODES = [101, 202, 303, 404, 505, 606]  # threshold: more than half of 6, i.e. 4


def local_model(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {k: rng.uniform(-1.5, 1.5, s).astype(np.float32) for k, s in SHAPES.items()}


def weight(node: int) -> int:
    return node // 10  # 10, 20, ..., 60 examples


def expected(nodes: list[int]) -> list[np.ndarray]:
    return weighted_average([list(local_model(u).values()) for u in nodes],
                            [weight(u) for u in nodes])


def new_context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


# ------------------------------------------------------------------ Message API
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
    nodes = [Node(u, fail="advertise" if u in NODES[:3] else "") for u in NODES]
    arrays, messages = run_round(nodes, max_empty_rounds=2)
    assert messages == [] and arrays is None
    assert "finished the advertise stage" in flwr_caplog.text
    with pytest.raises(NoUsableUpdate, match="node 101 failed the advertise stage"):
        run_round([Node(u, fail="advertise" if u in NODES[:3] else "") for u in NODES])


def test_nodes_without_the_authentication_key_fail_closed(task_identity, flwr_caplog,
                                                         tmp_path, monkeypatch):
    """No key on the nodes: every node refuses (one line each, no traceback), the server
    logs the cause once for all of them and the run stops at the first round; with
    ``secagg-allow-unauthenticated`` the round runs, unauthenticated, and the server
    says so."""
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path))  # empty: no key on any node
    with pytest.raises(NoUsableUpdate, match="needs the federation's authentication key"):
        run_round([Node(u) for u in NODES])
    line = (f"nodes {', '.join(map(str, NODES))} failed the advertise stage: secure "
            "aggregation needs the federation's authentication key")
    assert line in flwr_caplog.text and "Traceback" not in flwr_caplog.text

    allowed = [Node(u) for u in NODES]
    for node in allowed:
        node.context.run_config["secagg-allow-unauthenticated"] = True
    arrays, _ = run_round(allowed)
    assert_average_of(arrays, NODES)
    assert "0 of 6 nodes' key advertisements carry an authentication tag" in flwr_caplog.text


def _set_masked(reply: Message, vector: np.ndarray) -> None:
    (name, record), = reply.content.array_records.items()
    header = record[HEADER_KEY].numpy()
    reply.content[name] = ArrayRecord({MASKED_KEY: Array(vector), HEADER_KEY: Array(header)})


def _header_node(reply: Message, node: int) -> None:
    (name, record), = reply.content.array_records.items()
    header = json.loads(record[HEADER_KEY].numpy().tobytes())
    header["node"] = node
    raw = np.frombuffer(json.dumps(header).encode(), np.uint8).copy()
    reply.content[name] = ArrayRecord({MASKED_KEY: record[MASKED_KEY], HEADER_KEY: Array(raw)})


BAD_REPLIES = {
    "short": (lambda r: _set_masked(r, record_arrays(next(iter(
        r.content.array_records.values())))[MASKED_KEY][:-1]), "of shape (123,)"),
    "uint64": (lambda r: _set_masked(r, record_arrays(next(iter(
        r.content.array_records.values())))[MASKED_KEY].astype(np.uint64)), "uint32"),
    "for another node": (lambda r: _header_node(r, 101), "may only answer for itself"),
    "plaintext": (lambda r: r.content.__setitem__("arrays", ArrayRecord(
        {k: Array(v) for k, v in local_model(1).items()})), "is secagg_mod on the ClientApp"),
    "no weight": (lambda r: r.content["metrics"].pop("num-examples"), "num-examples must be"),
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


def test_the_mod_passes_evaluate_messages_through(task_identity):
    msg = Message(RecordDict({"arrays": global_arrays()}), dst_node_id=101,
                  message_type="evaluate")
    assert secagg_mod(msg, new_context(101), lambda m, c: "called") == "called"


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


# ------------------------------------------------------------------ legacy API
class LegacyClient(NumPyClient):
    def __init__(self, node: int) -> None:
        self.node = node

    def fit(self, parameters, config):
        return list(local_model(self.node).values()), weight(self.node), {"train-loss": 1.0}


class LegacyProxy(ClientProxy):
    """A client proxy that runs the legacy mod and NumPyClient in-process."""

    def __init__(self, node: int, silent: str = "", mods: tuple = (legacy_secagg_mod,)) -> None:
        super().__init__(str(node))
        self.node_id, self.silent, self.mods = node, silent, mods
        self.context = new_context(node)

    def _call(self, content: RecordDict, message_type: str) -> RecordDict:
        msg = Message(content, dst_node_id=self.node_id, message_type=message_type)

        def app(m: Message, c: Context) -> Message:
            return handle_legacy_message_from_msgtype(
                lambda context: LegacyClient(self.node_id).to_client(), m, c)
        for mod in reversed(self.mods):  # the first mod is the outermost, as in Flower
            app = (lambda mod, inner: lambda m, c: mod(m, c, inner))(mod, app)
        return app(msg, self.context).content

    def get_properties(self, ins, timeout, group_id):
        if json.loads(ins.config[PAYLOAD_KEY])["stage"] == self.silent:
            raise TimeoutError(f"node {self.node_id} did not answer")
        return compat.recorddict_to_getpropertiesres(
            self._call(compat.getpropertiesins_to_recorddict(ins), "get_properties"))

    def fit(self, ins, timeout, group_id):
        return compat.recorddict_to_fitres(
            self._call(compat.fitins_to_recorddict(ins, True), "train"), False)

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def legacy_round(proxies: list[LegacyProxy], drop_in_fit: set[int] = frozenset()):
    strategy = LegacySecAggFedAvg(
        clip=CLIP, min_fit_clients=len(proxies), min_available_clients=len(proxies),
        on_fit_config_fn=lambda rnd: {"lr": 0.1},
        fit_metrics_aggregation_fn=lambda rs: {"n": sum(n for n, _ in rs)})
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    initial = ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES.values()])
    pairs = strategy.configure_fit(1, initial, manager)
    results = [(proxy, proxy.fit(ins, None, 1)) for proxy, ins in pairs
               if proxy.node_id not in drop_in_fit]
    return pairs, results, strategy.aggregate_fit(1, results, [])


def test_legacy_round_with_dropouts_gives_the_weighted_average(task_identity, flwr_caplog):
    proxies = [LegacyProxy(u, silent="share" if u == 101 else "") for u in NODES + [707]]
    pairs, results, (parameters, metrics) = legacy_round(proxies, drop_in_fit={202})
    assert {p.node_id for p, _ in pairs} == {202, 303, 404, 505, 606, 707}
    assert all(ins.config["lr"] == 0.1 and PAYLOAD_KEY in ins.config for _, ins in pairs)
    assert all(res.parameters.tensor_type == TENSOR_TYPE for _, res in results)
    survivors = [303, 404, 505, 606, 707]
    assert metrics == {"n": sum(weight(u) for u in survivors)}
    bound = LegacySecAggFedAvg(clip=CLIP).params.error_bound
    for got, exp in zip(parameters_to_ndarrays(parameters), expected(survivors), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, exp, rtol=0, atol=bound + 1e-6)
    assert "node 101 failed the share stage" in flwr_caplog.text


def test_legacy_bad_reply_left_out_and_too_many_dropouts_skip(task_identity, flwr_caplog):
    # a plaintext reply is refused, and with 3 of 6 left the round is skipped
    strategy = LegacySecAggFedAvg(clip=CLIP, min_fit_clients=6, min_available_clients=6,
                                  max_empty_rounds=2)
    manager = SimpleClientManager()
    for proxy in [LegacyProxy(u) for u in NODES]:
        manager.register(proxy)
    initial = ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES.values()])
    pairs = strategy.configure_fit(1, initial, manager)
    results = [(proxy, proxy.fit(ins, None, 1)) for proxy, ins in pairs[:4]]
    results[0][1].parameters = ndarrays_to_parameters(list(local_model(1).values()))
    assert strategy.aggregate_fit(1, results, []) == (None, {})
    assert f"Left out the reply of client {pairs[0][0].cid}" in flwr_caplog.text
    assert "tensor type 'numpy.ndarray'" in flwr_caplog.text
    assert "Round 1 skipped" in flwr_caplog.text


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


def test_message_api_later_rounds_skip_the_advertise_stage(task_identity, flwr_caplog):
    nodes = [Node(u, silent="unmask" if u == 101 else "") for u in NODES + [707]]
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=7, min_train_nodes=7)
    grid = CountingGrid(nodes)
    for rnd in (1, 2, 3):
        grid.stages.clear()
        messages = list(strategy.configure_train(rnd, global_arrays(), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        assert_average_of(arrays, NODES + [707])
        if rnd == 1:
            assert grid.stages.count("advertise") == 7
        else:  # only 101 (silent at unmask, so it never pre-advertised) is asked
            assert grid.stages.count("advertise") == 1
        assert grid.stages.count("share") == 7 and grid.stages.count("unmask") == 7
        nodes[0].silent = "unmask" if rnd < 2 else ""  # 101 answers from round 2 on
    assert "advertise stage, 1 of 1 nodes answered" in flwr_caplog.text


def test_message_api_every_node_preadvertised_skips_the_stage(task_identity, flwr_caplog):
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=6, min_train_nodes=6)
    grid = CountingGrid([Node(u) for u in NODES])
    for rnd in (1, 2):
        grid.stages.clear()
        messages = list(strategy.configure_train(rnd, global_arrays(), ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(rnd, grid.send_and_receive(messages))
        assert_average_of(arrays, NODES)
    assert grid.stages == ["share"] * 6 + ["unmask"] * 6
    assert "advertise stage skipped, all 6 nodes pre-advertised" in flwr_caplog.text


def test_message_api_a_node_that_lost_its_state_drops_out_then_advertises(task_identity,
                                                                          flwr_caplog):
    """A restarted node has no pre-advertised keys: it refuses the share request of the
    next round (a dropout the others survive) and advertises afresh after that."""
    nodes = [Node(u) for u in NODES + [707]]
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=7, min_train_nodes=7)
    grid = CountingGrid(nodes)
    messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    nodes[0].context = new_context(101)  # restarted: its state is gone
    messages = list(strategy.configure_train(2, global_arrays(), ConfigRecord(), grid))
    assert 101 not in {m.metadata.dst_node_id for m in messages}
    arrays, _ = strategy.aggregate_train(2, grid.send_and_receive(messages))
    assert_average_of(arrays, NODES[1:] + [707])
    assert "names no keys this node pre-advertised" in flwr_caplog.text
    grid.stages.clear()
    messages = list(strategy.configure_train(3, global_arrays(), ConfigRecord(), grid))
    arrays, _ = strategy.aggregate_train(3, grid.send_and_receive(messages))
    assert_average_of(arrays, NODES + [707])
    assert grid.stages.count("advertise") == 1


def test_legacy_later_rounds_skip_the_advertise_stage(task_identity, flwr_caplog):
    proxies = [LegacyProxy(u) for u in NODES]
    strategy = LegacySecAggFedAvg(clip=CLIP, min_fit_clients=6, min_available_clients=6,
                                  max_empty_rounds=2)
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    initial = ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES.values()])
    bound = strategy.params.error_bound
    for rnd in (1, 2):
        pairs = strategy.configure_fit(rnd, initial, manager)
        results = [(proxy, proxy.fit(ins, None, rnd)) for proxy, ins in pairs]
        parameters, _ = strategy.aggregate_fit(rnd, results, [])
        for got, exp in zip(parameters_to_ndarrays(parameters), expected(NODES), strict=True):
            np.testing.assert_allclose(got, exp, rtol=0, atol=bound + 1e-6)
    answered = {id(r) for r in flwr_caplog.records
                if "advertise stage, 6 of 6 clients answered" in r.getMessage()}
    assert len(answered) == 1  # round 1 only
    assert "advertise stage skipped, all 6 nodes pre-advertised" in flwr_caplog.text
