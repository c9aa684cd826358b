"""The fixed-point ring, the PRG and the shares: exact round trips, uniform shares,
and the local truncation's error bound."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedapp.inference.ring import (DEFAULT_FRACTION_BITS, Prg, decode, encode, reconstruct,
                                   split, truncate)

F = DEFAULT_FRACTION_BITS
reals = arrays(np.float64, st.integers(1, 50),
               elements=st.floats(-1e5, 1e5, allow_nan=False, allow_infinity=False))


@given(reals)
def test_encode_decode_round_trip_within_half_a_step(x):
    assert np.abs(decode(encode(x, F), F) - x).max() <= 2.0 ** -(F + 1) + 1e-12


@given(reals, st.binary(min_size=32, max_size=32))
def test_shares_reconstruct_exactly(x, seed):
    words = encode(x, F)
    first, second = split(words, Prg(seed))
    assert (reconstruct(first, second) == words).all()


@given(arrays(np.float64, st.integers(1, 200), elements=st.floats(-200, 200)),
       st.binary(min_size=32, max_size=32))
@example(np.full(200, -8.93073754e-72), (323).to_bytes(32, "big"))  # x < 0 encodes as 0
def test_local_truncation_is_off_by_at_most_one_step(x, seed):
    """Both parties shift their own share of a product (2F fraction bits): the result
    is that product rounded down to 2**-F, or one step less (a wrap has probability
    2**-27 per value here, never seen). The product is the ring value, ``x`` rounded to
    2**-2F: a value just below a step encodes as the step."""
    words = encode(x, 2 * F)
    first, second = split(words, Prg(seed))
    back = decode(truncate(first, F) + truncate(second, F), F)
    floor = np.floor(decode(words, 2 * F) * 2.0**F) / 2.0**F
    assert ((back == floor) | (back == floor - 2.0**-F)).all()


def test_the_prg_is_deterministic_per_seed_and_differs_across_seeds():
    seed = secrets.token_bytes(32)
    a, b = Prg(seed), Prg(seed)
    assert (a.words(100) == b.words(100)).all() and (a.bits(50) == b.bits(50)).all()
    assert (Prg(seed).words(100) != Prg(secrets.token_bytes(32)).words(100)).any()
    with pytest.raises(ValueError, match="32 bytes"):
        Prg(b"short")


def test_encode_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([1.0, np.nan]), F)
    with pytest.raises(ValueError, match="does not fit"):
        encode(np.array([1e9]), F)


def _bit_frequencies(words: np.ndarray) -> np.ndarray:
    bits = (words[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return bits.mean(axis=0)


@pytest.mark.parametrize("secret", [0.0, 1.0, -3.5, 1e4])
def test_a_share_alone_is_uniform_whatever_the_secret(secret):
    """20,000 shares of one fixed value: every one of the 64 bit positions is 1 with
    frequency 1/2 within 5 standard deviations (0.0177), and the share of the value
    and of 0 are indistinguishable by a two-sample KS test on the top 16 bits."""
    n = 20_000
    words = encode(np.full(n, secret), F)
    second = split(words, Prg(secrets.token_bytes(32)))[1]
    assert np.abs(_bit_frequencies(second) - 0.5).max() < 5 * 0.5 / np.sqrt(n)
    baseline = split(encode(np.zeros(n), F), Prg(secrets.token_bytes(32)))[1]
    top_a = np.sort((second >> np.uint64(48)).astype(np.int64))
    top_b = np.sort((baseline >> np.uint64(48)).astype(np.int64))
    grid = np.arange(0, 1 << 16, 256)
    ks = np.abs(np.searchsorted(top_a, grid) - np.searchsorted(top_b, grid)).max() / n
    assert ks < 1.95 * np.sqrt(2 / n)  # the 0.1% critical value


def test_without_the_other_share_a_guess_is_chance():
    """The attack baseline: one share of a 0/1 secret, guessed by its low bit (or any
    fixed rule), is right half the time; both shares give the secret every time."""
    n = 20_000
    secret = np.random.default_rng(0).integers(0, 2, n).astype(np.uint64)
    first, second = split(secret, Prg(secrets.token_bytes(32)))
    guess = second & np.uint64(1)
    assert abs((guess == secret).mean() - 0.5) < 0.02
    assert ((first + second) == secret).all()
