"""Weighted averaging, the update and weight checks, and the model layout
(strategies.aggregation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import (InvalidUpdate, Layout, check_update, check_weight,
                                    weighted_average)
from tests.helpers.fuzzing import (BAD_WEIGHTS, attempt, bad_model, fuzz, json_values, must_refuse,
                                   mutated_json, plain_model, refused)


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


# ------------------------------------------------------------------ fuzzing
@fuzz(80)
@given(value=json_values | st.sampled_from(BAD_WEIGHTS) | st.integers())
def test_weights(value):
    result = attempt(lambda: check_weight(value), InvalidUpdate)
    assert refused(result) or (type(result) is int and result >= 1)


@fuzz(60)
@given(data=st.data())
def test_update_checks_fuzzed(data):
    reference = plain_model(1)
    update = data.draw(bad_model(reference))
    result = attempt(lambda: check_update(list(update.values()), list(reference.values())),
                     InvalidUpdate)
    if not refused(result):
        assert all(a.shape == r.shape and a.dtype.kind == r.dtype.kind and np.isfinite(a).all()
                   for a, r in zip(update.values(), reference.values()))


@fuzz(80)
@given(document=json_values | st.just([["w", "float32", [4, 3]], ["b", "float32", [3]]])
       .flatmap(mutated_json))
def test_layout_json(document):
    result = attempt(lambda: Layout.from_json(document), ValueError)
    if not refused(result):
        assert all(type(d) is int and d >= 0 for s in result.shapes for d in s)
        assert len(set(result.names)) == len(result.names)
        assert result.size == sum(math.prod(s) for s in result.shapes)


@pytest.mark.parametrize("document", [
    [["w", "float32", [10**30]]], [["w", "float32", [2**32, 2**32]]],
    [["w", "float32", [True]]], [["w", "zz", [1]]], [["w", "float32", [1]], ["w", "float32", [1]]],
    {"abc": 1}, [["w", "float32", "12"]], [["w", "float32", [-1]]], [], "w"])
def test_layout_json_refusals(document):
    must_refuse(lambda: Layout.from_json(document), ValueError)
