"""Plaintext FedAvg on the Message API (strategies.fedavg): bad replies are left out and
the rest averaged; evaluation replies of every strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from strategies.fedavg import WeightedFedAvg
from strategies.paillier_message import PaillierFedAvg
from strategies.secagg_message import SecAggFedAvg
from tests.helpers import CLIP, metadata
from tests.helpers import fuzzing
from tests.helpers.fuzzing import (BAD_METRICS, BAD_WEIGHTS, PLAIN_WEIGHTS, SHAPES, arrays_of,
                                   bad_plain_reply, fuzz, no_hang, plain_model, plain_reply,
                                   warnings_of)


def reply(node: int, arrays, n, metrics=None) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, **(metrics or {})})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, metadata=metadata(node))


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5, 6]


def test_weighted_fedavg_drops_bad_replies_and_averages_the_rest(task_identity):
    strategy = WeightedFedAvg(min_available_nodes=1, min_train_nodes=1)
    model = [np.zeros(4, np.float32), np.zeros((2,), np.float32)]
    list(strategy.configure_train(1, ArrayRecord(model), ConfigRecord(), FakeGrid()))
    good = [reply(1, [np.full(4, 1.0, np.float32), np.ones(2, np.float32)], 10, {"train-loss": 1.0}),
            reply(2, [np.full(4, 4.0, np.float32), np.ones(2, np.float32)], 30, {"train-loss": 2.0})]
    failed = Message(error=Error(code=1, reason="crashed"), metadata=metadata(7))
    bad = [reply(3, [np.full(5, 9.0, np.float32), np.ones(2, np.float32)], 10),  # wrong shape
           reply(4, [np.full(4, np.inf, np.float32), np.ones(2, np.float32)], 10),  # infinity
           reply(5, [np.full(4, 9.0, np.float32), np.ones(2, np.float32)], 0),  # zero weight
           reply(6, None, 10),  # no arrays
           failed]
    arrays, metrics = strategy.aggregate_train(1, good + bad)
    out = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(out[0], np.full(4, 3.25))
    np.testing.assert_allclose(out[1], np.ones(2))
    assert metrics["train-loss"] == pytest.approx(1.75)
    assert strategy.aggregate_train(2, bad) == (None, None)


# ------------------------------------------------------------------ fuzzing
@pytest.mark.usefixtures("task_identity")
@fuzz(50)
@given(data=st.data())
def test_weighted_fedavg_leaves_out_bad_replies(caplog_flwr, data):
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy = WeightedFedAvg(min_available_nodes=1, min_train_nodes=1)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}),
                                  ConfigRecord(), fuzzing.FakeGrid([1, 2, 3])))
    good = [plain_reply(n, plain_model(n), w) for n, w in PLAIN_WEIGHTS.items()]
    expected = arrays_of(strategy.aggregate_train(1, good)[0])
    bad, must_fail = data.draw(bad_plain_reply(3, plain_model(3)))
    caplog_flwr.clear()
    with no_hang():
        got = arrays_of(strategy.aggregate_train(1, [good[0], bad, good[1]])[0])
    if any("node 3" in w.lower() for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    else:
        assert not must_fail, "a malformed reply was aggregated"
        assert all(np.isfinite(g).all() for g in got)


@fuzz(40)
@given(data=st.data(), which=st.sampled_from(["plain", "paillier", "secagg"]))
def test_evaluation_replies(keys, caplog_flwr, data, which):
    strategy = {"plain": lambda: WeightedFedAvg(),
                "paillier": lambda: PaillierFedAvg(keys[0], clip=CLIP),
                "secagg": lambda: SecAggFedAvg(clip=CLIP)}[which]()
    good = [fuzzing.reply(1, None, {"num-examples": 10, "loss": 1.0, "accuracy": 0.5}),
            fuzzing.reply(2, None, {"num-examples": 30, "loss": 2.0, "accuracy": 0.7})]
    expected = strategy.aggregate_evaluate(1, good)
    kind = data.draw(st.sampled_from(["weight", "metrics", "records", "error"]))
    if kind == "weight":
        weight = data.draw(st.sampled_from([w for w in BAD_WEIGHTS if isinstance(w, (int, float))
                                            and not isinstance(w, bool)] + [[1, 2]]))
        bad = fuzzing.reply(3, None, {"num-examples": weight, "loss": 1.0, "accuracy": 0.5})
    elif kind == "metrics":
        bad = fuzzing.reply(3, None, {"num-examples": 10, "accuracy": 0.5,
                              **data.draw(st.sampled_from(BAD_METRICS))})
    elif kind == "records":
        bad = fuzzing.reply(3, None, None)
        if data.draw(st.booleans()):
            bad.content["a"] = MetricRecord({"num-examples": 10, "loss": 1.0})
            bad.content["b"] = MetricRecord({"num-examples": 10, "loss": 1.0})
    else:
        bad = Message(Error(code=1, reason="crashed"), metadata=metadata(3, "evaluate"))
    caplog_flwr.clear()
    with no_hang():
        got = strategy.aggregate_evaluate(1, [good[0], bad, good[1]])
    if any("node 3" in w.lower() for w in warnings_of(caplog_flwr)):
        assert dict(got) == dict(expected)
    else:
        assert kind == "metrics", "a malformed evaluation reply was aggregated"
