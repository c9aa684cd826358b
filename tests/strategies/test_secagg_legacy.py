"""The masking strategy and mod of the legacy API (strategies.secagg_legacy), with the
clients run in-process behind fake client proxies: the weighted average of the
survivors, bad replies left out, pre-advertised keys in later rounds."""

from __future__ import annotations

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from strategies.secagg_legacy import TENSOR_TYPE, LegacySecAggFedAvg
from strategies.secagg_protocol import PAYLOAD_KEY
from tests.helpers import CLIP, SHAPES
from tests.helpers.masking import NODES, LegacyProxy, expected, local_model


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
    # the survivors' example-weighted means, from sums (fit_metrics_aggregation_fn would
    # need each node's own metrics, which the server never gets)
    assert metrics == {"train-loss": 1.0, "secagg-clipped": 0.0}
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


def test_legacy_later_rounds_skip_the_key_stages(task_identity, flwr_caplog):
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
    for stage in ("advertise", "share"):  # round 1 only
        answered = {id(r) for r in flwr_caplog.records
                    if f"{stage} stage, 6 of 6 clients answered" in r.getMessage()}
        assert len(answered) == 1
    assert "advertise and share stages skipped, all 6 nodes sent their keys and shares" in \
        flwr_caplog.text
