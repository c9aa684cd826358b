"""Fixed-point encoding and packing (strategies.encoding), without encryption: the sum
of packed plaintexts stands in for the homomorphic sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import weighted_average
from strategies.encoding import (EncodingOverflow, EncodingParams, decode, dequantize, encode, pack,
                                 quantize, unpack)
from tests.helpers import CLIP
from tests.helpers.fuzzing import BAD_WEIGHTS, attempt, fuzz, mutated_json, refused


def params_strategy() -> st.SearchStrategy[EncodingParams]:
    """Byte-aligned and unaligned slots, small and 2048-bit moduli."""
    return st.builds(
        lambda n_bits, weight, value_bits, clip: EncodingParams.for_key(
            n_bits, weight, clip=clip, value_bits=value_bits),
        n_bits=st.sampled_from([64, 100, 512, 2048]),
        weight=st.integers(1, 70_000),
        value_bits=st.integers(1, 24),
        clip=st.sampled_from([0.05, 1.0, 3.5, 1000.0]),
    )


@pytest.fixture
def full_scale():
    """Three weight-1 clients whose values all hit the top of the range."""
    params = EncodingParams.for_key(2048, 4, clip=1.0, value_bits=8)
    plaintexts = [encode(np.ones(200), params, 1) for _ in range(3)]
    return params, [sum(column) for column in zip(*plaintexts)]


@pytest.mark.parametrize(
    ("weight", "headroom", "slot_bits", "slots"),
    [(1, 0, 16, 127), (2, 1, 17, 120), (100, 7, 23, 89), (128, 7, 23, 89), (129, 8, 24, 85),
     (60_000, 16, 32, 63)],
)
def test_for_key_derives_headroom_and_slots(weight, headroom, slot_bits, slots):
    params = EncodingParams.for_key(2048, weight, clip=1.0)
    assert (params.headroom_bits, params.slot_bits, params.slots_per_plaintext) == (
        headroom, slot_bits, slots)
    assert params.max_total_weight >= weight
    assert params.plaintext_bits <= 2047  # leaves a margin below n
    assert params.max_total_weight * params.levels < 2**params.slot_bits


def test_for_key_overrides():
    params = EncodingParams.for_key(2048, 100, clip=0.5, value_bits=12, slot_bits=24,
                                    slots_per_plaintext=10)
    assert (params.value_bits, params.headroom_bits, params.slot_bits,
            params.slots_per_plaintext, params.clip) == (12, 7, 24, 10, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(value_bits=0, clip=1.0, headroom_bits=0, slot_bits=8, slots_per_plaintext=1),
         "value_bits"),
        (dict(value_bits=16, clip=0.0, headroom_bits=0, slot_bits=16, slots_per_plaintext=1),
         "clip"),
        (dict(value_bits=16, clip=float("nan"), headroom_bits=0, slot_bits=16,
              slots_per_plaintext=1), "clip"),
        (dict(value_bits=16, clip="1", headroom_bits=0, slot_bits=16, slots_per_plaintext=1),
         "clip"),
        (dict(value_bits=16, clip=1.0, headroom_bits=4, slot_bits=19, slots_per_plaintext=1),
         "slot_bits"),
        (dict(value_bits=16, clip=1.0, headroom_bits=50, slot_bits=66, slots_per_plaintext=1),
         "slot_bits"),
        (dict(value_bits=16, clip=1.0, headroom_bits=-1, slot_bits=16, slots_per_plaintext=1),
         "headroom_bits"),
        (dict(value_bits=16, clip=1.0, headroom_bits=0, slot_bits=16, slots_per_plaintext=0),
         "slots_per_plaintext"),
        (dict(value_bits=16.0, clip=1.0, headroom_bits=0, slot_bits=16, slots_per_plaintext=1),
         "value_bits"),
    ],
)
def test_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncodingParams(**kwargs)


def test_for_key_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_total_weight"):
        EncodingParams.for_key(2048, 0, clip=1.0)
    with pytest.raises(ValueError, match="max_total_weight"):
        EncodingParams.for_key(2048, 2.5, clip=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        EncodingParams.for_key(2048, 100, clip=1.0, slots_per_plaintext=90)
    with pytest.raises(ValueError, match="cannot hold one"):
        EncodingParams.for_key(16, 100, clip=1.0)


def test_check_modulus_bits():
    params = EncodingParams.for_key(2048, 100, clip=1.0)
    params.check_modulus_bits(2048)
    with pytest.raises(ValueError, match="fewer slots"):
        params.check_modulus_bits(1024)


def test_max_error_is_one_quantization_step():
    params = EncodingParams.for_key(2048, 10, clip=2.0, value_bits=8)
    assert params.step == pytest.approx(4.0 / 255)
    assert params.step <= params.max_error() <= params.step * (1 + 1e-6)


def test_dict_round_trip_and_validation():
    params = EncodingParams.for_key(2048, 100, clip=0.1 + 0.2)
    data = params.to_dict()
    assert all(isinstance(v, (int, str)) for v in data.values())
    assert EncodingParams.from_dict(data) == params
    assert EncodingParams.from_dict({**data, "clip": params.clip}) == params
    with pytest.raises(ValueError, match="missing keys"):
        EncodingParams.from_dict({k: v for k, v in data.items() if k != "slot-bits"})
    with pytest.raises(ValueError, match="unexpected keys"):
        EncodingParams.from_dict({**data, "extra": 1})
    with pytest.raises(ValueError, match="not a number"):
        EncodingParams.from_dict({**data, "clip": "wide"})
    with pytest.raises(ValueError, match="slot_bits must be an int"):
        EncodingParams.from_dict({**data, "slot-bits": "23"})


# ------------------------------------------------------------------ quantization
def test_quantize_range_clipping_and_weight():
    params = EncodingParams.for_key(2048, 8, clip=1.0, value_bits=8)
    x = np.array([-5.0, -1.0, 0.0, 1.0, 7.0])
    q = quantize(x, params, rng=np.random.default_rng(0))
    assert q.dtype == np.uint64
    assert q[0] == q[1] == 0 and q[3] == q[4] == 255
    assert q[2] in (127, 128)
    qw = quantize(x, params, weight=5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(qw, 5 * q)


def test_stochastic_rounding_is_unbiased():
    params = EncodingParams.for_key(2048, 1, clip=1.0, value_bits=4)
    x = np.full(40_000, 0.3)
    q = quantize(x, params, rng=np.random.default_rng(1))
    assert set(np.unique(q)) <= {9, 10}  # t = 9.75
    exact = (0.3 + 1.0) / params.step
    # std of the mean of Bernoulli(0.75) over 40k draws is ~0.0022
    assert abs(q.mean() - exact) < 0.01


@pytest.mark.parametrize(
    ("values", "weight", "match"),
    [(np.zeros((2, 2)), 1, "1-D"), (np.array([0.0, np.nan]), 1, "NaN"),
     (np.array([np.inf]), 1, "NaN"), (np.array(["a"]), 1, "numeric"),
     (np.zeros(3), 0, "weight"), (np.zeros(3), 129, "weight"), (np.zeros(3), True, "weight"),
     (np.zeros(3), 2.0, "weight")],
)
def test_quantize_rejects(values, weight, match):
    params = EncodingParams.for_key(2048, 128, clip=1.0)
    with pytest.raises(ValueError, match=match):
        quantize(values, params, weight)


# ------------------------------------------------------------------ packing
@settings(max_examples=200, deadline=None)
@given(params=params_strategy(), size=st.integers(0, 700), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_pack_unpack_round_trip(params, size, seed, data):
    weight = data.draw(st.integers(1, params.max_total_weight))
    rng = np.random.default_rng(seed)
    q = quantize(rng.uniform(-2 * params.clip, 2 * params.clip, size), params, weight, rng)
    plaintexts = pack(q, params)
    assert len(plaintexts) == params.num_plaintexts(size)
    assert all(0 <= pt < 2**params.plaintext_bits for pt in plaintexts)
    np.testing.assert_array_equal(unpack(plaintexts, params, size, weight), q)


def test_pack_layout_slot_zero_most_significant():
    params = EncodingParams(value_bits=4, clip=1.0, headroom_bits=0, slot_bits=4,
                            slots_per_plaintext=3)
    assert pack(np.array([1, 2, 3, 4], dtype=np.uint64), params) == [0x123, 0x400]


def test_pack_rejects():
    params = EncodingParams.for_key(2048, 2, clip=1.0)
    with pytest.raises(ValueError, match="lie in"):
        pack(np.array([2**params.slot_bits]), params)
    with pytest.raises(ValueError, match="lie in"):
        pack(np.array([-1]), params)
    with pytest.raises(ValueError, match="integers"):
        pack(np.array([1.0]), params)
    with pytest.raises(ValueError, match="1-D"):
        pack(np.zeros((2, 2), dtype=np.uint64), params)


# ------------------------------------------------------------------ decoding
@settings(max_examples=150, deadline=None)
@given(params=params_strategy(), size=st.integers(1, 500), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_decoded_weighted_average_within_max_error(params, size, seed, data):
    clients = data.draw(st.integers(1, min(12, params.max_total_weight)))
    weights = data.draw(st.lists(st.integers(1, max(1, params.max_total_weight // clients)),
                                 min_size=clients, max_size=clients))
    total = sum(weights)
    assert total <= params.max_total_weight
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-params.clip, params.clip, size) for _ in weights]
    client_plaintexts = [encode(x, params, w, rng) for x, w in zip(updates, weights)]
    summed = [sum(column) for column in zip(*client_plaintexts)]  # the homomorphic sum
    avg = decode(summed, params, size, total)
    expected = weighted_average([[x] for x in updates], weights)[0]
    assert np.abs(avg - expected).max() <= params.max_error()


def test_float32_model_update_round_trip():
    params = EncodingParams.for_key(2048, 128, clip=0.5)
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.1, 10_000).astype(np.float32).clip(-0.5, 0.5)
    avg = decode(encode(x, params, 3, rng), params, x.size, 3)
    assert np.abs(avg - x.astype(np.float64)).max() <= params.max_error()


# ------------------------------------------------------------------ overflow
def test_correct_total_weight_decodes(full_scale):
    params, summed = full_scale
    np.testing.assert_allclose(decode(summed, params, 200, 3), 1.0)


def test_underreported_total_weight_is_overflow(full_scale):
    params, summed = full_scale
    with pytest.raises(EncodingOverflow, match="more than total weight 2"):
        unpack(summed, params, 200, 2)


def test_total_weight_beyond_headroom_is_overflow(full_scale):
    params, summed = full_scale
    with pytest.raises(EncodingOverflow, match="exceeds the headroom"):
        unpack(summed, params, 200, 5)


def test_carry_past_the_top_slot_is_overflow(full_scale):
    params, summed = full_scale
    with pytest.raises(EncodingOverflow, match="does not fit"):
        unpack([summed[0] + 2**params.plaintext_bits, *summed[1:]], params, 200, 3)
    with pytest.raises(EncodingOverflow, match="does not fit"):
        unpack([-1, *summed[1:]], params, 200, 3)


def test_carry_between_slots_is_overflow():
    """Summing more weight than the headroom allows carries into the next slot;
    decoding with the true total weight refuses."""
    params = EncodingParams.for_key(2048, 2, clip=1.0, value_bits=8)
    plaintexts = [encode(np.ones(10), params, 1) for _ in range(5)]
    summed = [sum(column) for column in zip(*plaintexts)]
    with pytest.raises(EncodingOverflow):
        unpack(summed, params, 10, 5)
    with pytest.raises(EncodingOverflow):
        unpack(summed, params, 10, 2)


def test_nonzero_padding_slot_is_overflow():
    params = EncodingParams.for_key(2048, 4, clip=1.0, value_bits=8)
    plaintexts = encode(np.zeros(5), params, 1)
    with pytest.raises(EncodingOverflow, match="padding slot"):
        unpack([plaintexts[0] + 1], params, 5, 1)


def test_wrong_plaintext_count_and_weight_rejected():
    params = EncodingParams.for_key(2048, 4, clip=1.0)
    plaintexts = encode(np.zeros(300), params, 1)
    with pytest.raises(ValueError, match="expected"):
        unpack(plaintexts[:-1], params, 300, 1)
    with pytest.raises(ValueError, match="total_weight"):
        unpack(plaintexts, params, 300, 0)
    with pytest.raises(ValueError, match="total_weight"):
        dequantize(np.zeros(3), params, 1.5)


# ------------------------------------------------------------------ fuzzing
@fuzz(80)
@given(data=st.data())
def test_encoding_params_dict(paillier, data):
    document = data.draw(mutated_json(paillier["params"].to_dict()))
    result = attempt(lambda: EncodingParams.from_dict(document), ValueError)
    assert refused(result) or isinstance(result, EncodingParams)


@fuzz(80)
@given(data=st.data(), num_values=st.integers(-2, 130),
       total=st.sampled_from([1, 5, 40, 1000, 1024, 1025, 2**70] + BAD_WEIGHTS),
       offset=st.sampled_from([0, 1, -1, 7, 2**40, 2**400, 10**400, 1.5, None]))
def test_unpack_and_decode(paillier, data, num_values, total, offset):
    params = paillier["params"]
    valid = encode(np.linspace(-CLIP, CLIP, 100), params, weight=40)
    plaintexts = data.draw(st.one_of(
        st.lists(st.integers(-2**70, 2**2100), max_size=4),
        st.just(valid).map(list).flatmap(lambda pts: st.tuples(
            st.integers(0, len(pts) - 1), st.integers(-2**2047, 2**2047)).map(
            lambda change: [p + change[1] if i == change[0] else p
                            for i, p in enumerate(pts)]))))
    for call in (lambda: unpack(plaintexts, params, num_values, total, offset),
                 lambda: decode(plaintexts, params, num_values, total, offset)):
        result = attempt(call, ValueError)
        if not refused(result):
            assert result.shape == (num_values,) and np.isfinite(
                result.astype(np.float64)).all()
    result = attempt(lambda: dequantize(np.arange(4, dtype=np.uint64), params, total, offset),
                     ValueError)
    assert refused(result) or np.isfinite(result).all()


def test_decode_with_a_noise_offset_past_the_slots_is_refused(paillier):
    params = paillier["params"]
    plaintexts = encode(np.zeros(5), params, weight=3)
    with pytest.raises(ValueError, match="noise offset"):
        decode(plaintexts, params, 5, 3, 10**400)
