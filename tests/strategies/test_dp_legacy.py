"""Central DP on the legacy API: ``LegacyCentralDP`` around plaintext FedAvg (the
server clips) and around ``LegacySecAggFedAvg`` (clients clip with
``legacy_dp_clip_mod`` inside ``legacy_secagg_mod``), with in-process clients."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from hypothesis import given
from hypothesis import strategies as st

from strategies.dp import clip_update
from strategies.dp_legacy import LegacyCentralDP, legacy_dp_clip_mod
from strategies.keyfiles import load_private_key, load_public_key
from strategies.legacy_wire import load_ndarrays
from strategies.secagg_legacy import LegacySecAggFedAvg, legacy_secagg_mod
from tests.helpers import SHAPES
from tests.helpers import fuzzing
from tests.helpers.fakes import FakeProxy
from tests.helpers.dp import same_noise
from tests.helpers.fuzzing import (PLAIN_WEIGHTS, bad_model, client_manager, fit_res, fuzz, garbage,
                                   mutated_bytes, no_hang, plain_model, warnings_of)
from tests.helpers.masking import NODES, LegacyProxy, local_model


CLIP = 0.5
TINY = 1e-6  # noise multiplier: the result is the clipped average, noise aside


def initial() -> list[np.ndarray]:
    return [np.full(s, 0.1, np.float32) for s in SHAPES.values()]


def expected(nodes: list[int], m: int) -> list[np.ndarray]:
    """global + sum of the clipped updates / m."""
    g = initial()
    total = [np.zeros(a.shape) for a in g]
    for u in nodes:
        clipped, _ = clip_update([x - y for x, y in zip(local_model(u).values(), g)], CLIP)
        total = [t + c for t, c in zip(total, clipped)]
    return [a + t / m for a, t in zip(g, total)]


def run(strategy, proxies, drop=()):
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    pairs = strategy.configure_fit(1, ndarrays_to_parameters(initial()), manager)
    results = [(proxy, proxy.fit(ins, None, 1)) for proxy, ins in pairs
               if proxy.node_id not in drop]
    return pairs, strategy.aggregate_fit(1, results, [])


def test_plaintext_server_clips_and_uses_the_fixed_denominator(task_identity):
    inner = FedAvg(min_fit_clients=6, min_available_clients=6)
    strategy = LegacyCentralDP(inner, noise_multiplier=TINY, clip=CLIP)
    proxies = [LegacyProxy(u, mods=()) for u in NODES]  # plain clients: no mod at all
    pairs, (parameters, metrics) = run(strategy, proxies, drop={NODES[0]})
    assert all(ins.config["dp-clip"] == CLIP for _, ins in pairs)
    got = parameters_to_ndarrays(parameters)
    for g, e in zip(got, expected(NODES[1:], m=6), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)
    assert metrics["dp-epsilon"] > 0 and metrics["dp-unclipped-fraction"] == 0.0


def test_masked_clients_clip_and_the_noise_goes_on_the_unmasked_sum(task_identity):
    inner = LegacySecAggFedAvg(clip=2.0, min_fit_clients=6, min_available_clients=6)
    # adaptive: the count noise must leave room for the update noise (z_delta ~ z)
    strategy = LegacyCentralDP(inner, noise_multiplier=1e-3, clip=CLIP, adaptive=True,
                               clipped_count_stddev=1e3)
    proxies = [LegacyProxy(u, mods=(legacy_secagg_mod, legacy_dp_clip_mod)) for u in NODES]
    pairs, (parameters, metrics) = run(strategy, proxies, drop={NODES[0]})
    assert all(ins.config["dp-unclipped"] is True for _, ins in pairs)
    got = parameters_to_ndarrays(parameters)
    assert len(got) == len(SHAPES)  # the bit array is gone
    noise = 5 * strategy.config.update_noise_multiplier * CLIP / 6
    bound = inner.params.error_bound * 5 / 6 + noise  # quantization of 5 updates, / m
    for g, e in zip(got, expected(NODES[1:], m=6), strict=True):
        np.testing.assert_allclose(g, e, atol=bound)
    assert metrics["dp-epsilon"] > 0 and "dp-unclipped-fraction" in metrics


def test_the_clip_mod_refuses_to_train_without_a_norm(task_identity):
    from flwr.app import Message
    from flwr.common import FitIns
    from flwr.compat.common import recorddict_compat as compat

    msg = Message(compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(initial()), {}),
                                              True), dst_node_id=1, message_type="train")
    called = []
    with pytest.raises(ValueError, match="server sent no dp-clip norm"):
        legacy_dp_clip_mod(msg, None, lambda m, c: called.append(m))
    assert called == []


def test_wrapper_refuses_non_fedavg():
    with pytest.raises(TypeError, match="wraps a flwr.server.strategy.FedAvg"):
        LegacyCentralDP(object(), noise_multiplier=1.0, clip=1.0)


# ------------------------------------------------------------------ fuzzing
def legacy_dp_round(strategy: LegacyCentralDP, results: list) -> list[np.ndarray] | None:
    with no_hang(), same_noise():  # the same noise for both runs compared
        out, _ = strategy.aggregate_fit(1, results, [])
    return None if out is None else load_ndarrays(out.tensors)


@pytest.fixture(scope="module")
def legacy_dp() -> tuple[LegacyCentralDP, list, list[np.ndarray]]:
    strategy = LegacyCentralDP(FedAvg(min_fit_clients=3, min_available_clients=3),
                               noise_multiplier=0.5, clip=1.0, population=3)
    start = [np.zeros(s, np.float32) for s in fuzzing.SHAPES.values()]
    strategy.configure_fit(1, ndarrays_to_parameters(start), client_manager(3))
    good = [(FakeProxy(n), fit_res(ndarrays_to_parameters(list(plain_model(n).values())), w))
            for n, w in PLAIN_WEIGHTS.items()]
    return strategy, good, legacy_dp_round(strategy, good)


@fuzz(25)
@given(data=st.data())
def test_legacy_central_dp_leaves_out_bad_replies(legacy_dp, caplog_flwr, data):
    strategy, good, expected = legacy_dp
    tensors = ndarrays_to_parameters(list(plain_model(3).values())).tensors
    kind = data.draw(st.sampled_from(["tensor", "count", "values"]))
    if kind == "tensor":
        i = data.draw(st.integers(0, len(tensors) - 1))
        tensors[i] = data.draw(garbage | mutated_bytes(tensors[i]))
    elif kind == "count":
        tensors = data.draw(st.lists(st.sampled_from(tensors) | garbage, max_size=3))
    else:
        tensors = ndarrays_to_parameters(list(data.draw(bad_model(plain_model(3))).values())
                                         ).tensors
    caplog_flwr.clear()
    got = legacy_dp_round(strategy, [
        good[0], (FakeProxy(9), fit_res(Parameters(tensors, "numpy.ndarray"), 7)), good[1]])
    assert all(np.isfinite(g).all() for g in got)
    if any("client 9" in w for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


def assert_noise_of(got: list[np.ndarray], nodes: list[int], m: int, std: float) -> None:
    """``got`` is the clipped average of ``nodes`` over ``m`` plus noise of ``std`` (123
    values: the std is measured to about 6%, checked to 30%)."""
    residual = np.concatenate([(g - e).ravel() for g, e in
                               zip(got, expected(nodes, m=m), strict=True)])
    assert 0.7 < residual.std() / std < 1.3
    assert abs(residual.mean()) < 6 * std / np.sqrt(residual.size)


def test_distributed_dp_over_legacy_masking(task_identity, monkeypatch):
    """mode="distributed" on the legacy API (fixed-size sampling): the nodes add the
    noise, the server draws none; 6 nodes share it among ceil(0.8 x 6) = 5, and one
    drops out, so the sum carries exactly z C."""
    monkeypatch.setattr("strategies.dp.discrete_gaussian", _no_server_noise)
    inner = LegacySecAggFedAvg(clip=2.0, min_fit_clients=6, min_available_clients=6)
    strategy = LegacyCentralDP(inner, noise_multiplier=0.5, clip=CLIP, mode="distributed")
    proxies = [LegacyProxy(u, mods=(legacy_secagg_mod, legacy_dp_clip_mod)) for u in NODES]
    pairs, (parameters, metrics) = run(strategy, proxies, drop={NODES[0]})
    assert all(ins.config["dp-noise-quorum-fraction"] == 0.8 for _, ins in pairs)
    assert_noise_of(parameters_to_ndarrays(parameters), NODES[1:], 6, 0.5 * CLIP / 6)
    assert strategy.config.sampling == "fixed" and metrics["dp-epsilon"] > 0


def test_distributed_dp_over_legacy_paillier(task_identity, monkeypatch, node_keys):
    """The same under Paillier: every update carries its share (quorum 5 of 6), the
    server adds nothing, and the aggregate is authentic: a key holder decrypts it
    without accepting server noise."""
    from strategies.keyfiles import KEY_DIR_ENV
    from strategies.paillier_legacy import (LegacyPaillierFedAvg, legacy_paillier_mod,
                                            parameters_arrays)
    from strategies.paillier_protocol import EncryptedModel, decrypt_model

    monkeypatch.setattr("strategies.dp_rounds.discrete_gaussian", _no_server_noise)
    monkeypatch.setenv(KEY_DIR_ENV, str(node_keys[1].parent))
    public = load_public_key(node_keys[0])
    inner = LegacyPaillierFedAvg(public, clip=2.0, min_fit_clients=6, min_available_clients=6)
    strategy = LegacyCentralDP(inner, noise_multiplier=0.5, clip=CLIP, mode="distributed")
    proxies = [LegacyProxy(u, mods=(legacy_paillier_mod, legacy_dp_clip_mod)) for u in NODES]
    pairs, (parameters, metrics) = run(strategy, proxies, drop={NODES[0]})
    assert all(ins.config["dp-noise-quorum"] == 5 for _, ins in pairs)
    model = EncryptedModel.from_arrays(parameters_arrays(parameters), public)
    assert model.server_noise == 0 and len(model.contributors) == 5
    got = decrypt_model(load_private_key(node_keys[1]), model)[0]
    # Paillier divides by the 5 updates; each carries levels / sqrt(5) of noise
    assert_noise_of(got, NODES[1:], 5, 0.5 * CLIP / 5)
    # the clients' tails, clipped at 12 standard deviations, add below 1e-28 to delta
    assert metrics["dp-epsilon"] > 0 and metrics["dp-delta"] == pytest.approx(1e-5)


def _no_server_noise(*_):
    raise AssertionError("the server drew noise")
