"""Threshold Paillier on the Message API (strategies.threshold_message, threshold_node,
threshold_protocol), on a real 2048-bit 2-of-3 key: rounds through the real mod behind
a fake Grid, and the server's attacks driven through the real node code.

Nodes 101, 202 and 303 hold shares 1-3, node 404 none; every node has its identity key,
the roster and the group key (tests.helpers.threshold). A round needs T + 1 = 3
contributions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                      RecordDict)

from strategies.keyfiles import (GROUP_KEY_NAME, THRESHOLD_PUBLIC_NAME, load_group_key,
                                 load_key_share, load_threshold_public_key,
                                 threshold_share_name)
from strategies.node_errors import NodeError
from strategies.paillier import ciphertexts_from_array, ciphertexts_to_array
from strategies.paillier_protocol import aggregate
from strategies.records import record_arrays
from strategies.threshold_message import (STAGE_KEY, ThresholdPaillierFedAvg, _decrypt_request,
                                         threshold_paillier_mod)
from strategies.threshold_node import load_state, node_keys
from strategies.threshold_paillier import KeyShare, combine, partial_decrypt
from strategies.screening import NoUsableUpdate
from strategies.threshold_protocol import (DecryptRequest, GroupKey, SealError, ThresholdRefused,
                                           View, check_request, decrypt_share, open_model,
                                           sealed_run, sign_view)
from tests.helpers import CLIP, IDENTITY, SHAPES, new_context
from tests.helpers.threshold import (HOLDERS, NODES, expected, forged_partial, held_secrets,
                                     local_model, node_config, weight)


class Node:
    """A node running the real mod around a train function that returns its local
    model; ``silent`` names a stage it never answers; ``tamper(stage, reply)`` may
    rewrite a reply; ``received`` keeps the arrays its app was given."""

    def __init__(self, node: int, config: dict, silent: str = "", tamper=None) -> None:
        self.node, self.silent, self.tamper = node, silent, tamper
        self.context = new_context(node)
        self.context.node_config.update(config)
        self.received: list[dict[str, np.ndarray]] = []

    def train(self, msg: Message, context: Context) -> Message:
        self.received.append(record_arrays(next(iter(msg.content.array_records.values()))))
        return Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in local_model(self.node).items()}),
            "metrics": MetricRecord({"num-examples": weight(self.node), "train-loss": 0.5})}),
            reply_to=msg)

    def handle(self, msg: Message) -> Message | None:
        record = msg.content.config_records.get(STAGE_KEY)
        stage = record["stage"] if record is not None else "train"
        if stage == self.silent:
            return None
        reply = threshold_paillier_mod(msg, self.context, self.train)
        if self.tamper is not None:
            self.tamper(stage, msg, reply, self)
        return reply


class FakeGrid:
    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = {n.node: n for n in nodes}
        self.sent: list[Message] = []
        self.run_id: int | None = None  # a run id for the messages (as another run's grid)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        self.sent += messages
        for msg in messages if self.run_id is not None else []:
            msg.metadata.__dict__["_run_id"] = self.run_id
        replies = [(m, self.nodes[m.metadata.dst_node_id].handle(m)) for m in messages]
        for msg, reply in replies:
            if reply is not None:
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        return [r for _, r in replies if r is not None]


@pytest.fixture(scope="module")
def keydir(threshold_key_dir) -> Path:
    IDENTITY.register(NODES + [999])
    return threshold_key_dir


def make_nodes(keydir: Path, per_node: dict | None = None) -> list[Node]:
    return [Node(u, node_config(keydir, u), **(per_node or {}).get(u, {})) for u in NODES]


def strategy_for(keydir: Path, nodes: list[Node], **kwargs) -> ThresholdPaillierFedAvg:
    return ThresholdPaillierFedAvg(load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME),
                                   clip=CLIP, min_available_nodes=len(nodes),
                                   min_train_nodes=len(nodes), **kwargs)


def initial() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def run_round(strategy, grid, server_round: int, arrays: ArrayRecord):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}),
                                             grid))
    return strategy.aggregate_train(server_round, grid.send_and_receive(messages))


def assert_average(arrays: list[np.ndarray], nodes: list[int], strategy) -> None:
    for value, exp in zip(arrays, expected(nodes), strict=True):
        np.testing.assert_allclose(value, exp, rtol=0, atol=strategy.params.max_error() + 1e-6)


@pytest.mark.parametrize("payload", ["masked", "paillier"])
def test_a_round_seals_the_weighted_average_for_the_clients_only(keydir, task_identity,
                                                                 payload):
    sent = []

    def keep(stage, msg, reply, node):
        if stage == "train":
            sent.append(set(record_arrays(next(iter(reply.content.array_records.values())))))

    nodes = make_nodes(keydir, {u: {"tamper": keep} for u in NODES})
    strategy, grid = strategy_for(keydir, nodes, payload=payload), FakeGrid(nodes)
    arrays, metrics = run_round(strategy, grid, 1, initial())
    # each node sent its update masked, or packed, as the strategy asked
    assert len(sent) == 4 and all(("paillier-masked" in arrays_sent) == (payload == "masked")
                                  for arrays_sent in sent)
    sealed = record_arrays(arrays)
    group = load_group_key(keydir / GROUP_KEY_NAME)
    _, plain, means, server_round = open_model(group, sealed, run=1)
    assert server_round == 1
    assert_average(plain, NODES, strategy)
    assert means["train-loss"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(SealError):  # the server, or anyone without the group key
        open_model(GroupKey(bytes(32), group.fingerprint), sealed, run=1)
    with pytest.raises(SealError):  # bound to its run
        open_model(group, sealed, run=2)
    stages = [m.content.config_records[STAGE_KEY]["stage"] for m in grid.sent
              if STAGE_KEY in m.content.config_records]
    assert stages.count("view") == 4 and stages.count("decrypt") == 3  # T + 1 extra
    assert stages.count("combine") == 1
    # round 2: every node's app gets the plaintext average; the server only sealed bytes
    arrays2, _ = run_round(strategy, grid, 2, arrays)
    for node in nodes:
        assert_average(list(node.received[-1].values()), NODES, strategy)
    assert open_model(group, record_arrays(arrays2), run=1)[3] == 2


def test_the_server_holds_no_share_no_group_key_and_no_model(keydir, task_identity):
    nodes = make_nodes(keydir)
    strategy, grid = strategy_for(keydir, nodes), FakeGrid(nodes)
    arrays, _ = run_round(strategy, grid, 1, initial())
    assert held_secrets([strategy, arrays], keydir) == []
    # and the average is nowhere in what the server holds in plaintext
    flat = np.concatenate([a.ravel() for a in expected(NODES)]).astype(np.float32)
    assert flat[:8].tobytes() not in np.asarray(record_arrays(arrays)["threshold-sealed-model"]
                                                ).tobytes()


def _forge(stage, msg, reply, node):
    """A decryptor holding the group key seals a wrong partial: one value changed."""
    if stage != "decrypt":
        return
    keys = node_keys(node.context)
    blob = record_arrays(reply.content.array_records["partial"])["bytes"].tobytes()
    sealed = forged_partial(keys, _decrypt_request(msg, keys), blob)
    reply.content["partial"] = ArrayRecord({"bytes": Array(np.frombuffer(sealed, np.uint8)
                                                            .copy())})


def test_a_forged_partial_is_left_out_and_named_and_the_round_finishes(keydir, task_identity,
                                                                        flwr_caplog):
    nodes = make_nodes(keydir, {101: {"tamper": _forge}})
    strategy, grid = strategy_for(keydir, nodes), FakeGrid(nodes)
    # the forger answers first, so it is asked to combine first too: it leaves itself out
    arrays, _ = run_round(strategy, grid, 1, initial())
    assert arrays is not None
    _, plain, _, _ = open_model(load_group_key(keydir / GROUP_KEY_NAME), record_arrays(arrays),
                                run=1)
    assert_average(plain, NODES, strategy)
    assert "partial decryptions of nodes [101] failed their proofs" in flwr_caplog.text


def _unproven(stage, msg, reply, node):
    """A node signs its update with a proof that does not fit it (what a colluder that
    derived its ciphertexts from others' would be left with)."""
    from strategies.paillier_protocol import EncryptedModel
    from strategies.plaintext_proofs import PlaintextProof
    from strategies.threshold_protocol import _statement

    if stage != "train":
        return
    keys = node_keys(node.context)
    fields = reply.content.config_records[STAGE_KEY]
    proof = PlaintextProof.from_text(fields["proof"])
    proof = dataclasses.replace(proof, z_message=(proof.z_message + 1) % int(keys.public.n))
    model = EncryptedModel.from_arrays(record_arrays(next(iter(
        reply.content.array_records.values()))), keys.public)
    fields["proof"] = proof.to_text()
    fields["signature"] = keys.identity.key.sign(_statement(model, proof)).hex()


def test_an_update_without_a_valid_proof_is_left_out_and_the_round_finishes(
        keydir, task_identity, flwr_caplog):
    nodes = make_nodes(keydir, {101: {"tamper": _unproven}})
    strategy, grid = strategy_for(keydir, nodes), FakeGrid(nodes)
    arrays, _ = run_round(strategy, grid, 1, initial())
    _, plain, _, _ = open_model(load_group_key(keydir / GROUP_KEY_NAME), record_arrays(arrays),
                                run=1)
    assert_average(plain, [202, 303, 404], strategy)
    assert "the proof that the sender knows its plaintexts does not verify" in flwr_caplog.text


def test_a_reply_refused_for_its_proof_takes_no_weight_from_the_round(keydir):
    """A node that claims a large weight with a proof that fails is left out before it
    counts: the honest replies after it still fit the round's weight budget (64)."""
    from strategies.aggregation import InvalidUpdate, Layout
    from strategies.paillier_node import round_config
    from strategies.threshold_node import contribute
    from strategies.threshold_protocol import Contribution, _statement
    from strategies.threshold_rounds import Signed

    strategy = strategy_for(keydir, NODES, max_total_weight=64)
    model = local_model(101)
    strategy._layout = Layout.of(list(model), list(model.values()))
    config = round_config(strategy.params, strategy.public_key.fingerprint, 1, 1,
                          masked=strategy.masked)
    made = {}
    for u, examples in ((101, 60), (202, 20), (303, 20), (404, 20)):
        context = new_context(u)
        context.node_config.update(node_config(keydir, u))
        model = local_model(u)
        made[u] = contribute(config, list(model), list(model.values()), examples,
                             node_keys(context), context, run=1)
    bad = made[101]
    proof = dataclasses.replace(bad.proof, z_message=bad.proof.z_message + 1)
    made[101] = Contribution(bad.model, proof,
                             IDENTITY(101).key.sign(_statement(bad.model, proof)))
    round_sum, signed = strategy._round_sum(1), {}
    with pytest.raises(InvalidUpdate, match="proof that the sender knows"):
        strategy._accept(round_sum, signed, 101, made[101].model.to_arrays(), Signed(
            IDENTITY(101).key.public, made[101].signature, made[101].proof, 1))
    for u in (202, 303, 404):
        strategy._accept(round_sum, signed, u, made[u].model.to_arrays(), Signed(
            IDENTITY(u).key.public, made[u].signature, made[u].proof, 0))
    assert sorted(signed) == [202, 303, 404] and round_sum.total_weight == 60


# ------------------------------------------------------------------ attacks on the core


@pytest.fixture(scope="module", params=["masked", "paillier"])
def contributions(keydir, request):
    """Each node's real round-1 contribution and signature, made by the node code, and
    the nodes' contexts after it; for each payload."""
    from strategies.paillier_node import round_config
    from strategies.threshold_node import contribute

    strategy = strategy_for(keydir, NODES, payload=request.param)
    config = round_config(strategy.params, strategy.public_key.fingerprint, 1, 1,
                          masked=strategy.masked)
    out, contexts = {}, {}
    for u in NODES:
        contexts[u] = new_context(u)
        contexts[u].node_config.update(node_config(keydir, u))
        model = local_model(u)
        out[u] = contribute(config, list(model), list(model.values()), weight(u),
                            node_keys(contexts[u]), contexts[u], run=1)
    return out, contexts, strategy


def view_of(keydir, contributions, nodes) -> View:
    out, contexts, strategy = contributions
    return View(1, 1, strategy.public_key.fingerprint, tuple(
        (u, IDENTITY(u).key.public, out[u].model.digest()) for u in sorted(nodes)))


def request_of(contributions, view: View) -> DecryptRequest:
    out, _, _ = contributions
    nodes = [e[0] for e in view.entries]
    return DecryptRequest(view, {IDENTITY(u).key.public: IDENTITY(u).key.sign(view.statement())
                                 for u in nodes}, {u: out[u] for u in nodes})


def share(keydir, index: int) -> KeyShare:
    return load_key_share(keydir / threshold_share_name(index))


def test_decryptors_refuse_an_aggregate_of_t_or_fewer_contributions(keydir, contributions):
    roster = IDENTITY(101).roster
    public = contributions[2].public_key
    for nodes in ([404], [303, 404]):  # one client's update as "the aggregate"; T = 2
        with pytest.raises(ThresholdRefused, match="at least 3"):
            check_request(public, roster, request_of(contributions,
                                                     view_of(keydir, contributions, nodes)),
                          minimum=2)
    check_request(public, roster, request_of(contributions,
                                             view_of(keydir, contributions, [202, 303, 404])),
                  minimum=2)
    with pytest.raises(ThresholdRefused, match="at least 4"):  # the node's own minimum
        check_request(public, roster, request_of(contributions,
                                                 view_of(keydir, contributions, [202, 303, 404])),
                      minimum=4)


def test_subset_differencing_reveals_an_update_without_the_checks_and_fails_with_them(
        keydir, contributions):
    out, contexts, strategy = contributions
    public, group = strategy.public_key, load_group_key(keydir / GROUP_KEY_NAME)
    all_four = aggregate(public, [out[u].model for u in NODES])
    three = aggregate(public, [out[u].model for u in (101, 202, 303)])
    # the attack, with the raw core and no checks: two honest decryptions, one difference
    plain = []
    for model in (all_four, three):
        cts = ciphertexts_from_array(public, model.ciphertexts)
        partials = [partial_decrypt(share(keydir, i), cts, b"x") for i in (1, 2)]
        plain.append(combine(public, cts, partials, b"x")[0])
    alone = aggregate(public, [out[404].model])
    cts = ciphertexts_from_array(public, alone.ciphertexts)
    truth = combine(public, cts, [partial_decrypt(share(keydir, i), cts, b"x") for i in (1, 2)],
                    b"x")[0]
    assert [(a - b) % int(public.n) for a, b in zip(*plain)] == truth  # node 404's update
    # with the checks: a contributor signs one view per round ...
    view4, view3 = (view_of(keydir, contributions, n) for n in (NODES, [101, 202, 303]))
    signed: dict = {}
    own = load_state(contexts[101])["own"]
    sign_view(view4, IDENTITY(101), own, signed, minimum=2, threshold=2)
    sign_view(view4, IDENTITY(101), own, signed, minimum=2, threshold=2)  # again: same view
    with pytest.raises(ThresholdRefused, match="another view"):
        sign_view(view3, IDENTITY(101), own, signed, minimum=2, threshold=2)
    # ... and a decryptor decrypts one view per round, even one signed by everyone
    decrypted: dict = {}
    roster = IDENTITY(101).roster
    decrypt_share(share(keydir, 1), group, roster, request_of(contributions, view4), decrypted,
                  minimum=2)
    with pytest.raises(ThresholdRefused, match="one per round"):
        decrypt_share(share(keydir, 1), group, roster, request_of(contributions, view3),
                      decrypted, minimum=2)


def test_a_contribution_the_server_made_or_altered_is_refused(keydir, contributions):
    out, _, strategy = contributions
    public, roster = strategy.public_key, IDENTITY(101).roster
    view = view_of(keydir, contributions, [202, 303, 404])
    request = request_of(contributions, view)
    # the server swaps 404's ciphertexts for 303's (its own encryption would do the same)
    swapped = dataclasses.replace(out[404].model, ciphertexts=out[303].model.ciphertexts)
    with pytest.raises(ThresholdRefused, match="node 404's contribution is not the one"):
        check_request(public, roster, dataclasses.replace(
            request, contributions={**request.contributions,
                                    404: dataclasses.replace(out[404], model=swapped)}),
            minimum=2)
    # a view signature missing, or made by another identity
    signatures = dict(request.view_signatures)
    signatures[IDENTITY(404).key.public] = IDENTITY(999).key.sign(view.statement())
    with pytest.raises(ThresholdRefused, match="node 404 did not sign this view"):
        check_request(public, roster, dataclasses.replace(request, view_signatures=signatures),
                      minimum=2)
    # an identity outside the roster (the server's own key)
    from strategies.secagg_identity import Identity
    stranger = Identity.generate()
    forged_view = View(1, 1, public.fingerprint, tuple(
        (u, stranger.public if u == 404 else k, d) for u, k, d in view.entries))
    with pytest.raises(ThresholdRefused, match="outside the federation's roster"):
        check_request(public, roster, request_of(contributions, forged_view), minimum=2)


def colluding_contribution(keydir, contributions, colluder: int, cancelled: list[int]):
    """What a client colluding with the server can sign as its own contribution, given
    the honest ones: its own update, times the inverse of each ``cancelled`` node's,
    times a fresh encryption of a zero update of that node's weight (its group key makes
    the tag), so the view's aggregate holds the cancelled nodes as zero updates (masked
    payload: the same on the secrets' ciphertexts, and on the masked vectors, which are
    plain integers to anyone). Also the best proof it can make: over every plaintext and
    randomizer it knows (its own and the zero updates'), all but the cancelled nodes'."""
    from strategies.paillier_protocol import encrypt_update
    from strategies.plaintext_proofs import ProvingEncryptor, prove_plaintexts
    from strategies.threshold_paillier import ThresholdEncryptor
    from strategies.threshold_protocol import Contribution, _statement, proof_context

    out, _, strategy = contributions
    public, group = strategy.public_key, load_group_key(keydir / GROUP_KEY_NAME)
    honest = out[colluder].model

    def encrypted(arrays, node):
        prover = ProvingEncryptor(ThresholdEncryptor(public))
        model = encrypt_update(arrays, honest.layout, out[node].model.total_weight,
                               honest.params, prover, group.tag_key(public.n), run=1,
                               server_round=1, node=node, masked=bool(honest.masks))
        return prover, model.masked

    own, masked = encrypted(list(local_model(colluder).values()), colluder)
    rows, known = list(own.ciphertexts), list(zip(own.plaintexts, own.randomizers))
    for node in cancelled:
        zero, zero_masked = encrypted([np.zeros(s, np.float32) for s in honest.layout.shapes],
                                      node)
        theirs = ciphertexts_from_array(public, out[node].model.ciphertexts)
        for j, c in enumerate(theirs):
            rows[j] = rows[j] * zero.ciphertexts[j] * pow(int(c), -1, int(public.nsquare)) \
                % public.nsquare
            known[j] = ((known[j][0] + zero.plaintexts[j]) % int(public.n),
                        known[j][1] + zero.randomizers[j])
        if masked is not None:  # modulo the ring's 2^bits
            masked = (masked + zero_masked - out[node].model.masked) \
                & np.uint64((1 << honest.ring.bits) - 1)
    crafted = dataclasses.replace(honest, ciphertexts=ciphertexts_to_array(public, rows),
                                  masked=masked)
    proof = prove_plaintexts(public, *zip(*known), rows, proof_context(crafted))
    signature = IDENTITY(colluder).key.sign(_statement(crafted, proof))
    return Contribution(crafted, proof, signature)


def test_a_colluding_client_cannot_cancel_the_others_to_isolate_an_update(
        keydir, contributions, monkeypatch):
    """Server + one client (k = 1 <= T - 1): the colluder signs, as its contribution,
    its update minus the other honest ones (Paillier is malleable), so the view
    {101, 202, 303, 404} adds up to 101's and 404's updates only, and the colluder, who
    gets the model like every client, subtracts its own. Signatures and tags let it
    through; the proof that a contributor knows its plaintexts does not."""
    from strategies.threshold_protocol import Contribution, _statement, combine_sealed

    out, _, strategy = contributions
    public, group = strategy.public_key, load_group_key(keydir / GROUP_KEY_NAME)
    roster, colluder, target = IDENTITY(101).roster, 101, 404
    crafted = colluding_contribution(keydir, contributions, colluder, [202, 303])
    view = View(1, 1, public.fingerprint, tuple(
        (u, IDENTITY(u).key.public, (crafted if u == colluder else out[u]).model.digest())
        for u in NODES))
    request = DecryptRequest(view, {IDENTITY(u).key.public: IDENTITY(u).key.sign(
        view.statement()) for u in NODES}, {**{u: out[u] for u in NODES}, colluder: crafted})
    # the attack works if the proof is not checked: two honest decryptors decrypt ...
    with monkeypatch.context() as patch:
        patch.setattr("strategies.threshold_protocol.verify_plaintexts", lambda *args: None)
        sealed = {i: decrypt_share(share(keydir, i), group, roster, request, {}, minimum=2)
                  for i in (2, 3)}
        model = check_request(public, roster, request, minimum=2)
        opened = open_model(group, combine_sealed(public, group, model, sealed)[0], run=1)[1]
    # ... and the colluder takes its own update out of the model: node 404's remains
    w = {u: out[u].model.total_weight for u in NODES}
    own, truth = local_model(colluder), local_model(target)
    for name, got in zip(own, opened):
        recovered = (got * sum(w.values()) - w[colluder] * own[name]) / w[target]
        np.testing.assert_allclose(recovered, truth[name], atol=1e-3)
    # with the check, the decryptors refuse the view and the server the update
    for decryptor in (2, 3):
        with pytest.raises(ThresholdRefused, match="node 101's contribution is refused: the "
                                                   "proof that the sender knows"):
            decrypt_share(share(keydir, decryptor), group, roster, request, {}, minimum=2)
    assert crafted.fault(public, IDENTITY(colluder).key.public).startswith(
        "the proof that the sender knows its plaintexts does not verify")
    # its honest contribution's proof does not fit the crafted ciphertexts either
    reused = Contribution(crafted.model, out[colluder].proof, IDENTITY(colluder).key.sign(
        _statement(crafted.model, out[colluder].proof)))
    assert "does not verify" in reused.fault(public, IDENTITY(colluder).key.public)


def test_a_contribution_replayed_into_another_round_is_refused(keydir, contributions):
    out, contexts, strategy = contributions
    round2 = View(1, 2, strategy.public_key.fingerprint, tuple(
        (u, IDENTITY(u).key.public, out[u].model.digest()) for u in (202, 303, 404)))
    with pytest.raises(ThresholdRefused, match="contributed to no such round"):
        sign_view(round2, IDENTITY(202), load_state(contexts[202])["own"], {}, minimum=2,
                  threshold=2)
    with pytest.raises(ThresholdRefused, match="made for another run, round or node"):
        check_request(strategy.public_key, IDENTITY(101).roster,
                      request_of(contributions, round2), minimum=2)


def test_the_combiner_refuses_an_aggregate_the_partials_were_not_made_for(keydir,
                                                                          contributions):
    from strategies.threshold_protocol import combine_sealed

    out, _, strategy = contributions
    public, group = strategy.public_key, load_group_key(keydir / GROUP_KEY_NAME)
    roster = IDENTITY(101).roster
    request = request_of(contributions, view_of(keydir, contributions, [202, 303, 404]))
    sealed = {i: decrypt_share(share(keydir, i), group, roster, request, {}, minimum=2)
              for i in (1, 2)}
    honest = check_request(public, roster, request, minimum=2)
    model, bad = combine_sealed(public, group, honest, sealed)
    assert bad == [] and open_model(group, model, run=1)[3] == 1
    lone = dataclasses.replace(honest, ciphertexts=out[404].model.ciphertexts)  # one update
    with pytest.raises(ThresholdRefused, match="cannot decrypt"):
        combine_sealed(public, group, lone, sealed)


def test_a_node_without_a_share_or_without_the_group_key_fails_closed(keydir, task_identity,
                                                                      tmp_path):
    from strategies.threshold_node import answer_decrypt

    context = new_context(404)
    context.node_config.update(node_config(keydir, 404))
    with pytest.raises(NodeError, match="holds no key share"):
        answer_decrypt(None, node_keys(context), context)
    context.node_config["paillier-group-key"] = str(tmp_path / "missing.key")
    with pytest.raises(NodeError, match="missing.key"):
        node_keys(context)


def test_a_contributor_that_does_not_sign_the_view_skips_the_round(keydir, task_identity,
                                                                   flwr_caplog):
    nodes = make_nodes(keydir, {404: {"silent": "view"}})
    strategy = strategy_for(keydir, nodes, max_empty_rounds=2)
    arrays, _ = run_round(strategy, FakeGrid(nodes), 1, initial())
    assert arrays is None
    assert "node 404 did not sign the view" in flwr_caplog.text


def test_too_few_decryptors_skip_the_round(keydir, task_identity, flwr_caplog):
    nodes = make_nodes(keydir, {101: {"silent": "decrypt"}, 202: {"silent": "decrypt"}})
    arrays, _ = run_round(strategy_for(keydir, nodes, max_empty_rounds=2), FakeGrid(nodes), 1,
                          initial())
    assert arrays is None
    assert "1 partial decryptions, 2 needed" in flwr_caplog.text


def test_the_strategy_takes_only_a_threshold_public_key(keydir, keypair):
    with pytest.raises(ValueError, match="ThresholdPublicKey"):
        ThresholdPaillierFedAvg(keypair[0], clip=CLIP)
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    with pytest.raises(ValueError, match="payload must be one of masked, paillier"):
        ThresholdPaillierFedAvg(public, clip=CLIP, payload="ckks")
    # sums of 44-bit slots do not fit the ring masks' 43-bit message range; packed they do
    with pytest.raises(ValueError, match="44-bit slots do not fit the masked payload"):
        ThresholdPaillierFedAvg(public, clip=CLIP, max_total_weight=2**28)
    assert not ThresholdPaillierFedAvg(public, clip=CLIP, max_total_weight=2**28,
                                       payload="paillier").masked


def _bad_signature(stage, msg, reply, node):
    if stage == "train":
        record = reply.content.config_records[STAGE_KEY]
        record["signature"] = bytes(64).hex()


def test_an_update_whose_signature_fails_is_left_out_before_the_view(keydir, task_identity,
                                                                     flwr_caplog):
    """A node whose signature does not verify is left out, naming it; the round goes on
    with the three others (T + 1 = 3)."""
    nodes = make_nodes(keydir, {202: {"tamper": _bad_signature}})
    strategy = strategy_for(keydir, nodes)
    arrays, _ = run_round(strategy, FakeGrid(nodes), 1, initial())
    assert "Left out the reply of node 202" in flwr_caplog.text
    _, plain, _, _ = open_model(load_group_key(keydir / GROUP_KEY_NAME), record_arrays(arrays),
                                run=1)
    assert_average(plain, [101, 303, 404], strategy)


def test_a_restarted_server_goes_on_from_the_sealed_checkpoint(keydir, task_identity):
    """Resume: a new strategy (a restarted ServerApp) gets the sealed model of the last
    finished round from the checkpoint; it learns the share holders again from the next
    train replies and the round completes, from the model the nodes opened."""
    nodes = make_nodes(keydir)
    grid = FakeGrid(nodes)
    arrays, _ = run_round(strategy_for(keydir, nodes), grid, 1, initial())
    checkpoint = {k: np.array(v) for k, v in record_arrays(arrays).items()}  # as saved
    restarted = strategy_for(keydir, nodes)
    resumed = ArrayRecord({k: Array(v) for k, v in checkpoint.items()})
    arrays2, _ = run_round(restarted, grid, 2, resumed)
    assert restarted.share_holders == HOLDERS
    for node in nodes:  # round 2 trained from round 1's average
        assert_average(list(node.received[-1].values()), NODES, restarted)
    assert open_model(load_group_key(keydir / GROUP_KEY_NAME), record_arrays(arrays2),
                      run=1)[3] == 2


def test_a_resumed_run_opens_the_sealed_model_of_the_run_it_resumes(keydir, task_identity):
    """A server restarted on real nodes resumes under a new run id, while the checkpoint's
    model is sealed for the old run: nodes refuse to open it unless the round names the
    run it resumes (the ServerApp sets ``resumed_run`` from the checkpoint), and then
    the round completes from it."""
    nodes = make_nodes(keydir)
    grid = FakeGrid(nodes)
    arrays, _ = run_round(strategy_for(keydir, nodes), grid, 1, initial())
    checkpoint = {k: np.array(v) for k, v in record_arrays(arrays).items()}
    first = sealed_run(checkpoint)
    grid.run_id = first + 1

    def resumed() -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in checkpoint.items()})

    with pytest.raises(NoUsableUpdate, match=f"the sealed model is of run {first}, this is "
                                             f"run {first + 1}"):
        run_round(strategy_for(keydir, nodes), grid, 2, resumed())
    restarted = strategy_for(keydir, nodes)
    restarted.resumed_run = first
    arrays2, _ = run_round(restarted, grid, 2, resumed())
    for node in nodes:  # round 2 trained from round 1's average
        assert_average(list(node.received[-1].values()), NODES, restarted)
    assert open_model(load_group_key(keydir / GROUP_KEY_NAME), record_arrays(arrays2),
                      run=first + 1)[3] == 2
