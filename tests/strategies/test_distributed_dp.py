"""Distributed DP under masking: each node adds its share of discrete Gaussian noise to
what it masks, so the only sum the server can unmask already carries the mechanism's
noise (Kairouz, Liu and Steinke, ICML 2021).

The masking core runs for real (tests.helpers.masking.Round) and so does the Message-API
wrapper with the real mods; the server is the adversary: with the defence off (central
mode) it unmasks the exact sum of the clients' values, with it on it never can."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import dp as dp_core
from strategies.dp_message import CentralDP
from strategies.dp_rounds import (FRACTION_KEY, NOISE_LEVELS_KEY, distributed_noise,
                                  masking_noise_fraction)
from strategies.fedavg import WeightedFedAvg
from strategies.node_settings import NodeError
from strategies.secagg_masks import MaskOverflow, SecAggError, SecAggParams, centred_sum
from strategies.secagg_protocol import RoundAborted
from strategies.secagg_message import SecAggFedAvg
from tests.helpers.masking import Round

LENGTH = 20_000  # values: the noise std is measured to about 0.5%


def clean_levels(rnd: Round) -> np.ndarray:
    """The survivors' levels as they quantized them, summed exactly (no noise)."""
    fixed_point = rnd.params.fixed_point
    return sum(fixed_point.quantize(rnd.xs[u], np.random.default_rng(rnd.seeds[u]))
               .astype(np.int64) for u in sorted(rnd.sr.masked))


def masked_round(noise: float, drop=(), n: int = 8, fraction: float = 0.0,
                 server_fraction: float | None = None) -> Round:
    rnd = Round(n=n, length=LENGTH, seed=3)
    rnd.sr.noise_levels = noise
    rnd.sr.noise_fraction = fraction if server_fraction is None else server_fraction
    rnd.advertise()
    rnd.share()
    rnd.mask(drop=drop, ws={u: 1 for u in rnd.nodes}, noise=noise, fraction=fraction)
    rnd.unmask()
    return rnd


@pytest.mark.parametrize("drop", [(), (0, 1, 2)])
def test_the_unmasked_sum_carries_each_survivors_share_of_the_noise(drop):
    """Each node adds levels / sqrt(quorum): the sum of s survivors has std levels x
    sqrt(s / quorum), never less than levels (the server cannot unmask fewer than the
    quorum). Three of eight dropped: exactly the quorum of five is left."""
    rnd = Round(n=8, length=1, seed=3)
    victims = tuple(rnd.nodes[i] for i in drop)
    rnd = masked_round(300.0, drop=victims)
    survivors, quorum = len(rnd.sr.masked), rnd.sr.drawn.quorum
    assert survivors == 8 - len(drop) and quorum == 5
    residual = (rnd.sr.level_sum - clean_levels(rnd)).astype(np.float64)
    std = 300.0 * math.sqrt(survivors / quorum)
    assert abs(residual.std() / std - 1) < 0.03
    assert abs(residual.mean()) < 6 * std / math.sqrt(LENGTH)
    assert np.array_equal(residual, np.rint(residual))  # integer noise: the lattice kept


def test_a_noise_quorum_above_the_masking_quorum_needs_that_many_survivors():
    """dp-quorum 0.75 of 8 members: each node shares the noise among 6, not the masking
    quorum of 5. Six survivors carry exactly sigma; with five the server's round stops,
    and a server that ignores the noise quorum finds the nodes refusing to unmask."""
    rnd = Round(n=8, length=1, seed=3)
    two, three = tuple(rnd.nodes[:2]), tuple(rnd.nodes[:3])
    full = masked_round(300.0, drop=two, fraction=0.75)
    assert full.sr.quorum == 6 and full.sr.drawn.quorum == 5
    residual = (full.sr.level_sum - clean_levels(full)).astype(np.float64)
    assert abs(residual.std() / 300.0 - 1) < 0.03
    with pytest.raises(RoundAborted, match="only 5 masked updates arrived, 6 needed"):
        masked_round(300.0, drop=three, fraction=0.75)
    with pytest.raises(SecAggError, match="5 of the round's 8 members survived, 6 needed: "
                                          "refusing to unmask"):  # on every node
        masked_round(300.0, drop=three, fraction=0.75, server_fraction=0.0)
    masked_round(300.0, drop=three, fraction=0.0)  # the defence off: five unmask


def test_with_the_defence_off_the_server_unmasks_the_exact_sum():
    """Central mode, the attack's baseline: the server reads the clients' exact sum (it
    is trusted to add the noise); in distributed mode what it reads never is."""
    off = masked_round(0.0)
    assert np.array_equal(off.sr.level_sum.astype(np.int64), clean_levels(off))
    on = masked_round(50.0)
    assert np.count_nonzero(on.sr.level_sum - clean_levels(on)) > 0.99 * LENGTH


@settings(max_examples=60, deadline=None)
@given(weight=st.integers(1, 200), noise=st.floats(0.0, 1e5), seed=st.integers(0, 2**31),
       bits=st.sampled_from([32, 64]))
def test_centred_sums_come_back_exactly(weight, noise, seed, bits):
    params = SecAggParams.derive(1.0, mod_bits=bits)
    rng = np.random.default_rng(seed)
    true = rng.integers(0, weight * params.levels + 1, 300) \
        + np.rint(rng.normal(0, noise, 300)).astype(np.int64)
    mod = true.astype(np.uint64).astype(params.dtype)  # two's complement: the modulus
    assert np.array_equal(centred_sum(mod, weight, params, noise), true)


def test_a_sum_whose_masks_did_not_cancel_is_refused():
    params = SecAggParams.derive(1.0)
    garbage = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.uint64) \
        .astype(params.dtype)
    with pytest.raises(MaskOverflow, match="a mask did not cancel"):
        centred_sum(garbage, 10, params, 500.0)


# ------------------------------------------------------------------ the node's side
CONFIG = {"dp-clip": 0.5, "dp-quantization-step": 2 / 65535, NOISE_LEVELS_KEY: 8000.0}


def test_a_node_adds_what_the_round_asks_unless_below_its_own_floor():
    assert distributed_noise({}, {}) == 0.0  # central DP or none: nothing to add
    assert distributed_noise(CONFIG, {}) == 8000.0
    asked = 8000.0 * (2 / 65535) / 0.5  # the multiplier the request amounts to: 0.49
    assert distributed_noise(CONFIG, {"dp-min-noise-multiplier": 0.4}) == 8000.0
    with pytest.raises(PermissionError, match=f"multiplier {asked:.4g}, below this node's "
                                              "dp-min-noise-multiplier 0.8"):
        distributed_noise(CONFIG, {"dp-min-noise-multiplier": 0.8})
    with pytest.raises(NodeError, match="must be float"):
        distributed_noise(CONFIG, {"dp-min-noise-multiplier": "high"})


def test_a_server_that_leaves_the_noise_request_out_does_not_skip_a_nodes_floor():
    """The attack: the server sends no ``dp-noise-levels`` (as in a round without DP) to
    nodes that require noise. With no floor (the defence off) a node adds none; with a
    floor it refuses the round."""
    assert distributed_noise({}, {"dp-min-noise-multiplier": 0.0}) == 0.0
    with pytest.raises(PermissionError, match="asks for no distributed DP noise, and this "
                                              "node's dp-min-noise-multiplier is 0.4"):
        distributed_noise({}, {"dp-min-noise-multiplier": 0.4})


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "8000", True, 2.0 ** 41])
def test_a_malformed_noise_request_is_refused(bad):
    with pytest.raises(ValueError, match="distributed DP noise"):
        distributed_noise({**CONFIG, NOISE_LEVELS_KEY: bad}, {})


def test_a_node_reads_the_fraction_its_noise_is_shared_among():
    assert masking_noise_fraction({}) == 0.0  # no noise: the masking quorum alone
    assert masking_noise_fraction({**CONFIG, FRACTION_KEY: 0.8}) == 0.8


@pytest.mark.parametrize("bad", [None, 0, 1.5, "0.8", True, math.nan])
def test_a_malformed_quorum_fraction_is_refused(bad):
    with pytest.raises(ValueError, match=FRACTION_KEY):
        masking_noise_fraction({**CONFIG, FRACTION_KEY: bad})


# ------------------------------------------------------------------ the wrapper
def test_distributed_dp_is_refused_where_it_cannot_hold():
    with pytest.raises(ValueError, match="distributed DP needs masking or Paillier"):
        CentralDP(WeightedFedAvg(), noise_multiplier=1.0, clip=1.0, mode="distributed")
    with pytest.raises(ValueError, match="accounted for a fixed clip"):
        CentralDP(SecAggFedAvg(clip=2.0), noise_multiplier=1.0, clip=1.0,
                  mode="distributed", adaptive=True)
    for quorum in (0.0, 1.5):
        with pytest.raises(ValueError, match="quorum must be in"):
            CentralDP(SecAggFedAvg(clip=2.0), noise_multiplier=1.0, clip=1.0,
                      mode="distributed", quorum=quorum)
    with pytest.raises(ValueError, match="one of"):
        CentralDP(SecAggFedAvg(clip=2.0), noise_multiplier=1.0, clip=1.0, mode="local")


def test_distributed_dp_with_fixed_sampling_takes_the_general_bound():
    dp = CentralDP(SecAggFedAvg(clip=2.0), noise_multiplier=1.0, clip=1.0,
                   mode="distributed", sampling="fixed")
    dp._start_dp(10, 5, 1000)
    assert dp.config.sampling == "fixed" and dp.config.distributed


def test_too_many_nodes_for_too_little_noise_each_is_refused():
    """Kairouz et al.'s bound needs each node's std well above one level."""
    dp = CentralDP(SecAggFedAvg(clip=2.0, value_bits=4), noise_multiplier=0.01, clip=1.0,
                   mode="distributed")
    with pytest.raises(ValueError, match="add too little each"):
        dp._start_dp(1000, 1000, 100_000)


def test_the_accounted_multiplier_is_the_configured_one_when_each_share_is_large():
    assert dp_core.distributed_multiplier(1.0, 30.0, 100, 10**7) == 1.0
    assert dp_core.distributed_multiplier(1.0, 0.3, 100, 10**3) < 0.5
