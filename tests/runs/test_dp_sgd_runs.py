"""Client-side DP-SGD in a real Flower simulation: the cumulative epsilon each round."""

from __future__ import annotations

import json
import math

import pytest

from clients.tasks import load_client_data
from fedapp import launch
from fedapp.config import RunSettings
from tests.helpers import ROOT
from tests.helpers.dp import independent_epsilon

pytestmark = pytest.mark.slow  # a real Flower simulation


def test_simulation_reports_growing_cumulative_epsilon(tmp_path):
    """Housing, 2 SuperNodes, 2 rounds, dp-sgd on: metrics.json's train-dp-sgd-epsilon
    grows from round 1 to 2 and is the example-weighted mean of the clients' RDP
    epsilons over all steps so far, so the accountant's state outlived round 1."""
    overrides = {"task": "housing", "num-server-rounds": 2, "dp-sgd": True,
                 "local-epochs": 1, "central-eval": False}
    status, run_dir, logs = launch.simulate(ROOT, tmp_path, 2, overrides, timeout=300,
                                            progress=False)
    assert status == launch.FINISHED_OK, logs[-3000:]
    rows = {r["round"]: r for r in json.loads((run_dir / "metrics.json").read_text())}
    settings = RunSettings.from_run_config(overrides)
    spec = settings.data_spec(2)
    sizes = [len(load_client_data(spec, pid)[0]) for pid in range(2)]
    for rnd in (1, 2):
        expected = sum(n * independent_epsilon(
            [(settings.dp_sgd.noise_multiplier, settings.train.batch_size / n,
              rnd * math.ceil(n / settings.train.batch_size))], settings.dp.delta)
            for n in sizes) / sum(sizes)
        assert rows[rnd]["train-dp-sgd-epsilon"] == pytest.approx(expected, rel=1e-6)
    assert 0 < rows[1]["train-dp-sgd-epsilon"] < rows[2]["train-dp-sgd-epsilon"]
    assert rows[2]["train-clients"] == 2 and rows[2]["train-failures"] == 0
