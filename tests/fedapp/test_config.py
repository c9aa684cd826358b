"""Run settings (fedapp.config): the defaults in pyproject.toml, the task defaults,
clear refusals, and no setting that could carry a client's secret."""

from __future__ import annotations

import math
import tomllib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedapp.config import DEFAULTS, RunSettings
from tests.helpers import ROOT
from tests.helpers.fuzzing import attempt, fuzz, json_values, refused


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
    ({"tsak": "mnist"}, "unknown run setting .tsak. \\(did you mean .task.\\?\\)"),
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
    ({"dp-noise-multiplier": 1.0, "dp-mode": "distributed"},
     "dp-mode 'distributed' needs aggregation 'secagg', 'paillier' or "
     "'paillier-threshold'"),
    ({"aggregation": "paillier-threshold", "paillier-public-key": "/k.pub.json",
      "dp-noise-multiplier": 1.0, "dp-adaptive-clip": True}, "dp-adaptive-clip false"),
    ({"aggregation": "secagg", "dp-noise-multiplier": 1.0, "dp-mode": "distributed",
      "dp-adaptive-clip": True}, "and a fixed clip"),
    ({"dp-quorum": 0.0}, "dp-quorum must be in \\(0, 1\\]"),
    ({"paillier-threshold-payload": "ckks"},
     "paillier-threshold-payload must be masked or paillier"),
])
def test_bad_settings_say_what_is_wrong(override, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_run_config(override)


def test_run_dir_is_absolute():
    assert RunSettings.from_run_config({}).resolved_run_dir().is_absolute()
    assert str(RunSettings.from_run_config({"run-dir": "/x/y"}).resolved_run_dir()) == "/x/y"


def test_run_config_cannot_carry_client_secrets():
    """The ServerApp gets the run config: it has no setting for a private key, and
    an unknown setting stops the run (node config keys stay with the nodes)."""
    assert not [k for k, v in DEFAULTS.items() if not isinstance(v, bool)  # a switch holds none
                and any(w in k for w in ("private", "secret", "auth"))]
    for key in ("paillier-private-key", "secagg-identity-key", "supernode-key"):
        with pytest.raises(ValueError, match="unknown run setting"):
            RunSettings.from_run_config({**DEFAULTS, key: "/keys/secret"})


# ------------------------------------------------------------------ fuzzing
@fuzz(100)
@given(data=st.data())
def test_run_settings(data):
    from fedapp.config import DEFAULTS, RunSettings

    keys = st.sampled_from(sorted(DEFAULTS))
    overrides = data.draw(st.dictionaries(keys, json_values | keys.map(DEFAULTS.get), max_size=3))
    if data.draw(st.booleans()):  # one value of another setting's type: a swapped field
        a, b = data.draw(st.tuples(keys, keys))
        overrides[a] = DEFAULTS[b]
    if data.draw(st.integers(0, 9)) == 0:
        overrides[data.draw(st.text(max_size=10))] = 1
    result = attempt(lambda: RunSettings.from_run_config(overrides), ValueError)
    if refused(result):
        return
    s = result
    for key, value in overrides.items():  # taken as given, never converted from another type
        got = s.value(key)
        if value != "auto":
            assert type(got) in (type(value), float), (key, value, got)
            assert got == (float(value) if type(got) is float else value), (key, value, got)
    assert s.round_timeout > 0 and 0 < s.data.local_test_fraction < 1
    assert min(s.data.spam_buckets, s.data.shards_per_client, s.data.shard_size) >= 1
    assert min(s.train.momentum, s.train.weight_decay, s.dp.noise_multiplier, s.dp.population,
               s.seed) >= 0
    for name, value in s.as_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), name
