import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import RecordDict as RD  # noqa: F401 - same class, legacy path

from clients.numpy_clients import CLIENTS, HousingClient
from clients.partition import PartitionSpec
from clients.standardize import combine_stats, encode_floats
from clients.tasks import DataSpec, load_client_data
from fedapp.client_app import app as client_app

TRAIN = {"local-epochs": 1, "batch-size": 32, "learning-rate": 0.01, "optimizer": "adam",
         "server-round": 1}


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


def test_message_api_adapter_serves_the_numpy_client(data_dir, task_identity):
    run_config = {"task": "mnist", "data-dir": str(data_dir), "mnist-model": "small-cnn"}
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 50},
                  state=RecordDict(), run_config=run_config)
    from clients.models import SmallCNN, get_weights
    msg = Message(RecordDict({"arrays": ArrayRecord(get_weights(SmallCNN())),
                              "config": ConfigRecord({**TRAIN, "optimizer": "sgd"})}),
                  dst_node_id=1, message_type="train")
    out = client_app(msg, ctx)
    assert out.content["metrics"]["num-examples"] == 1080
    assert len(out.content["arrays"]) == len(get_weights(SmallCNN()))
    msg = Message(RecordDict({"arrays": out.content["arrays"], "config": ConfigRecord()}),
                  dst_node_id=1, message_type="evaluate")
    metrics = client_app(msg, ctx).content["metrics"]
    assert metrics["num-examples"] == 120 and 0 <= metrics["accuracy"] <= 1
    ctx_bad = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ValueError, match="partition-id"):
        client_app(msg, ctx_bad)
