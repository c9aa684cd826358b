"""The in-process compute benchmark of scripts/bench_secagg.py runs the real masking
core end to end (a small model here): the benchmark cannot drift from the protocol."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import load_script


@pytest.mark.parametrize(("n", "degree", "dropped"), [(6, 0, 1), (16, 6, 3)])
def test_compute_round_decodes_within_the_error_bound(n, degree, dropped):
    """Complete (6 clients) and sparse (16 clients, 6 neighbors: with the coin stage)."""
    bench = load_script("bench_secagg")
    out = bench.compute_round(n, 200, degree, 0.2, np.random.default_rng(0))
    assert out["clients"] == n and out["dropped"] == dropped
    assert out["neighbors"] == (degree or n - 1)
    assert out["max_abs_error"] <= out["error_bound"]
    assert set(out["client_seconds"]) == {"advertise", "coin", "share", "mask", "check",
                                          "unmask"}
    assert (out["client_seconds"]["coin"] > 0) == (degree > 0)
