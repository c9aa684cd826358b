"""The app on the legacy API (fedapp.legacy): the client function keeps a node's state,
and the standardizing FedAvg leaves out bad replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common import (Code, FitIns, Parameters, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from hypothesis import given
from hypothesis import strategies as st

from clients.dp_sgd_config import load_history
from clients.models import HousingMLP, get_weights
from clients.standardize import encode_floats
from clients.tasks import load_client_data
from fedapp.config import RunSettings
from fedapp.legacy import client_fn
from strategies.legacy_wire import load_ndarrays
from tests.helpers.dp import independent_epsilon
from tests.helpers.fakes import FakeProxy
from tests.helpers.fuzzing import (BAD_WEIGHTS, PLAIN_WEIGHTS, SHAPES, bad_model, client_manager,
                                   fit_res, fuzz, garbage, mutated_bytes, no_hang, plain_model,
                                   warnings_of)


def test_legacy_client_fn_keeps_the_history_in_the_context_state(data_dir):
    """fedapp.legacy.client_fn (and so make_client) threads the node's context.state."""
    run_config = {"task": "housing", "data-dir": str(data_dir), "dp-sgd": True,
                  "local-epochs": 1}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                      "num-partitions": 8}, state=RecordDict(), run_config=run_config)
    settings = RunSettings.from_run_config(run_config)
    spec = settings.data_spec(8, str(data_dir))
    train, _ = load_client_data(spec, 0)
    rows = np.c_[train.x, train.y]
    config = {**settings.train_config(), "norm-mean": encode_floats(rows.mean(0)),
              "norm-std": encode_floats(rows.std(0) + 1e-3)}
    params = ndarrays_to_parameters(get_weights(HousingMLP()))
    epsilons = []
    for _ in range(2):
        res = client_fn(context).fit(FitIns(params, config))
        params = res.parameters
        epsilons.append(res.metrics["dp-sgd-epsilon"])
    assert 0 < epsilons[0] < epsilons[1]
    assert epsilons[1] == pytest.approx(independent_epsilon(load_history(context.state), 1e-5))
    assert [a.shape for a in parameters_to_ndarrays(params)] == \
        [a.shape for a in get_weights(HousingMLP())]


# ------------------------------------------------------------------ fuzzing
@pytest.fixture(scope="module")
def legacy_fedavg():
    """The app's legacy plaintext strategy after configure_fit, two good replies and
    their aggregate."""
    from fedapp.legacy import StandardizingFedAvg

    strategy = StandardizingFedAvg(needs_stats=False, min_fit_clients=3,
                                   min_available_clients=3)
    start = [np.zeros(s, np.float32) for s in SHAPES.values()]
    strategy.configure_fit(1, ndarrays_to_parameters(start), client_manager(3))
    good = [(FakeProxy(n), fit_res(ndarrays_to_parameters(list(plain_model(n).values())), w))
            for n, w in PLAIN_WEIGHTS.items()]
    return strategy, good, load_ndarrays(strategy.aggregate_fit(1, good, [])[0].tensors)


@fuzz(40)
@given(data=st.data())
def test_legacy_fedavg_leaves_out_bad_replies(legacy_fedavg, caplog_flwr, data):
    strategy, good, expected = legacy_fedavg
    tensors = ndarrays_to_parameters(list(plain_model(3).values())).tensors
    kind = data.draw(st.sampled_from(["tensor", "count", "values", "weight"]))
    n: object = 7
    if kind == "tensor":
        i = data.draw(st.integers(0, len(tensors) - 1))
        tensors[i] = data.draw(garbage | mutated_bytes(tensors[i]))
    elif kind == "count":
        tensors = data.draw(st.lists(st.sampled_from(tensors) | garbage, max_size=3))
    elif kind == "values":
        tensors = ndarrays_to_parameters(list(data.draw(bad_model(plain_model(3))).values())
                                         ).tensors
    else:
        n = data.draw(st.sampled_from(BAD_WEIGHTS))
    caplog_flwr.clear()
    with no_hang():
        out, _ = strategy.aggregate_fit(1, [good[0], (FakeProxy(9), fit_res(
            Parameters(tensors, "numpy.ndarray"), n)), good[1]], [])
    got = load_ndarrays(out.tensors)
    assert all(np.isfinite(g).all() for g in got)
    if any("client 9" in w for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    else:
        assert kind in ("tensor", "count", "values"), "a bad weight was used"


def test_legacy_fedavg_evaluation_with_bad_weights_or_losses(legacy_fedavg, caplog_flwr):
    from flwr.common import EvaluateRes

    strategy, _, _ = legacy_fedavg

    def res(n, loss):
        return EvaluateRes(status=Status(Code.OK, ""), loss=loss, num_examples=n, metrics={})

    good = [(FakeProxy(1), res(10, 1.0)), (FakeProxy(2), res(30, 2.0))]
    for n, loss in [(-40, 1.0), (0, 1.0), (10, float("nan")), (10, float("inf")), (None, 1.0)]:
        caplog_flwr.clear()
        with no_hang():
            loss_avg, _ = strategy.aggregate_evaluate(1, [good[0], (FakeProxy(9), res(n, loss)),
                                                          good[1]], [])
        assert loss_avg == pytest.approx(1.75)
        assert any("client 9" in w for w in warnings_of(caplog_flwr))


def test_legacy_weighted_metrics_of_any_type():
    from fedapp.legacy import weighted_metrics

    metrics = weighted_metrics([(10, {"loss": 1.0}), (30, {"loss": [1.0, 2.0]}),
                                (10, {"loss": "x"})])
    assert metrics == {"loss": pytest.approx(0.2)}
