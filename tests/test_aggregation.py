import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from strategies.aggregation import InvalidUpdate, check_update, check_weight, weighted_average
from strategies.fedavg import WeightedFedAvg


@settings(max_examples=50, deadline=None)
@given(k=st.integers(1, 6), size=st.integers(1, 20), seed=st.integers(0, 1000))
def test_weighted_average_matches_numpy(k, size, seed):
    rng = np.random.default_rng(seed)
    updates = [[rng.normal(size=size).astype(np.float32), rng.normal(size=(2, 3))] for _ in range(k)]
    weights = rng.integers(1, 1000, size=k).tolist()
    out = weighted_average(updates, weights)
    for j in range(2):
        expected = np.average(np.stack([u[j] for u in updates]).astype(np.float64), axis=0,
                              weights=weights)
        np.testing.assert_allclose(out[j], expected, rtol=1e-5, atol=1e-6)
        assert out[j].dtype == updates[0][j].dtype


def test_update_checks():
    ref = [np.zeros(3, np.float32), np.zeros((2, 2), np.float32)]
    check_update([np.ones(3, np.float32), np.ones((2, 2), np.float32)], ref)
    for bad, why in [([np.ones(3, np.float32)], "1 arrays"),
                     ([np.ones(4, np.float32), ref[1]], "shape"),
                     ([np.ones(3, np.int64), ref[1]], "dtype"),
                     ([np.array([0, np.nan, 0], np.float32), ref[1]], "NaN")]:
        with pytest.raises(InvalidUpdate, match=why):
            check_update(bad, ref)
    for w in (0, -3, 2.5, True, None, "7"):
        with pytest.raises(InvalidUpdate):
            check_weight(w)


def metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


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
