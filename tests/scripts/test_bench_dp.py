"""The sampler comparison of scripts/bench_dp.py draws from both exact discrete
Gaussian samplers for real (small counts here) and reports their spread."""

from __future__ import annotations

import pytest

from tests.helpers import load_script


def test_sampler_benchmark_draws_from_ours_and_opendps():
    out = load_script("bench_dp").sampler_benchmark(values=50_000, opendp_values=5_000,
                                                    sigma=40.0)
    assert out["ours_values"] == 50_000 and out["opendp_values"] == 5_000
    assert out["ours_values_per_second"] > 0 and out["opendp_values_per_second"] > 0
    # 50k and 5k draws: the sample std within 6 of its standard errors of sigma
    assert out["ours_std_over_sigma"] == pytest.approx(1, abs=6 * 0.0032)
    assert out["opendp_std_over_sigma"] == pytest.approx(1, abs=6 * 0.01)


def test_side_by_side_compares_distributed_dp_with_masking_and_central_dp():
    bench = load_script("bench_dp")
    runs = [{"run": "secagg:0", "aggregation": "secagg", "noise_multiplier": 0.0,
             "seconds_per_round": 20.0, "final_accuracy": 0.97},
            {"run": "secagg:1", "aggregation": "secagg", "noise_multiplier": 1.0,
             "seconds_per_round": 20.5, "final_accuracy": 0.95},
            {"run": "secagg-ddp:1", "aggregation": "secagg-ddp", "noise_multiplier": 1.0,
             "seconds_per_round": 21.0, "final_accuracy": 0.945}]
    assert bench.side_by_side(runs) == {"ddp_z1_seconds_over_masking": 1.05,
                                        "ddp_z1_accuracy_minus_central": -0.005}
    assert bench.side_by_side(runs[2:]) == {}  # nothing to compare with
    assert bench.run_spec("secagg-ddp:1.3") == ("secagg-ddp", 1.3)
    with pytest.raises(Exception, match="aggregation:z"):
        bench.run_spec("paillier:1")
