"""The clipping a node does for central DP (strategies.dp_rounds), with the clip the
server sends.

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.dp_message import CentralDP
from strategies.dp_rounds import clip_local_update
from strategies.fedavg import WeightedFedAvg
from strategies.fixed_point import FixedPoint
from tests.helpers.fuzzing import attempt, fuzz, json_values, refused


# ------------------------------------------------------------------ fuzzing
@fuzz(60)
@given(clip=json_values, bit=json_values)
def test_dp_clip_sent_by_the_server(clip, bit):
    incoming = {"w": np.zeros(3, np.float32)}
    trained = {"w": np.array([3.0, 4.0, 0.0], np.float32)}
    result = attempt(lambda: clip_local_update({"dp-clip": clip, "dp-unclipped": bit},
                                               incoming, trained), ValueError)
    if not refused(result):
        assert math.isfinite(clip) and clip > 0
        assert np.linalg.norm(result["w"]) <= clip * (1 + 1e-6)


# ------------------------------------------------------------------ quantization
def contribution(update: dict, incoming: dict, value_clip: float, bits: int,
                 seed: int) -> float:
    """How far one client moves the secure sum as the server reads it: ``step ||q -
    j||`` for the levels ``q`` of the update quantized as the secure modes do (value
    clip, stochastic rounding, weight 1) and the lattice point ``j`` nearest the
    global model (``DPRounds._unmasked_sum``)."""
    quantizer = FixedPoint(value_clip, bits)
    flat = np.concatenate([np.ravel(update[k]) for k in incoming])
    q = quantizer.quantize(flat, np.random.default_rng(seed)).astype(np.int64)
    g = np.concatenate([np.ravel(incoming[k]).astype(np.float64) for k in incoming])
    j = np.rint((g + value_clip) / quantizer.step).astype(np.int64)
    return float(np.linalg.norm((q - j).astype(np.float64)) * quantizer.step)


@settings(max_examples=150, deadline=None)
@given(d=st.integers(1, 60), bits=st.integers(3, 16), value_clip=st.sampled_from([0.5, 1.0, 4.0]),
       clip=st.floats(0.05, 20.0), spread=st.floats(0.0, 1.5), scale=st.floats(0.0, 50.0),
       seed=st.integers(0, 2**31))
def test_a_quantized_contribution_stays_within_the_clip(d, bits, value_clip, clip, spread,
                                                        scale, seed):
    """With the server's quantizer in the config, what one client adds to the secure
    sum moves it by at most dp-clip, rounding and value clipping included (a global
    model partly outside the value range too), or the client refuses."""
    rng = np.random.default_rng(seed)
    incoming = {"w": (rng.uniform(-spread, spread, d) * value_clip).astype(np.float32)}
    trained = {"w": incoming["w"] + (rng.standard_normal(d) * scale).astype(np.float32)}
    step = FixedPoint(value_clip, bits).step
    config = {"dp-clip": clip, "dp-value-clip": value_clip, "dp-quantization-step": step}
    result = attempt(lambda: clip_local_update(config, incoming, trained), ValueError)
    if refused(result):
        assert "leaves no room for the quantization" in str(result)
        assert clip <= 1.5 * step * math.sqrt(d) + 1e-9 + np.linalg.norm(
            incoming["w"] - np.clip(incoming["w"], -value_clip, value_clip))
        return
    # float32 model values: the update is exact to float32's rounding of g + u
    assert contribution(result, incoming, value_clip, bits, seed) <= clip * (1 + 1e-5) + 1e-6


def test_without_the_quantizer_the_contribution_exceeds_the_clip():
    """The defence off (a config without the quantizer: the clip of plaintext mode):
    rounding and the lattice add up to 1.5 step x sqrt(d), here past the clip."""
    d, bits, value_clip, clip = 400, 4, 1.0, 0.5
    incoming = {"w": np.full(d, 1 / 30, np.float32)}  # g + u falls between two levels
    trained = {"w": incoming["w"] + np.float32(1.0)}
    plain = clip_local_update({"dp-clip": clip}, incoming, trained)
    assert contribution(plain, incoming, value_clip, bits, 0) > clip
    step = FixedPoint(value_clip, bits).step
    with pytest.raises(ValueError, match="leaves no room"):  # 0.5 < 1.5 step x sqrt(400)
        clip_local_update({"dp-clip": clip, "dp-value-clip": value_clip,
                           "dp-quantization-step": step}, incoming, trained)
    roomy = {"dp-clip": 5.0, "dp-value-clip": value_clip, "dp-quantization-step": step}
    assert contribution(clip_local_update(roomy, incoming, trained), incoming, value_clip,
                        bits, 0) <= 5.0


@pytest.mark.parametrize("z,sampled,warned", [(3.0, 2, True), (1.0, 2, False), (1.0, 100, False)])
def test_noise_that_swamps_the_updates_is_warned_about(flwr_caplog, z, sampled, warned):
    """z C / m larger than C: the noise on the average outweighs any clipped update."""
    CentralDP(WeightedFedAvg(), noise_multiplier=z, clip=1.0)._start_dp(200, sampled)
    said = [r.getMessage() for r in flwr_caplog.records if "swamps" in r.getMessage()]
    assert bool(said) == warned
    if warned:
        assert f"= {z / sampled:.3g} C" in said[0]


@settings(max_examples=100, deadline=None)
@given(d=st.integers(1, 300), clip=st.floats(1e-3, 100.0), scale=st.floats(0.0, 1e3),
       seed=st.integers(0, 2**31))
def test_a_plaintext_update_moves_the_lattice_sum_by_at_most_the_clip(d, clip, scale, seed):
    """Plaintext mode rounds each clipped update to its fine grid before the discrete
    Gaussian: what one client adds is a lattice vector of norm at most dp-clip."""
    dp = CentralDP(WeightedFedAvg(), noise_multiplier=1.0, clip=clip)
    dp._start_dp(10, 10)
    dp._global = {"w": np.zeros(d, np.float32)}
    rng = np.random.default_rng(seed)
    update = (rng.standard_normal(d) * scale).astype(np.float32)
    total, step, n, _, _ = dp._clipped_sum([("node", [update])])
    assert n == 1 and total.dtype == np.int64
    assert np.linalg.norm(total.astype(np.float64)) * step <= clip * (1 + 1e-12)
