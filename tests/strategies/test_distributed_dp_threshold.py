"""DP under threshold Paillier. Distributed: each contributor adds its share of discrete
Gaussian noise before encrypting (as under the single-holder key), and the decryptors,
who recompute the aggregate from the signed contributions, and the combiner refuse any
aggregate that may carry less noise than declared, or than their own floor. Central:
the server encrypts its noise and proves it knows the plaintexts; decryptors that
accept server noise add it.

The adversary is the server, driving the real node code (contribute, answer_decrypt,
answer_combine) on the session's real 2048-bit 2-of-3 key (tests.helpers.threshold:
nodes 101, 202 and 303 hold shares, 404 none). With the defence off (no noise asked,
no floor) the clients' exact average is decrypted; with it on the average carries the
configured noise, and the server can neither strip it, lower the quorum, nor pass off
a partial sum. Server "noise" that cancels the other contributions isolates one update
when its proof is not checked, and is refused when it is. The accountants are the
paillier-distributed one (Wang et al.'s fixed-size bound) and the Paillier central one."""

from __future__ import annotations

import dataclasses
import math
import secrets
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message

from fedapp.config import RunSettings
from strategies.dp_message import CentralDP, dp_clip_mod
from strategies.dp_rounds import (CLIP_KEY, NOISE_LEVELS_KEY, QUORUM_KEY, STEP_KEY,
                                  VALUE_CLIP_KEY)
from strategies.encoding import EncodingParams
from strategies.keyfiles import (GROUP_KEY_NAME, THRESHOLD_PUBLIC_NAME, load_group_key,
                                 load_threshold_public_key)
from strategies.node_errors import NodeError
from strategies.paillier_message import PaillierFedAvg
from strategies.paillier_node import round_config
from strategies.paillier_protocol import EncryptedModel, aggregate
from strategies.records import record_arrays
from strategies.screening import NoUsableUpdate
from strategies.threshold_message import ThresholdPaillierFedAvg
from strategies.threshold_node import answer_combine, answer_decrypt, contribute, node_keys
from strategies.threshold_protocol import (DecryptRequest, ServerNoise, ThresholdRefused, View,
                                           add_server_noise, open_model)
from strategies.threshold_rounds import CombineRequest
from tests.helpers import CLIP, IDENTITY, RUN, SHAPES, new_context
from tests.helpers.threshold import NODES, node_config
from tests.strategies.test_threshold_message import FakeGrid, Node, initial, run_round

LENGTH = 10_000  # values: the noise std is measured to about 1%
PARAMS = EncodingParams.for_key(2048, 64, clip=1.0)
LEVELS = 400.0  # the round's noise in levels: multiplier 400 x step / 0.5 = 0.0244
DP_CLIP = 0.5
DECRYPTORS = (101, 202)  # T = 2 of the share holders
PLAIN = {u: np.random.default_rng(u).uniform(-0.5, 0.5, LENGTH) for u in NODES}


@pytest.fixture(scope="module")
def keydir(threshold_key_dir) -> Path:
    IDENTITY.register(NODES)
    return threshold_key_dir


def context_of(keydir: Path, node: int, **settings) -> Context:
    context = new_context(node)
    context.node_config.update({**node_config(keydir, node), **settings})
    return context


def dp_config(keydir: Path, server_round: int, *, levels: float = LEVELS,
              quorum: int = 3, masked: bool = False) -> dict:
    """A train config as the DP wrapper sends it (no noise keys when ``levels`` is 0),
    for a packed or ``masked`` payload."""
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    config = round_config(PARAMS, public.fingerprint, 1, server_round, masked=masked)
    if levels:
        config.update({CLIP_KEY: DP_CLIP, STEP_KEY: PARAMS.step, VALUE_CLIP_KEY: PARAMS.clip,
                       NOISE_LEVELS_KEY: levels, QUORUM_KEY: quorum})
    return config


def contributions(keydir: Path, configs: dict[int, dict], length: int = LENGTH) -> dict:
    """Each node's real contribution (and signature) for its config, weight 1."""
    out = {}
    for node, config in configs.items():
        context = context_of(keydir, node)
        out[node] = contribute(config, ["w"], [PLAIN[node][:length]], 1, node_keys(context),
                               context, run=RUN)
    return out


def request_of(keydir: Path, signed: dict, nodes, noise_of=None) -> DecryptRequest:
    """The server's decryption request for the view of ``nodes``, each of which signed
    it (the view stage is not what these tests attack), with the server noise
    ``noise_of(view, summed)`` if given."""
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    model = signed[next(iter(nodes))].model
    view = View(RUN, model.server_round, public.fingerprint, tuple(sorted(
        (u, IDENTITY(u).key.public, signed[u].model.digest()) for u in nodes)))
    noise = noise_of(view, aggregate(public, [signed[u].model for u in nodes])) \
        if noise_of else None
    return DecryptRequest(view, {IDENTITY(u).key.public: IDENTITY(u).key.sign(view.statement())
                                 for u in nodes}, {u: signed[u] for u in nodes}, noise)


def decrypted_average(keydir: Path, signed: dict, noise_of=None, **settings) -> np.ndarray:
    """What the clients decrypt of the aggregate of every contribution in ``signed``
    (and the server's noise, ``noise_of`` as in :func:`request_of`): T decryptors'
    partials, combined and sealed by the first, opened by a client."""
    request = request_of(keydir, signed, sorted(signed), noise_of)
    partials = {u: answer_decrypt(request, node_keys(c := context_of(keydir, u, **settings)), c)
                for u in DECRYPTORS}
    public = node_keys(context_of(keydir, 101)).public
    summed = aggregate(public, [c.model for c in signed.values()])
    if request.noise is not None:  # as the server names it in its combine request
        summed = add_server_noise(public, summed, request.view, request.noise)
    combiner = context_of(keydir, DECRYPTORS[0], **settings)
    combined = answer_combine(CombineRequest(summed, partials), node_keys(combiner), combiner)
    _, plain, _, _ = open_model(load_group_key(keydir / GROUP_KEY_NAME), combined.model, run=RUN)
    return plain[0].astype(np.float64)


def clean_average(nodes, length: int = LENGTH) -> np.ndarray:
    return np.mean([PLAIN[u][:length] for u in nodes], axis=0)


# ------------------------------------------------------------------ (1) the noise
@pytest.mark.parametrize("masked", [False, True])
def test_with_the_defence_off_the_clients_exact_average_is_decrypted(keydir, masked):
    """No noise asked and no floor: the threshold key holders decrypt the four
    contributions' exact average (the baseline the defence changes)."""
    signed = contributions(keydir, {u: dp_config(keydir, 11, levels=0, masked=masked)
                                    for u in NODES})
    assert all(c.model.masks == masked for c in signed.values())
    got = decrypted_average(keydir, signed)
    assert np.abs(got - clean_average(NODES)).max() <= PARAMS.max_error() + 1e-9


@pytest.mark.parametrize("masked", [False, True])
def test_with_it_on_the_average_carries_the_configured_noise(keydir, masked):
    """Quorum 3, four contributors of std 400 / sqrt(3) levels each: the decrypted
    average is the clean one plus noise of std 400 sqrt(4 / 3) step / 4 (the ring
    masks' own errors are rounded away: they add nothing)."""
    signed = contributions(keydir, {u: dp_config(keydir, 12, masked=masked) for u in NODES})
    assert all(m.client_noise.std == pytest.approx(LEVELS / math.sqrt(3))
               for m in (c.model for c in signed.values()))
    residual = decrypted_average(keydir, signed) - clean_average(NODES)
    std = LEVELS * math.sqrt(4 / 3) * PARAMS.step / 4
    assert abs(residual.std() / std - 1) < 0.05
    assert abs(residual.mean()) < 6 * std / math.sqrt(LENGTH)


# ------------------------------------------------------------------ (2) the server's forgeries
def _mixed(keydir):
    """Two nodes sent the round's noise, two (told otherwise) none."""
    signed = contributions(keydir, {u: dp_config(keydir, 21, levels=LEVELS if u < 300 else 0)
                                    for u in NODES}, 200)
    return request_of(keydir, signed, NODES), {}, "declares other distributed-DP noise"


def _lowered_header(keydir):
    """A contribution whose header the server rewrote to declare less noise."""
    signed = contributions(keydir, {u: dp_config(keydir, 22) for u in NODES}, 200)
    model = signed[404].model
    lowered = dataclasses.replace(model, client_noise=dataclasses.replace(
        model.client_noise, std=1.0, quorum=1))
    signed[404] = dataclasses.replace(signed[404], model=EncryptedModel.from_arrays(
        lowered.to_arrays(), node_keys(context_of(keydir, 404)).public))
    return request_of(keydir, signed, NODES), {}, "not the one its identity signed"


def _below_quorum(keydir):
    """Three authentic contributions of a round whose noise is shared by a quorum of 4
    (T + 1 = 3 is enough for the key, not for the noise)."""
    signed = contributions(keydir, {u: dp_config(keydir, 23, quorum=4) for u in NODES}, 200)
    return request_of(keydir, signed, [101, 202, 303]), {}, "quorum of 4"


def _below_floor(keydir):
    """A round without noise, and decryptors that require multiplier 0.01."""
    signed = contributions(keydir, {u: dp_config(keydir, 24, levels=0) for u in NODES}, 200)
    return (request_of(keydir, signed, NODES), {"dp-min-noise-multiplier": 0.01},
            "multiplier 0, below this node's dp-min-noise-multiplier 0.01")


@pytest.mark.parametrize("attack", [_mixed, _lowered_header, _below_quorum, _below_floor])
def test_a_decryptor_refuses_a_view_with_less_noise_than_declared(keydir, attack):
    request, settings, reason = attack(keydir)
    context = context_of(keydir, 101, **settings)
    with pytest.raises(ThresholdRefused, match=reason):
        answer_decrypt(request, node_keys(context), context)


@pytest.fixture(scope="module")
def full_round(keydir):
    """A quorum-4 round of four real contributions and the decryptors' sealed partials
    of their aggregate."""
    signed = contributions(keydir, {u: dp_config(keydir, 31, quorum=4) for u in NODES}, 200)
    request = request_of(keydir, signed, NODES)
    partials = {u: answer_decrypt(request, node_keys(c := context_of(keydir, u)), c)
                for u in DECRYPTORS}
    public = node_keys(context_of(keydir, 101)).public
    return signed, partials, public


@pytest.mark.parametrize("forgery, reason", [
    ("three of the four", "quorum of 4"),
    ("noise header stripped", "noise the server added"),
    ("noise and its offset stripped, floor", "below this node's dp-min-noise-multiplier"),
    ("quorum lowered to three of the four", "cannot decrypt the aggregate"),
    ("noise and its offset stripped", "cannot decrypt the aggregate"),
])
def test_the_combiner_refuses_an_aggregate_with_less_noise_than_declared(keydir, full_round,
                                                                          forgery, reason):
    """The combiner gets the aggregate from the server: it checks the quorum, the
    server's noise and its floor itself, and the partials (sealed for the aggregate
    the decryptors recomputed) open only for that aggregate."""
    signed, partials, public = full_round
    whole = aggregate(public, [c.model for c in signed.values()])
    three = aggregate(public, [signed[u].model for u in (101, 202, 303)])
    settings = {}
    model = {
        "three of the four": three,
        "noise header stripped": dataclasses.replace(whole, client_noise=None),
        "noise and its offset stripped, floor": dataclasses.replace(
            whole, client_noise=None, noise_offset=0),
        "quorum lowered to three of the four": dataclasses.replace(
            three, client_noise=dataclasses.replace(three.client_noise, quorum=3)),
        "noise and its offset stripped": dataclasses.replace(whole, client_noise=None,
                                                             noise_offset=0),
    }[forgery]
    if forgery.endswith("floor"):
        settings["dp-min-noise-multiplier"] = 0.01
    received = EncryptedModel.from_arrays(model.to_arrays(), public)  # as it travels
    context = context_of(keydir, 101, **settings)
    with pytest.raises(ThresholdRefused, match=reason):
        answer_combine(CombineRequest(received, partials), node_keys(context), context)
    # the genuine aggregate combines
    combined = answer_combine(CombineRequest(whole, partials), node_keys(context_of(
        keydir, 101)), context_of(keydir, 101))
    assert combined.left_out == []


# ------------------------------------------------------------------ (3) the node's floor
def test_a_node_refuses_to_add_noise_below_its_floor(keydir):
    """The round's multiplier 0.0244 against a floor of 0.1: refused, and so is a round
    without any noise; at a floor of 0.02 the node contributes."""
    context = context_of(keydir, 101, **{"dp-min-noise-multiplier": 0.1})
    keys = node_keys(context)
    with pytest.raises(NodeError, match=r"multiplier 0\.0244\d*, below this node's "
                                        r"dp-min-noise-multiplier 0\.1"):
        contribute(dp_config(keydir, 41), ["w"], [PLAIN[101][:50]], 1, keys, context, run=RUN)
    with pytest.raises(NodeError, match="asks for no distributed DP noise.*dp-mode"):
        contribute(dp_config(keydir, 41, levels=0), ["w"], [PLAIN[101][:50]], 1, keys,
                   context, run=RUN)
    context = context_of(keydir, 101, **{"dp-min-noise-multiplier": 0.02})
    model = contribute(dp_config(keydir, 41), ["w"], [PLAIN[101][:50]], 1, keys, context,
                       run=RUN).model
    assert model.client_noise.quorum == 3


# ------------------------------------------------------------------ (4) the settings
def test_both_dp_modes_are_run_settings_of_threshold_mode_with_a_fixed_clip():
    base = {"aggregation": "paillier-threshold", "paillier-public-key": "/k.pub.json",
            "dp-noise-multiplier": 1.0}
    for mode in ("central", "distributed"):
        assert RunSettings.from_run_config({**base, "dp-mode": mode}).dp.mode == mode
        with pytest.raises(ValueError, match="adaptive"):
            RunSettings.from_run_config({**base, "dp-mode": mode, "dp-adaptive-clip": True})


# ------------------------------------------------------------------ (5) a round, accounted
class DPNode(Node):
    """A node running the real threshold mod with the DP clip mod inside it."""

    def train(self, msg: Message, context: Context) -> Message:
        return dp_clip_mod(msg, context, super().train)


def paillier_distributed_epsilons(keypair, settings: dict) -> tuple[object, list[float]]:
    """The paillier-distributed wrapper's DP config and epsilons after one and two
    rounds of all four nodes, at ``settings``."""
    reference = CentralDP(PaillierFedAvg(keypair[0], clip=CLIP), **settings)
    reference._start_dp(len(NODES), len(NODES), sum(math.prod(s) for s in SHAPES.values()))
    return reference.config, [reference.ledger.step(), reference.ledger.step()]


def test_a_round_reports_the_paillier_distributed_epsilon_and_the_budget_stops(
        keydir, keypair, task_identity):
    """CentralDP(mode="distributed") around the threshold strategy: the nodes add their
    noise (quorum ceil(0.75 x 4) = 3), the clients seal the model, and the epsilon is
    the paillier-distributed accountant's at the same settings; with a budget between
    one round's epsilon and two's, round 2 is not run."""
    settings = dict(noise_multiplier=1.0, clip=0.5, mode="distributed", quorum=0.75)
    reference, epsilons = paillier_distributed_epsilons(keypair, settings)
    nodes = [DPNode(u, node_config(keydir, u)) for u in NODES]
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    dp = CentralDP(ThresholdPaillierFedAvg(public, clip=CLIP, min_available_nodes=4,
                                           min_train_nodes=4, fraction_evaluate=0.0),
                   max_epsilon=sum(epsilons) / 2, **settings)
    grid = FakeGrid(nodes)
    arrays, metrics = run_round(dp, grid, 1, initial())
    assert dp.config == dataclasses.replace(reference, max_epsilon=sum(epsilons) / 2)
    assert metrics["dp-epsilon"] == pytest.approx(epsilons[0], rel=1e-12)
    assert dp.strategy.last_aggregate.client_noise == dp.strategy.client_noise
    assert dp.strategy.client_noise.quorum == 3
    _, plain, _, server_round = open_model(load_group_key(keydir / GROUP_KEY_NAME),
                                           record_arrays(arrays), run=RUN)
    assert server_round == 1 and plain[0].shape == SHAPES["w"]
    # round 2 would pass the budget: nothing is sent
    assert list(dp.configure_train(2, arrays, {}, grid)) == []
    assert dp.budget_exhausted


def test_the_legacy_wrapper_runs_the_same_round(keydir, keypair, task_identity):
    """LegacyCentralDP(mode="distributed") around LegacyThresholdPaillierFedAvg, the
    legacy DP clip mod inside the legacy threshold mod: the same noise and the same
    epsilon."""
    from strategies.dp_legacy import LegacyCentralDP, legacy_dp_clip_mod
    from tests.strategies.test_threshold_legacy import federation, fit_round, opened
    from tests.strategies.test_threshold_legacy import initial as legacy_initial

    settings = dict(noise_multiplier=1.0, clip=0.5, mode="distributed", quorum=0.75)
    reference, epsilons = paillier_distributed_epsilons(keypair, settings)
    _, manager, strategy = federation(keydir, {u: {"inner": legacy_dp_clip_mod}
                                               for u in NODES})
    dp = LegacyCentralDP(strategy, **settings)
    _, (parameters, metrics) = fit_round(dp, manager, 1, legacy_initial())
    assert dp.config == reference
    assert metrics["dp-epsilon"] == pytest.approx(epsilons[0], rel=1e-12)
    assert strategy.last_aggregate.client_noise == strategy.client_noise
    assert opened(keydir, parameters)[2] == 1  # sealed for the clients, round 1


# ------------------------------------------------------------------ (6) central DP
ACCEPT = {"paillier-accept-server-noise": True}


def server_noise(keydir: Path, sigma: float, bound: int):
    """The server's side of central DP, as the strategy makes it: ``noise_of`` for
    :func:`request_of`."""
    from strategies.discrete_gaussian import discrete_gaussian
    from strategies.threshold_paillier import ThresholdEncryptor

    encryptor = ThresholdEncryptor(load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME))

    def noise_of(view, summed):
        return ServerNoise.make(encryptor, summed, view,
                                discrete_gaussian(sigma, summed.layout.size), bound)
    return noise_of


@pytest.mark.parametrize("masked", [False, True])
def test_central_dp_the_servers_proven_noise_is_decrypted_with_the_nodes_consent(keydir,
                                                                                  masked):
    """The server encrypts std-400 noise (masked payload: masks it under its own ring
    secret and encrypts that), proves it knows it, and the decryptors that accept
    server noise add it: the average carries noise of std 400 step / 4. Nodes that do
    not accept it refuse, before any decryption."""
    signed = contributions(keydir, {u: dp_config(keydir, 51, levels=0, masked=masked)
                                    for u in NODES})
    noise_of = server_noise(keydir, LEVELS, math.ceil(8 * LEVELS))
    residual = decrypted_average(keydir, signed, noise_of, **ACCEPT) - clean_average(NODES)
    std = LEVELS * PARAMS.step / 4
    assert abs(residual.std() / std - 1) < 0.05
    assert abs(residual.mean()) < 6 * std / math.sqrt(LENGTH)
    with pytest.raises(ThresholdRefused, match="paillier-accept-server-noise = true"):
        decrypted_average(keydir, signed, noise_of)
    # a floor on distributed-DP noise is not met by the server's, which no node can check
    with pytest.raises(ThresholdRefused, match="dp-min-noise-multiplier"):
        decrypted_average(keydir, signed, noise_of,
                          **ACCEPT, **{"dp-min-noise-multiplier": 0.01})


def cancelling_noise(keydir, signed: dict, cancelled: list[int], offset: int):
    """The attack: server "noise" that is the inverse of the ``cancelled`` nodes'
    contributions (made from their ciphertexts, no key needed), times encryptions of
    zero updates of their weights and of the declared offset, so the view's aggregate
    decodes to the other nodes' updates alone. Masked payload: the inverse of their
    secrets' ciphertexts (plus ones, so the secret sum's offset still holds) and of their
    masked vectors (plain integers), plus the zero updates' levels unmasked. Its proof
    is the best the server can make: over every plaintext and randomizer it knows."""
    from strategies import ring_masks
    from strategies.encoding import encode, encode_noise, pack, quantize
    from strategies.paillier import ciphertexts_from_array, ciphertexts_to_array
    from strategies.plaintext_proofs import prove_plaintexts
    from strategies.threshold_paillier import ThresholdEncryptor
    from strategies.threshold_protocol import _noise_context

    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    n, nsquare = int(public.n), public.nsquare
    size = signed[404].model.layout.size
    masked = bool(signed[404].model.masks)

    def noise_of(view, summed):
        shift = encode_noise(np.zeros(size, np.int64), offset, summed.total_weight, PARAMS)[0]
        vector = None
        if masked:  # slots of 1 per cancelled secret and for the server's own "secret"
            per = PARAMS.plaintext_bits // ring_masks.SECRET_SLOT_BITS
            slots = np.full(ring_masks.RING_DEGREE, len(cancelled) + 1, ">u2")
            known = [int.from_bytes(slots[i:i + per].tobytes(), "big")
                     for i in range(0, slots.size, per)]
            levels = shift.astype(np.int64) + sum(
                quantize(np.zeros(size), PARAMS, signed[u].model.total_weight).astype(np.int64)
                for u in cancelled)
            plain = np.zeros(ring_masks.rows_for(size) * ring_masks.RING_DEGREE, np.int64)
            plain[:size] = levels
            ring = signed[404].model.ring
            vector = ((plain << ring_masks.SCALE_BITS).astype(np.uint64)
                      - sum(signed[u].model.masked for u in cancelled)) \
                & np.uint64((1 << ring.bits) - 1)
        else:
            known = pack(shift, PARAMS)
            for node in cancelled:
                zero = encode(np.zeros(size), PARAMS, signed[node].model.total_weight)
                known = [(k + z) % n for k, z in zip(known, zero)]
        encryptor = ThresholdEncryptor(public)
        randomizers = [secrets.randbits(public.randomizer_bits) for _ in known]
        cts = [encryptor.encrypt_with(m, a) for m, a in zip(known, randomizers)]
        for node in cancelled:
            theirs = ciphertexts_from_array(public, signed[node].model.ciphertexts)
            cts = [c * pow(int(t), -1, int(nsquare)) % nsquare for c, t in zip(cts, theirs)]
        proof = prove_plaintexts(public, known, randomizers, cts,
                                 _noise_context(view, offset, vector))
        return ServerNoise(ciphertexts_to_array(public, cts), offset, proof, vector)
    return noise_of


@pytest.mark.parametrize("masked", [False, True])
def test_central_dp_noise_that_cancels_the_others_is_refused_and_works_unchecked(
        keydir, monkeypatch, masked):
    """Server + one client (the colluder reads the model like every client): "noise"
    that cancels nodes 101-303 leaves node 404's update alone in a view all four signed.
    Without the proof check the decryptors decrypt it and the model is 404's update
    over the total weight; with it they refuse: the server cannot prove it knows that
    noise's plaintext."""
    signed = contributions(keydir, {u: dp_config(keydir, 52, levels=0, masked=masked)
                                    for u in NODES})
    noise_of = cancelling_noise(keydir, signed, [101, 202, 303], 50)
    with monkeypatch.context() as patch:
        patch.setattr("strategies.threshold_protocol.verify_plaintexts", lambda *args: None)
        alone = decrypted_average(keydir, signed, noise_of, **ACCEPT)
    assert np.abs(alone * 4 - PLAIN[404]).max() <= 4 * PARAMS.max_error() + 1e-9
    with pytest.raises(ThresholdRefused, match="the server's noise is refused: the proof "
                                               "that the sender knows its plaintexts"):
        decrypted_average(keydir, signed, noise_of, **ACCEPT)


def central_epsilon(keypair, settings: dict, rounds: int = 1) -> float:
    reference = CentralDP(PaillierFedAvg(keypair[0], clip=CLIP), **settings)
    reference._start_dp(len(NODES), len(NODES), sum(math.prod(s) for s in SHAPES.values()))
    return [reference.ledger.step() for _ in range(rounds)][-1]


def test_central_dp_round_through_the_wrapper_on_both_apis(keydir, keypair, task_identity):
    """CentralDP / LegacyCentralDP around the threshold strategies: the server's noise
    is in the sealed aggregate (its offset the round's bound), the epsilon is the
    single-holder Paillier central one at the same settings; nodes that do not accept
    server noise refuse, and the run stops (one empty round allowed here) with their
    reason."""
    from strategies.dp_legacy import LegacyCentralDP, legacy_dp_clip_mod
    from tests.strategies.test_threshold_legacy import federation, fit_round, opened
    from tests.strategies.test_threshold_legacy import initial as legacy_initial

    settings = dict(noise_multiplier=1.0, clip=0.5)
    epsilon = central_epsilon(keypair, settings)
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    for accept in (True, False):
        nodes = [DPNode(u, {**node_config(keydir, u), **(ACCEPT if accept else {})})
                 for u in NODES]
        dp = CentralDP(ThresholdPaillierFedAvg(public, clip=CLIP, min_available_nodes=4,
                                               min_train_nodes=4, fraction_evaluate=0.0),
                       **settings)
        if not accept:
            with pytest.raises(NoUsableUpdate, match="failed the decrypt stage: the aggregate "
                               "carries noise the server added .* "
                               "paillier-accept-server-noise"):
                run_round(dp, FakeGrid(nodes), 1, initial())
            continue
        arrays, metrics = run_round(dp, FakeGrid(nodes), 1, initial())
        assert metrics["dp-epsilon"] == pytest.approx(epsilon, rel=1e-12)
        assert dp.strategy.last_aggregate.server_noise == dp.strategy.server_noise[1] > 0
        _, plain, _, server_round = open_model(load_group_key(keydir / GROUP_KEY_NAME),
                                               record_arrays(arrays), run=RUN)
        assert server_round == 1 and plain[0].shape == SHAPES["w"]
    proxies, manager, strategy = federation(keydir, {u: {"inner": legacy_dp_clip_mod}
                                                     for u in NODES})
    for proxy in proxies:
        proxy.context.node_config.update(ACCEPT)
    dp = LegacyCentralDP(strategy, **settings)
    _, (parameters, metrics) = fit_round(dp, manager, 1, legacy_initial())
    assert metrics["dp-epsilon"] == pytest.approx(epsilon, rel=1e-12)
    assert strategy.last_aggregate.server_noise == strategy.server_noise[1] > 0
    assert opened(keydir, parameters)[2] == 1


def test_a_decrypted_round_whose_combiners_all_fail_still_counts(keydir, keypair, task_identity,
                                                                  flwr_caplog):
    """T decryptors decrypted the noised aggregate, then no combiner answered: no model,
    but the combiners saw it, so the round's epsilon is spent and reported."""
    settings = dict(noise_multiplier=1.0, clip=0.5)
    epsilon = central_epsilon(keypair, settings)
    nodes = [DPNode(u, {**node_config(keydir, u), **ACCEPT}, silent="combine") for u in NODES]
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    dp = CentralDP(ThresholdPaillierFedAvg(public, clip=CLIP, min_available_nodes=4,
                                           min_train_nodes=4, fraction_evaluate=0.0,
                                           max_empty_rounds=3), **settings)
    arrays, metrics = run_round(dp, FakeGrid(nodes), 1, initial())
    assert arrays is None and metrics["dp-epsilon"] == pytest.approx(epsilon, rel=1e-12)
    assert "no combiner returned the model; the round's privacy cost counts" in flwr_caplog.text
    # a round that fails before anything is decrypted costs nothing
    nodes = [DPNode(u, {**node_config(keydir, u), **ACCEPT}, silent="decrypt") for u in NODES]
    arrays, metrics = run_round(dp, FakeGrid(nodes), 2, initial())
    assert arrays is None and metrics is None
    # a decrypted round that is also the last empty round allowed stops the run, and the
    # error says its cost: it was accounted first (two rounds' epsilon)
    nodes = [DPNode(u, {**node_config(keydir, u), **ACCEPT}, silent="combine") for u in NODES]
    epsilon2 = central_epsilon(keypair, settings, rounds=2)
    with pytest.raises(NoUsableUpdate, match=f"Round 3's noised aggregate was decrypted, so "
                       f"its privacy cost counts: epsilon {epsilon2:.4g} spent in all"):
        run_round(dp, FakeGrid(nodes), 3, initial())
    assert dp.ledger.epsilon() == pytest.approx(epsilon2, rel=1e-12)
