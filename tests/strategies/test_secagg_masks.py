"""The cryptographic core of masked secure aggregation (strategies.secagg_masks)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import weighted_average
from strategies.secagg_masks import (PRIME, SEED_BYTES, SHARE_BYTES, KeyPair, MaskOverflow,
                                     SecAggError, SecAggParams, agree, commitment, decode_sum,
                                     default_degree, encode_weighted, neighbor_graph,
                                     prg, public_of, quantize, reconstruct_secret, seal,
                                     share_secret, threshold_for, unseal)
from strategies.secagg_protocol import mask_info, pair_mask
from tests.helpers.fuzzing import (LOW_ORDER_POINTS, MASK_PARAMS, attempt, fuzz, garbage,
                                   mutated_bytes, mutated_json, refused)


SEED = bytes(range(32))


# ------------------------------------------------------------------ parameters
def test_derive_picks_the_smallest_modulus_with_headroom():
    assert SecAggParams.derive(1.0).mod_bits == 32  # 65536 x (2^16 - 1) < 2^32
    assert SecAggParams.derive(1.0, max_total_weight=65537).mod_bits == 32  # = 2^32 - 1
    assert SecAggParams.derive(1.0, max_total_weight=65538).mod_bits == 64
    assert SecAggParams.derive(1.0, value_bits=8, max_total_weight=2**24).mod_bits == 32
    assert SecAggParams.derive(1.0, mod_bits=64).mod_bits == 64
    p = SecAggParams.derive(0.5, value_bits=4)
    assert (p.levels, p.dtype) == (15, np.uint32)
    assert p.step == pytest.approx(1 / 15)
    assert p.error_bound == p.step


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(clip=0.0), "clip"),
    (dict(clip=-1.0), "clip"),
    (dict(clip=float("nan")), "clip"),
    (dict(clip=float("inf")), "clip"),
    (dict(clip=1.0, value_bits=1), "value_bits"),
    (dict(clip=1.0, value_bits=33), "value_bits"),
    (dict(clip=1.0, mod_bits=16), "mod_bits"),
    (dict(clip=1.0, max_total_weight=0), "max_total_weight"),
    (dict(clip=1.0, max_total_weight=65538, mod_bits=32), "does not fit in 32 bits"),
    (dict(clip=1.0, value_bits=32, max_total_weight=2**33), "does not fit in 64 bits"),
])
def test_derive_refuses_bad_parameters(kwargs, match):
    with pytest.raises(SecAggError, match=match):
        SecAggParams.derive(**kwargs)


def test_params_dict_round_trip():
    for p in (SecAggParams.derive(0.25), SecAggParams.derive(3.0, 10**6, 20)):
        assert SecAggParams.from_dict(p.to_dict()) == p
        assert SecAggParams.from_dict({k: np.int64(v) if isinstance(v, int) else v
                                        for k, v in p.to_dict().items()}) == p


GOOD = {"clip": 1.0, "value-bits": 16, "max-total-weight": 1000, "mod-bits": 32}


@pytest.mark.parametrize(("change", "match"), [
    ({"value-bits": True}, "expected an int"),
    ({"max-total-weight": True}, "expected an int"),
    ({"mod-bits": False}, "expected an int"),
    ({"value-bits": "16"}, "expected an int"),
    ({"mod-bits": "32"}, "expected an int"),
    ({"max-total-weight": 1000.0}, "expected an int"),
    ({"value-bits": None}, "expected an int"),
    ({"clip": "one"}, "malformed masking parameters"),
    ({"clip": None}, "malformed masking parameters"),
    ({"clip": [1.0]}, "malformed masking parameters"),
    ({"clip": float("nan")}, "clip must be a positive number"),
    ({"clip": -2.0}, "clip must be a positive number"),
    ({"mod-bits": 48}, "mod_bits must be 32 or 64"),
    ({"value-bits": 40}, "value_bits must be in"),
    ({"max-total-weight": 0}, "max_total_weight must be >= 1"),
    ({"max-total-weight": 2**16 + 2}, "does not fit in 32 bits"),
    ({"value-bits": 32, "max-total-weight": 2}, "does not fit in 32 bits"),
    ({"value-bits": 32, "max-total-weight": 2**32 + 2, "mod-bits": 64}, "does not fit in 64"),
])
def test_from_dict_refuses_malformed_values(change, match):
    with pytest.raises(SecAggError, match=match):
        SecAggParams.from_dict({**GOOD, **change})


@pytest.mark.parametrize("missing", sorted(GOOD))
def test_from_dict_refuses_missing_keys(missing):
    data = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(SecAggError, match=f"malformed masking parameters.*'{missing}'"):
        SecAggParams.from_dict(data)


def test_from_dict_refuses_non_mapping():
    with pytest.raises(SecAggError, match="malformed"):
        SecAggParams.from_dict([1, 2, 3])  # type: ignore[arg-type]


# ------------------------------------------------------------------ encoding
def test_quantize_is_unbiased():
    p = SecAggParams.derive(1.0, value_bits=4)  # coarse: step 2/15
    rng = np.random.default_rng(7)
    for x in (0.3, -0.77, 0.999, -1.0, 1.0, 0.0):
        q = quantize(np.full(200_000, x), p, rng)
        lo = math.floor((x + 1.0) / p.step)
        # only the two neighboring levels, and on average the value itself
        assert set(np.unique(q).tolist()) <= {lo, min(lo + 1, p.levels)}
        mean = q.astype(np.float64).mean() * p.step - p.clip
        assert abs(mean - x) < 2e-3, (x, mean)
    # deterministic rounding would be biased by ~step/2 here; the test can tell
    biased = np.floor((0.3 + 1.0) / p.step) * p.step - 1.0
    assert abs(biased - 0.3) > 2e-2


def test_quantize_clips_and_stays_in_range():
    p = SecAggParams.derive(0.5, value_bits=8)
    q = quantize(np.array([-7.0, -0.5, 0.5, 9.0, np.inf, -np.inf]), p, np.random.default_rng(0))
    assert q.dtype == np.uint32
    assert q.tolist() == [0, 0, 255, 255, 255, 0]


def test_encode_weighted_weight_bounds():
    p = SecAggParams.derive(1.0, max_total_weight=100)
    rng = np.random.default_rng(0)
    enc = encode_weighted(np.array([1.0, -1.0]), 100, p, rng)
    assert enc.tolist() == [100 * p.levels, 0]
    for w in (0, -1, 101):
        with pytest.raises(SecAggError, match=rf"weight {w} outside \[1, 100\]"):
            encode_weighted(np.zeros(3), w, p, rng)


def test_encode_weighted_refuses_non_finite_values():
    """BUG (strategies/secagg_masks.py quantize/encode_weighted): NaN is not refused.

    ``np.clip`` keeps NaN and ``astype(uint32)`` turns it into 0 or 2^31 (undefined
    cast: it depends on numpy's code path, e.g. the array length). 0, and 2^31 times
    an even weight (wraps to 0 mod 2^32), silently decode as -clip and corrupt the
    average; 2^31 times an odd weight aborts the round with a misleading "a mask did
    not cancel" overflow. The server cannot see a masked NaN, so the node must refuse it,
    as the Paillier encoder does (strategies/encoding.py: "values hold NaN or
    infinity"). mask_model's clip warning misses NaN too (abs(NaN) > clip is False).
    """
    p = SecAggParams.derive(1.0)
    wrong = {}
    for weight in (1, 2):
        try:
            with np.errstate(invalid="ignore"):
                enc = encode_weighted(np.array([0.0, np.nan]), weight, p,
                                      np.random.default_rng(0))
        except SecAggError:
            continue
        wrong[weight] = int(enc[1])
    assert not wrong, (f"NaN was encoded instead of refused (weight -> encoded value: {wrong}; "
                       f"0 decodes as -clip, anything above weight*{p.levels} overflows)")


def test_decode_sum_of_extremes_is_exact():
    p = SecAggParams.derive(2.0, max_total_weight=1000)
    out = decode_sum(np.array([0, 7 * p.levels, 7 * (p.levels // 2)], dtype=np.uint32), 7, p)
    assert out.dtype == np.float64
    assert out.tolist() == pytest.approx([-2.0, 2.0, -p.step / 2], abs=1e-12)


@settings(max_examples=80)
@given(
    clip=st.sampled_from([0.01, 1.0, 37.5]),
    value_bits=st.integers(2, 24),
    mod_bits=st.sampled_from([32, 64]),
    n=st.integers(1, 8),
    length=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_decode_error_within_bound(clip, value_bits, mod_bits, n, length, seed):
    max_total = 2 ** (mod_bits - value_bits)
    p = SecAggParams.derive(clip, max_total_weight=max_total, value_bits=value_bits,
                             mod_bits=mod_bits)
    rng = np.random.default_rng(seed)
    weights = [int(w) for w in rng.integers(1, max(2, max_total // n), n)]
    xs = [rng.uniform(-clip, clip, length) for _ in range(n)]
    xs[0][0] = clip  # the extremes too
    xs[-1][-1] = -clip
    total = np.zeros(length, dtype=p.dtype)
    for x, w in zip(xs, weights):
        total += encode_weighted(x, w, p, rng)
    avg = decode_sum(total, sum(weights), p)
    ref = weighted_average([[x] for x in xs], weights)[0]
    assert np.abs(avg - ref).max() <= p.error_bound


def test_decode_sum_overflow():
    p = SecAggParams.derive(1.0, max_total_weight=1000)
    W = 5
    ok = np.full(4, W * p.levels, dtype=np.uint32)
    assert decode_sum(ok, W, p).tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    bad = ok.copy()
    bad[2] += 1
    bad[3] = np.uint32(2**32 - 1)  # what a wrapped "negative" looks like
    with pytest.raises(MaskOverflow, match=f"2 summed values exceed {W * p.levels}"):
        decode_sum(bad, W, p)
    for w in (0, 1001):
        with pytest.raises(MaskOverflow, match="total weight"):
            decode_sum(ok, w, p)
    assert issubclass(MaskOverflow, SecAggError)
    assert decode_sum(np.zeros(0, dtype=np.uint32), 1, p).shape == (0,)


# ------------------------------------------------------------------ PRG
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [0, 1, 7, 1000])
def test_prg_deterministic_dtype_length(dtype, length):
    a = prg(SEED, length, dtype)
    assert a.dtype == dtype and a.shape == (length,)
    assert np.array_equal(a, prg(SEED, length, dtype))
    if length >= 7:
        other = prg(bytes(32), length, dtype)
        assert np.count_nonzero(a != other) >= length - 1


def test_prg_prefix_and_stream_consistency():
    long = prg(SEED, 100, np.uint32)
    assert np.array_equal(prg(SEED, 10, np.uint32), long[:10])
    assert prg(SEED, 50, np.uint64).tobytes() == long.tobytes()


@pytest.mark.parametrize("size", [0, 16, 31, 33])
def test_prg_refuses_bad_seed(size):
    with pytest.raises(SecAggError, match="32 bytes"):
        prg(bytes(size), 4, np.uint32)


def test_prg_output_looks_uniform():
    from scipy.stats import chisquare

    values = prg(SEED, 100_000, np.uint32)
    counts = np.bincount((values >> 24).astype(np.int64), minlength=256)
    assert chisquare(counts).pvalue > 1e-4


# ------------------------------------------------------------------ keys, AEAD, MAC
def test_keypair_and_agree_symmetric():
    a, b, c = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    assert len(a.private) == len(a.public) == 32
    assert public_of(a.private) == a.public
    assert a.public != b.public
    info = b"round-1"
    k_ab = agree(a.private, b.public, info)
    assert len(k_ab) == 32
    assert k_ab == agree(b.private, a.public, info)
    assert k_ab != agree(a.private, c.public, info)
    assert k_ab != agree(a.private, b.public, b"round-2")


def test_pair_masks_of_one_edge_are_opposite():
    a, b = KeyPair.generate(), KeyPair.generate()
    ctx = bytes(32)
    m_ab = pair_mask(20, np.uint64, ctx, 5, 9, a.private, b.public)
    m_ba = pair_mask(20, np.uint64, ctx, 9, 5, b.private, a.public)
    assert not np.any(m_ab + m_ba)
    assert np.count_nonzero(m_ab) == 20
    assert mask_info(ctx, 5, 9) == mask_info(ctx, 9, 5)


@pytest.mark.parametrize("peer", [b"\x00" * 31, b"\x00" * 33, b""])
def test_agree_refuses_wrong_key_length(peer):
    with pytest.raises(SecAggError, match="32 bytes"):
        agree(KeyPair.generate().private, peer, b"x")


def test_agree_refuses_low_order_point():
    with pytest.raises(SecAggError, match="unusable peer public key"):
        agree(KeyPair.generate().private, bytes(32), b"x")


def test_seal_unseal():
    key, other = bytes(range(32)), bytes(32)
    sealed = seal(key, b"secret shares", b"ad")
    assert len(sealed) == 12 + len(b"secret shares") + 16
    assert unseal(key, sealed, b"ad") == b"secret shares"
    assert seal(key, b"secret shares", b"ad") != sealed  # fresh nonce
    with pytest.raises(SecAggError, match="failed authentication"):
        unseal(key, sealed, b"other associated data")
    with pytest.raises(SecAggError, match="failed authentication"):
        unseal(other, sealed, b"ad")
    for i in (0, 12, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[i] ^= 1
        with pytest.raises(SecAggError, match="failed authentication"):
            unseal(key, bytes(tampered), b"ad")
    with pytest.raises(SecAggError, match="failed authentication"):
        unseal(key, sealed[:10], b"ad")


def test_commitment():
    assert commitment(SEED) == commitment(SEED) != commitment(bytes(32))
    assert len(commitment(SEED)) == 32


# ------------------------------------------------------------------ Shamir
@settings(max_examples=60)
@given(data=st.data(), n=st.integers(1, 12), secret=st.binary(min_size=32, max_size=32))
def test_shamir_any_t_of_n_reconstruct(data, n, secret):
    t = data.draw(st.integers(1, n), label="t")
    xs = data.draw(st.lists(st.integers(1, 2**63), min_size=n, max_size=n, unique=True),
                   label="xs")
    shares = share_secret(secret, xs, t)
    assert set(shares) == set(xs)
    assert all(len(y) == SHARE_BYTES for y in shares.values())
    subset = data.draw(st.permutations(xs), label="order")[:t]
    assert reconstruct_secret({x: shares[x] for x in subset}, t) == secret
    # more than t: the first t are used and are right too
    assert reconstruct_secret({x: shares[x] for x in xs}, t) == secret
    if t >= 2:
        fewer = {x: shares[x] for x in subset[:t - 1]}
        with pytest.raises(SecAggError, match=f"{t - 1} shares, {t} needed"):
            reconstruct_secret(fewer, t)
        # interpolating t-1 shares as if the threshold were t-1 gives something else
        try:
            wrong = reconstruct_secret(fewer, t - 1)
        except SecAggError as err:
            assert "expected size" in str(err)
        else:
            assert wrong != secret


def test_shamir_shares_are_randomised():
    a = share_secret(SEED, [1, 2, 3], 2)
    b = share_secret(SEED, [1, 2, 3], 2)
    assert a != b
    assert reconstruct_secret({1: a[1], 3: a[3]}, 2) == reconstruct_secret({2: b[2], 3: b[3]}, 2)
    # threshold 1 is no sharing at all: every share is the secret
    one = share_secret(SEED, [4, 5], 1)
    assert {int.from_bytes(y, "big") for y in one.values()} == {int.from_bytes(SEED, "big")}


def test_shamir_mixed_shares_of_two_sharings_fail():
    a, b = share_secret(SEED, [1, 2, 3], 2), share_secret(bytes(32), [1, 2, 3], 2)
    with pytest.raises(SecAggError, match="expected size"):
        reconstruct_secret({1: a[1], 2: b[2]}, 2)


@pytest.mark.parametrize(("xs", "t", "match"), [
    ([1, 2, 3], 0, "threshold 0"),
    ([1, 2, 3], 4, "threshold 4"),
    ([1, 1, 2], 2, "distinct"),
    ([0, 1, 2], 2, "distinct and in"),
    ([1, PRIME], 2, "distinct and in"),
    ([-1, 2], 2, "distinct and in"),
])
def test_share_secret_refuses_bad_points(xs, t, match):
    with pytest.raises(SecAggError, match=match):
        share_secret(SEED, xs, t)


def test_reconstruct_refuses_malformed_shares():
    shares = share_secret(SEED, [1, 2], 2)
    with pytest.raises(SecAggError, match="malformed share at point 2"):
        reconstruct_secret({1: shares[1], 2: shares[2][:-1]}, 2)
    with pytest.raises(SecAggError, match="malformed share at point 0"):
        reconstruct_secret({0: shares[1], 2: shares[2]}, 2)


def test_shamir_secret_sizes():
    s = os.urandom(SEED_BYTES)
    sh = share_secret(s, [1, 2, 3, 4, 5], 3)
    assert reconstruct_secret({k: sh[k] for k in (5, 1, 3)}, 3) == s
    assert reconstruct_secret({k: sh[k] for k in (5, 1, 3)}, 3, length=40) == bytes(8) + s
    short = share_secret(b"\x01\x02", [1, 2], 2)
    assert reconstruct_secret(short, 2, length=2) == b"\x01\x02"


# ------------------------------------------------------------------ graph
@settings(max_examples=150)
@given(n=st.integers(2, 40), degree=st.integers(0, 45), seed=st.binary(min_size=32, max_size=32),
       base=st.integers(0, 2**60))
def test_neighbor_graph_properties(n, degree, seed, base):
    nodes = [base + 7 * i + 1 for i in range(n)]
    graph = neighbor_graph(nodes, degree, seed)
    assert set(graph) == set(nodes)
    graph = {u: sorted(vs) for u, vs in graph.items()}
    for u, vs in graph.items():
        assert u not in vs, "self loop"
        assert len(set(vs)) == len(vs) and set(vs) <= set(nodes)
        for v in vs:
            assert u in graph[v], "not symmetric"
    degrees = {len(vs) for vs in graph.values()}
    if degree >= n - 1:
        assert degrees == {n - 1}  # complete
    else:
        # a Harary ring: degree // 2 on either side (at least 1), so odd degrees round down
        assert degrees == {min(2 * max(1, degree // 2), n - 1)}
        assert min(degrees) >= min(degree - degree % 2, n - 1)
    # connected
    seen, todo = {nodes[0]}, [nodes[0]]
    while todo:
        for v in graph[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    assert seen == set(nodes)
    again = neighbor_graph(list(reversed(nodes)), degree, seed)  # order-free
    assert {u: sorted(vs) for u, vs in again.items()} == graph


def test_neighbor_graph_depends_on_seed():
    nodes = list(range(1, 101))
    graphs = {tuple(map(tuple, neighbor_graph(nodes, 6, bytes([i]) * 32).values()))
              for i in range(5)}
    assert len(graphs) == 5
    g = neighbor_graph(nodes, 6, SEED)
    assert sum(len(v) for v in g.values()) == 100 * 6


@pytest.mark.parametrize(("n", "expected"), [
    (0, 0), (1, 0), (2, 1), (3, 2), (5, 4), (10, 9), (11, 10), (16, 10), (17, 12),
    (100, 16), (1000, 22), (1024, 22), (1025, 24), (10**6, 42)])
def test_default_degree(n, expected):
    assert default_degree(n) == expected


def test_default_degree_grows_logarithmically():
    prev = 0
    for n in range(2, 5000, 37):
        d = default_degree(n)
        assert 1 <= d <= n - 1
        assert d >= prev
        assert d <= 2 * math.ceil(math.log2(n)) + 2
        prev = d
    assert default_degree(2**20) == 42 and default_degree(2**21) == 44


@settings(max_examples=200)
@given(g=st.integers(1, 500), fraction=st.floats(0, 1))
def test_threshold_for_bounds(g, fraction):
    t = threshold_for(g, fraction)
    assert 1 <= t <= g
    if fraction * g < g - 1:
        assert t > fraction * g  # strictly more than the fraction
        assert t <= fraction * g + 1


@pytest.mark.parametrize(("g", "fraction", "t"), [
    (10, 0.5, 6), (7, 0.5, 4), (2, 0.5, 2), (1, 0.5, 1), (5, 0.0, 1), (5, 1.0, 5),
    (5, 0.99, 5), (100, 0.33, 34)])
def test_threshold_for_values(g, fraction, t):
    assert threshold_for(g, fraction) == t


# ------------------------------------------------------------------ masks cancel
@settings(max_examples=60)
@given(n=st.integers(2, 12), length=st.integers(1, 200), degree=st.integers(0, 12),
       mod_bits=st.sampled_from([32, 64]), seed=st.binary(min_size=32, max_size=32),
       ids=st.lists(st.integers(0, 2**64 - 1), min_size=12, max_size=12, unique=True))
def test_pairwise_masks_cancel_exactly(n, length, degree, mod_bits, seed, ids):
    dtype = np.uint32 if mod_bits == 32 else np.uint64
    nodes = ids[:n]
    graph = neighbor_graph(nodes, degree, seed)
    keys = {u: KeyPair.generate() for u in nodes}
    total = np.zeros(length, dtype=dtype)
    per_node = {}
    for u in nodes:
        m = np.zeros(length, dtype=dtype)
        for v in graph[u]:
            m += pair_mask(length, dtype, seed, u, v, keys[u].private, keys[v].public)
        per_node[u] = m
        total += m
    assert not np.any(total), "masks did not cancel"
    # as Python integers: the sum is a multiple of 2^b
    ints = [sum(int(per_node[u][i]) for u in nodes) % 2**mod_bits for i in range(length)]
    assert ints == [0] * length
    # and each node's own mask is far from zero (it hides something)
    for m in per_node.values():
        assert np.count_nonzero(m) >= length - 1


# ------------------------------------------------------------------ fuzzing
@fuzz(80)
@given(data=st.data())
def test_masking_params_dict(data):
    document = data.draw(mutated_json(MASK_PARAMS.to_dict()))
    result = attempt(lambda: SecAggParams.from_dict(document), SecAggError)
    if not refused(result):
        result.check()


@fuzz(40)
@given(data=st.data())
def test_shamir_shares(data):
    secret = bytes(range(SEED_BYTES))
    shares = share_secret(secret, [1, 2, 3, 4, 5], 3)
    points = data.draw(st.lists(st.sampled_from([1, 2, 3, 4, 5]), min_size=0, max_size=5,
                                unique=True))
    given_shares = {x: shares[x] for x in points}
    if given_shares and data.draw(st.booleans()):
        x = data.draw(st.sampled_from(sorted(given_shares)))
        given_shares[x] = data.draw(mutated_bytes(given_shares[x]) | garbage)
    if data.draw(st.booleans()):
        given_shares[data.draw(st.sampled_from([0, -1, 2**521 - 1, 2**600, 6]))] = \
            data.draw(st.sampled_from(list(shares.values())) | garbage)
    result = attempt(lambda: reconstruct_secret(given_shares, 3), SecAggError)
    if not refused(result):
        assert len(result) == SEED_BYTES
        if all(given_shares.get(x) == shares.get(x) for x in list(given_shares)[:3]):
            assert result == secret


@fuzz(60)
@given(data=st.data())
def test_sealed_shares(data):
    key, plaintext, associated = bytes(32), bytes(2 * SHARE_BYTES), b"ad"
    sealed = seal(key, plaintext, associated)
    changed = data.draw(mutated_bytes(sealed) | garbage)
    result = attempt(lambda: unseal(key, changed, associated), SecAggError)
    assert refused(result) or (changed == sealed and result == plaintext)


@fuzz(60)
@given(peer=st.binary(max_size=40) | st.sampled_from(LOW_ORDER_POINTS))
def test_key_agreement_with_any_peer_key(peer):
    result = attempt(lambda: agree(KeyPair.generate().private, peer, b"info"), SecAggError)
    assert refused(result) or len(result) == 32


@fuzz(60)
@given(values=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8),
       weight=st.integers(-5, 2000))
def test_unmasked_sum_decoding(values, weight):
    total = np.array(values, np.uint32)
    result = attempt(lambda: decode_sum(total, weight, MASK_PARAMS), MaskOverflow)
    if not refused(result):
        assert np.isfinite(result).all()
        assert np.abs(result).max() <= MASK_PARAMS.clip + MASK_PARAMS.step
