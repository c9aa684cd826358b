"""DP-SGD settings from the fit config (clients.dp_sgd_config)."""

from __future__ import annotations

import pytest

from clients.dp_sgd_config import DPSGDConfig
from fedapp.config import RunSettings
from tests.helpers.dp import DP


def test_config_errors_say_what_to_change():
    assert DPSGDConfig.from_config({"local-epochs": 1}) is None
    assert DPSGDConfig.from_config(DP) == DPSGDConfig(1.1, 1.0, 1e-5)
    with pytest.raises(ValueError, match="noise-multiplier must be positive"):
        DPSGDConfig.from_config({**DP, "dp-sgd-noise-multiplier": 0.0})
    with pytest.raises(ValueError, match="max-grad-norm must be positive"):
        DPSGDConfig.from_config({**DP, "dp-sgd-max-grad-norm": -1.0})
    with pytest.raises(ValueError, match="dp-delta"):
        DPSGDConfig.from_config({**DP, "dp-delta": 1.0})
    with pytest.raises(ValueError, match="lacks"):
        DPSGDConfig.from_config({"dp-sgd-noise-multiplier": 1.0})
    settings = RunSettings.from_run_config({"task": "housing", "dp-sgd": True})
    assert DPSGDConfig.from_config(settings.train_config()) is not None
    assert DPSGDConfig.from_config(RunSettings.from_run_config({}).train_config()) is None
