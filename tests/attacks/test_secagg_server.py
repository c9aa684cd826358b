"""A malicious server against masked secure aggregation (issue 14, items 1-3), driving
the real node code (``client_step``, ``client_mask``) as the server would.

1. **Lying about dropouts** (the attack Bonawitz et al.'s ConsistencyCheck stops):
   10 nodes, complete graph, threshold 6, identity keys on, no colluding node.
   The server forwards to the target ``u`` the shares of only ``t - 1`` neighbors
   ``M``, so ``u`` masks with ``M`` alone; at unmasking it tells every node a story of
   its own: ``u`` survived (its self-mask seed comes out) and the nodes of ``M``
   dropped (their mask keys come out), each node of ``M`` seeing itself among the
   survivors. With the consistency check switched off, ``u``'s weighted quantized
   update comes out exactly; with it on, no story gathers the threshold of
   signatures and no node reveals anything. A client colluding with the server
   cannot sign for the others: each node signs with its own identity key (with one
   key for all, as a shared HMAC key was, the forgery unmasks the target).
2. **A threshold or group the node did not agree to**: threshold 1, a group of one, in
   a share request or in the next round's share request sent with an unmask request.
3. **A replayed context**: an old round's context, and with it old advertisements.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import numpy as np
import pytest

import strategies.secagg_protocol as protocol
from strategies.secagg_masks import (SecAggError, SecAggParams, encode_weighted, prg,
                                     reconstruct_secret)
from strategies.secagg_protocol import (NodePolicy, b64, client_step, pair_mask,
                                        self_mask_seed)
from strategies.secagg_identity import Identity
from strategies.secure_sums import WEIGHT, decode_sums
from tests.helpers import IDENTITY
from tests.helpers.masking import Round


def lie_about_dropouts(r: Round) -> tuple[int, set[int]]:
    """The mask stage of the attack on ``r`` (advertised and shared): every node
    masks, the target with only its ``t - 1`` chosen neighbors; returns both."""
    target = r.nodes[0]
    chosen = set(r.sr.graph[target][:r.sr.threshold - 1])  # t - 1 neighbors
    payloads = r.sr.mask_payloads()
    data = json.loads(payloads[target])
    data["shares"] = {k: v for k, v in data["shares"].items() if int(k) in chosen}
    payloads[target] = json.dumps(data)
    for u, payload in payloads.items():
        x = r.rng.uniform(-1, 1, r.length)
        w = int(r.rng.integers(1, 600))
        r.seeds[u] = int(r.rng.integers(2**32))
        y, h, r.state[u] = protocol.client_mask(payload, r.state[u], u, x, w,
                                                np.random.default_rng(r.seeds[u]))
        r.xs[u], r.ws[u], r.ys[u] = x, w, y
    return target, chosen


def story(r: Round, node: int, chosen: set[int]) -> tuple[list[int], list[int]]:
    """What the server tells ``node``: the target survived; all but one of the ``t - 1``
    chosen dropped (a chosen node is told it survived, to be asked; the others miss a
    different one each, in a sparse graph none), so every node still sees the threshold
    of survivors in its group, each chosen node is "dropped" for most of its holders and
    the target "survived" for all."""
    ring = sorted(chosen)
    if node in chosen:
        dropped = chosen - {node}
    elif r.sr.sparse:  # groups are small: every other node hears that all the chosen dropped
        dropped = set(chosen)
    else:
        others = [u for u in r.nodes if u not in chosen]
        dropped = chosen - {ring[others.index(node) % len(ring)]}
    return sorted(set(r.nodes) - dropped), sorted(dropped)


def one_story(r: Round, node: int, chosen: set[int]) -> tuple[list[int], list[int]]:
    """The same story for every node: the chosen dropped, everyone else survived (the
    chosen are then not asked: they are not survivors)."""
    return sorted(set(r.nodes) - chosen), sorted(chosen)


def run_attack(r: Round, target: int, chosen: set[int], forger: Callable[[int], Identity] |
               None = None, tell=story) -> tuple[np.ndarray | None, dict]:
    """Steps 4-5: each node signs its story, gets every signature, and is asked to
    unmask; the server then rebuilds what it can. With ``forger``, a client colluding
    with the server signs each node's story in the name of every survivor, with the
    key ``forger(v)`` for node ``v``. Returns the target's unmasked vector (None if the
    secrets did not come out) and the nodes' refusals."""
    ctx = b64(r.sr.context)
    sigs, refused = {}, {}
    for u in r.nodes:
        survivors, dropped = tell(r, u, chosen)
        req = json.dumps({"version": protocol.VERSION, "stage": "check", "context": ctx,
                          "survivors": survivors, "dropped": dropped})
        try:
            reply, r.state[u] = client_step(req, r.state[u], u, IDENTITY(u))
        except SecAggError as err:  # the target: its story lists nodes it did not mask with
            refused[u] = str(err)
            continue
        sigs[u] = json.loads(reply)["sig"]
    b_shares: dict[int, bytes] = {}
    s_shares: dict[int, dict[int, bytes]] = {v: {} for v in chosen}
    for u in r.nodes:
        survivors, dropped = tell(r, u, chosen)
        shown = dict(sigs)
        if forger is not None:  # signatures on u's story, for every survivor but u
            view = protocol.view_digest(r.sr.session, survivors, dropped, "")
            shown.update({v: b64(forger(v).sign(protocol.check_bytes(view, v)))
                          for v in survivors if v != u})
        req = json.dumps({"version": protocol.VERSION, "stage": "unmask", "context": ctx,
                          "survivors": survivors, "dropped": dropped,
                          "sigs": {str(v): s for v, s in shown.items()}})
        if u in refused:
            continue
        try:
            reply, r.state[u] = client_step(req, r.state[u], u, IDENTITY(u))
        except SecAggError as err:
            refused[u] = str(err)
            continue
        rep = json.loads(reply)
        if str(target) in rep["b_shares"]:
            b_shares[r.sr.points[u]] = base64.b64decode(rep["b_shares"][str(target)])
        for v in chosen:
            if str(v) in rep["s_shares"]:
                s_shares[v][r.sr.points[u]] = base64.b64decode(rep["s_shares"][str(v)])
    t = r.sr.threshold
    if len(b_shares) < t or any(len(s_shares[v]) < t for v in chosen):
        return None, refused
    b = reconstruct_secret(b_shares, t)
    width = r.ys[target].size  # the model, then the node's weight and metric sums
    vector = r.ys[target] - prg(self_mask_seed(b, r.sr.session), width, r.params.dtype)
    for v in chosen:  # the pairwise masks the target added, from the chosen nodes' keys
        s_v = reconstruct_secret(s_shares[v], t)
        vector -= pair_mask(width, r.params.dtype, r.sr.session, target, v, s_v,
                            base64.b64decode(r.sr.adverts[target]["s_pk"]))
    return vector, refused


def truth(r: Round, u: int) -> np.ndarray:
    return encode_weighted(r.xs[u], r.ws[u], r.params, np.random.default_rng(r.seeds[u]))


@pytest.fixture(params=[(10, 0, 6), (20, 8, 5)], ids=["complete-10", "sparse-20-degree-8"])
def attacked(request) -> tuple[Round, int, set[int]]:
    """The issue's two settings: 10 nodes, complete graph, t = 6; 20 nodes, SecAgg+'s
    sparse graph of degree 8 (drawn from the nodes' coins), t = 5."""
    n, degree, t = request.param
    r = Round(n, 200, degree=degree)
    r.advertise()
    r.share()
    target, chosen = lie_about_dropouts(r)
    assert r.sr.threshold == t and len(chosen) == t - 1 and r.sr.sparse == (degree > 0)
    return r, target, chosen


def test_without_the_consistency_check_the_server_unmasks_one_node(attacked, monkeypatch):
    r, target, chosen = attacked
    monkeypatch.setattr(protocol, "signers", lambda view, sigs, keys: set(keys))
    vector, refused = run_attack(r, target, chosen)
    assert set(refused) == {target}  # (it sees too few survivors; it is not needed)
    assert vector is not None and np.array_equal(vector[:r.length], truth(r, target))
    assert decode_sums([WEIGHT], vector[r.length:], 1) == {WEIGHT: r.ws[target]}


def test_with_the_consistency_check_no_node_reveals_anything(attacked):
    r, target, chosen = attacked
    vector, refused = run_attack(r, target, chosen)
    assert vector is None
    assert set(refused) == set(r.nodes)  # no story is signed by all its survivors
    assert all("did not sign the same survivors, dropped nodes and model" in e
               for u, e in refused.items() if u != target)


def test_a_colluding_client_cannot_sign_for_the_others(attacked):
    """A client colluding with the server signs every node's story in the name of
    every survivor with its own identity key: each signature is checked under the key
    that signed that node's advertisement, so nothing comes out. Were the signing key
    shared by the federation (as an HMAC key is), the forgeries would pass and the
    target's update would come out exactly."""
    r, target, chosen = attacked
    colluder = next(u for u in r.nodes if u != target and u not in chosen)
    vector, refused = run_attack(r, target, chosen, forger=lambda v: IDENTITY(colluder).key)
    assert vector is None
    assert set(refused) >= set(r.nodes) - {colluder}
    assert all("did not sign the same survivors" in e for u, e in refused.items()
               if u != target)


def test_with_one_signing_key_for_all_the_forgery_unmasks_the_target():
    r = Round(10, 200)
    r.advertise()
    r.share()
    target, chosen = lie_about_dropouts(r)
    vector, refused = run_attack(r, target, chosen, forger=lambda v: IDENTITY(v).key)
    assert set(refused) == {target}
    assert vector is not None and np.array_equal(vector[:r.length], truth(r, target))


def test_an_honest_round_passes_the_check_and_decodes():
    r = Round(10, 200)
    avg, _ = r.run(drop=set(r.nodes[:2]))
    assert np.abs(avg - r.expected()).max() <= r.params.error_bound


def test_nodes_sent_different_models_reveal_nothing():
    """Pasquini et al. (CCS 2022): a model crafted for one node isolates its update in
    the sum. Each node signs the digest of the model it trained from: the nodes of a
    different model cannot gather the threshold together."""
    r = Round(10, 50)
    r.advertise()
    r.share()
    for u, payload in r.sr.mask_payloads().items():
        digest = "crafted" if u == r.nodes[0] else "global"
        y, h, r.state[u] = protocol.client_mask(payload, r.state[u], u, np.zeros(50), 1,
                                                model_digest=digest)
        r.sr.receive_masked(u, y, h)
    r.check()
    r.unmask_replies = r.step(r.sr.unmask_requests(), tolerate=True)
    assert set(r.refused) == set(r.nodes)


@pytest.mark.parametrize(("n", "degree"), [(9, 0), (20, 8)])
def test_one_story_for_all_cannot_isolate_a_node(n, degree):
    """The server relays the target only its ``t - 1`` chosen neighbors' shares, then
    tells every node the same story: the chosen dropped. Every survivor can sign it,
    and it leaves the other nodes' share groups the threshold (9 nodes, complete: 5
    survivors, t = 5; 20 nodes of degree 8: t = 5 of 9). The target's self-mask seed
    and the chosen nodes' mask keys are the only masks on its input. Two checks of the
    target stop it, each alone: it refuses a story that lists neighbors it did not
    mask with (Bonawitz et al.: ``U3`` within ``U2``), so it does not sign and no one
    reveals; and its own share group keeps only itself, below the threshold, so it
    would not reveal its own share of the seed, which the other ``t - 1`` holders
    need."""
    r = Round(n, 200, degree=degree)
    r.advertise()
    r.share()
    assert r.sr.sparse == (degree > 0) and r.sr.threshold == 5
    target, chosen = lie_about_dropouts(r)
    vector, refused = run_attack(r, target, chosen, tell=one_story)
    assert vector is None
    assert "got no shares from them and did not mask with them" in refused[target]
    survivors = set(r.nodes) - chosen
    assert all("did not sign the same survivors" in refused[u] for u in survivors - {target})


def test_a_sparse_round_checks_every_survivors_signature():
    """In a sparse graph a node checks the signatures of every survivor, not only its
    share group's: two groups that signed different views cannot both be acted on."""
    r = Round(20, 20, degree=4)
    r.advertise()
    r.share()
    r.mask()
    r.check()
    u = r.nodes[0]
    far = next(v for v in r.nodes if v != u and v not in r.sr.graph[u])
    data = json.loads(r.sr.unmask_requests()[u])
    data["sigs"] = {k: sig for k, sig in data["sigs"].items() if k != str(far)}
    with pytest.raises(SecAggError, match="1 of the 20 survivors did not sign"):
        client_step(json.dumps(data), r.state[u], u, IDENTITY(u))


@pytest.mark.parametrize(("setup", "policy", "why"), [
    ({"fraction": 0.0}, NodePolicy(), "needs at least 0.5"),
    ({"fraction": 0.45}, NodePolicy(), "needs at least 0.5"),
    ({"fraction": 0.6}, NodePolicy(min_threshold_fraction=0.66), "needs at least 0.66"),
    ({"degree": 2}, NodePolicy(min_group=4), "groups of at least 4"),
    ({}, NodePolicy(min_group=12), "groups of at least 12")])
def test_a_node_refuses_a_threshold_or_group_below_its_own_minimum(setup, policy, why):
    """The node computes its group and threshold itself, from the members, the degree
    and the fraction; it refuses a fraction or group below its own minimums."""
    r = Round(16, 10)
    r.advertise()
    r.coin()
    u = r.nodes[0]
    data = json.loads(r.sr.share_requests()[u])
    data["setup"] = {**data["setup"], **setup}
    with pytest.raises(SecAggError, match=why):
        client_step(json.dumps(data), r.state[u], u, IDENTITY(u), policy)
    client_step(r.sr.share_requests()[u], r.state[u], u, IDENTITY(u))  # the round's own


def test_a_replayed_context_is_refused():
    """The next round under an old context (and with it the old, authenticated
    advertisements of nodes whose mask keys the server rebuilt) is refused."""
    first = Round(6, 10)
    first.run(drop={first.nodes[0]})
    replay = json.loads(first.sr.advertise_requests()[first.nodes[1]])
    u = first.nodes[1]
    with pytest.raises(SecAggError, match="made keys for this round's context before"):
        client_step(json.dumps(replay), first.state[u], u, IDENTITY(u))
    # the server refuses a threshold fraction under a half for its own strategies
    from strategies.secagg_rounds import secagg_params

    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        secagg_params(1.0, 100, 16, 0, 0.0)
    assert SecAggParams.derive(1.0)  # (the encoding itself is unchanged)


@pytest.mark.parametrize(("change", "policy", "why"), [
    (lambda d, u, c: {**d, "setup": {**d["setup"], "fraction": 0.45}}, NodePolicy(),
     "needs at least 0.5"),
    (lambda d, u, c: {**d, "setup": {**d["setup"], "fraction": 0.6}},
     NodePolicy(min_threshold_fraction=0.66), "needs at least 0.66"),
    # the target alone with one colluding client: a sum of two gives its input away
    (lambda d, u, c: {**d, "adverts": {k: a for k, a in d["adverts"].items()
                                       if k in (str(u), str(c))}},
     NodePolicy(min_group=3), "groups of at least 3")])
def test_a_node_refuses_an_early_share_request_below_its_own_minimum(change, policy, why):
    """The next round's share request, sent along with this round's unmask request, is
    checked against the node's own minimums as a share stage's is: refused, the node
    makes no shares for that round (and still unmasks this one)."""
    r = Round(10, 10)
    r.advertise()
    r.share()
    r.mask()
    r.check()
    u, colluder = r.nodes[0], r.nodes[1]
    request = r.sr.unmask_requests()[u]
    data = json.loads(request)
    data["next_share"] = json.dumps(change(json.loads(data["next_share"]), u, colluder))
    reply, state = client_step(json.dumps(data), r.state[u], u, IDENTITY(u), policy)
    reply = json.loads(reply)
    assert why in reply["next_refused"] and "next_share" not in reply
    assert reply["b_shares"] and state["stage"] == "done"
    reply, state = client_step(request, r.state[u], u, IDENTITY(u))  # the honest one
    assert "next_share" in json.loads(reply) and state["stage"] == "shared"
