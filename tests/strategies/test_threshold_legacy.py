"""Threshold Paillier on the legacy API (strategies.threshold_legacy) on a real 2048-bit
2-of-3 key: the real strategy and mod, with the nodes run in-process behind fake client
proxies (a NumPyClient under the mod, as Flower's compat layer calls it). Rounds reach
the weighted average, sealed for the clients only; a forged partial is left out; the
decryptors refuse a one-contributor aggregate and a node without a share refuses to
decrypt; nodes without their keys fail closed; the server holds no secret.

The nodes, keys and models are those of tests.helpers.threshold (nodes 101, 202, 303
hold shares 1-3, node 404 none; a round needs T + 1 = 3 contributions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype
from flwr.common import FitIns, GetPropertiesIns, Parameters, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from strategies.keyfiles import (GROUP_KEY_NAME, THRESHOLD_PUBLIC_NAME, load_group_key,
                                 load_threshold_public_key)
from strategies.legacy_wire import load_npy
from strategies.paillier_node import round_config
from strategies.threshold_legacy import (SEALED_TENSOR_TYPE, TENSOR_TYPE,
                                         LegacyThresholdPaillierFedAvg, _decrypt_request,
                                         _request_config, legacy_threshold_paillier_mod,
                                         sealed_arrays)
from strategies.threshold_node import contribute, node_keys
from strategies.threshold_protocol import DecryptRequest, GroupKey, SealError, View, open_model
from tests.helpers import CLIP, IDENTITY, SHAPES, flower_task_identity, new_context
from tests.helpers.threshold import (NODES, expected, forged_partial, held_secrets, local_model,
                                     node_config, weight)

STAGE = "threshold-stage"


class Client(NumPyClient):
    """A node's app: trains to its local model, records the weights it was given, and
    fails the test if its own get_properties is called."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def fit(self, parameters, config):
        self.proxy.received.append(parameters)
        return list(local_model(self.proxy.node_id).values()), weight(self.proxy.node_id), {
            "train-loss": 0.5}

    def evaluate(self, parameters, config):
        self.proxy.evaluated.append(parameters)
        return 1.0, weight(self.proxy.node_id), {}

    def get_properties(self, config):
        raise AssertionError("the mod passed a stage request to the app")


class Proxy(ClientProxy):
    """A legacy client proxy running ``legacy_threshold_paillier_mod`` around
    :class:`Client` in-process; an error reply raises as Flower's proxy does.
    ``silent`` names a stage it never answers; ``tamper(stage, ins, res, proxy)`` may
    rewrite a stage answer; ``inner`` is a mod run inside the threshold mod."""

    def __init__(self, node: int, keydir: Path, silent: str = "", tamper=None,
                 inner=None) -> None:
        super().__init__(str(node))
        self.node_id, self.silent, self.tamper, self.inner = node, silent, tamper, inner
        self.context = new_context(node)
        self.context.node_config.update(node_config(keydir, node))
        self.received: list = []
        self.evaluated: list = []
        self.stages: list[str] = []

    def _call(self, content: RecordDict, message_type: str) -> RecordDict:
        msg = Message(content, dst_node_id=self.node_id, message_type=message_type)

        def app(m: Message, c: Context) -> Message:
            return handle_legacy_message_from_msgtype(lambda _: Client(self).to_client(), m, c)
        inner = self.inner
        reply = legacy_threshold_paillier_mod(
            msg, self.context, (lambda m, c: inner(m, c, app)) if inner else app)
        if reply.has_error():
            raise ValueError(f"Message contains an Error (reason: {reply.error.reason})")
        return reply.content

    def get_properties(self, ins, timeout, group_id):
        stage = ins.config.get(STAGE)
        self.stages.append(stage)
        if stage == self.silent:
            raise TimeoutError(f"node {self.node_id} did not answer")
        res = compat.recorddict_to_getpropertiesres(
            self._call(compat.getpropertiesins_to_recorddict(ins), "get_properties"))
        if self.tamper is not None:
            self.tamper(stage, ins, res, self)
        return res

    def fit(self, ins, timeout, group_id):
        return compat.recorddict_to_fitres(
            self._call(compat.fitins_to_recorddict(ins, True), "train"), False)

    def evaluate(self, ins, timeout, group_id):
        return compat.recorddict_to_evaluateres(
            self._call(compat.evaluateins_to_recorddict(ins, True), "evaluate"))

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


@pytest.fixture(scope="module")
def keydir(threshold_key_dir) -> Path:
    IDENTITY.register(NODES + [999])
    return threshold_key_dir


def federation(keydir: Path, per_node: dict | None = None, **kwargs):
    """Proxies of :data:`NODES`, their client manager and a strategy sampling them all."""
    proxies = [Proxy(u, keydir, **(per_node or {}).get(u, {})) for u in NODES]
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    strategy = LegacyThresholdPaillierFedAvg(
        load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME), clip=CLIP,
        min_fit_clients=len(NODES), min_available_clients=len(NODES), **kwargs)
    return proxies, manager, strategy


def initial() -> Parameters:
    return ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES.values()])


def fit_round(strategy, manager, server_round: int, parameters: Parameters, tamper=None):
    """One round as Flower's legacy server runs it; ``tamper(results)`` may rewrite the
    fit replies before the strategy sees them."""
    results, failures = [], []
    for proxy, ins in strategy.configure_fit(server_round, parameters, manager):
        try:
            results.append((proxy, proxy.fit(ins, None, server_round)))
        except ValueError as err:
            failures.append(err)
    if tamper is not None:
        tamper(results)
    return results, strategy.aggregate_fit(server_round, results, failures)


def opened(keydir: Path, parameters: Parameters, run: int = 1):
    """What a client reads from the sealed model: arrays, metric means, round."""
    _, plain, means, server_round = open_model(load_group_key(keydir / GROUP_KEY_NAME),
                                               sealed_arrays(parameters), run=run)
    return plain, means, server_round


def assert_average(arrays: list[np.ndarray], nodes: list[int], strategy) -> None:
    for value, exp in zip(arrays, expected(nodes), strict=True):
        np.testing.assert_allclose(value, exp, rtol=0, atol=strategy.params.max_error() + 1e-6)


@pytest.fixture(scope="module")
def first_round(keydir, tmp_path_factory):
    """Round 1 of 4 honest nodes from the plaintext initial model, saving the sealed
    model: (proxies, manager, strategy, fit replies, sealed parameters, fit metrics,
    saved file)."""
    saved = tmp_path_factory.mktemp("legacy-threshold") / "final_model.sealed.npz"
    proxies, manager, strategy = federation(
        keydir, save_to=saved,
        fit_metrics_aggregation_fn=lambda rs: {"replies": len(rs), "released-train-loss": min(
            (m.get("released-train-loss", -1.0) for _, m in rs), default=-1.0)})
    with flower_task_identity():
        results, (parameters, metrics) = fit_round(strategy, manager, 1, initial())
    return proxies, manager, strategy, results, parameters, metrics, saved


def test_a_legacy_round_seals_the_weighted_average_for_the_clients_only(keydir, first_round,
                                                                        task_identity, tmp_path,
                                                                        capsys):
    from fedapp import cli

    proxies, manager, strategy, results, parameters, metrics, saved = first_round
    # each fit reply: the update under the threshold key, signed, as .npy uint8 tensors:
    # the secret's ciphertexts, the header and the masked vector (the default payload)
    for proxy, res in results:
        assert res.parameters.tensor_type == TENSOR_TYPE and len(res.parameters.tensors) == 3
        assert all(load_npy(t, "tensor", (np.uint8,)).dtype == np.uint8
                   for t in res.parameters.tensors)
        assert set(res.metrics) == {"threshold-identity", "threshold-signature",
                                    "threshold-proof", "threshold-share"}  # no plaintext
        assert res.metrics["threshold-share"] == {101: 1, 202: 2, 303: 3}.get(proxy.node_id, 0)
    assert strategy.share_holders == {101: 1, 202: 2, 303: 3}
    # the server's new global model is sealed: the clients' group key opens it
    assert parameters.tensor_type == SEALED_TENSOR_TYPE
    plain, means, server_round = opened(keydir, parameters)
    assert server_round == 1 and means["train-loss"] == pytest.approx(0.5, abs=1e-6)
    assert_average(plain, NODES, strategy)
    assert metrics == {"replies": 4, "released-train-loss": -1.0}  # round 1 released nothing
    with pytest.raises(SealError):  # the server, or anyone without the group key
        open_model(GroupKey(bytes(32), strategy.public_key.fingerprint),
                   sealed_arrays(parameters), run=1)
    stages = [s for p in proxies for s in p.stages]  # as get_properties calls
    assert (stages.count("view"), stages.count("decrypt"), stages.count("combine")) == (4, 3, 1)
    # round 2: every app trains from the plain average; the server sends sealed bytes only
    _, (parameters2, metrics2) = fit_round(strategy, manager, 2, parameters)
    for proxy in proxies:
        assert_average(proxy.received[-1], NODES, strategy)
    assert opened(keydir, parameters2)[2] == 2
    assert metrics2["released-train-loss"] == pytest.approx(0.5, abs=1e-6)  # of round 1
    # save_to: the last round's sealed model, opened on a client machine by fedapp decrypt
    out = tmp_path / "model.npz"
    assert cli.main(["decrypt", "--key", str(keydir / GROUP_KEY_NAME), "--model", str(saved),
                     "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as model:
        assert_average([model[k] for k in model.files], NODES, strategy)
    assert '"round": 2' in capsys.readouterr().out


def test_the_legacy_server_holds_no_share_no_group_key_and_no_model(keydir, first_round):
    _, _, strategy, _, parameters, _, _ = first_round
    # the proxies stand for the remote nodes (Flower's hold only the node id)
    assert held_secrets([strategy, parameters], keydir, skip=(ClientProxy,)) == []
    flat = np.concatenate([a.ravel() for a in expected(NODES)]).astype(np.float32)
    assert flat[:8].tobytes() not in b"".join(parameters.tensors)


def test_client_evaluation_opens_the_model_only_where_plaintext_metrics_are_allowed(
        keydir, first_round, task_identity):
    proxies, manager, strategy, _, parameters, _, _ = first_round
    pairs = strategy.configure_evaluate(1, parameters, manager)
    assert pairs and all(ins.parameters.tensor_type == SEALED_TENSOR_TYPE for _, ins in pairs)
    proxy, ins = next((p, i) for p, i in pairs if p.node_id == 404)
    with pytest.raises(ValueError, match="answers no federated evaluation under threshold"):
        proxy.evaluate(ins, None, 1)
    proxy.context.node_config["plaintext-metrics"] = True
    try:
        assert proxy.evaluate(ins, None, 1).loss == 1.0
    finally:
        del proxy.context.node_config["plaintext-metrics"]
    assert_average(proxy.evaluated[-1], NODES, strategy)  # the app got the plain model
    assert strategy.evaluate(1, parameters) is None  # no server-side evaluation


def _forge(stage, ins, res, proxy):
    """A decryptor holding the group key seals a wrong partial: one value changed."""
    if stage == "decrypt":
        keys = node_keys(proxy.context)
        res.properties["threshold-partial"] = forged_partial(
            keys, _decrypt_request(ins.config, keys), res.properties["threshold-partial"])


def test_a_forged_partial_is_left_out_and_named_and_the_round_finishes(keydir, task_identity,
                                                                        flwr_caplog):
    # the forger is the first decryptor, so it is asked to combine first: it names itself
    proxies, manager, strategy = federation(keydir, {101: {"tamper": _forge}})
    _, (parameters, _) = fit_round(strategy, manager, 1, initial())
    assert parameters is not None
    assert_average(opened(keydir, parameters)[0], NODES, strategy)
    assert "partial decryptions of nodes [101] failed their proofs" in flwr_caplog.text


def _break_two(results):
    """Node 101's reply in plaintext (no mod), node 202's signature zeroed."""
    by_node = {proxy.node_id: res for proxy, res in results}
    by_node[101].parameters = ndarrays_to_parameters(list(local_model(101).values()))
    by_node[202].metrics["threshold-signature"] = bytes(64).hex()


def test_too_few_valid_contributors_skip_the_round_and_keep_the_model(keydir, task_identity,
                                                                     flwr_caplog):
    proxies, manager, strategy = federation(keydir, max_empty_rounds=2)
    _, (parameters, metrics) = fit_round(strategy, manager, 1, initial(), tamper=_break_two)
    assert (parameters, metrics) == (None, {})  # Flower keeps the global model
    assert "Left out the reply of client 101 in round 1: tensor type 'numpy.ndarray'" \
        in flwr_caplog.text
    assert "Left out the reply of client 202 in round 1: it is not the one its identity " \
        "signed (the signature does not verify); the decryptors would refuse the round" \
        in flwr_caplog.text
    assert "Round 1 skipped, the model stays as it was: 2 valid updates, the decryptors " \
        "need at least 3 (T + 1)" in flwr_caplog.text
    assert not [s for p in proxies for s in p.stages]  # no stage was run


def test_a_contributor_that_does_not_sign_the_view_skips_the_round(keydir, task_identity,
                                                                   flwr_caplog):
    proxies, manager, strategy = federation(keydir, {404: {"silent": "view"}},
                                            max_empty_rounds=2)
    _, (parameters, _) = fit_round(strategy, manager, 1, initial())
    assert parameters is None
    assert "node 404 failed the view stage: node 404 did not answer" in flwr_caplog.text
    assert "node 404 did not sign the view" in flwr_caplog.text


@pytest.fixture(scope="module")
def lone_request(keydir) -> DecryptRequest:
    """A decryption request for node 404's update alone, signed by node 404, as the
    legacy server would send it."""
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    strategy = LegacyThresholdPaillierFedAvg(public, clip=CLIP)
    context = new_context(404)
    context.node_config.update(node_config(keydir, 404))
    model = local_model(404)
    contribution = contribute(round_config(strategy.params, public.fingerprint, 1, 1),
                              list(model), list(model.values()), weight(404),
                              node_keys(context), context, run=1)
    key = IDENTITY(404).key
    view = View(1, 1, public.fingerprint, ((404, key.public, contribution.model.digest()),))
    return DecryptRequest(view, {key.public: key.sign(view.statement())}, {404: contribution})


def test_decryptors_refuse_a_one_contributor_aggregate(keydir, lone_request, task_identity):
    holder = Proxy(101, keydir)
    with pytest.raises(ValueError, match="lists 1 contributions, this node decrypts "
                                         "aggregates of at least 3"):
        holder.get_properties(GetPropertiesIns(config=_request_config(lone_request)), None, 1)


def test_a_node_without_a_share_refuses_to_decrypt(keydir, lone_request, task_identity):
    with pytest.raises(ValueError, match="this node holds no key share"):
        Proxy(404, keydir).get_properties(
            GetPropertiesIns(config=_request_config(lone_request)), None, 1)


@pytest.mark.parametrize("setting, said", [
    ("paillier-group-key", "threshold Paillier: .*missing.key"),
    ("paillier-threshold-public-key", "threshold Paillier: .*missing.key"),
    ("secagg-identity-key", "identity key.*missing.key"),
    ("secagg-roster", "roster.*missing.key"),
    ("", "sent no Paillier parameters")],
    ids=["group-key", "public-key", "identity-key", "roster", "no-round-config"])
def test_a_node_without_its_keys_fails_closed(keydir, task_identity, tmp_path, setting, said):
    """The node answers with an error naming the cause, and never trains or sends
    plaintext."""
    proxy = Proxy(404, keydir)
    if setting:
        proxy.context.node_config[setting] = str(tmp_path / "missing.key")
    config = {} if not setting else round_config(
        LegacyThresholdPaillierFedAvg(load_threshold_public_key(
            keydir / THRESHOLD_PUBLIC_NAME), clip=CLIP).params, "f" * 64, 1, 1)
    with pytest.raises(ValueError, match=said):
        proxy.fit(FitIns(initial(), config), None, 1)
    assert proxy.received == []  # the app never ran


def test_the_strategy_refuses_server_evaluation_and_a_wrong_key(keydir, keypair):
    public = load_threshold_public_key(keydir / THRESHOLD_PUBLIC_NAME)
    with pytest.raises(ValueError, match="cannot take an evaluate_fn: the server never holds "
                                         "the model"):
        LegacyThresholdPaillierFedAvg(public, clip=CLIP, evaluate_fn=lambda *a: (0.0, {}))
    with pytest.raises(ValueError, match="ThresholdPublicKey"):
        LegacyThresholdPaillierFedAvg(keypair[0], clip=CLIP)


def test_the_global_model_must_be_sealed_or_the_plaintext_initial_one(keydir):
    _, manager, strategy = federation(keydir)
    with pytest.raises(ValueError, match="expected the sealed model"):
        strategy.configure_fit(2, Parameters(tensors=[], tensor_type="paillier-v1/x"), manager)
