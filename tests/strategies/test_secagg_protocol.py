"""Masked secure aggregation rounds (strategies.secagg_protocol), driven in-process:
the server's ServerRound and each node's client_step/client_mask, payloads as JSON."""

from __future__ import annotations

import base64
import copy
import json
import logging
import random
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2, chisquare

import strategies.secagg_masks as masking
import strategies.secagg_protocol as protocol
from strategies.aggregation import InvalidUpdate
from strategies.secagg_masks import (SHARE_BYTES, KeyPair, SecAggError, SecAggParams,
                                     encode_weighted, prg, public_of, reconstruct_secret)
from strategies.secure_sums import WEIGHT, sum_slots
from strategies.secagg_protocol import (RoundAborted, ServerRound, b64, client_mask, client_step,
                                        loads, node_map, pair_mask, self_mask_seed, unb64)
from strategies.secagg_wire import header_of
from strategies.secagg_identity import Identity, IdentityError, NodeIdentity
from tests.helpers import IDENTITY, fuzzing
from tests.helpers.masking import Round, node_ids
from tests.helpers.fuzzing import (BAD, LOW_ORDER_POINTS, MASK_LENGTH, MASK_NODES, MASK_PARAMS, WS,
                                   XS, attempt, deep_json, fuzz, json_values, must_refuse,
                                   mutated_array, mutated_bytes, mutated_json, no_hang, refused)


# ------------------------------------------------------------------ helpers
def edit(payload: str, **changes) -> str:
    data = json.loads(payload)
    data.update(changes)
    return json.dumps(data)


def other_key() -> str:
    return b64(KeyPair.generate().public)


def warnings_of(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


class _SeededSecrets:
    def __init__(self, seed: int):
        self._rand = random.Random(seed)

    def token_bytes(self, n: int = 32) -> bytes:
        return self._rand.randbytes(n)

    def randbelow(self, n: int) -> int:
        return self._rand.randrange(n)


@pytest.fixture
def seeded(monkeypatch):
    """All the protocol's randomness (round context, seeds, keys, Shamir
    coefficients, nonces) from a fixed seed: statistical tests are reproducible."""
    fake = _SeededSecrets(20240601)
    monkeypatch.setattr(protocol, "secrets", fake)
    monkeypatch.setattr(masking, "secrets", fake)

    def generate() -> KeyPair:
        private = fake.token_bytes(32)
        return KeyPair(private, public_of(private))

    monkeypatch.setattr(KeyPair, "generate", staticmethod(generate))


# ------------------------------------------------------------------ correctness
def test_round_decodes_the_weighted_average():
    r = Round(10, 300)
    avg, weight = r.run()
    assert weight == sum(r.ws.values())
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    assert r.sr.stats == {"sampled": 10, "advertise": 10, "share": 10, "survivors": 10,
                          "dropped": 0, "check": 10}
    assert r.sr.threshold == 6
    # the server's running total alone is uniformly masked, nothing like the sum
    encoded = sum(encode_weighted(r.xs[u], r.ws[u], r.params, np.random.default_rng(r.seeds[u]))
                  for u in r.nodes)
    assert np.count_nonzero(r.sr.total[:300] != encoded) >= 295


@settings(max_examples=50)
@given(n=st.integers(2, 12), length=st.integers(1, 120), degree=st.integers(0, 12),
       mod_bits=st.sampled_from([32, 64]), value_bits=st.integers(2, 16),
       clip=st.sampled_from([0.05, 1.0, 20.0]), seed=st.integers(0, 2**31))
def test_round_matches_weighted_average_property(n, length, degree, mod_bits, value_bits, clip,
                                                 seed):
    max_total = 2 ** (mod_bits - value_bits)
    params = SecAggParams.derive(clip, max_total_weight=max_total, value_bits=value_bits,
                                  mod_bits=mod_bits)
    r = Round(n, length, degree=degree, params=params, seed=seed)
    rng = np.random.default_rng(seed)
    xs = {u: rng.uniform(-clip, clip, length) for u in r.nodes}
    xs[r.nodes[0]][0] = clip
    xs[r.nodes[-1]][-1] = -clip
    ws = {u: int(rng.integers(1, max(2, max_total // n))) for u in r.nodes}
    avg, weight = r.run(xs=xs, ws=ws)
    assert weight == sum(ws.values())
    assert avg.shape == (length,)
    assert np.abs(avg - r.expected()).max() <= params.error_bound
    nxt = b64(r.sr.next_context)
    for u in r.nodes:
        assert r.ys[u].dtype == params.dtype
        # done; in a complete graph the node moved on to its shares for the next round,
        # and this round's secrets are gone from its state
        if r.sr.sparse:
            assert r.state[u]["stage"] == "done"
        else:
            assert r.state[u]["stage"] == "shared" and r.state[u]["context"] == nxt
            assert r.state[u]["session"] != b64(r.sr.session)


def test_metric_sums_of_the_survivors_come_out_exactly():
    """The weight and metrics travel masked beside the model: the server learns their
    sums over the survivors (dropped nodes' are not in them), exact to 2^-16."""
    r = Round(8, 30)
    sums = {u: {"loss": float(r.rng.uniform(0, 50)), "correct": float(r.rng.integers(0, 99))}
            for u in r.nodes}
    dropped = set(r.nodes[:2])
    avg, weight = r.run(drop=dropped, sums=sums)
    survivors = [u for u in r.nodes if u not in dropped]
    assert weight == sum(r.ws[u] for u in survivors)
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    assert r.sr.sum_names == ["correct", "loss", WEIGHT]
    for name in ("loss", "correct"):
        assert r.sr.sums[name] == pytest.approx(sum(sums[u][name] for u in survivors),
                                                abs=len(survivors) * 2**-17)


def test_sum_of_all_masked_vectors_is_the_sum_plus_self_masks():
    """Integer identity: the pairwise masks cancel exactly; only the self masks remain."""
    r = Round(7, 400, degree=2, params=SecAggParams.derive(1.0, mod_bits=64))
    r.advertise()
    r.share()
    r.mask()
    ctx = r.sr.session
    expected = np.zeros(400, dtype=np.uint64)
    for u in r.nodes:
        expected += encode_weighted(r.xs[u], r.ws[u], r.params, np.random.default_rng(r.seeds[u]))
        b = base64.b64decode(r.state[u]["b"])
        expected += prg(self_mask_seed(b, ctx), 400, np.uint64)
    assert np.array_equal(r.sr.total[:400], expected)


def test_masked_vector_is_uniform_and_plain_encoding_is_not(seeded):
    """What the server sees of one node (masked all-zero model) passes chi-square tests
    of uniformity; the same model unmasked fails them."""
    n_values = 200_000
    r = Round(3, n_values)
    zeros = {u: np.zeros(n_values) for u in r.nodes}
    avg, _ = r.run(xs=zeros, ws={u: 5 for u in r.nodes})
    assert np.abs(avg).max() <= r.params.error_bound

    def pvalues(vector: np.ndarray) -> tuple[float, float, float]:
        v = vector.astype(np.uint64)
        top = np.bincount((v >> np.uint64(24)).astype(np.int64), minlength=256)
        low = np.bincount((v & np.uint64(255)).astype(np.int64), minlength=256)
        ones = np.array([np.count_nonzero((v >> np.uint64(i)) & np.uint64(1)) for i in range(32)])
        z = (ones - n_values / 2) / np.sqrt(n_values / 4)
        return chisquare(top).pvalue, chisquare(low).pvalue, chi2.sf(float(z @ z), 32)

    u = r.nodes[0]
    assert r.ys[u].dtype == np.uint32
    assert min(pvalues(r.ys[u])) > 1e-4
    # the running total of the others too
    assert min(pvalues(r.ys[r.nodes[1]] + r.ys[r.nodes[2]])) > 1e-4
    plain = encode_weighted(zeros[u], 5, r.params, np.random.default_rng(0))
    assert max(pvalues(plain)) < 1e-100


# ------------------------------------------------------------------ dropouts
@pytest.mark.parametrize("dropped", [1, 2, 3, 4])
def test_dropouts_complete_graph(dropped):
    r = Round(10, 200)
    drop = set(r.nodes[:dropped])
    avg, weight = r.run(drop=drop)
    assert set(r.sr.masked) == set(r.nodes) - drop
    assert weight == sum(r.ws[u] for u in r.nodes if u not in drop)
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    assert r.sr.stats["dropped"] == dropped
    # no survivor revealed a dropped node's self-mask share, nor a survivor's key share
    for reply in r.unmask_replies.values():
        rep = json.loads(reply)
        assert not {int(v) for v in rep["b_shares"]} & drop
        assert {int(v) for v in rep["s_shares"]} == drop


def droppable(sr: ServerRound, k: int, rng: random.Random) -> set[int]:
    """``k`` nodes whose loss leaves every share group at least the threshold."""
    drop: set[int] = set()
    candidates = list(sr.nodes)
    rng.shuffle(candidates)
    for c in candidates:
        if len(drop) == k:
            break
        trial = drop | {c}
        if all(len(({u} | set(sr.graph[u])) - trial) >= sr.threshold for u in sr.nodes):
            drop = trial
    assert len(drop) == k
    return drop


@pytest.mark.parametrize("dropped", [0, 1, 3, 6, 9])
def test_dropouts_sparse_graph(dropped):
    r = Round(30, 150, degree=6)
    r.advertise()
    r.share()
    assert {len(v) for v in r.sr.graph.values()} == {6}
    assert r.sr.threshold == 4  # more than half of a share group of 7
    assert r.sr.stats["coin"] == 30  # a sparse graph, drawn from every node's coin
    drop = droppable(r.sr, dropped, random.Random(dropped))
    r.mask(drop)
    avg, weight = r.unmask()
    assert weight == sum(r.ws[u] for u in r.nodes if u not in drop)
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    # every unmask request carries every survivor's signature (checked by every node)
    for u, req in r.unmask_requests().items():
        assert set(map(int, json.loads(req)["sigs"])) == set(r.sr.masked)


def test_too_many_dropouts_after_share_aborts():
    r = Round(10, 20)
    r.advertise()
    r.share()
    r.mask(drop=set(r.nodes[:5]))  # 5 left, threshold 6
    with pytest.raises(RoundAborted, match="only 5 masked updates arrived, 6 needed"):
        r.sr.check_requests()


def test_too_many_dropouts_in_a_sparse_group_aborts():
    r = Round(30, 20, degree=6)
    r.advertise()
    r.share()
    victim = r.nodes[0]
    r.mask(drop=set(r.sr.graph[victim][:4]))  # 3 of its group of 7 are left, 4 needed
    # its group keeps itself and 2 neighbors, and it refuses to answer: 2 shares of its b
    # (which node's secret is found short first depends on the random graph)
    with pytest.raises(RoundAborted, match=r"too many dropouts: [0-3] shares of the "
                                           r"(self-mask seed|mask key) of node \d+ arrived, "
                                           "4 needed"):
        r.unmask(tolerate=True)
    assert "only 3 survivors in this node's share group, 4 needed" in r.refused[victim]


def test_too_many_dropouts_at_advertise_and_share_abort():
    r = Round(10, 20)
    with pytest.raises(RoundAborted, match="1 of 10 nodes finished the advertise stage, 2 needed"):
        r.advertise(skip=r.nodes[:9])
    r = Round(10, 20)
    r.advertise(skip=r.nodes[:2])
    assert len(r.sr.adverts) == 8 and r.sr.threshold == 5  # more than half of the 8 members
    with pytest.raises(RoundAborted, match="4 of 10 nodes finished the share stage, 5 needed"):
        r.share(skip=r.nodes[2:6])


def test_dropouts_during_advertise_share_and_unmask():
    r = Round(12, 60)
    r.advertise(skip=r.nodes[1:2])
    assert {len(v) for v in r.sr.graph.values()} == {10}  # complete: default degree for 11
    assert r.sr.threshold == 6 and "coin" not in r.sr.stats
    r.share(skip=r.nodes[2:4])
    r.mask()
    avg, weight = r.unmask(skip=r.nodes[4:6])  # 9 survivors, 7 answer (>= 6 in every group)
    assert set(r.sr.masked) == set(r.nodes) - set(r.nodes[1:4])
    assert weight == sum(r.ws[u] for u in r.sr.masked)
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    assert r.sr.stats == {"sampled": 12, "advertise": 11, "share": 9, "survivors": 9,
                          "dropped": 0, "check": 9}


@pytest.mark.parametrize("n", [5, 10])
def test_dropout_at_advertise_and_after_share(n):
    """BUG (strategies/secagg_protocol.py ServerRound.receive_unmask): one node that
    never answers the advertise stage and one that drops after the share stage
    crash the server with KeyError. For the dropped node ``v`` it builds
    ``{u: self.adverts[u]["s_pk"] for u in self.graph[v]}`` over *all* of v's graph
    neighbors, including those that never advertised (not in ``self.adverts``).
    The Flower adapter only catches RoundAborted, so an ordinary pair of dropouts
    crashes aggregate_train instead of giving the survivors' average."""
    r = Round(n, 20)
    r.advertise(skip=r.nodes[:1])
    r.share()
    r.mask(drop=set(r.nodes[1:2]))
    try:
        avg, _ = r.unmask()
    except KeyError as err:
        pytest.fail(f"receive_unmask raised KeyError({err}) for a neighbor that never "
                    "advertised (expected the survivors' average)")
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound


def test_missing_unmask_replies_abort():
    r = Round(10, 20)
    r.advertise()
    r.share()
    r.mask(drop=set(r.nodes[:2]))
    assert np.abs(r.unmask(skip=r.nodes[2:4])[0] - r.expected()).max() <= r.params.error_bound
    r = Round(10, 20)
    r.advertise()
    r.share()
    r.mask(drop=set(r.nodes[:2]))
    with pytest.raises(RoundAborted, match="too many dropouts: 5 shares .* 6 needed"):
        r.unmask(skip=r.nodes[2:5])


def test_fewer_than_two_nodes_abort():
    with pytest.raises(RoundAborted, match="at least 2 nodes"):
        ServerRound(SecAggParams.derive(1.0), [5, 5], 10)


def test_late_vector_of_a_dropped_node_stays_masked():
    r = Round(10, 2000)
    r.advertise()
    r.share()
    late = r.nodes[3]
    r.mask(drop={late})
    avg, _ = r.unmask()
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    sr, ctx, dtype = r.sr, r.sr.session, r.params.dtype
    # everything the server learnt of the late node: its s key, from the s shares
    s_shares, b_shares = {}, {}
    for u, reply in r.unmask_replies.items():
        rep = json.loads(reply)
        if str(late) in rep["s_shares"]:
            s_shares[sr.points[u]] = base64.b64decode(rep["s_shares"][str(late)])
        if str(late) in rep["b_shares"]:
            b_shares[sr.points[u]] = base64.b64decode(rep["b_shares"][str(late)])
    assert not b_shares, "a survivor revealed a self-mask share of a dropped node"
    s_sk = reconstruct_secret(s_shares, sr.threshold)
    assert public_of(s_sk) == base64.b64decode(sr.adverts[late]["s_pk"])
    # remove every pairwise mask of the late vector
    unmasked = r.ys[late].copy()
    for v in sr.graph[late]:
        if late in sr.sealed.get(v, {}):
            unmasked -= pair_mask(unmasked.size, dtype, ctx, late, v, s_sk,
                                  base64.b64decode(sr.adverts[v]["s_pk"]))
    truth = encode_weighted(r.xs[late], r.ws[late], r.params,
                            np.random.default_rng(r.seeds[late]))
    assert np.count_nonzero(unmasked[:r.length] != truth) >= 0.99 * r.length
    # what is left is exactly the self mask PRG(b), b known to the node alone
    b = base64.b64decode(r.state[late]["b"])
    assert np.array_equal(unmasked[:r.length] - truth,
                          prg(self_mask_seed(b, ctx), r.length, dtype))
    # and decoding it gives nonsense, not the input
    with pytest.raises(SecAggError, match="exceed"):
        masking.decode_sum(unmasked[:r.length], r.ws[late], r.params)


@pytest.mark.parametrize("told_survivor", [0, 3, 5, 6, 9])
def test_inconsistent_views_never_reveal_both_secrets(told_survivor):
    """A server that tells some nodes a node survived and others it dropped: each node
    signs the view it was told, and reveals only with the threshold of its group's
    signatures on that same view, so at most one view is ever acted on (threshold >
    half a group). (The full attack: tests/attacks/test_secagg_server.py.)"""
    r = Round(10, 10)
    r.advertise()
    r.share()
    r.mask()
    target = r.nodes[0]
    ctx = b64(r.sr.context)
    rest = [v for v in r.nodes if v != target]
    views = {u: (sorted(rest + [target]), []) if u == target or i <= told_survivor
             else (rest, [target]) for i, u in enumerate(r.nodes)}
    sigs = {}
    for u, (survivors, dropped) in views.items():
        req = json.dumps({"version": protocol.VERSION, "stage": "check", "context": ctx,
                          "survivors": survivors, "dropped": dropped})
        reply, r.state[u] = client_step(req, r.state[u], u, IDENTITY(u))
        sigs[u] = json.loads(reply)["sig"]
    b_count = s_count = 0
    for u, (survivors, dropped) in views.items():
        req = json.dumps({"version": protocol.VERSION, "stage": "unmask", "context": ctx,
                          "survivors": survivors, "dropped": dropped,
                          "sigs": {str(v): sig for v, sig in sigs.items()}})
        try:
            reply, r.state[u] = client_step(req, r.state[u], u, IDENTITY(u))
        except SecAggError as err:
            assert "did not sign the same survivors" in str(err)
            continue
        rep = json.loads(reply)
        b_count += str(target) in rep["b_shares"]
        s_count += str(target) in rep["s_shares"]
    assert not (b_count and s_count)
    assert b_count + s_count in (0, 10 - (told_survivor + 1) if s_count else told_survivor + 1)


def test_unmask_refuses_both_shares_and_a_second_request():
    r = Round(10, 10)
    r.advertise()
    r.share()
    r.mask(drop={r.nodes[0]})
    r.check()
    requests = r.unmask_requests()
    u, v = r.nodes[1], r.nodes[2]
    data = json.loads(requests[u])
    both = json.dumps({**data, "dropped": data["dropped"] + [v]})
    with pytest.raises(SecAggError, match=rf"nodes \[{v}\] are listed both as survivors and as "
                                           "dropped"):
        client_step(both, r.state[u], u, IDENTITY(u))
    reply, state = client_step(requests[u], r.state[u], u, IDENTITY(u))
    assert state["stage"] == "shared"  # done, and on to the next round's shares
    for again in (requests[u], both):
        with pytest.raises(SecAggError, match="out of order"):
            client_step(again, state, u, IDENTITY(u))


@pytest.mark.parametrize(("change", "match"), [
    (lambda d, u, g: {**d, "survivors": [u]}, "neither survivors nor dropped"),
    (lambda d, u, g: {**d, "survivors": [v for v in d["survivors"] if v != u]},
     "not listed among the survivors"),
    (lambda d, u, g: {**d, "dropped": d["dropped"] + [12345]}, "not members of this round"),
    (lambda d, u, g: {**d, "dropped": [d["survivors"][-1]],
                      "survivors": d["survivors"][:-1]}, "other survivors or dropped"),
    (lambda d, u, g: {**d, "sigs": {}}, "6 of the 6 survivors did not sign"),
    (lambda d, u, g: {**d, "survivors": d["survivors"] + [True]}, "unsigned 64-bit"),
    (lambda d, u, g: {**d, "context": b64(bytes(32))}, "belongs to another round"),
])
def test_unmask_refuses_bad_requests(change, match):
    r = Round(6, 10)
    r.advertise()
    r.share()
    r.mask()
    r.check()
    u = r.nodes[0]
    data = json.loads(r.unmask_requests()[u])
    with pytest.raises(SecAggError, match=match):
        client_step(json.dumps(change(data, u, r.sr.graph)), r.state[u], u, IDENTITY(u))


# ------------------------------------------------------------------ bad masked vectors
def test_receive_masked_refuses_bad_vectors_and_the_round_still_decodes():
    r = Round(5, 40)
    r.advertise()
    r.share()
    r.mask(drop=set(r.nodes))  # computed, nothing sent yet
    sr = r.sr
    other = Round(5, 40)
    other.advertise()
    other.share()
    other.mask(drop=set(other.nodes))
    u, v = r.nodes[0], r.nodes[1]
    y, h = r.ys[u], r.headers[u]
    width = 40 + sum_slots([WEIGHT])  # the model, then the weight's limbs
    cases = [
        ((u, y[:-1], h), rf"of shape \({width},\), got uint32 of shape \({width - 1},\)"),
        ((u, np.append(y, y[:1]), h), rf"shape \({width},\)"),
        ((u, y.astype(np.uint64), h), "must be uint32 .* got uint64"),
        ((u, y.astype(np.uint64), {**h, "mod-bits": 64}), "masked in a 64-bit modulus"),
        ((u, y.astype(np.int32), h), "must be uint32"),
        ((u, y.tolist(), h), "must be uint32 .* got list"),
        ((u, y.reshape(-1, 1), h), "shape"),
        ((u, other.ys[other.nodes[0]], {**h, "context": other.headers[other.nodes[0]]["context"]}),
         "belongs to another round"),
        ((u, y, None), "belongs to another round"),
        ((u, r.ys[v], r.headers[v]), f"from node {v}, sent by node {u}: a node may only "
                                     "answer for itself"),
        ((u, y, {k: x for k, x in h.items() if k != "sums"}), "sums must be a sorted list"),
        ((u, y, {**h, "sums": ["loss"]}), "sums must include 'weight'"),
        ((u, y, {**h, "sums": ["weight", "loss"]}), "sums must be a sorted list"),
        ((u, y, {**h, "sums": ["weight", "weight"]}), "sums must be a sorted list"),
        ((u, y, {**h, "sums": [f"m{i:02}" for i in range(64)] + ["weight"]}),
         "sums must be a sorted list"),
        ((u, y, {**h, "sums": ["loss", "weight"]}), rf"shape \({width + sum_slots(['loss'])},\)"),
        ((424242, y, {**h, "node": 424242}), "took no part in the share stage"),
    ]
    for args, match in cases:
        with pytest.raises(InvalidUpdate, match=match):
            sr.receive_masked(*args)
        assert not sr.masked and sr.total is None
    for u2 in r.nodes:
        sr.receive_masked(u2, r.ys[u2], r.headers[u2])
    with pytest.raises(InvalidUpdate, match="a second masked update"):
        sr.receive_masked(u, y, h)
    avg, _ = r.unmask()
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound


def test_total_weight_above_max_aborts():
    params = SecAggParams.derive(1.0, max_total_weight=100)
    r = Round(3, 10, params=params)
    with pytest.raises(RoundAborted, match=r"total weight 120 outside \[1, 100\]: a node sent"):
        r.run(ws={u: 40 for u in r.nodes})


def test_client_refuses_weight_above_max():
    r = Round(3, 10, params=SecAggParams.derive(1.0, max_total_weight=100))
    r.advertise()
    r.share()
    u = r.nodes[0]
    with pytest.raises(SecAggError, match=r"weight 101 outside \[1, 100\]"):
        client_mask(r.sr.mask_payloads()[u], r.state[u], u, np.zeros(10), 101)


def test_corrupted_sum_overflows():
    r = Round(4, 30)
    r.advertise()
    r.share()
    r.mask()
    r.sr.total[7] += np.uint32(2**31)  # a mask that does not cancel, or a dishonest node
    with pytest.raises(RoundAborted, match="1 summed values exceed .* a mask did not cancel"):
        r.unmask()


# ------------------------------------------------------------------ bad replies at the server
def _bad_advert(kind, r, replies, u, v):
    if kind == "not json":
        return "{not json"
    if kind == "not a string":
        return None
    if kind == "json list":
        return "[1, 2]"
    if kind == "version":
        return edit(replies[u], version=1)
    if kind == "stage":
        return edit(replies[u], stage="share")
    if kind == "for another":
        return replies[v]
    if kind == "claims another":
        return edit(replies[u], node=v)
    if kind == "same key twice":
        data = json.loads(replies[u])
        return edit(replies[u], s_pk=data["c_pk"])
    if kind == "short key":
        return edit(replies[u], c_pk=b64(bytes(31)))
    if kind == "bad base64":
        return edit(replies[u], s_pk="***")
    if kind == "too large":
        return edit(replies[u], pad="x" * (16 << 20))
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "match"), [
    ("not json", "the advertise payload is not JSON"),
    ("not a string", "the advertise payload must be a JSON string"),
    ("json list", "must be an object of version 3"),
    ("version", "must be an object of version 3"),
    ("stage", "expected a 'advertise' payload, got stage 'share'"),
    ("for another", "the reply claims to be from node"),
    ("claims another", "the reply claims to be from node"),
    ("same key twice", "replayed public keys"),
    ("short key", "c_pk must have 32 bytes, got 31"),
    ("bad base64", "s_pk is not valid base64"),
    ("too large", "larger than"),
])
def test_bad_adverts_are_left_out(flwr_caplog, kind, match):
    r = Round(10, 10)
    replies = r.step(r.sr.advertise_requests())
    u, v = r.nodes[0], r.nodes[1]
    replies[u] = _bad_advert(kind, r, replies, u, v)
    flwr_caplog.clear()
    r.sr.receive_adverts(replies)
    assert u not in r.sr.adverts and len(r.sr.adverts) == 9
    logged = warnings_of(flwr_caplog)
    assert f"left out node {u} at the advertise stage" in logged
    assert match in logged
    # the others go on without it
    r.share()
    r.mask()
    avg, _ = r.unmask()
    assert u not in r.sr.masked
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound


def test_duplicate_and_unsampled_replies_are_left_out(flwr_caplog):
    r = Round(5, 10)
    replies = r.step(r.sr.advertise_requests())
    u = r.nodes[0]
    r.sr.receive_adverts(replies)
    first = dict(r.sr.adverts[u])
    again, r.state[u] = client_step(r.sr.advertise_requests()[u], {}, u, IDENTITY(u))
    r.sr.receive_adverts({u: again, 99: edit(again, node=99)})
    assert r.sr.adverts[u] == first and 99 not in r.sr.adverts
    logged = warnings_of(flwr_caplog)
    assert f"left out node {u} at the advertise stage: a second advertise reply" in logged
    assert "left out node 99 at the advertise stage: this node was not sampled" in logged


def test_replayed_keys_from_an_earlier_round_are_refused(flwr_caplog):
    seen: set[bytes] = set()
    nodes = node_ids(6)
    first = Round(nodes=nodes, seen_keys=seen)
    old = first.advertise()
    assert len(seen) == 12
    second = Round(nodes=nodes, seen_keys=seen)
    replies = second.step(second.sr.advertise_requests())
    u = nodes[2]
    replies[u] = old[u]
    second.sr.receive_adverts(replies)
    assert u not in second.sr.adverts and len(second.sr.adverts) == 5
    assert f"left out node {u} at the advertise stage: replayed public keys" in \
        warnings_of(flwr_caplog)
    assert len(seen) == 22


def test_two_nodes_advertising_the_same_key(flwr_caplog):
    r = Round(6, 10)
    replies = r.step(r.sr.advertise_requests())
    u, v = r.nodes[0], r.nodes[1]
    copied = json.loads(replies[u])
    replies[v] = edit(replies[v], s_pk=copied["s_pk"])
    r.sr.receive_adverts(replies)
    assert u in r.sr.adverts and v not in r.sr.adverts
    assert f"left out node {v} at the advertise stage: replayed public keys" in \
        warnings_of(flwr_caplog)


def test_replayed_advert_fails_authentication_at_the_nodes():
    """A server without the shared seen-keys set cannot replay keys either: the
    signature binds them to the round."""
    nodes = node_ids(5)
    old = Round(nodes=nodes).advertise()
    r = Round(nodes=nodes)
    replies = r.step(r.sr.advertise_requests())
    u = nodes[0]
    replies[u] = old[u]
    r.sr.receive_adverts(replies)
    assert u in r.sr.adverts  # the server cannot tell
    v = nodes[1]
    with pytest.raises(SecAggError, match=f"the keys of node {u} fail authentication"):
        client_step(r.sr.share_requests()[v], r.state[v], v, IDENTITY(v))


@pytest.mark.parametrize("field", ["c_pk", "s_pk", "sig"])
def test_substituted_keys_fail_authentication(field):
    r = Round(5, 10)
    r.advertise()
    u, v = r.nodes[0], r.nodes[1]
    r.sr.adverts[u][field] = other_key()  # the server swaps in its own key
    with pytest.raises(SecAggError, match=f"the keys of node {u} fail authentication"):
        client_step(r.sr.share_requests()[v], r.state[v], v, IDENTITY(v))


def test_without_identity_keys_substitution_goes_unnoticed():
    """What the identity keys buy: without them the nodes accept a swapped key."""
    r = Round(5, 10, identity=False)
    r.advertise()
    u, v = r.nodes[0], r.nodes[1]
    r.sr.adverts[u]["c_pk"] = other_key()
    reply, state = client_step(r.sr.share_requests()[v], r.state[v], v, None)
    assert state["stage"] == "shared" and json.loads(reply)["node"] == v


def test_keys_signed_outside_the_roster_or_by_another_node_fail():
    """A node accepts a neighbor's keys only under a roster key of its own: not an
    unknown key (the server's), not another node's, not its own."""
    r = Round(4, 10)
    r.advertise()
    u, v, w = r.nodes[:3]
    intruder = Identity(bytes(32))
    ad = r.sr.adverts[u]
    signed = intruder.sign(protocol.advert_bytes(r.sr.context, u, base64.b64decode(ad["c_pk"]),
                                                 base64.b64decode(ad["s_pk"]),
                                                 base64.b64decode(ad["coin"])))
    for id_pk, sig in ((intruder.public, signed),
                       (IDENTITY(w).key.public, ad["sig"]),
                       (IDENTITY(v).key.public, ad["sig"])):
        r.sr.adverts[u] = {**ad, "id_pk": b64(id_pk), "sig": sig if isinstance(sig, str)
                           else b64(sig)}
        with pytest.raises(SecAggError, match=f"node {u} advertised keys under an identity key "
                           f"that is not its own|keys of node {u} fail authentication"):
            client_step(r.sr.share_requests()[v], r.state[v], v, IDENTITY(v))
    r.sr.adverts[u] = ad
    client_step(r.sr.share_requests()[v], r.state[v], v, IDENTITY(v))  # the honest one


def test_a_node_missing_from_the_roster_cannot_take_part():
    key = Identity(bytes(range(32)))
    with pytest.raises(IdentityError, match="not in the roster"):
        NodeIdentity(key, IDENTITY(1).roster)


def test_same_key_for_two_neighbors_refused_by_node():
    r = Round(5, 10, identity=False)
    r.advertise()
    u, w, v = r.nodes[0], r.nodes[1], r.nodes[2]
    r.sr.adverts[w] = dict(r.sr.adverts[u])
    with pytest.raises(SecAggError, match="two nodes advertised the same public key"):
        client_step(r.sr.share_requests()[v], r.state[v], v, None)


# ------------------------------------------------------------------ share stage
def test_bad_share_replies_are_left_out(flwr_caplog):
    r = Round(12, 10)
    r.advertise()
    r.coin()
    replies = r.step(r.sr.share_requests())
    a, b, c, d, e, f = r.nodes[:6]
    shares_a = json.loads(replies[a])["shares"]
    replies[a] = edit(replies[a], shares={k: s for k, s in list(shares_a.items())[1:]})
    replies[b] = edit(replies[b], commit=b64(bytes(31)))
    replies[c] = replies[d]
    replies[e] = edit(replies[e], shares={k: b64(bytes(5)) for k in json.loads(replies[e])
                                          ["shares"]})
    replies[f] = edit(replies[f], stage="advertise")
    r.sr.receive_shares(replies)
    assert set(r.sr.commits) == set(r.nodes[6:]) | {d}
    logged = warnings_of(flwr_caplog)
    for node, match in [(a, "shares for nodes"), (b, "commit must have 32 bytes"),
                        (c, "the reply claims to be from node"), (e, "sealed shares must have"),
                        (f, "expected a 'share' payload")]:
        assert f"left out node {node} at the share stage: {match}" in logged
    # nobody receives shares from a left-out node
    for payload in r.sr.mask_payloads().values():
        assert not {str(x) for x in (a, b, c, e, f)} & set(json.loads(payload)["shares"])


def test_shares_before_adverts_are_refused():
    r = Round(4, 10)
    with pytest.raises(RuntimeError, match="graph is drawn once its members"):
        r.sr.share_requests()
    with pytest.raises(RuntimeError, match="graph is drawn once its members"):
        r.sr.receive_shares({u: "{}" for u in r.nodes})


def test_tampered_sealed_shares_fail_at_unmask(flwr_caplog):
    r = Round(10, 30)
    r.advertise()
    r.share()
    u, v = r.nodes[0], r.nodes[1]
    sealed = bytearray(base64.b64decode(r.sr.sealed[u][v]))
    sealed[20] ^= 1
    r.sr.sealed[u][v] = b64(bytes(sealed))
    r.mask()
    request = r.unmask_requests()[u]
    with pytest.raises(SecAggError, match="a sealed share failed authentication"):
        client_step(request, r.state[u], u, IDENTITY(u))
    # the round goes on without that node's shares
    avg, _ = r.unmask(skip={u})
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound


def test_sealed_shares_swapped_between_senders_fail():
    r = Round(5, 10)
    r.advertise()
    r.share()
    u, v, w = r.nodes[:3]
    r.sr.sealed[u][v], r.sr.sealed[u][w] = r.sr.sealed[u][w], r.sr.sealed[u][v]
    r.mask()
    with pytest.raises(SecAggError, match="failed authentication"):
        client_step(r.unmask_requests()[u], r.state[u], u, IDENTITY(u))


# ------------------------------------------------------------------ client: requests
def test_client_stages_out_of_order():
    r = Round(4, 10)
    u = r.nodes[0]
    adv_req = r.sr.advertise_requests()[u]
    r.advertise()
    share_req = r.sr.share_requests()[u]
    with pytest.raises(SecAggError, match="the share request names a round this node has no "
                                           "keys for"):
        client_step(share_req, {}, u, IDENTITY(u))
    _, fresh = client_step(adv_req, {}, u, IDENTITY(u))
    with pytest.raises(SecAggError, match="'mask' request .* 'advertised', not 'shared'"):
        client_mask(json.dumps({"version": protocol.VERSION, "stage": "mask", "context": b64(r.sr.context),
                                "shares": {}}), fresh, u, np.zeros(10), 1)
    r.share()
    mask_req = r.sr.mask_payloads()[u]
    with pytest.raises(SecAggError, match="the share request names a round this node has no "
                                           "keys for"):  # its keys are used once
        client_step(share_req, r.state[u], u, IDENTITY(u))
    with pytest.raises(SecAggError, match="'unmask' request .* 'shared', not 'checked'"):
        client_step(json.dumps({"version": protocol.VERSION, "stage": "unmask", "context": b64(r.sr.context),
                                "survivors": r.nodes, "dropped": []}), r.state[u], u, IDENTITY(u))
    _, _, masked_state = client_mask(mask_req, r.state[u], u, np.zeros(10), 1)
    with pytest.raises(SecAggError, match="'mask' request .* 'masked', not 'shared'"):
        client_mask(mask_req, masked_state, u, np.zeros(10), 1)


@pytest.mark.parametrize(("request_text", "match"), [
    ("{not json", "unknown secure-aggregation stage None"),
    (None, "unknown secure-aggregation stage None"),
    ('{"version": 2, "stage": "train"}', "unknown secure-aggregation stage 'train'"),
    ('{"version": 2, "stage": "mask"}', "unknown secure-aggregation stage 'mask'"),
    ('{"version": 1, "stage": "advertise"}', "must be an object of version 3"),
    ('{"stage": "advertise"}', "must be an object of version 3"),
])
def test_client_refuses_malformed_requests(request_text, match):
    with pytest.raises(SecAggError, match=match):
        client_step(request_text, {}, 7, IDENTITY(7))


@pytest.mark.parametrize("request_text", ["[]", "null", "1", '"advertise"', '["stage"]'])
def test_client_refuses_json_that_is_not_an_object(request_text):
    """BUG (strategies/secagg_protocol.py client_step): the stage is read with
    ``json.loads(request).get("stage")``, which only catches ValueError, so a request
    that is valid JSON but not an object raises AttributeError instead of the
    documented SecAggError (loads() would have said "must be an object of version 3")."""
    try:
        client_step(request_text, {}, 7, IDENTITY(7))
    except SecAggError:
        pass
    except AttributeError as err:
        pytest.fail(f"client_step({request_text!r}) raised AttributeError({err}), "
                    "not SecAggError")
    else:
        pytest.fail("accepted")


@pytest.mark.parametrize("stage", ["share", "unmask"])
def test_client_refuses_ill_typed_fields_with_masking_error(stage):
    """BUG (same class as above, client_step's _share/_unmask): ill-typed fields of
    a well-formed request escape as AttributeError/TypeError, not SecAggError: an
    advert that is not an object (``ad.get`` on a str), ``survivors``/``dropped`` that
    are not lists (iterating an int or None)."""
    r = Round(4, 10)
    r.advertise()
    u = r.nodes[0]
    if stage == "share":
        req = json.loads(r.sr.share_requests()[u])
        v = next(iter(req["adverts"]))
        bad = [{**req, "adverts": {**req["adverts"], v: "not an object"}}]
    else:
        r.share()
        r.mask()
        req = json.loads(r.unmask_requests()[u])
        bad = [{**req, "survivors": 5}, {**req, "dropped": None}]
    escaped = []
    for data in bad:
        try:
            client_step(json.dumps(data), r.state[u], u, IDENTITY(u))
        except SecAggError:
            continue
        except (AttributeError, TypeError) as err:
            escaped.append(f"{type(err).__name__}: {err}")
    assert not escaped, f"ill-typed {stage} request fields raised {escaped}, not SecAggError"


@pytest.mark.parametrize(("change", "match"), [
    ({"node": 8}, "addressed to node 8, this is node 7"),
    ({"node": "7"}, "unsigned 64-bit int"),
    ({"context": b64(bytes(16))}, "context must have 32 bytes"),
    ({"context": 5}, "context must be a base64 string"),
])
def test_client_refuses_bad_advertise_requests(change, match):
    good = {"version": protocol.VERSION, "stage": "advertise", "node": 7,
            "context": b64(bytes(32))}
    client_step(json.dumps(good), {}, 7, IDENTITY(7))  # the base request is fine
    with pytest.raises(SecAggError, match=match):
        client_step(json.dumps({**good, **change}), {}, 7, IDENTITY(7))


@pytest.mark.parametrize(("setup", "match"), [
    ({"params": {"clip": 1.0}}, "malformed masking parameters"),
    ({"params": {"clip": 1.0, "value-bits": 16, "max-total-weight": True, "mod-bits": 32}},
     "expected an int"),
    ({"degree": "4"}, "degree must be an int"),
    ({"degree": -1}, "degree must be an int"),
    ({"fraction": 0.3}, "threshold fraction 0.3: this node needs at least 0.5"),
    ({"fraction": 0.0}, "threshold fraction 0: this node needs at least 0.5"),
    ({"fraction": 1.0}, "float below 1"),
    ({"fraction": "0.5"}, "float below 1"),
])
def test_client_refuses_bad_round_settings(setup, match):
    r = Round(6, 10)
    r.advertise()
    u = r.nodes[0]
    req = json.loads(r.sr.share_requests()[u])
    with pytest.raises(SecAggError, match=match):
        client_step(json.dumps({**req, "setup": {**req["setup"], **setup}}), r.state[u], u,
                    IDENTITY(u))
    client_step(json.dumps(req), r.state[u], u, IDENTITY(u))  # the server's own is fine


def test_client_refuses_bad_share_requests():
    r = Round(6, 10)
    r.advertise()
    u, v = r.nodes[:2]
    req = json.loads(r.sr.share_requests()[u])
    others = {k: a for k, a in req["adverts"].items() if k != str(u)}
    cases = [
        ({**req, "context": b64(bytes(32))}, "names a round this node has no keys for"),
        ({**req, "adverts": others}, "do not list this node's keys as it made them"),
        ({**req, "adverts": {**req["adverts"], str(u): r.sr.adverts[v]}},
         "identity key that is not its own"),
        ({**req, "adverts": {**req["adverts"], "77": r.sr.adverts[v]}},
         "identity key that is not its own|fail authentication"),
    ]
    for data, match in cases:
        with pytest.raises(SecAggError, match=match):
            client_step(json.dumps(data), r.state[u], u, IDENTITY(u))
    assert r.state[u]["stage"] == "advertised"
    # the node's own minimum group size, whatever the server sends
    with pytest.raises(SecAggError, match="groups of at least 12"):
        client_step(json.dumps(req), r.state[u], u, IDENTITY(u), protocol.NodePolicy(12))


def test_a_sparse_round_needs_every_coin():
    """A sparse graph is drawn from every member's coin: a node refuses a share
    request that skips the coin stage, leaves a coin out, or changes one."""
    r = Round(16, 10)
    r.advertise()
    assert r.sr.sparse
    u = r.nodes[0]
    with pytest.raises(RuntimeError, match="graph is drawn once"):
        r.sr.share_requests()
    r.coin()
    req = json.loads(r.sr.share_requests()[u])
    v = next(k for k in req["coins"] if k != str(u))
    cases = [
        ({**req, "coins": {k: c for k, c in req["coins"].items() if k != v}},
         "must reveal the coin of every member"),
        ({**req, "coins": {**req["coins"], v: b64(bytes(32))}},
         f"the coin of node {v} does not match its commitment"),
    ]
    for data, match in cases:
        with pytest.raises(SecAggError, match=match):
            client_step(json.dumps(data), r.state[u], u, IDENTITY(u))
    # a node that was never asked for its coin refuses a sparse share request
    fresh = Round(nodes=r.nodes, length=10)
    fresh.advertise()
    forged = {**json.loads(r.sr.share_requests()[u]), "context": b64(fresh.sr.context),
              "adverts": {str(k): a for k, a in fresh.sr.adverts.items()}}
    with pytest.raises(SecAggError, match="this node was not asked for its coin"):
        client_step(json.dumps(forged), fresh.state[u], u, IDENTITY(u))
    # a node reveals its coin once, to one list of members
    with pytest.raises(SecAggError, match="a second coin request"):
        client_step(r.sr.coin_requests()[u], r.state[u], u, IDENTITY(u))


def test_a_missing_coin_aborts_a_sparse_round(flwr_caplog):
    """Leaving a member's coin out would let whoever picks whom to leave out pick the
    graph: the round aborts instead."""
    r = Round(16, 10)
    r.advertise()
    replies = r.step(r.sr.coin_requests())
    u, v = r.nodes[:2]
    replies[u] = edit(replies[u], coin=b64(bytes(32)))
    del replies[v]
    with pytest.raises(RoundAborted, match="2 of the round's 16 members did not reveal"):
        r.sr.receive_coins(replies)
    assert f"left out node {u} at the coin stage: the coin does not match" in \
        warnings_of(flwr_caplog)


def test_client_refuses_bad_mask_requests():
    r = Round(10, 10)
    r.advertise()
    r.share()
    u = r.nodes[0]
    req = json.loads(r.sr.mask_payloads()[u])
    few = dict(list(req["shares"].items())[:4])
    with pytest.raises(SecAggError, match="the mask request belongs to another round"):
        client_mask(json.dumps({**req, "context": b64(bytes(32))}), r.state[u], u,
                    np.zeros(10), 1)
    with pytest.raises(SecAggError, match=r"shares from nodes \[424242\] that are not this "
                                           "node's neighbors"):
        client_mask(json.dumps({**req, "shares": {**req["shares"], "424242": "AA=="}}),
                    r.state[u], u, np.zeros(10), 1)
    with pytest.raises(SecAggError, match="only 4 neighbors left, 5 needed"):
        client_mask(json.dumps({**req, "shares": few}), r.state[u], u, np.zeros(10), 1)
    v = next(iter(req["shares"]))
    with pytest.raises(SecAggError, match=f"sealed shares from node {v} must have"):
        client_mask(json.dumps({**req, "shares": {**req["shares"], v: b64(bytes(10))}}),
                    r.state[u], u, np.zeros(10), 1)
    with pytest.raises(SecAggError, match="expected a 'mask' payload"):
        client_mask(json.dumps({**req, "stage": "share"}), r.state[u], u, np.zeros(10), 1)


# ------------------------------------------------------------------ bad unmask replies
def test_bad_unmask_replies_are_left_out(flwr_caplog):
    r = Round(10, 20)
    r.advertise()
    r.share()
    dropped = r.nodes[0]
    r.mask(drop={dropped})
    replies = r.step(r.unmask_requests())
    a, b = r.nodes[1], r.nodes[2]
    rep_a = json.loads(replies[a])
    both = {**rep_a, "s_shares": {**rep_a["s_shares"], str(b): rep_a["b_shares"][str(b)]}}
    replies[a] = json.dumps(both)
    replies[dropped] = replies[b]
    avg, _ = r.sr.receive_unmask(replies)
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound
    logged = warnings_of(flwr_caplog)
    assert f"left out node {a} at the unmask stage: both shares of one node" in logged
    assert f"left out node {dropped} at the unmask stage: shares from a node that did not " \
           "sign the round's view" in logged


def test_a_wrong_share_aborts_the_round():
    """A survivor that sends a well-formed but wrong share makes the round abort
    (reconstruction cannot tell which share is wrong).

    BUG (strategies/secagg_protocol.py ServerRound._rebuild / receive_unmask): the
    documented RoundAborted is only raised when the rebuilt secret happens to fit in
    32 bytes and then fails its commitment; a wrong share almost always interpolates
    to a value >= 2^256, and reconstruct_secret's SecAggError ("the shares do not
    reconstruct a secret of the expected size") escapes receive_unmask. The Flower
    adapter (SecAggFedAvg.aggregate_train) only catches RoundAborted there, so one
    malicious node crashes the server run instead of skipping the round.
    """
    r = Round(10, 20)
    r.advertise()
    r.share()
    r.mask()
    replies = r.step(r.unmask_requests())
    liar, victim = r.nodes[1], r.nodes[2]
    rep = json.loads(replies[liar])
    rep["b_shares"][str(victim)] = b64((12345).to_bytes(66, "big"))
    replies = {liar: json.dumps(rep), **{u: t for u, t in replies.items() if u != liar}}
    try:
        r.sr.receive_unmask(replies)
    except RoundAborted:
        pass
    except SecAggError as err:
        pytest.fail(f"receive_unmask raised {type(err).__name__}({err}) instead of RoundAborted")
    else:
        pytest.fail("a wrong share went unnoticed")


# ------------------------------------------------------------------ keys and shares made early
def test_later_rounds_skip_the_advertise_and_share_stages_and_decode():
    first = Round(8, 30, seed=3)
    first.run()
    assert set(first.sr.next_adverts) == set(first.sr.next_shares) == set(first.nodes)
    second = Round(length=30, after=first)
    assert second.sr.context == first.sr.next_context
    assert second.sr.advertise_requests() == {} and second.sr.share_requests() == {}
    for u in second.nodes:  # the nodes made their shares with the last unmask reply...
        assert second.state[u]["stage"] == "shared"
        assert "pending" not in second.state[u]  # ...with keys used once, then gone
        assert second.state[u]["context"] == b64(second.sr.context)
    second.advertise()  # nothing to ask
    second.share()  # the shares made early
    assert set(second.sr.commits) == set(second.nodes)
    second.mask()
    average, _ = second.unmask()
    assert np.abs(average - second.expected()).max() <= second.params.error_bound
    third = Round(length=30, after=second)  # and so on
    assert third.sr.preshared and third.sr.context == second.sr.next_context
    assert np.abs(third.run()[0] - third.expected()).max() <= third.params.error_bound


def assert_starts_afresh(r: Round, before: Round) -> None:
    """``r`` does not use what ``before`` prepared: a new context, every node advertises,
    and the round decodes."""
    assert not r.sr.preshared and r.sr.context != before.sr.next_context
    assert set(r.sr.advertise_requests()) == set(r.nodes)
    assert np.abs(r.run()[0] - r.expected()).max() <= r.params.error_bound


def test_dropouts_after_shares_made_early_are_recovered():
    first = Round(8, 30, seed=4)
    first.run()
    second = Round(length=30, after=first)
    second.advertise()
    second.share()
    dropped = second.nodes[3]
    second.mask(drop={dropped})  # its shares were made a round ago: still recoverable
    average, _ = second.unmask()
    assert dropped not in second.sr.masked
    assert np.abs(average - second.expected()).max() <= second.params.error_bound
    assert dropped not in second.sr.next_adverts  # not a survivor: not in the next round's
    assert_starts_afresh(Round(length=30, after=second), second)  # sampled again


def test_a_node_that_missed_the_unmask_stage_makes_the_next_round_start_afresh():
    first = Round(8, 30, seed=4)
    first.advertise()
    first.share()
    first.mask()
    late = first.nodes[0]
    first.unmask(skip={late})  # it pre-advertised at the check, then made no shares
    assert late in first.sr.next_adverts and late not in first.sr.next_shares
    assert_starts_afresh(Round(length=30, after=first), first)


def test_another_sample_than_the_shares_were_made_for_starts_afresh():
    first = Round(8, 30, seed=5)
    first.run()
    assert_starts_afresh(Round(length=30, after=first, nodes=first.nodes[1:]), first)


def test_other_settings_than_the_shares_were_made_for_start_afresh():
    first = Round(6, 30, seed=5)
    first.run()
    assert_starts_afresh(Round(length=30, after=first, fraction=0.6), first)


def checked_round(n: int, seed: int) -> Round:
    """A round whose nodes signed the check, with keys for the next round, and got no
    unmask request (the round aborted there): keys, and no shares, for the next one."""
    r = Round(n, 10, seed=seed)
    r.advertise()
    r.share()
    r.mask()
    r.check()
    return r


def test_keys_preadvertised_at_the_check_serve_the_next_round_without_shares():
    first = checked_round(6, 6)
    assert set(first.sr.next_adverts) == set(first.nodes) and not first.sr.next_shares
    second = Round(length=10, after=first)
    assert second.sr.context == first.sr.next_context and not second.sr.preshared
    assert second.sr.advertise_requests() == {}
    second.advertise()
    assert set(second.share()) == set(second.nodes)  # the share stage, on those keys
    second.mask()
    assert np.abs(second.unmask()[0] - second.expected()).max() <= second.params.error_bound


def test_preadvertised_keys_are_bound_to_their_round():
    first = checked_round(5, 5)
    u, v = first.nodes[0], first.nodes[1]
    # a round on another context cannot use them: the node refuses...
    other = Round(length=10, after=first)
    other.sr.context = bytes(32)
    other.advertise()
    with pytest.raises(SecAggError, match="names a round this node has no keys for"):
        client_step(other.sr.share_requests()[u], other.state[u], u, IDENTITY(u))
    # ...and if the server re-binds them to a fresh context, the signature gives it away
    moved = Round(length=10, after=first, seen_keys=set())
    moved.sr.preadvertised_nodes.discard(v)  # v advertises afresh for the new context
    moved.sr.context = bytes(range(32))
    moved.sr.adverts.pop(v)
    moved.state[v] = {}
    moved.advertise()
    with pytest.raises(SecAggError, match=f"the keys of node {u} fail authentication"):
        client_step(moved.sr.share_requests()[v], moved.state[v], v, IDENTITY(v))


def test_shares_made_early_are_bound_to_their_round():
    """A server that moves the shares made for one round to another context: the nodes
    refuse to mask for it."""
    first = Round(5, 10, seed=5)
    first.run()
    second = Round(length=10, after=first)
    second.sr.context = bytes(32)
    second.advertise()
    second.share()
    u = second.nodes[0]
    with pytest.raises(SecAggError, match="belongs to another round"):
        client_mask(second.sr.mask_payloads()[u], second.state[u], u, np.zeros(10), 1)


def test_a_preadvertised_pair_is_used_once():
    first = checked_round(5, 6)
    second = Round(length=10, after=first)
    second.advertise()
    u = second.nodes[0]
    request = second.sr.share_requests()[u]
    before = dict(second.state[u])
    _, used = client_step(request, second.state[u], u, IDENTITY(u))
    assert second.state[u] == before  # not changed in place
    with pytest.raises(SecAggError, match="names a round this node has no keys for"):
        client_step(request, used, u, IDENTITY(u))  # a replayed share request
    # an advertise request for the same round replaces the pending pair: the share
    # request naming the old one fails
    fresh_req = json.dumps({"version": protocol.VERSION, "stage": "advertise",
                            "context": b64(second.sr.context), "node": u})
    _, readvertised = client_step(fresh_req, second.state[u], u, IDENTITY(u))
    assert readvertised["pending"]["c_sk"] != second.state[u]["pending"]["c_sk"]
    with pytest.raises(SecAggError, match="do not list this node's keys as it made them"):
        client_step(request, readvertised, u, IDENTITY(u))


def test_an_early_share_request_is_answered_once():
    r = checked_round(5, 7)
    u = r.nodes[0]
    early = json.loads(r.unmask_requests()[u])["next_share"]
    _, shared = client_step(r.unmask_requests()[u], r.state[u], u, IDENTITY(u))
    assert shared["stage"] == "shared"
    with pytest.raises(SecAggError, match="names a round this node has no keys for"):
        client_step(early, shared, u, IDENTITY(u))


def test_replayed_preadvertised_keys_are_refused_by_the_server(flwr_caplog):
    first = Round(5, 10, seed=7)
    first.run()
    u = first.nodes[0]
    later = Round(length=10, nodes=first.nodes, seen_keys=first.sr.seen_keys)  # fresh
    replies = later.step(later.sr.advertise_requests())
    keys = first.sr.next_adverts[u]
    replies[u] = edit(replies[u], c_pk=keys["c_pk"], s_pk=keys["s_pk"])
    later.sr.receive_adverts(replies)
    assert u not in later.sr.adverts and len(later.sr.adverts) == 4
    assert f"left out node {u} at the advertise stage: replayed public keys" in \
        warnings_of(flwr_caplog)


@pytest.mark.parametrize("tamper", [
    lambda ad, other: "not an object",
    lambda ad, other: {**ad, "s_pk": ad["c_pk"]},
    lambda ad, other: {**ad, "c_pk": other["c_pk"]},
    lambda ad, other: {**ad, "c_pk": "%%%"},
])
def test_bad_preadvertised_keys_cost_only_the_preadvertisement(flwr_caplog, tamper):
    r = Round(6, 20, seed=8)
    r.advertise()
    r.share()
    r.mask()
    replies = r.step(r.sr.check_requests())
    u, w = r.nodes[0], r.nodes[1]
    rep = json.loads(replies[u])
    rep["next_advert"] = tamper(rep["next_advert"], r.sr.adverts[w])  # w's keys: seen
    r.check_replies = {u: json.dumps(rep), **{k: x for k, x in replies.items() if k != u}}
    r.sr.receive_checks(r.check_replies)
    average, _ = r.unmask()
    assert np.abs(average - r.expected()).max() <= r.params.error_bound
    assert u not in r.sr.next_adverts and len(r.sr.next_adverts) == 5
    assert set(r.sr.next_shares) == set(r.sr.next_adverts)
    assert f"left out node {u} at the pre-advertise stage" in warnings_of(flwr_caplog)


def test_check_refuses_a_next_context_equal_to_the_round():
    r = Round(4, 10)
    r.advertise()
    r.share()
    r.mask()
    u = r.nodes[0]
    data = json.loads(r.sr.check_requests()[u])
    with pytest.raises(SecAggError, match="made keys for this round's context before"):
        client_step(json.dumps({**data, "next": data["context"]}), r.state[u], u, IDENTITY(u))
    with pytest.raises(SecAggError, match="context is not valid base64"):
        client_step(json.dumps({**data, "next": "abc"}), r.state[u], u, IDENTITY(u))


@pytest.mark.parametrize(("tamper", "match"), [
    (lambda d, w: {**d, "setup": {**d["setup"], "fraction": 0.4}}, "threshold fraction 0.4"),
    (lambda d, w: {**d, "adverts": {k: ({**a, "c_pk": d["adverts"][w]["c_pk"]} if k != w else a)
                                    for k, a in d["adverts"].items()}},
     "fail authentication|advertised the same public key"),
    (lambda d, w: {**d, "stage": "unmask"}, "expected a 'share' payload"),
])
def test_a_refused_early_share_request_costs_only_those_shares(flwr_caplog, tamper, match):
    """A node refuses an early share request as it would the share stage's, and still
    unmasks this round; the next round starts afresh."""
    r = checked_round(6, 9)
    requests = r.unmask_requests()
    u, w = r.nodes[0], str(r.nodes[1])
    data = json.loads(requests[u])
    data["next_share"] = json.dumps(tamper(json.loads(data["next_share"]), w))
    r.unmask_replies = r.step({**requests, u: json.dumps(data)})
    assert re.search(match, json.loads(r.unmask_replies[u])["next_refused"])
    assert r.state[u]["stage"] == "done" and "pending" in r.state[u]
    average, _ = r.sr.receive_unmask(r.unmask_replies)
    assert np.abs(average - r.expected()).max() <= r.params.error_bound
    assert u not in r.sr.next_shares and len(r.sr.next_shares) == 5
    assert f"node {u} made no shares for the next round" in warnings_of(flwr_caplog)
    assert_starts_afresh(Round(length=10, after=r), r)


def test_a_bad_early_share_reply_is_left_out_of_the_next_round(flwr_caplog):
    r = checked_round(6, 10)
    r.unmask_replies = r.step(r.unmask_requests())
    u = r.nodes[0]
    rep = json.loads(r.unmask_replies[u])
    share = json.loads(rep["next_share"])
    share["shares"].popitem()
    rep["next_share"] = json.dumps(share)
    r.unmask_replies[u] = json.dumps(rep)
    r.sr.receive_unmask(r.unmask_replies)
    second = Round(length=10, after=r)
    assert second.sr.preshared
    second.advertise()
    second.share()
    assert u not in second.sr.commits and len(second.sr.commits) == 5
    assert f"left out node {u} at the share stage" in warnings_of(flwr_caplog)
    second.mask()  # the others mask without it
    assert u not in second.sr.mask_payloads()
    assert np.abs(second.unmask()[0] - second.expected()).max() <= second.params.error_bound


def test_without_preadvertising_every_round_advertises():
    r = Round(4, 10)
    r.sr.preadvertise = False
    r.run()
    assert "next" not in json.loads(r.sr.check_requests()[r.nodes[0]])
    assert "next_share" not in json.loads(r.unmask_requests()[r.nodes[0]])
    assert r.sr.next_adverts == {} and r.sr.next_shares == {}
    assert r.sr.prepared_next() is None
    assert all("next_advert" not in json.loads(x) for x in r.check_replies.values())
    assert all("next_share" not in json.loads(x) for x in r.unmask_replies.values())


# ------------------------------------------------------------------ fuzzing
@fuzz(80)
@given(data=st.data(), size=st.sampled_from([None, 32, SHARE_BYTES]))
def test_base64_fields_and_node_maps(data, size):
    text = data.draw(st.one_of(
        st.just(b64(bytes(range(32)))).map(str.encode).flatmap(mutated_bytes).map(
            lambda b: b.decode("latin-1")),
        st.text(max_size=60), json_values))
    result = attempt(lambda: unb64(text, size, "a field"), SecAggError)
    assert refused(result) or size is None or len(result) == size
    document = data.draw(json_values | mutated_json({"11": "x", "22": [1]}))
    result = attempt(lambda: node_map(document, "a map"), SecAggError)
    assert refused(result) or all(type(k) is int and 0 <= k < 2**64 for k in result)


@fuzz(80)
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "unmask"]))
def test_stage_payload_text(data, stage):
    valid = json.dumps({"version": protocol.VERSION, "stage": stage, "node": 11, "shares": {}})
    text = data.draw(st.one_of(
        st.just(valid.encode()).flatmap(mutated_bytes).map(lambda b: b.decode("latin-1")),
        st.just(json.loads(valid)).flatmap(mutated_json).map(json.dumps),
        st.text(max_size=100), json_values))
    result = attempt(lambda: loads(text, stage), SecAggError)
    assert refused(result) or (isinstance(result, dict) and result["stage"] == stage)


def test_deep_json_payloads_are_refused():
    must_refuse(lambda: loads(deep_json(), "share"), SecAggError)
    must_refuse(lambda: client_step(deep_json(), {}, 11, IDENTITY(11)), SecAggError)
    must_refuse(lambda: header_of(np.frombuffer(deep_json(2000).encode(), np.uint8)),
                InvalidUpdate)


# ------------------------------------------------------------------ fuzzing: the client side
@pytest.fixture(scope="module")
def secagg_stages() -> dict[str, tuple[str, dict]]:
    """One honest round: node BAD's request and state at each stage."""
    sr = ServerRound(MASK_PARAMS, MASK_NODES, MASK_LENGTH)
    states: dict[int, dict] = {u: {} for u in MASK_NODES}
    stages = {}

    def ask(requests: dict[int, str], stage: str) -> dict[int, str]:
        stages[stage] = (requests[BAD], states[BAD])
        replies = {}
        for u, request in requests.items():
            replies[u], states[u] = client_step(request, states[u], u, IDENTITY(u))
        return replies

    sr.receive_adverts(ask(sr.advertise_requests(), "advertise"))
    sr.receive_shares(ask(sr.share_requests(), "share"))
    for u, payload in sr.mask_payloads().items():
        if u == BAD:
            stages["mask"] = (payload, states[u])
        vector, header, states[u] = client_mask(payload, states[u], u, XS[u], WS[u])
        sr.receive_masked(u, vector, header)
    sr.receive_checks(ask(sr.check_requests(), "check"))
    ask(sr.unmask_requests(), "unmask")
    return stages


@fuzz(120)
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "mask", "check", "unmask"]))
def test_client_stage_requests(secagg_stages, data, stage):
    request, state = secagg_stages[stage]
    text = data.draw(st.one_of(
        st.just(json.loads(request)).flatmap(mutated_json).map(json.dumps),
        st.just(request.encode()).flatmap(mutated_bytes).map(lambda b: b.decode("latin-1")),
        st.text(max_size=100), json_values))
    before = copy.deepcopy(state)
    if stage == "mask":
        result = attempt(lambda: client_mask(text, state, BAD, XS[BAD], WS[BAD]), SecAggError)
        assert refused(result) or result[0].shape == (MASK_LENGTH + sum_slots([WEIGHT]),)
    else:
        result = attempt(lambda: client_step(text, state, BAD, IDENTITY(BAD)), SecAggError)
        assert refused(result) or json.loads(result[0])["node"] == BAD
    assert state == before, "a request changed the node's state in place"


@pytest.mark.parametrize("adverts", [None, [], "x" * 5000, {"x": {}}, {"11": None},
                                     {"11": {"c_pk": 5}}, {}, {"11": [1]}])
def test_coin_requests_with_bad_members_are_refused(adverts):
    r = Round(16, 10)
    r.advertise()
    u = r.nodes[0]
    request = {**json.loads(r.sr.coin_requests()[u]), "adverts": adverts}
    must_refuse(lambda: client_step(json.dumps(request), r.state[u], u, IDENTITY(u)),
                SecAggError)


# ------------------------------------------------------------------ fuzzing: the server side
def run_masked_round(stage: str, tamper, identity: bool = True):
    """One round with honest nodes, except that node BAD's message of ``stage``
    (advertise, share, masked, unmask) goes through ``tamper``. Returns the server's
    round and its outcome: ``(average, weight)`` or the RoundAborted."""
    sr = ServerRound(MASK_PARAMS, MASK_NODES, MASK_LENGTH)
    states: dict[int, dict] = {u: {} for u in MASK_NODES}
    IDENTITY.register(MASK_NODES)

    def ask(requests: dict[int, str], name: str) -> dict[int, object]:
        replies: dict[int, object] = {}
        for u, request in requests.items():
            try:
                replies[u], states[u] = client_step(request, states[u], u,
                                                    IDENTITY(u) if identity else None)
            except SecAggError:  # an honest node refuses what fails its checks: a dropout
                continue
            if name == stage and u == BAD:
                replies[u] = tamper(replies[u])
        if name == stage and BAD in replies:  # first: what it leaves behind is used first
            replies = {BAD: replies.pop(BAD), **replies}
        return replies

    with no_hang():
        try:
            sr.receive_adverts(ask(sr.advertise_requests(), "advertise"))
            sr.receive_shares(ask(sr.share_requests(), "share"))
            for u, payload in sr.mask_payloads().items():
                try:
                    vector, header, states[u] = client_mask(payload, states[u], u, XS[u],
                                                            WS[u])
                except SecAggError:
                    continue
                if stage == "masked" and u == BAD:
                    vector, header = tamper((vector, header))
                result = attempt(lambda: sr.receive_masked(u, vector, header),
                                 InvalidUpdate)
                assert not refused(result) or u == BAD
            sr.receive_checks(ask(sr.check_requests(), "check"))
            return sr, sr.receive_unmask(ask(sr.unmask_requests(), "unmask"))
        except RoundAborted as err:
            assert str(err)
            return sr, err


def assert_average_of_survivors(sr: ServerRound, outcome) -> None:
    average, weight = outcome
    survivors = sorted(sr.masked)
    assert weight == sum(WS[u] for u in survivors)
    expected = sum(WS[u] * XS[u] for u in survivors) / weight
    assert np.abs(average - expected).max() <= MASK_PARAMS.error_bound + 1e-9


@st.composite
def tampered_reply(draw, text: str) -> object:
    return draw(st.one_of(
        st.just(json.loads(text)).flatmap(mutated_json).map(json.dumps),
        st.just(text.encode()).flatmap(mutated_bytes).map(lambda b: b.decode("latin-1"))))


@fuzz(40)
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "check", "unmask"]))
def test_server_round_with_a_tampered_reply(data, stage):
    """A near-valid reply may be refused, accepted, or make the round abort (a wrong
    share is caught by the commitment); an accepted round is the average of the
    survivors."""
    sr, outcome = run_masked_round(stage, lambda text: data.draw(tampered_reply(text)))
    if not isinstance(outcome, RoundAborted):
        assert_average_of_survivors(sr, outcome)


@fuzz(40)
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "check", "unmask"]))
def test_server_round_with_a_garbage_reply(caplog_flwr, data, stage):
    """Garbage is left out, naming the node, and the round goes on with the others."""
    junk = data.draw(st.text(max_size=80) | json_values | st.sampled_from(
        [deep_json(), b"{}", json.dumps({"version": protocol.VERSION, "stage": stage, "node": BAD})]))
    caplog_flwr.clear()
    sr, outcome = run_masked_round(stage, lambda text: junk)
    if stage == "check":  # a survivor that signs nothing: its input could not be unmasked
        assert isinstance(outcome, RoundAborted) and f"nodes [{BAD}]" in str(outcome)
        return
    assert not isinstance(outcome, RoundAborted), outcome
    assert any(f"node {BAD} at the {stage} stage" in w for w in fuzzing.warnings_of(caplog_flwr))
    assert_average_of_survivors(sr, outcome)
    assert (BAD in sr.masked) == (stage == "unmask")


@fuzz(40)
@given(data=st.data())
def test_server_round_with_a_tampered_masked_vector(data):
    """A bad vector or header is left out and the others' average comes out; a vector of
    the right type and length is kept (a client may bias the sum within range: the
    documented caveat), and the round then decodes or aborts on overflow."""
    sent = {}

    def tamper(masked):
        vector, header = masked
        kind = data.draw(st.sampled_from(["vector", "header", "both"]))
        if kind in ("vector", "both"):
            vector = data.draw(mutated_array(vector) | st.sampled_from(
                [None, vector.tolist(), vector.astype(np.uint64), vector.astype(">u4")]))
        if kind in ("header", "both"):
            header = data.draw(mutated_json(header))
        sent.update(vector=vector)
        return vector, header

    sr, outcome = run_masked_round("masked", tamper)
    if BAD in sr.masked:
        vector = sent["vector"]
        assert isinstance(vector, np.ndarray) and vector.dtype == np.uint32 \
            and vector.shape == (MASK_LENGTH + sum_slots([WEIGHT]),)
    else:
        assert not isinstance(outcome, RoundAborted), outcome
        assert_average_of_survivors(sr, outcome)


def test_low_order_public_keys_are_refused_at_advertise(caplog_flwr):
    """Keys that make every shared secret zero: neighbors would fail to mask with the
    node, and the server could not rebuild their masks."""
    for point in LOW_ORDER_POINTS:
        def tamper(text):
            return json.dumps({**json.loads(text), "s_pk": b64(point)})
        caplog_flwr.clear()
        sr, outcome = run_masked_round("advertise", tamper, identity=False)
        assert BAD not in sr.adverts
        assert any(f"node {BAD} at the advertise stage" in w
                   for w in fuzzing.warnings_of(caplog_flwr))
        assert_average_of_survivors(sr, outcome)


def test_a_low_order_key_cannot_crash_the_unmasking():
    """A node that advertised a low-order key is left out of a sparse round's members;
    the others' round must not fail."""
    nodes = list(range(101, 111))
    sr = ServerRound(MASK_PARAMS, nodes, MASK_LENGTH, degree=2)
    bad = nodes[0]
    states: dict[int, dict] = {u: {} for u in nodes}

    def ask(requests):
        replies = {}
        for u, request in requests.items():
            try:
                replies[u], states[u] = client_step(request, states[u], u, None)
            except SecAggError:
                continue
        return replies

    with no_hang():
        try:
            adverts = ask(sr.advertise_requests())
            adverts[bad] = json.dumps({**json.loads(adverts[bad]),
                                       "s_pk": b64(LOW_ORDER_POINTS[0])})
            sr.receive_adverts(adverts)
            sr.receive_coins(ask(sr.coin_requests()))  # 9 members of degree 2: sparse
            sr.receive_shares(ask(sr.share_requests()))
            for u, payload in sr.mask_payloads().items():
                try:
                    vector, header, states[u] = client_mask(
                        payload, states[u], u, np.zeros(MASK_LENGTH), 10)
                except SecAggError:
                    continue
                sr.receive_masked(u, vector, header)
            sr.receive_checks(ask(sr.check_requests()))
            average, _ = sr.receive_unmask(ask(sr.unmask_requests()))
        except RoundAborted as err:
            pytest.fail(f"the round of the honest nodes aborted: {err}")
    assert bad not in sr.masked and np.abs(average).max() <= MASK_PARAMS.error_bound


def test_a_partly_bad_unmask_reply_is_left_out_entirely(caplog_flwr):
    """Its valid-looking shares must not be used when the rest of it is refused."""
    def tamper(text):
        rep = json.loads(text)
        other = next(k for k in rep["b_shares"] if k != str(BAD))
        rep["b_shares"][other] = b64(bytes(SHARE_BYTES - 1) + b"\x01")  # a wrong share
        rep["b_shares"]["999"] = "not base64!"
        return json.dumps(rep)

    caplog_flwr.clear()
    sr, outcome = run_masked_round("unmask", tamper)
    assert not isinstance(outcome, RoundAborted), outcome
    assert any(f"node {BAD} at the unmask stage" in w for w in fuzzing.warnings_of(caplog_flwr))
    assert_average_of_survivors(sr, outcome)


def test_a_survivor_that_does_not_sign_the_check_aborts_the_round():
    """A node whose masked input arrived but that does not answer the consistency check
    (a client stalling the round): its input could never be unmasked, so the round
    stops, naming it, before any node reveals a share."""
    r = Round(6, 20)
    r.advertise()
    r.share()
    r.mask()
    silent = r.nodes[2]
    with pytest.raises(RoundAborted, match=rf"did not sign the round's view .*{silent}"):
        r.check(skip={silent})
    assert all(r.state[u]["stage"] == "checked" for u in r.nodes if u != silent)
