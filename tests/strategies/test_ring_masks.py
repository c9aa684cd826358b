"""Ring-LWE masks (strategies.ring_masks): the FFT ring product equals the schoolbook one
(hypothesis, and worst cases at full size); masked vectors add up and unmask to the
exact sum of the levels under the sum of the secrets; the secret travels through real
threshold Paillier; a wrong secret sum, a tampered or partial sum, one client's vector
under the aggregate's secret and the server's own differencing attack are refused or
learn nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import ring_masks as rm
from strategies.keyfiles import (THRESHOLD_PUBLIC_NAME, load_key_share,
                                 load_threshold_public_key, threshold_share_name)
from strategies.threshold_paillier import ThresholdEncryptor, combine, partial_decrypt

N = rm.RING_DEGREE
CONTEXT = b"key fingerprint, run 1, round 2"
RING = rm.Ring(64)


def schoolbook(a_row: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``a * s mod (X^n + 1, 2^64)`` the slow way, in Python integers."""
    n = len(s)
    out = [0] * n
    for i, ai in enumerate(int(x) for x in a_row):
        for j, sj in enumerate(int(x) for x in s):
            if sj:
                k = i + j
                out[k % n] += ai * sj if k < n else -ai * sj
    return np.array([v % (1 << 64) for v in out], np.uint64)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7).map(lambda e: 1 << e), st.data())
def test_the_fft_product_is_the_negacyclic_product(degree, data):
    rows = data.draw(st.integers(1, 3))
    a = np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=rows * degree,
                                    max_size=rows * degree)), np.uint64).reshape(rows, degree)
    bound = data.draw(st.sampled_from([1, 10, 1000, 32767]))
    s = np.array(data.draw(st.lists(st.integers(-bound, bound), min_size=degree,
                                    max_size=degree)), np.int64)
    got = rm._negacyclic(a, s)
    for row in range(rows):
        assert np.array_equal(got[row], schoolbook(a[row], s))


@pytest.mark.parametrize("bound", [1, 10, 32767])
def test_the_full_size_product_is_exact_at_its_worst(bound):
    """Every coefficient at its largest: the largest FFT magnitudes there are."""
    a = np.full((2, N), np.uint64(2**64 - 1))
    s = np.full(N, bound, np.int64)
    s[::3] = -bound
    # a = -1 (mod 2^64), so a * s = -(s with the negacyclic sign pattern) summed: exactly
    # -sum_j s_j * sign, computed directly for one row
    got = rm._negacyclic(a, s)
    expected = np.array([(-(int(s[: k + 1].sum()) - int(s[k + 1:].sum()))) % (1 << 64)
                         for k in range(N)], np.uint64)
    assert np.array_equal(got[0], expected) and np.array_equal(got[1], expected)
    row = rm.public_polynomials(b"random row", 1)
    ternary = rm.new_secret()
    assert np.array_equal(rm._negacyclic(row, ternary)[0], _shifted_sum(row[0], ternary))


def _shifted_sum(row: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``row * s`` for a ternary ``s`` as a sum of signed negacyclic shifts (numpy, exact)."""
    out = np.zeros(N, np.uint64)
    for j in np.nonzero(s)[0]:
        shifted = np.concatenate([(0 - row[N - j:]), row[:N - j]]) if j else row.copy()
        out += shifted if s[j] == 1 else 0 - shifted
    return out


def test_secrets_and_errors_have_their_distributions():
    s = np.concatenate([rm.new_secret() for _ in range(25)])  # 102,400 draws
    assert set(np.unique(s)) == {-1, 0, 1}
    for v in (-1, 0, 1):
        assert abs(np.mean(s == v) - 1 / 3) < 0.01
    e = rm._errors((400, 1000))
    assert np.abs(e).max() <= rm.ERROR_BOUND
    assert abs(e.mean()) < 0.02 and abs(e.var() - rm.ERROR_BOUND / 2) < 0.1


def test_public_polynomials_depend_on_the_context_only():
    a = rm.public_polynomials(CONTEXT, 3)
    assert a.shape == (3, N) and a.dtype == np.uint64
    assert np.array_equal(a, rm.public_polynomials(CONTEXT, 3))
    assert np.array_equal(a[:2], rm.public_polynomials(CONTEXT, 2))
    assert not np.array_equal(a, rm.public_polynomials(CONTEXT + b"!", 3))


def _round(levels: list[np.ndarray], context: bytes = CONTEXT, ring: rm.Ring = RING):
    secrets_ = [rm.new_secret() for _ in levels]
    masked = [ring.mask(m, s, context) for m, s in zip(levels, secrets_, strict=True)]
    return masked, secrets_


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([32, 40, 48, 56, 64]), st.integers(1, 12), st.integers(0, 3 * N),
       st.data())
def test_masked_vectors_add_up_and_unmask_exactly(bits, clients, length, data):
    ring = rm.Ring(bits)
    level_bits = data.draw(st.integers(1, ring.message_bits - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    top = (1 << level_bits) // clients
    levels = [rng.integers(-top, top + 1, length) for _ in range(clients)]
    masked, secrets_ = _round(levels, ring=ring)
    assert all(v.shape == (rm.rows_for(length) * N,) and int(v.max(initial=0)) >> bits == 0
               for v in masked)
    total = ring.add(masked)
    wire = ring.to_bytes(total)
    assert wire.dtype == np.uint8 and wire.size == rm.rows_for(length) * N * bits // 8
    assert np.array_equal(ring.from_bytes(wire, length), total)
    out = ring.unmask(total, sum(secrets_), clients, CONTEXT, length)
    assert out.dtype == np.int64 and np.array_equal(out, sum(levels, np.zeros(length, int)))


def test_the_ring_is_the_fewest_bytes_that_hold_the_sums():
    assert [rm.Ring.for_levels(b).bits for b in (1, 11, 12, 23, 27, 28, 35, 43)] == \
        [32, 32, 40, 48, 48, 56, 56, 64]
    assert rm.Ring(48).message_bits == 27
    with pytest.raises(ValueError, match="44-bit sums do not fit"):
        rm.Ring.for_levels(44)
    for bits in (24, 33, 72, True):
        with pytest.raises(ValueError, match="multiple of 8 in 32..64"):
            rm.Ring(bits)
    with pytest.raises(ValueError, match="uint8 array of 24576 bytes"):
        rm.Ring(48).from_bytes(np.zeros(10, np.uint8), 5)


def test_unmasking_is_exact_with_every_error_at_its_bound(monkeypatch):
    """The rounding holds for the largest errors the sampler can give, either sign."""
    clients, length = 50, 2 * N + 17
    for sign in (1, -1):
        monkeypatch.setattr(rm, "_errors",
                            lambda shape: np.full(shape, sign * rm.ERROR_BOUND, np.int64))
        for ring in (rm.Ring(40), RING):
            top = (1 << ring.message_bits - 1) // clients
            levels = [np.full(length, sign * top, np.int64) for _ in range(clients)]
            masked, secrets_ = _round(levels, ring=ring)
            out = ring.unmask(ring.add(masked), sum(secrets_), clients, CONTEXT, length)
            assert np.array_equal(out, sum(levels))


def test_the_secret_sum_travels_through_threshold_paillier(threshold_key_dir):
    """Clients encrypt their secrets under the real 2048-bit 2-of-3 key, the sum is
    computed homomorphically, two shares decrypt it, and it unmasks the model."""
    public = load_threshold_public_key(threshold_key_dir / THRESHOLD_PUBLIC_NAME)
    shares = [load_key_share(threshold_key_dir / threshold_share_name(i)) for i in (1, 3)]
    encryptor = ThresholdEncryptor(public)
    levels = [np.arange(5000) * k - 7 for k in range(1, 5)]
    masked, secrets_ = _round(levels)
    encrypted = [[encryptor.encrypt(m) for m in rm.secret_plaintexts(s, public.n_bits - 1)]
                 for s in secrets_]
    summed = [int(np.prod(column, dtype=object) % public.nsquare)
              for column in zip(*encrypted, strict=True)]
    assert len(summed) == 33  # 4,096 coefficients in 127 slots of 16 bits a plaintext
    partials = [partial_decrypt(share, summed, CONTEXT) for share in shares]
    plaintexts, bad = combine(public, summed, partials, CONTEXT)
    secret_sum = rm.secret_sum(plaintexts, len(levels), public.n_bits - 1)
    assert not bad and np.array_equal(secret_sum, sum(secrets_))
    assert np.array_equal(RING.unmask(RING.add(masked), secret_sum, 4, CONTEXT, 5000),
                          sum(levels))


def test_what_does_not_unmask_is_refused():
    levels = [np.arange(3000) + k for k in range(5)]
    masked, secrets_ = _round(levels)
    total, secret_sum = RING.add(masked), sum(secrets_)
    one_off = secret_sum.copy()
    one_off[100] += 1
    tampered = total.copy()
    tampered[7] += np.uint64(1 << 16)
    shifted = total.copy()
    shifted[7] += np.uint64(3 << rm.SCALE_BITS)  # whole multiples of 2^20 move the sum
    assert RING.unmask(shifted, secret_sum, 5, CONTEXT, 3000)[7] == sum(levels)[7] + 3
    for args in [(total, one_off, 5, CONTEXT), (tampered, secret_sum, 5, CONTEXT),
                 (total, secret_sum, 5, CONTEXT + b"!"),  # another round's polynomials
                 (RING.add(masked[:4]), secret_sum, 5, CONTEXT)]:  # a client left out
        with pytest.raises(rm.MaskError, match="does not unmask"):
            RING.unmask(*args, 3000)
    for bad_count in (0, rm.MAX_CONTRIBUTORS + 1):
        with pytest.raises(rm.MaskError, match="contributors"):
            RING.unmask(total, secret_sum, bad_count, CONTEXT, 3000)
    with pytest.raises(rm.MaskError, match="coefficients in"):
        RING.unmask(total, secret_sum * 0 + 6, 5, CONTEXT, 3000)  # more than 5 secrets hold
    with pytest.raises(rm.MaskError, match="uint64 entries"):
        RING.unmask(total[:-1], secret_sum, 5, CONTEXT, 3000)


def test_the_aggregates_secret_does_not_isolate_one_client():
    """A server (or colluders) holding the aggregate's secret sum and every masked vector:
    one client's vector, or the sum with the others subtracted back out, is refused, and
    what such a subtraction leaves is far from the client's levels (it is still masked by
    the other clients' secrets)."""
    levels = [np.full(2000, 1000 * (k + 1), np.int64) for k in range(4)]
    masked, secrets_ = _round(levels)
    secret_sum = sum(secrets_)
    with pytest.raises(rm.MaskError):
        RING.unmask(masked[0], secret_sum, 4, CONTEXT, 2000)
    rows = rm.rows_for(2000)
    rest = (masked[0] - rm._negacyclic(RING.public_polynomials(CONTEXT, rows),
                                       secret_sum).reshape(-1)).view(np.int64)
    guess = (rest + (1 << rm.SCALE_BITS - 1)) >> rm.SCALE_BITS
    assert np.mean(guess[:2000] == levels[0]) < 0.01
    # with its own secret, client 0's vector opens: the mask is all that hides it
    assert np.array_equal(RING.unmask(masked[0], secrets_[0], 1, CONTEXT, 2000), levels[0])


def test_bad_input_is_named():
    s = rm.new_secret()
    with pytest.raises(ValueError, match="flat integer array"):
        RING.mask(np.zeros((2, 2), np.int64), s, CONTEXT)
    with pytest.raises(ValueError, match="flat integer array"):
        RING.mask(np.zeros(3), s, CONTEXT)
    with pytest.raises(ValueError, match="does not fit the mask"):
        RING.mask(np.array([1 << RING.message_bits]), s, CONTEXT)
    with pytest.raises(ValueError, match="coefficients"):
        RING.mask(np.zeros(3, np.int64), s[:-1], CONTEXT)
    with pytest.raises(rm.MaskError, match="coefficients in"):
        RING.mask(np.zeros(3, np.int64), s * 2, CONTEXT)
    with pytest.raises(ValueError, match="one length"):
        RING.add([RING.mask(np.zeros(3, np.int64), s, CONTEXT), np.zeros(N, np.int64)])
    with pytest.raises(ValueError, match="nothing"):
        RING.add([])
    plaintexts = rm.secret_plaintexts(s, 2047)
    assert rm.secret_rows(2047) == len(plaintexts) == 33
    assert all(p < 1 << 2032 for p in plaintexts)
    with pytest.raises(rm.MaskError, match="33 plaintexts"):
        rm.secret_sum(plaintexts[:-1], 1, 2047)
    with pytest.raises(rm.MaskError, match="out of range"):
        rm.secret_sum([1 << 2040] + plaintexts[1:], 1, 2047)
    with pytest.raises(rm.MaskError, match="contributors"):
        rm.secret_sum(plaintexts, rm.MAX_CONTRIBUTORS + 1, 2047)
    assert np.array_equal(rm.secret_sum(plaintexts, 1, 2047), s)
