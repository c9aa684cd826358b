import tomllib
from pathlib import Path

import pytest

from fedapp.config import DEFAULTS, RunSettings

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_run_config_is_the_defaults_and_has_no_federations():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["config"] == DEFAULTS
    assert app["components"] == {"serverapp": "fedapp.server_app:app",
                                 "clientapp": "fedapp.client_app:app"}
    assert "federations" not in project["tool"]["flwr"]


def test_auto_settings_take_the_task_defaults():
    s = RunSettings.from_run_config({"task": "housing"})
    assert (s.train.optimizer, s.train.local_epochs, s.train.weight_decay) == ("adam", 10, 0.1)
    s = RunSettings.from_run_config({"task": "mnist", "learning-rate": 0.2, "batch-size": 10})
    assert (s.train.learning_rate, s.train.batch_size, s.train.optimizer) == (0.2, 10, "sgd")
    assert s.train_config()["learning-rate"] == 0.2
    assert RunSettings.from_run_config({"task": "spam", "aggregation": "secagg"}).secagg.clip == 8.0


@pytest.mark.parametrize("override, message", [
    ({"tsak": "mnist"}, "unknown run settings"),
    ({"task": "cifar"}, "task must be one of"),
    ({"learning-rate": "fast"}, "learning-rate must be 'auto'"),
    ({"partitioning": "random"}, "partitioning must be one of"),
    ({"data-source": "s3"}, "data-source must be one of"),
    ({"fraction-train": 1.5}, "fraction-train"),
    ({"num-server-rounds": 0}, "num-server-rounds"),
    ({"aggregation": "secure"}, "aggregation must be one of"),
    ({"aggregation": "paillier"}, "needs paillier-public-key"),
    ({"aggregation": "secagg", "secagg-threshold": 1.0}, "threshold_fraction must be in"),
    ({"aggregation": "secagg", "secagg-neighbors": -2}, "num_neighbors must be >= 0"),
    ({"aggregation": "secagg", "secagg-clip": -1.0}, "clip must be a positive"),
    ({"aggregation": "secagg", "secagg-value-bits": 40}, "value_bits must be in"),
])
def test_bad_settings_say_what_is_wrong(override, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config(override)


def test_run_dir_is_absolute():
    assert RunSettings.from_run_config({}).resolved_run_dir().is_absolute()
    assert str(RunSettings.from_run_config({"run-dir": "/x/y"}).resolved_run_dir()) == "/x/y"
