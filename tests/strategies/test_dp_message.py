"""Central DP-FedAvg on the Message API (strategies.dp_message: CentralDP, dp_clip_mod).

Checked: the noise actually added has the configured std (plaintext, adaptive,
masked and Paillier modes); clipping bounds every client's influence (server side,
and client side with dp_clip_mod); the budget stops training before it is exceeded;
dropouts neither abort the round nor change the denominator; bad settings are
refused.

Rounds run in-process behind a fake Grid, as in tests/strategies/test_secagg_message.py:
plaintext nodes reply with (global + their delta); masked nodes go through the real
mods composed as the app composes them, secagg_mod(dp_clip_mod(train))."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from hypothesis import given
from hypothesis import strategies as st

from strategies.dp import POISSON_ORDERS, DPConfig, clip_update, l2_norm, poisson_rdp, rdp_to_epsilon
from strategies.discrete_gaussian import tail_bound
from strategies.dp_message import CentralDP, dp_clip_mod
from strategies.dp_rounds import BIT_KEY, CLIP_KEY, quantized_clip
from strategies.fedavg import WeightedFedAvg
from strategies.node_settings import NODE_CONFIG_ENV
from strategies.secagg_message import SecAggFedAvg, secagg_mod
from strategies.secagg_protocol import PAYLOAD_KEY
from tests.helpers import flower_task_identity, new_context
from tests.helpers import fuzzing
from tests.helpers.dp import BIG, assert_noise_std, model, opacus_epsilon, same_noise
from tests.helpers.fuzzing import (PLAIN_WEIGHTS, SHAPES, arrays_of, bad_plain_reply, fuzz, no_hang,
                                   plain_model, plain_reply, warnings_of)


SMALL = {"w": (30, 20), "b": (20,)}
NODES = [101, 202, 303, 404]


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def numpy_of(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays.values()])


def scaled_to(shapes: dict, seed: int, norm: float) -> dict[str, np.ndarray]:
    """A random delta of the given L2 norm (float64)."""
    rng = np.random.default_rng(seed)
    d = {k: rng.normal(size=s) for k, s in shapes.items()}
    factor = norm / l2_norm(list(d.values()))
    return {k: v * factor for k, v in d.items()}


def train_with(delta: dict[str, np.ndarray] | None, weight: int = 10) -> Callable:
    """The app's train function: the incoming model plus ``delta``."""
    def train(msg: Message, context: Context) -> Message:
        (_, rec), = msg.content.array_records.items()
        incoming = numpy_of(rec)
        out = {k: (v.astype(np.float64) + (delta[k] if delta else 0)).astype(v.dtype)
               for k, v in incoming.items()}
        return Message(RecordDict({"arrays": record(out), "metrics": MetricRecord(
            {"num-examples": weight, "train-loss": 1.0})}), reply_to=msg)
    return train


def error_reply(msg: Message, why: str = "crashed") -> Message:
    return Message(Error(code=0, reason=f"node {msg.metadata.dst_node_id} {why}"), reply_to=msg)


class PlainNode:
    """A plaintext node (aggregation fedavg: no mod): replies global + delta, or
    errs, or replies whatever ``tamper`` makes of its reply."""

    def __init__(self, node: int, delta=None, fail: bool = False, tamper=None) -> None:
        self.node, self.fail, self.tamper = node, fail, tamper
        self.train = train_with(delta)
        self.context = new_context(node)
        self.received: list[Message] = []

    def handle(self, msg: Message) -> Message | None:
        self.received.append(msg)
        if self.fail:
            return error_reply(msg)
        reply = self.train(msg, self.context)
        if self.tamper:
            self.tamper(reply)
        return reply


class MaskedNode:
    """A masked-mode node: secagg_mod(dp_clip_mod(train)) as the app composes them;
    ``fail`` / ``silent`` name the stage (advertise, share, unmask, train) where it
    errs or never answers."""

    def __init__(self, node: int, delta=None, fail: str = "", silent: str = "") -> None:
        self.node, self.fail, self.silent = node, fail, silent
        self.train = train_with(delta, weight=25)
        self.context = new_context(node)
        self.trained: list[Message] = []

    def app(self, msg: Message, context: Context) -> Message:
        self.trained.append(msg)
        return self.train(msg, context)

    def handle(self, msg: Message) -> Message | None:
        rec = msg.content.config_records.get("secagg")
        stage = json.loads(rec[PAYLOAD_KEY])["stage"] if rec is not None else "train"
        if stage == self.silent:
            return None
        if stage == self.fail:
            return error_reply(msg, f"crashed at {stage}")
        try:
            return secagg_mod(msg, self.context,
                              lambda m, c: dp_clip_mod(m, c, self.app))
        except Exception as err:  # as Flower does: the exception becomes an error reply
            return error_reply(msg, repr(err))


class FakeGrid:
    def __init__(self, nodes) -> None:
        self.nodes = {n.node: n for n in nodes}

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        replies = [self.nodes[m.metadata.dst_node_id].handle(m) for m in messages]
        return [r for r in replies if r is not None]


def plain_dp(m: int = len(NODES), **kwargs) -> CentralDP:
    return CentralDP(WeightedFedAvg(min_available_nodes=m, min_train_nodes=m,
                                    fraction_evaluate=0.0), **kwargs)


def masked_dp(m: int = len(NODES), **kwargs) -> CentralDP:
    return CentralDP(SecAggFedAvg(clip=2.0, min_available_nodes=m, min_train_nodes=m,
                                  fraction_evaluate=0.0), **kwargs)


def run_round(dp: CentralDP, grid: FakeGrid, arrays: dict[str, np.ndarray], rnd: int = 1):
    messages = list(dp.configure_train(rnd, record(arrays), ConfigRecord({"lr": 0.1}), grid))
    replies = grid.send_and_receive(messages)
    new, metrics = dp.aggregate_train(rnd, replies)
    return new, metrics, messages


def _nan(reply: Message) -> None:
    arrays = numpy_of(reply.content["arrays"])
    arrays["w"][0, 0] = np.nan
    reply.content["arrays"] = record(arrays)


def _short(reply: Message) -> None:
    arrays = numpy_of(reply.content["arrays"])
    arrays["b"] = arrays["b"][:-1]
    reply.content["arrays"] = record(arrays)


def _no_metrics(reply: Message) -> None:
    del reply.content["metrics"]


def _no_weight(reply: Message) -> None:
    reply.content["metrics"] = MetricRecord({"train-loss": 1.0})


def _zero_weight(reply: Message) -> None:
    reply.content["metrics"]["num-examples"] = 0


@pytest.fixture(scope="module")
def paillier_public_key():
    from strategies.paillier import generate_keypair

    return generate_keypair(2048)[0]


class PaillierNode:
    """A Paillier-mode node: paillier_mod(dp_clip_mod(train)) as the app composes them."""

    def __init__(self, node: int, delta, key) -> None:
        self.node, self.key = node, key
        self.train = train_with(delta, weight=25)
        self.context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                               run_config={})

    def handle(self, msg: Message) -> Message:
        from strategies import paillier_message

        original = paillier_message.node_private_key  # the node's key, without a key file
        paillier_message.node_private_key = lambda context: self.key
        try:
            return paillier_message.paillier_mod(
                msg, self.context, lambda m, c: dp_clip_mod(m, c, self.train))
        finally:
            paillier_message.node_private_key = original


@pytest.fixture(scope="module")
def paillier_keys(keypair):
    return keypair


def test_plaintext_round_noise_has_the_configured_std(task_identity):
    glob = model(BIG, 2)
    dp = plain_dp(noise_multiplier=0.7, clip=0.3)
    new, metrics, messages = run_round(dp, FakeGrid([PlainNode(u) for u in NODES]), glob)
    assert len(messages) == 4 and all(m.content["config"][CLIP_KEY] == 0.3 for m in messages)
    assert dp.config.num_sampled == 4 and dp.config.update_noise_multiplier == 0.7
    got = numpy_of(new)
    assert list(got) == list(glob) and all(a.dtype == np.float32 for a in got.values())
    assert_noise_std(flat(got) - flat(glob), 0.7 * 0.3 / 4)
    assert metrics["dp-clip"] == 0.3 and metrics["dp-next-clip"] == 0.3
    assert metrics["dp-epsilon"] == pytest.approx(opacus_epsilon(1.0, 0.7, 1, 1e-5), rel=1e-12)


def test_adaptive_round_noise_uses_z_delta_and_the_current_clip(task_identity):
    glob = model(BIG, 3)
    # sigma_b = m/20 = 0.2, given explicitly (see the test of the default below)
    dp = plain_dp(noise_multiplier=0.3, clip=0.5, adaptive=True, clipped_count_stddev=0.2)
    z_delta = (0.3 ** -2 - (2 * 0.2) ** -2) ** -0.5
    assert dp.config is None
    grid = FakeGrid([PlainNode(u) for u in NODES])
    new, metrics, _ = run_round(dp, grid, glob)
    assert dp.config.update_noise_multiplier == pytest.approx(z_delta, rel=1e-12)
    assert_noise_std(flat(numpy_of(new)) - flat(glob), z_delta * 0.5 / 4)
    # round 2 runs with the moved norm: clients are sent it and the noise follows it
    clip2 = metrics["dp-next-clip"]
    assert clip2 != 0.5
    glob2 = numpy_of(new)
    new2, metrics2, messages = run_round(dp, grid, glob2, rnd=2)
    assert metrics2["dp-clip"] == clip2
    assert all(m.content["config"][CLIP_KEY] == clip2 for m in messages)
    assert_noise_std(flat(numpy_of(new2)) - flat(glob2), z_delta * clip2 / 4)


def test_masked_round_noise_is_added_to_the_unmasked_sum(task_identity):
    glob = model(BIG, 4)
    dp = masked_dp(noise_multiplier=0.9, clip=0.2)
    nodes = [MaskedNode(u) for u in NODES]
    new, metrics, messages = run_round(dp, FakeGrid(nodes), glob)
    assert all(m.content["config"][CLIP_KEY] == 0.2 for m in messages)
    assert all(len(n.trained) == 1 for n in nodes)
    got = numpy_of(new)
    assert list(got) == list(glob)
    assert_noise_std(flat(got) - flat(glob), 0.9 * 0.2 / 4)
    assert metrics["dp-epsilon"] == pytest.approx(opacus_epsilon(1.0, 0.9, 1, 1e-5), rel=1e-12)


def test_masked_adaptive_round_noise_uses_z_delta(task_identity):
    glob = model(BIG, 5)
    dp = masked_dp(noise_multiplier=0.3, clip=0.2, adaptive=True, clipped_count_stddev=0.2)
    z_delta = (0.3 ** -2 - (2 * 0.2) ** -2) ** -0.5
    new, _, messages = run_round(dp, FakeGrid([MaskedNode(u) for u in NODES]), glob)
    assert all(m.content["config"][BIT_KEY] is True for m in messages)
    got = numpy_of(new)
    assert list(got) == list(glob)  # the bit array is not part of the model
    assert_noise_std(flat(got) - flat(glob), z_delta * 0.2 / 4)


# ------------------------------------------------------------------ clipping
def test_server_clipping_bounds_one_clients_influence(task_identity):
    glob = model(SMALL, 6)
    huge = scaled_to(SMALL, 7, 1e4)
    nodes = [PlainNode(101, huge)] + [PlainNode(u) for u in NODES[1:]]
    dp = plain_dp(noise_multiplier=1e-6, clip=0.5)
    new, metrics, _ = run_round(dp, FakeGrid(nodes), glob)
    shift = flat(numpy_of(new)) - flat(glob)
    assert np.linalg.norm(shift) <= 0.5 / 4 * (1 + 1e-3)
    # it is the clipped update, not a dropped one: C/m along the huge delta
    expected = flat(huge) * (0.5 / 1e4) / 4
    np.testing.assert_allclose(shift, expected, rtol=0, atol=1e-6)
    assert metrics["dp-epsilon"] > 0
    assert metrics["dp-unclipped-fraction"] == 0.75


def test_dp_clip_mod_clips_relative_to_the_global_model(task_identity):
    glob = model(SMALL, 8)
    for norm, bit in ((5.0, 0.0), (0.05, 1.0)):
        delta = scaled_to(SMALL, 9, norm)
        received = []

        def app(msg, context):
            received.append(numpy_of(msg.content["arrays"]))
            return train_with(delta, weight=77)(msg, context)

        msg = Message(RecordDict({"arrays": record({**glob, BIT_KEY: np.zeros(1, np.float32)}),
                                  "config": ConfigRecord({CLIP_KEY: 0.5, BIT_KEY: True})}),
                      dst_node_id=101, message_type="train")
        reply = dp_clip_mod(msg, new_context(101), app)
        assert list(received[0]) == list(glob)  # the app never sees the bit array
        out = numpy_of(reply.content["arrays"])
        assert list(out) == [*glob, BIT_KEY]
        assert out[BIT_KEY].tolist() == [bit] and out[BIT_KEY].dtype == np.float32
        out.pop(BIT_KEY)
        sent = flat(out) - flat(glob)
        expected = flat(delta) * min(1.0, 0.5 / norm)
        np.testing.assert_allclose(sent, expected, rtol=0, atol=1e-6)
        assert np.linalg.norm(sent) <= 0.5 * (1 + 1e-5)
        assert all(out[k].dtype == np.float32 for k in out)
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == 1 and metrics["train-loss"] == 1.0


def test_dp_clip_mod_sends_the_bit_only_when_asked(task_identity):
    glob = model(SMALL, 10)
    for config in ({CLIP_KEY: 0.5}, {CLIP_KEY: 0.5, BIT_KEY: False}):
        msg = Message(RecordDict({"arrays": record(glob), "config": ConfigRecord(config)}),
                      dst_node_id=101, message_type="train")
        reply = dp_clip_mod(msg, new_context(101), train_with(scaled_to(SMALL, 11, 3.0)))
        out = numpy_of(reply.content["arrays"])
        assert list(out) == list(glob)
        assert np.linalg.norm(flat(out) - flat(glob)) == pytest.approx(0.5, rel=1e-5)
        assert reply.content["metrics"]["num-examples"] == 1


@pytest.mark.parametrize("config", [{}, {"lr": 0.1}, {CLIP_KEY: 0.0}, {CLIP_KEY: -1.0},
                                    {CLIP_KEY: True}, {CLIP_KEY: "0.5"}])
def test_dp_clip_mod_refuses_to_train_without_a_clip(config, task_identity):
    msg = Message(RecordDict({"arrays": record(model(SMALL, 12)),
                              "config": ConfigRecord(config)}),
                  dst_node_id=101, message_type="train")
    called = []
    with pytest.raises(ValueError, match="server sent no dp-clip norm: the server must wrap "
                                         "its strategy in CentralDP"):
        dp_clip_mod(msg, new_context(101), lambda m, c: called.append(m))
    assert called == []


def test_dp_clip_mod_passes_evaluate_and_key_stages_through(task_identity):
    evaluate = Message(RecordDict({"arrays": record(model(SMALL, 13))}), dst_node_id=101,
                       message_type="evaluate")
    assert dp_clip_mod(evaluate, new_context(101), lambda m, c: "called") == "called"
    stage = Message(RecordDict({"secagg": ConfigRecord({PAYLOAD_KEY: "{}"})}),
                    dst_node_id=101, message_type="train")
    assert dp_clip_mod(stage, new_context(101), lambda m, c: "called") == "called"


# ------------------------------------------------------------------ budget
@pytest.mark.parametrize("k", [0, 1, 3])
def test_budget_stops_training_before_it_is_exceeded(k, task_identity, flwr_caplog):
    q, sigma = 4 / 100, 1.0
    eps = [0.0] + [rdp_to_epsilon(POISSON_ORDERS, r * poisson_rdp(q, sigma, POISSON_ORDERS),
                                  1e-5) for r in range(1, k + 2)]
    budget = (eps[k] + eps[k + 1]) / 2  # k rounds fit, k + 1 do not
    dp = plain_dp(noise_multiplier=sigma, clip=1.0, population=100, max_epsilon=budget)
    nodes = [PlainNode(u, scaled_to(SMALL, u, 0.1)) for u in NODES]
    result = dp.start(FakeGrid(nodes), record(model(SMALL, 14)), num_rounds=k + 3)
    assert dp.budget_exhausted
    assert sorted(result.train_metrics_clientapp) == list(range(1, k + 1))
    for r, metrics in result.train_metrics_clientapp.items():
        assert metrics["dp-epsilon"] == pytest.approx(eps[r], rel=1e-12)
        assert metrics["dp-epsilon"] <= budget
    # Poisson sampling at q = 0.04 from 4 nodes: rounds 1..k release (noise alone if no
    # node was drawn), and nothing is sent after the budget
    assert all(len(n.received) <= k for n in nodes)
    assert (dp.ledger.epsilon() if dp.ledger else 0.0) <= budget
    warnings = [r for r in flwr_caplog.records if r.levelno == logging.WARNING
                and f"Round {k + 1} not run" in r.getMessage()]
    assert warnings and f"past the budget {budget:g}" in warnings[0].getMessage()


# ------------------------------------------------------------------ dropouts
@pytest.mark.parametrize("bad", ["error", "nan", "wrong shape"])
def test_plaintext_dropout_keeps_the_denominator(bad, task_identity, flwr_caplog):
    glob = model(SMALL, 15)
    d = scaled_to(SMALL, 16, 0.3)  # within the clip
    broken = dict(error=dict(fail=True), nan=dict(tamper=_nan),
                  **{"wrong shape": dict(tamper=_short)})[bad]
    nodes = [PlainNode(u, d) for u in NODES[:3]] + [PlainNode(404, d, **broken)]
    dp = plain_dp(noise_multiplier=1e-6, clip=0.5)
    new, metrics, _ = run_round(dp, FakeGrid(nodes), glob)
    assert new is not None
    shift = flat(numpy_of(new)) - flat(glob)
    np.testing.assert_allclose(shift, flat(d) * 3 / 4, rtol=0, atol=1e-6)
    assert "404" in flwr_caplog.text
    assert "3 of 4 sampled clients summed" in flwr_caplog.text
    assert metrics["dp-epsilon"] == pytest.approx(opacus_epsilon(1.0, 1e-6, 1, 1e-5))


@pytest.mark.parametrize("tamper", [_no_metrics, _no_weight, _zero_weight],
                         ids=["no MetricRecord", "no num-examples", "num-examples 0"])
def test_plaintext_reply_with_bad_metrics_does_not_abort_the_round(tamper, task_identity,
                                                                   flwr_caplog):
    # WeightedFedAvg leaves such a reply out; CentralDP must not crash on it either
    glob = model(SMALL, 17)
    d = scaled_to(SMALL, 18, 0.3)
    nodes = [PlainNode(u, d) for u in NODES[:3]] + [PlainNode(404, d, tamper=tamper)]
    dp = plain_dp(noise_multiplier=1e-6, clip=0.5)
    new, _, _ = run_round(dp, FakeGrid(nodes), glob)
    assert new is not None
    shift = flat(numpy_of(new)) - flat(glob)
    # a bad weight is no reason to drop the update (DP ignores weights), but dropping it
    # is fine too: either way the round ends with a model and the denominator m
    assert (np.allclose(shift, flat(d) * 3 / 4, rtol=0, atol=1e-6)
            or np.allclose(shift, flat(d), rtol=0, atol=1e-6))


def test_all_plaintext_replies_failing_release_nothing_under_fixed_sampling(task_identity,
                                                                           flwr_caplog):
    dp = plain_dp(noise_multiplier=1.0, clip=0.5, sampling="fixed")
    new, metrics, _ = run_round(dp, FakeGrid([PlainNode(u, fail=True) for u in NODES]),
                                model(SMALL, 19))
    assert new is None and metrics is None
    assert dp.ledger.epsilon() == 0.0
    assert "no update to add noise to" in flwr_caplog.text


@pytest.mark.parametrize("population", [4, 400])
def test_poisson_rounds_without_updates_release_the_noise_alone(population, task_identity,
                                                               flwr_caplog):
    """Under Poisson sampling whether a round is empty depends on who is in the
    population, so an empty round still releases: the global model plus the noise
    of std z C / m, accounted. Population 4: every node drawn, every reply fails;
    population 400 (q = 0.01 from the 4 connected): almost surely none drawn, and
    nothing is sent."""
    glob = model(BIG, 30)
    dp = plain_dp(noise_multiplier=1.0, clip=0.5, population=population)
    grid = FakeGrid([PlainNode(u, fail=True) for u in NODES])
    new, metrics, messages = run_round(dp, grid, glob)
    assert new is not None and metrics["dp-epsilon"] > 0
    assert dp.ledger.history == [(1.0, len(NODES) / population, 1)]
    assert_noise_std(flat(numpy_of(new)) - flat(glob), 1.0 * 0.5 / len(NODES))
    if population == 400 and not messages:
        assert dp.noise_only and "releases the noise alone" in flwr_caplog.text


def test_poisson_sampling_draws_each_node_with_the_rate(task_identity):
    """q = 0.5 over 200 connected nodes: the round's messages go to the drawn nodes
    only, about half of them, a different half each round."""
    ids = list(range(1000, 1200))
    dp = CentralDP(WeightedFedAvg(min_available_nodes=200, fraction_train=0.5,
                                  min_train_nodes=0, fraction_evaluate=0.0),
                   noise_multiplier=1.0, clip=0.5)
    grid = FakeGrid([PlainNode(u, scaled_to(SMALL, u, 0.1)) for u in ids])
    drawn = []
    for rnd in (1, 2):
        _, _, messages = run_round(dp, grid, model(SMALL, 31), rnd)
        drawn.append({m.metadata.dst_node_id for m in messages})
    assert dp.config.sample_rate == 0.5
    for sample in drawn:  # Binomial(200, 0.5): 100 +- 7.1; 6 standard deviations
        assert sample <= set(ids) and abs(len(sample) - 100) < 43
    assert drawn[0] != drawn[1]
    assert dp.strategy.fraction_train == 0.5 and dp.strategy.min_available_nodes == 200


def test_paillier_refuses_poisson_sampling_and_legacy_takes_fixed_only():
    from strategies.dp_legacy import LegacyCentralDP
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    class Encrypted(WeightedFedAvg):
        server_sees = "encrypted"
        public_key = None

    with pytest.raises(ValueError, match="Poisson sampling needs the fixed denominator"):
        CentralDP(Encrypted(), noise_multiplier=1.0, clip=1.0, sampling="poisson")
    with pytest.raises(ValueError, match="use the Message API's CentralDP"):
        LegacyCentralDP(LegacyFedAvg(), noise_multiplier=1.0, clip=1.0, sampling="poisson")
    with pytest.raises(ValueError, match="sampling must be one of"):
        CentralDP(WeightedFedAvg(), noise_multiplier=1.0, clip=1.0, sampling="uniform")


def test_masked_dropouts_are_recovered_and_divided_by_m(task_identity, flwr_caplog):
    # 707 drops in the share stage (never gets a train message); 303 fails and 505 is
    # silent after it (masked stage): recovered; the survivors' sum is divided by m = 7
    nodes_ids = [101, 202, 303, 404, 505, 606, 707]
    glob = model(SMALL, 20)
    deltas = {u: scaled_to(SMALL, u, norm) for u, norm in
              zip(nodes_ids, [0.1, 0.3, 2.0, 0.45, 5.0, 0.2, 0.1])}
    nodes = [MaskedNode(u, deltas[u], fail="train" if u == 303 else "",
                        silent={505: "train", 707: "share"}.get(u, "")) for u in nodes_ids]
    dp = masked_dp(m=7, noise_multiplier=1e-6, clip=0.5, adaptive=True,
                   clipped_count_stddev=1e-6)
    new, metrics, messages = run_round(dp, FakeGrid(nodes), glob)
    assert sorted(m.metadata.dst_node_id for m in messages) == [101, 202, 303, 404, 505, 606]
    assert new is not None
    survivors = [101, 202, 404, 606]
    clipped_sum = sum(flat(dict(zip(SMALL, clip_update(list(deltas[u].values()), 0.5)[0])))
                      for u in survivors)
    expected = flat(glob) + clipped_sum / 7
    bound = dp.strategy.params.error_bound
    got = numpy_of(new)
    assert list(got) == list(glob)
    np.testing.assert_allclose(flat(got), expected, rtol=0, atol=bound + 1e-5)
    assert "2 dropped and recovered" in flwr_caplog.text
    assert "4 of 7 sampled clients summed" in flwr_caplog.text
    # the four survivors were all within the clip: the bits say 4 unclipped of the 4
    # summed, released centred: (4 - 4/2) / 7 + 1/2
    assert metrics["dp-unclipped-fraction"] == pytest.approx(11 / 14, abs=1e-5)  # noised
    assert metrics["dp-next-clip"] == pytest.approx(0.5 * math.exp(-0.2 * (11 / 14 - 0.5)),
                                                    rel=1e-4)
    assert metrics["dp-epsilon"] > 0 and dp.ledger.history == [(1e-6, 1.0, 1)]


def test_masked_bits_count_the_clipped_clients(task_identity, flwr_caplog):
    glob = model(SMALL, 21)
    norms = {101: 0.1, 202: 3.0, 303: 7.0, 404: 0.2}
    nodes = [MaskedNode(u, scaled_to(SMALL, u, norms[u])) for u in NODES]
    dp = masked_dp(noise_multiplier=1e-6, clip=0.5, adaptive=True, clipped_count_stddev=1e-6,
                   target_quantile=0.9, clip_learning_rate=0.3)
    _, metrics, _ = run_round(dp, FakeGrid(nodes), glob)
    assert metrics["dp-unclipped-fraction"] == pytest.approx(2 / 4, abs=1e-5)  # noised
    assert metrics["dp-next-clip"] == pytest.approx(0.5 * math.exp(-0.3 * (2 / 4 - 0.9)),
                                                    rel=1e-4)


def test_masked_adaptive_refuses_a_secagg_value_range_below_one():
    # the 0/1 bit travels through SecAgg's encoding, which clips values to
    # [-secagg clip, secagg clip]: with secagg clip 0.5 a bit of 1 would arrive as 0.5
    with pytest.raises(ValueError, match="masking clip of at least 1"):
        CentralDP(SecAggFedAvg(clip=0.5, min_available_nodes=4, min_train_nodes=4,
                               fraction_evaluate=0.0),
                  noise_multiplier=1e-6, clip=0.5, adaptive=True, clipped_count_stddev=1e-6)


# ------------------------------------------------------------------ adaptive clipping
@pytest.mark.parametrize("z,sigma_b", [(1.0, 0.5), (1.0, 0.3), (2.0, 0.01)])
def test_count_noise_spending_all_the_noise_is_refused(z, sigma_b):
    with pytest.raises(ValueError, match=r"clipped-count noise \(std .*\) spends the whole "
                                         r"noise multiplier"):
        DPConfig(noise_multiplier=z, clip=1.0, num_sampled=10, population=10, adaptive=True,
                 clipped_count_stddev=sigma_b)
    with pytest.raises(ValueError, match="spends the whole"):
        plain_dp(noise_multiplier=z, clip=1.0, adaptive=True, clipped_count_stddev=sigma_b)


def test_adaptive_wrapper_accepts_the_default_count_noise(task_identity):
    # m = 100 sampled: the default sigma_b = m/20 = 5 leaves z_delta ~ z for z = 1 ...
    config = DPConfig(noise_multiplier=1.0, clip=1.0, num_sampled=100, population=100,
                      adaptive=True)
    assert config.update_noise_multiplier == pytest.approx((1 - 10.0 ** -2) ** -0.5)
    # ... so the wrapper must accept it; it checks its arguments with m = 1 instead, where
    # the default sigma_b is 1/20 and every z >= 0.1 "spends the whole noise multiplier"
    dp = plain_dp(m=100, noise_multiplier=1.0, clip=1.0, adaptive=True)
    nodes = [PlainNode(u) for u in range(1, 101)]
    run_round(dp, FakeGrid(nodes), model(SMALL, 22))
    assert dp.config.count_stddev == 5.0
    assert dp.config.update_noise_multiplier == pytest.approx((1 - 10.0 ** -2) ** -0.5)


# ------------------------------------------------------------------ validation
def test_central_dp_checks_its_settings_at_once():
    with pytest.raises(ValueError, match="noise_multiplier must be positive"):
        plain_dp(noise_multiplier=0.0, clip=1.0)
    with pytest.raises(ValueError, match="clip must be positive"):
        plain_dp(noise_multiplier=1.0, clip=0.0)
    with pytest.raises(ValueError, match="delta must be in"):
        plain_dp(noise_multiplier=1.0, clip=1.0, delta=2.0)


def test_central_dp_refuses_a_strategy_that_is_not_fedavg():
    from flwr.serverapp.strategy import Strategy

    class NotFedAvg(Strategy):
        def configure_train(self, *a):
            return []

        def aggregate_train(self, *a):
            return None, None

        def configure_evaluate(self, *a):
            return []

        def aggregate_evaluate(self, *a):
            return None

        def summary(self):
            pass

    for strategy in (NotFedAvg(), object()):
        with pytest.raises(TypeError, match="CentralDP wraps a FedAvg strategy"):
            CentralDP(strategy, noise_multiplier=1.0, clip=1.0)


def test_central_dp_wraps_paillier_only_with_a_fixed_clip(paillier_public_key):
    from strategies.paillier_message import PaillierFedAvg

    class TunedPaillier(PaillierFedAvg):  # a subclass is Paillier aggregation too
        pass

    for cls in (PaillierFedAvg, TunedPaillier):
        dp = CentralDP(cls(paillier_public_key, clip=1.0), noise_multiplier=1.0, clip=1.0)
        assert dp.encrypted and not dp.masked
        with pytest.raises(ValueError, match="adaptive clipping needs the count of unclipped "
                                             "updates, which the server cannot read under "
                                             "Paillier: use a fixed clip"):
            CentralDP(cls(paillier_public_key, clip=1.0), noise_multiplier=1.0, clip=1.0,
                      adaptive=True)


# ------------------------------------------------------------------ Paillier mode
@pytest.mark.parametrize("z", [1e-6, 2.0])
def test_paillier_round_adds_encrypted_noise_of_std_z_c_over_n(z, paillier_keys, task_identity):
    """The noise goes into the encrypted average: a key holder decrypts the clipped
    average of the n updates plus N(0, (z C / n)^2) (within the quantization error)."""
    from strategies.paillier_message import PaillierFedAvg
    from strategies.paillier_protocol import EncryptedModel, decrypt_model

    public, private = paillier_keys
    shapes = {"w": (40, 50)}  # 2,000 values: 32 ciphertexts
    glob = model(shapes, 41, scale=0.1)
    clip = 0.5
    deltas = {u: scaled_to(shapes, u, 2.0) for u in NODES[:4]}  # all clipped to 0.5
    nodes = [PaillierNode(u, deltas[u], private) for u in NODES[:4]]
    dp = CentralDP(PaillierFedAvg(public, clip=2.0, min_available_nodes=4, min_train_nodes=4,
                                  fraction_evaluate=0.0), noise_multiplier=z, clip=clip)
    new, metrics, _ = run_round(dp, FakeGrid(nodes), glob)
    encrypted = EncryptedModel.from_arrays(numpy_of(new), public)
    assert encrypted.total_weight == 4 and encrypted.noise_offset > 0
    got = decrypt_model(private, encrypted, accept_noise=True)[0][0].astype(np.float64).ravel()
    # each node leaves room for the quantization (dp_rounds.quantized_clip)
    params = dp.strategy.params
    effective = quantized_clip(clip, [glob["w"]], params.clip, params.step)
    assert effective == pytest.approx(clip - 1.5 * params.step * math.sqrt(2000))
    expected = glob["w"].astype(np.float64).ravel() + sum(
        flat(deltas[u]) * (effective / np.linalg.norm(flat(deltas[u]))) for u in deltas) / 4
    residual = got - expected
    quantization = dp.strategy.params.max_error() + 1e-6  # + float32
    if z < 1e-3:
        assert np.abs(residual).max() <= quantization
    else:
        std = z * clip / 4
        assert abs(residual.std() / std - 1) < 0.08  # 2,000 samples: ~1.6% standard error
        assert abs(residual.mean()) < 5 * std / np.sqrt(residual.size)
    assert metrics["dp-epsilon"] > 0 and dp.config.sampling == "fixed"
    # the noise is clipped at 8 standard deviations: what that may change goes into delta
    sigma = z * clip / params.step  # in levels of the sum
    tail = 2000 * tail_bound(sigma, math.ceil(8 * sigma))
    assert tail >= 2000 * math.erfc(8 / math.sqrt(2))
    assert metrics["dp-delta"] == pytest.approx(1e-5 + tail, rel=1e-12)
    assert dp.state_dict()["tail-mass"] == pytest.approx(tail, rel=1e-12)


# ------------------------------------------------------------------ fuzzing
def central_dp(global_model: dict[str, np.ndarray]) -> CentralDP:
    strategy = CentralDP(WeightedFedAvg(min_available_nodes=1, min_train_nodes=3),
                         noise_multiplier=0.5, clip=1.0, population=3)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in
                                                  global_model.items()}),
                                  ConfigRecord(), fuzzing.FakeGrid([1, 2, 3])))
    return strategy


def seeded_dp_round(strategy, replies: list[Message]) -> list[np.ndarray] | None:
    with no_hang(), same_noise():  # the same noise for both runs compared
        return arrays_of(strategy.aggregate_train(1, replies)[0])


@pytest.fixture(scope="module")
def dp_round() -> tuple[CentralDP, list[Message], list[np.ndarray]]:
    """A plaintext central-DP strategy after configure_train, two good replies and what
    it releases for them (noise from a fixed seed)."""
    with flower_task_identity():  # configure_train builds Flower messages
        strategy = central_dp({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    good = [plain_reply(n, plain_model(n), w) for n, w in PLAIN_WEIGHTS.items()]
    return strategy, good, seeded_dp_round(strategy, good)


@fuzz(30)
@given(data=st.data())
def test_central_dp_leaves_out_bad_replies(dp_round, caplog_flwr, data):
    strategy, good, expected = dp_round
    bad, must_fail = data.draw(bad_plain_reply(3, plain_model(3)))
    caplog_flwr.clear()
    got = seeded_dp_round(strategy, [good[0], bad, good[1]])
    assert all(np.isfinite(g).all() for g in got)
    if any("node 3" in w.lower() for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    else:
        assert not must_fail, "a malformed reply was aggregated"


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("dtype, extreme", [(np.float32, 3e38), (np.float64, 1e308)])
def test_central_dp_with_updates_of_extreme_norm(caplog_flwr, dtype, extreme):
    """Finite values whose difference from the global model, or whose norm, overflows:
    never NaN in the released model."""
    start = {k: np.full(s, -extreme, dtype) for k, s in SHAPES.items()}
    strategy = central_dp(start)
    far = {k: np.full(s, extreme, dtype) for k, s in SHAPES.items()}
    got = seeded_dp_round(strategy, [plain_reply(1, far, 10), plain_reply(2, far, 10)])
    assert got is None or all(np.isfinite(g).all() for g in got)


# ------------------------------------------------------------------ distributed DP
@pytest.mark.parametrize("quorum, shared_by", [(0.5, 3), (0.8, 4)])
def test_a_distributed_round_releases_the_clients_noise_and_the_server_adds_none(
        quorum, shared_by, task_identity, monkeypatch):
    """mode="distributed": the nodes' secagg_mod adds each one's share; the server's own
    sampler is never called, and the released model carries noise of std z C / m times
    sqrt(4 / k): the 4 nodes each add levels / sqrt(k), k the masking quorum of 3 or,
    if more, ceil(quorum 4)."""
    def server_noise(*_):
        raise AssertionError("the server drew noise")

    monkeypatch.setattr("strategies.dp.discrete_gaussian", server_noise)
    glob = model(BIG, 30, scale=0.1)
    deltas = {u: scaled_to(BIG, u, 0.3) for u in NODES}  # within the clip
    nodes = [MaskedNode(u, deltas[u]) for u in NODES]
    dp = masked_dp(m=4, noise_multiplier=0.5, clip=0.5, mode="distributed", quorum=quorum)
    new, metrics, messages = run_round(dp, FakeGrid(nodes), glob)
    assert all(dict(m.content.config_records["config"])["dp-noise-levels"] > 0
               for m in messages)
    residual = flat(numpy_of(new)) - flat(glob) - sum(flat(deltas[u]) for u in NODES) / 4
    std = 0.5 * 0.5 / 4 * math.sqrt(4 / shared_by)
    assert abs(residual.std() / std - 1) < 0.02
    assert abs(residual.mean()) < 6 * std / math.sqrt(residual.size)
    # q = 1: every node every round, the plain mechanism's epsilon
    assert metrics["dp-epsilon"] == pytest.approx(opacus_epsilon(1.0, 0.5, 1, 1e-5), rel=1e-6)


def test_a_distributed_paillier_round_carries_the_clients_noise_and_a_second_decrypts(
        paillier_keys, task_identity, monkeypatch):
    """mode="distributed" under Paillier: the nodes' paillier_mod adds each one's share
    before encrypting (quorum 0.75 of 4: 3), the server draws nothing, and the aggregate
    it sends back is authentic: the next round's nodes decrypt it without accepting any
    server noise, and find the clipped average plus noise of std z C / 4 sqrt(4 / 3)."""
    from strategies.paillier_message import PaillierFedAvg
    from strategies.paillier_protocol import EncryptedModel, decrypt_model

    def server_noise(*_):
        raise AssertionError("the server drew noise")

    monkeypatch.setattr("strategies.dp_rounds.discrete_gaussian", server_noise)
    public, private = paillier_keys
    shapes = {"w": (100, 100)}
    glob = model(shapes, 42, scale=0.1)
    deltas = {u: scaled_to(shapes, u, 0.3) for u in NODES}  # within the clip
    nodes = [PaillierNode(u, deltas[u], private) for u in NODES]
    dp = CentralDP(PaillierFedAvg(public, clip=2.0, min_available_nodes=4, min_train_nodes=4,
                                  fraction_evaluate=0.0), noise_multiplier=0.5, clip=0.5,
                   mode="distributed", quorum=0.75)
    new, metrics, messages = run_round(dp, FakeGrid(nodes), glob)
    assert all(dict(m.content.config_records["config"])["dp-noise-quorum"] == 3
               for m in messages)
    encrypted = EncryptedModel.from_arrays(numpy_of(new), public)
    assert encrypted.server_noise == 0 and encrypted.client_noise.quorum == 3
    got = decrypt_model(private, encrypted)[0][0].astype(np.float64).ravel()
    residual = got - flat(glob) - sum(flat(deltas[u]) for u in NODES) / 4
    std = 0.5 * 0.5 / 4 * math.sqrt(4 / 3)
    assert abs(residual.std() / std - 1) < 0.04  # 10,000 values: ~0.7% standard error
    assert abs(residual.mean()) < 6 * std / math.sqrt(residual.size)
    noise = encrypted.client_noise
    assert metrics["dp-delta"] == pytest.approx(
        1e-5 + 4 * 10_000 * tail_bound(noise.std, noise.bound), rel=1e-12)
    # the next round: the nodes decrypt it as the global model (no server-noise setting)
    new2, _, _ = run_round(dp, FakeGrid(nodes), numpy_of(new), rnd=2)
    assert EncryptedModel.from_arrays(numpy_of(new2), public).server_round == 2


def test_a_node_refuses_to_add_less_noise_than_its_floor(task_identity, monkeypatch,
                                                         flwr_caplog):
    """The server asks for multiplier 0.5; nodes that require 0.8 refuse, saying why."""
    monkeypatch.setenv(NODE_CONFIG_ENV, "dp-min-noise-multiplier=0.8")
    glob = model(SMALL, 31)
    nodes = [MaskedNode(u, scaled_to(SMALL, u, 0.3)) for u in NODES]
    dp = masked_dp(m=4, noise_multiplier=0.5, clip=0.5, mode="distributed")
    from strategies.screening import NoUsableUpdate

    with pytest.raises(NoUsableUpdate, match="below this node's dp-min-noise-multiplier 0.8"):
        run_round(dp, FakeGrid(nodes), glob)  # nothing masked: the round has no update
    assert "multiplier 0.5, below" in flwr_caplog.text
