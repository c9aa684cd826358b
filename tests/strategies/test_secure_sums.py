"""Metric sums in limbs (strategies.secure_sums): exact for every client count the
encoding allows, in both masking moduli, with clamping at the edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.secure_sums import (LIMIT, MAX_CLIENTS, MAX_SUMS, OFFSET, check_names, clamp,
                                    decode_sums, encode_sums, from_fixed, metric_sums, sum_slots,
                                    to_fixed)

INTS = st.integers(-OFFSET, OFFSET - 1)


@settings(max_examples=200)
@given(values=st.lists(st.dictionaries(st.sampled_from(["a", "b", "weight"]), INTS,
                                       min_size=3, max_size=3), min_size=1, max_size=20),
       dtype=st.sampled_from([np.uint32, np.uint64]))
def test_limb_sums_decode_to_the_exact_sum(values, dtype):
    total = np.zeros(sum_slots(["a", "b", "weight"]), dtype)
    for v in values:
        names, limbs = encode_sums(v, dtype)
        assert names == ["a", "b", "weight"] and limbs.dtype == dtype
        total += limbs
    sums = decode_sums(names, total, len(values))
    assert sums == {k: sum(v[k] for v in values) for k in names}


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_the_largest_client_count_never_wraps(dtype):
    """Every limb at its largest, from MAX_CLIENTS clients: the limb sums still fit."""
    _, top = encode_sums({"m": OFFSET - 1}, dtype)
    assert int(top.max()) == 2**16 - 1
    total = (top.astype(np.uint64) * MAX_CLIENTS).astype(dtype)
    assert (total.astype(np.uint64) == top.astype(np.uint64) * MAX_CLIENTS).all()
    assert decode_sums(["m"], total, MAX_CLIENTS) == {"m": (OFFSET - 1) * MAX_CLIENTS}
    with pytest.raises(ValueError, match="between 1 and"):
        decode_sums(["m"], total, MAX_CLIENTS + 1)


@pytest.mark.parametrize("value", [OFFSET, -OFFSET - 1, 1.5, "1", None])
def test_encode_refuses_what_a_slot_cannot_hold(value):
    with pytest.raises(ValueError, match="must be an int"):
        encode_sums({"m": value}, np.uint32)


def test_decode_refuses_a_wrong_length():
    with pytest.raises(ValueError, match="limb sums for"):
        decode_sums(["a", "b"], np.zeros(5, np.uint32), 1)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_clamp_keeps_every_value_encodable(value):
    clamped, was = clamp(value)
    assert -LIMIT < clamped < LIMIT and not math.isnan(clamped)
    assert was == (math.isnan(value) or abs(value) >= LIMIT - 1)
    encode_sums({"m": to_fixed(clamped)}, np.uint64)  # never raises
    if not was:
        assert abs(from_fixed(to_fixed(clamped)) - value) <= 2**-17


def test_metric_sums_weigh_numbers_clamp_and_skip_the_rest(flwr_caplog):
    sums = metric_sums({"loss": 0.5, "correct": 3, "ok": True, "curve": [1.0, 2.0],
                        "name": "x", "huge": float(LIMIT), "nan": float("nan")}, 4)
    assert sums == {"loss": 2.0, "correct": 12.0, "huge": LIMIT - 1.0, "nan": 0.0}
    assert "Metric huge is outside" in flwr_caplog.text and "Metric nan" in flwr_caplog.text
    many = metric_sums({f"m{i:03}": 1.0 for i in range(100)}, 1)
    assert len(many) == MAX_SUMS - 1  # room for the weight


@pytest.mark.parametrize("names", [["b", "a"], ["a", "a"], [""], ["x" * 65], "ab", [1],
                                   [f"m{i:02}" for i in range(65)]])
def test_bad_sum_names_are_refused(names):
    with pytest.raises(ValueError, match="sorted list of at most 64"):
        check_names(names)
