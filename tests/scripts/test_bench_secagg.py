"""The in-process compute benchmark of scripts/bench_secagg.py runs the real masking
core end to end (a small model here): the benchmark cannot drift from the protocol."""

from __future__ import annotations

import numpy as np

from tests.helpers import load_script


def test_compute_round_decodes_within_the_error_bound():
    bench = load_script("bench_secagg")
    out = bench.compute_round(6, 200, 0, 0.2, np.random.default_rng(0))
    assert out["clients"] == 6 and out["dropped"] == 1
    assert out["max_abs_error"] <= out["error_bound"]
    assert set(out["client_seconds"]) == {"advertise", "share", "mask", "check", "unmask"}
