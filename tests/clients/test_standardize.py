"""Federated standardization statistics (clients.standardize)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.standardize import combine_stats, decode_floats, encode_floats, local_stats
from tests.helpers.fuzzing import NASTY, attempt, fuzz, garbage, mutated_bytes, refused


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_federated_stats_equal_pooled_stats(sizes, seed):
    if sum(sizes) < 2:
        sizes = [2]
    rng = np.random.default_rng(seed)
    parts = [rng.normal(3, 5, size=(n, 4)) for n in sizes]
    mean, std = combine_stats([local_stats(p) for p in parts], 4)
    pooled = np.concatenate(parts)
    np.testing.assert_allclose(mean, pooled.mean(0), atol=1e-9)
    expected = pooled.std(0)
    expected[expected == 0] = 1
    np.testing.assert_allclose(std, expected, rtol=1e-6, atol=1e-7)


def test_malformed_reports_are_refused():
    good = local_stats(np.ones((3, 2)))
    with pytest.raises(ValueError, match="stats-sum"):
        combine_stats([{**good, "stats-sum": b"123"}], 2)
    with pytest.raises(ValueError, match="NaN"):
        combine_stats([{**good, "stats-sumsq": encode_floats(np.array([np.nan, 1]))}], 2)
    with pytest.raises(ValueError, match="stats-n"):
        combine_stats([{**good, "stats-n": -1}], 2)
    with pytest.raises(ValueError, match="at least 2 rows"):
        combine_stats([local_stats(np.ones((1, 2)))], 2)
    with pytest.raises(ValueError, match="expected 16 bytes"):
        decode_floats("not bytes", 2, "x")


# ------------------------------------------------------------------ fuzzing
@fuzz(80)
@given(data=st.data())
def test_standardization_reports(data):
    from clients.standardize import combine_stats, decode_floats, local_stats

    width = 3
    reports = [local_stats(np.arange(12.0).reshape(4, 3) + i) for i in range(2)]
    i = data.draw(st.integers(0, 1))
    key = data.draw(st.sampled_from(["stats-n", "stats-sum", "stats-sumsq"]))
    value = data.draw(st.one_of(
        st.just(reports[i][key]).filter(lambda v: isinstance(v, bytes)).flatmap(mutated_bytes),
        st.sampled_from(NASTY), garbage,
        st.lists(st.floats(), min_size=width, max_size=width).map(
            lambda v: np.asarray(v, "<f8").tobytes())))
    reports[i] = {**reports[i], key: value}
    result = attempt(lambda: combine_stats(reports, width), ValueError)
    if not refused(result):
        mean, std = result
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
    result = attempt(lambda: decode_floats(value, width, key), ValueError)
    assert refused(result) or (result.shape == (width,) and np.isfinite(result).all())
