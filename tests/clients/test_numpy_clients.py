"""The NumPy clients of every task (clients.numpy_clients): fit, evaluate, federated
normalization and config checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clients.numpy_clients import CLIENTS, HousingClient
from clients.partition import PartitionSpec
from clients.standardize import combine_stats, encode_floats
from clients.tasks import DataSpec, load_client_data
from tests.helpers import TRAIN
from tests.helpers.fuzzing import NASTY, attempt, fuzz, mutated_bytes, refused


def make(task, data_dir, n=4, pid=0):
    spec = DataSpec(task=task, data_dir=str(data_dir), partition=PartitionSpec("iid", n))
    return CLIENTS[task](spec, *load_client_data(spec, pid), seed=pid)


@pytest.mark.parametrize("task", ["mnist", "spam"])
def test_classifiers_fit_and_evaluate(task, data_dir):
    client = make(task, data_dir, n=20)
    weights = client.get_parameters({})
    new, n, metrics = client.fit(weights, TRAIN)
    assert n == len(client.train_set) and np.isfinite(metrics["train-loss"])
    assert any(not np.array_equal(a, b) for a, b in zip(weights, new))
    loss, n_test, m = client.evaluate(new, {})
    assert n_test == len(client.test_set) and 0 <= m["accuracy"] <= 1 and loss > 0


def test_housing_needs_and_uses_federated_normalization(data_dir):
    clients = [make("housing", data_dir, n=2, pid=i) for i in range(2)]
    with pytest.raises(ValueError, match="norm-mean"):
        clients[0].fit(clients[0].get_parameters({}), TRAIN)
    mean, std = combine_stats([c.get_properties({}) for c in clients], 14)
    pooled = np.concatenate([np.c_[c.train_set.x, c.train_set.y] for c in clients])
    np.testing.assert_allclose(mean, pooled.astype(np.float64).mean(0), rtol=1e-9)
    cfg = {**TRAIN, "norm-mean": encode_floats(mean), "norm-std": encode_floats(std)}
    new, _, _ = clients[0].fit(clients[0].get_parameters({}), cfg)
    _, _, m = clients[0].evaluate(new, cfg)
    assert m["mse"] > 0
    with pytest.raises(ValueError, match="norm-std"):
        HousingClient.normalization({**cfg, "norm-std": b"short"})


def test_train_config_is_checked(data_dir):
    client = make("mnist", data_dir, n=50)
    w = client.get_parameters({})
    with pytest.raises(ValueError, match="lacks 'local-epochs'"):
        client.fit(w, {"batch-size": 1, "learning-rate": 0.1})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        client.fit(w, {**TRAIN, "optimizer": "lbfgs"})
    with pytest.raises(ValueError, match="arrays"):
        client.fit(w[:-1], TRAIN)


# ------------------------------------------------------------------ fuzzing
@fuzz(60)
@given(data=st.data())
def test_housing_normalization_config(data):
    from clients.numpy_clients import HousingClient
    from clients.standardize import encode_floats

    config = {"norm-mean": encode_floats(np.zeros(14)), "norm-std": encode_floats(np.ones(14))}
    key = data.draw(st.sampled_from(sorted(config)))
    config[key] = data.draw(st.one_of(mutated_bytes(config[key]), st.sampled_from(NASTY),
                                      st.lists(st.floats(), min_size=14, max_size=14).map(
                                          lambda v: np.asarray(v, "<f8").tobytes())))
    if data.draw(st.booleans()):
        del config[key]
    result = attempt(lambda: HousingClient.normalization(config), ValueError)
    if not refused(result):
        mean, std = result
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
