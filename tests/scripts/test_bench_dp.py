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
