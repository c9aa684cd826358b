"""The Paillier strategy and mod of the legacy API (strategies.paillier_legacy) with
replies built by hand: valid replies add up to the weighted average, bad ones are
left out with the client named, the wire format survives Flower's conversions, and
the mod fails closed."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import (Code, EvaluateIns, FitIns, FitRes, Parameters, Status, ndarray_to_bytes,
                         ndarrays_to_parameters)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from hypothesis import given
from hypothesis import strategies as st

from strategies.keyfiles import KEY_DIR_ENV, load_private_key, write_keypair
from strategies.legacy_wire import layout_of
from strategies.paillier_legacy import (TENSOR_TYPE, LegacyPaillierFedAvg, legacy_paillier_mod,
                                        parameters_arrays, to_parameters)
from strategies.paillier_node import round_config
from strategies.paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, EncryptedModel,
                                          decrypt_model)
from tests.helpers import CLIP
from tests.helpers import fuzzing
from tests.helpers.fakes import FakeProxy
from tests.helpers.fuzzing import (BAD_WEIGHTS, WEIGHTS, client_manager, fuzz, garbage,
                                   mutated_bytes, no_hang, warnings_of)
from tests.helpers.paillier import (assert_weighted_average_of_good, encrypted_arrays, find_secrets,
                                    foreign_arrays, global_model, model, truncated,
                                    with_big_row)


def raw_parameters(arrays: dict[str, np.ndarray]) -> Parameters:
    """Arrays as a client would send them, checked by nobody."""
    return Parameters(tensors=[ndarray_to_bytes(arrays[CIPHERTEXTS_KEY]),
                               ndarray_to_bytes(arrays[HEADER_KEY])], tensor_type=TENSOR_TYPE)


def fit_res(parameters: Parameters, n: int, loss: float = 1.0) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=parameters, num_examples=n,
                  metrics={"train-loss": loss})


def legacy_strategy(keypair, **kwargs) -> tuple[LegacyPaillierFedAvg, SimpleClientManager]:
    fit_config = {"lr": 0.1}
    strategy = LegacyPaillierFedAvg(
        keypair[0], clip=CLIP, min_fit_clients=1, min_evaluate_clients=1,
        min_available_clients=1,
        on_fit_config_fn=lambda rnd: fit_config,
        fit_metrics_aggregation_fn=lambda rs: {
            "train-loss": sum(n * m["train-loss"] for n, m in rs) / sum(n for n, _ in rs)},
        **kwargs)
    manager = SimpleClientManager()
    for node in range(1, 9):
        manager.register(FakeProxy(node))
    pairs = strategy.configure_fit(1, ndarrays_to_parameters(list(model(0.0).values())), manager)
    assert pairs and all(ins.config["paillier-fingerprint"] == keypair[0].fingerprint
                         and ins.config["lr"] == 0.1 for _, ins in pairs)
    assert fit_config == {"lr": 0.1}  # the user's dict is left alone
    return strategy, manager


def test_legacy_strategy_aggregates_valid_replies_and_names_bad_ones(keypair, other_public_key,
                                                                     flwr_caplog):
    strategy, _ = legacy_strategy(keypair)

    def enc(m, n, node):
        arrays = list(m.values())
        return encrypted_arrays(keypair, arrays, layout_of(arrays).names, n, strategy, node)

    params = raw_parameters
    good = [model(0.5, seed=1), model(-0.25, seed=2)]
    valid = to_parameters(EncryptedModel.from_arrays(enc(good[0], 10, 1), keypair[0]))
    cut_bytes = Parameters(tensors=[valid.tensors[0][:-7], valid.tensors[1]],
                           tensor_type=TENSOR_TYPE)
    plain = list(good[0].values())
    results = [(FakeProxy(1), fit_res(valid, 10, loss=1.0)),
               (FakeProxy(2), fit_res(params(enc(good[1], 30, 2)), 30, loss=2.0)),
               (FakeProxy(1), fit_res(params(enc(model(1.5), 10, 1)), 10)),  # second reply
               (FakeProxy(3), fit_res(params(foreign_arrays(
                   other_public_key, plain, layout_of(plain).names, 10, strategy.params, 3)),
                   10)),
               (FakeProxy(4), fit_res(params(truncated(enc(good[0], 10, 4))), 10)),
               (FakeProxy(5), fit_res(params(with_big_row(enc(good[0], 10, 5))), 10)),
               (FakeProxy(6), fit_res(ndarrays_to_parameters(plain), 10)),  # plaintext
               (FakeProxy(7), fit_res(cut_bytes, 10))]  # tensor bytes cut short
    flwr_caplog.clear()
    parameters, metrics = strategy.aggregate_fit(1, results, [RuntimeError("node 8 is gone")])

    assert parameters.tensor_type == TENSOR_TYPE
    assert_weighted_average_of_good(parameters_arrays(parameters), keypair, good, strategy)
    assert metrics["train-loss"] == pytest.approx(1.75)
    warnings = [r.getMessage() for r in flwr_caplog.records if r.levelno == logging.WARNING]
    for client, why in [(1, "second reply"), (3, "another key pair"), (4, "got (4, 511)"),
                        (5, "n^2"), (6, "not encrypted"), (7, "data complete"),
                        (8, "node 8 is gone")]:
        assert any((f"client {client} " in w or f"node {client} " in w) and why in w
                   for w in warnings), (client, warnings)
    assert len(set(warnings)) == 7
    assert strategy.evaluate(1, parameters) is None
    assert find_secrets(strategy, keypair[1]) == []


def test_legacy_strategy_refuses_overflow_and_central_evaluation(keypair, flwr_caplog):
    with pytest.raises(ValueError, match="evaluate_fn"):
        LegacyPaillierFedAvg(keypair[0], clip=CLIP, evaluate_fn=lambda *a: (0.0, {}))
    with pytest.raises(ValueError, match="PublicKey"):
        LegacyPaillierFedAvg(keypair[1], clip=CLIP)
    strategy, _ = legacy_strategy(keypair, max_total_weight=64)
    plain = list(model(0.1).values())

    def update(node, n):
        return to_parameters(EncryptedModel.from_arrays(encrypted_arrays(
            keypair, plain, layout_of(plain).names, n, strategy, node), keypair[0]))

    out, _ = strategy.aggregate_fit(1, [(FakeProxy(1), fit_res(update(1, 40), 40)),
                                        (FakeProxy(2), fit_res(update(2, 40), 40)),
                                        (FakeProxy(3), fit_res(update(3, 20), 20))], [])
    summed = EncryptedModel.from_arrays(parameters_arrays(out), keypair[0])
    assert dict(summed.contributors) == {1: 40, 3: 20}
    assert any("client 2" in r.getMessage() and "past 64" in r.getMessage()
               for r in flwr_caplog.records)


def test_legacy_wire_format_survives_flowers_conversions(keypair):
    """Parameters -> ArrayRecord -> protobuf -> ArrayRecord -> Parameters, byte for byte."""
    from flwr.common.serde import array_record_from_proto, array_record_to_proto

    plain = list(model(0.3).values())
    update = global_model(keypair, plain, layout_of(plain),
                          LegacyPaillierFedAvg(keypair[0], clip=CLIP).params)
    record = compat.parameters_to_arrayrecord(to_parameters(update), keep_input=True)
    back = compat.arrayrecord_to_parameters(
        array_record_from_proto(array_record_to_proto(record)), keep_input=True)
    assert back.tensor_type == TENSOR_TYPE
    arrived = parameters_arrays(back)
    for k, v in update.to_arrays().items():
        assert arrived[k].dtype == v.dtype and np.array_equal(arrived[k], v)
    assert EncryptedModel.from_arrays(arrived, keypair[0]).digest() == update.digest()


def test_legacy_mod_decrypts_encrypts_and_fails_closed(tmp_path, keypair, task_identity,
                                                       monkeypatch):
    """The mod around Flower's own legacy handler and a NumPyClient."""
    from flwr.client import NumPyClient
    from flwr.client.message_handler.message_handler import handle_legacy_message_from_msgtype

    _, private_path, _ = write_keypair(tmp_path / "keys", n_bits=2048)
    key = load_private_key(private_path)
    monkeypatch.setenv(KEY_DIR_ENV, str(private_path.parent))
    strategy = LegacyPaillierFedAvg(key.public_key, clip=CLIP)
    seen = {}

    class Client(NumPyClient):
        def fit(self, parameters, config):
            seen["fit"] = parameters
            return [p + 0.5 for p in parameters], 20, {"train-loss": 0.5}

        def evaluate(self, parameters, config):
            seen["evaluate"] = parameters
            return 0.25, 20, {}

    def call_next(msg, context):
        return handle_legacy_message_from_msgtype(lambda ctx: Client().to_client(), msg, context)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    start = list(model(0.1, seed=3).values())
    encrypted = global_model((key.public_key, key), start, layout_of(start), strategy.params)

    def fit_message(parameters: Parameters, config: dict) -> Message:
        return Message(content=compat.fitins_to_recorddict(FitIns(parameters, config), True),
                       dst_node_id=1, message_type="train")

    config = round_config(strategy.params, key.fingerprint, 1, 2)
    out = legacy_paillier_mod(fit_message(to_parameters(encrypted), config), context, call_next)
    for got, exp in zip(seen["fit"], start, strict=True):
        np.testing.assert_allclose(got, exp, atol=strategy.params.max_error())
    res = compat.recorddict_to_fitres(out.content, keep_input=True)
    assert res.parameters.tensor_type == TENSOR_TYPE and res.num_examples == 20
    assert res.metrics == {}  # the weight is all the server learns of the node's training
    update = EncryptedModel.from_arrays(parameters_arrays(res.parameters), key.public_key)
    assert dict(update.contributors) == {1: 20} and update.server_round == 2
    for got, exp in zip(decrypt_model(key, update, min_contributors=1)[0], seen["fit"], strict=True):
        np.testing.assert_allclose(got, exp + 0.5, atol=strategy.params.max_error())

    # evaluate: refused (the reply would be the node's own metrics, in plaintext) unless
    # the node allows it, then decrypted too; train metrics are then sent as they are
    msg = Message(content=compat.evaluateins_to_recorddict(
        EvaluateIns(to_parameters(encrypted), {}), True), dst_node_id=1, message_type="evaluate")
    reply = legacy_paillier_mod(msg, context, call_next)
    assert reply.has_error() and "plaintext-metrics=true" in reply.error.reason
    assert "evaluate" not in seen
    context.node_config["plaintext-metrics"] = True
    legacy_paillier_mod(msg, context, call_next)
    assert [a.shape for a in seen["evaluate"]] == [a.shape for a in start]
    out = legacy_paillier_mod(fit_message(to_parameters(encrypted), config), context, call_next)
    res = compat.recorddict_to_fitres(out.content, keep_input=True)
    assert res.metrics == {"train-loss": 0.5, "paillier-clipped": 0.0}
    del context.node_config["plaintext-metrics"]

    # a server without the Paillier strategy: the node refuses to train, nothing is sent
    seen.clear()
    reply = legacy_paillier_mod(fit_message(ndarrays_to_parameters(start), {"lr": 0.1}),
                                context, call_next)
    assert reply.has_error() and "no Paillier parameters" in reply.error.reason
    assert "fit" not in seen

    # a node without its private key answers with the cause and the fix, and trains not
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "empty"))
    reply = legacy_paillier_mod(fit_message(to_parameters(encrypted), config), context,
                                call_next)
    assert reply.has_error() and "no paillier.key.json on this node" in reply.error.reason
    assert "fedapp keygen" in reply.error.reason and "fit" not in seen


# ------------------------------------------------------------------ fuzzing
@fuzz(30)
@given(data=st.data())
def test_legacy_paillier_strategy_leaves_out_bad_replies(keys, paillier, caplog_flwr, data):
    from strategies.paillier_legacy import TENSOR_TYPE, to_parameters

    pk = keys[0]
    strategy = LegacyPaillierFedAvg(pk, clip=CLIP, max_total_weight=1000, min_fit_clients=1,
                                    min_available_clients=1)
    plain = list(paillier["models"][0].values())
    strategy.configure_fit(1, ndarrays_to_parameters(plain), client_manager())
    updates = paillier["legacy_updates"]
    good = [(FakeProxy(i + 1), fuzzing.fit_res(to_parameters(u), w))
            for i, (u, w) in enumerate(zip(updates, WEIGHTS))]
    expected = parameters_arrays(strategy.aggregate_fit(1, good, [])[0])
    tensors = to_parameters(updates[0]).tensors
    kind = data.draw(st.sampled_from(["tensor", "type", "count", "weight"]))
    parameters = Parameters(tensors=list(tensors), tensor_type=TENSOR_TYPE)
    n: object = 7
    if kind == "tensor":
        i = data.draw(st.integers(0, 1))
        parameters.tensors[i] = data.draw(garbage | mutated_bytes(tensors[i]))
    elif kind == "type":
        parameters.tensor_type = data.draw(st.text(max_size=30))
    elif kind == "count":
        parameters.tensors = data.draw(st.lists(st.sampled_from(tensors) | garbage, max_size=4))
    else:
        n = data.draw(st.sampled_from(BAD_WEIGHTS))
    bad = (FakeProxy(9), fuzzing.fit_res(parameters, n))
    caplog_flwr.clear()
    with no_hang():
        out, _ = strategy.aggregate_fit(1, [good[0], bad, good[1]], [])
    got = parameters_arrays(out)
    if EncryptedModel.from_arrays(got, pk).total_weight == sum(WEIGHTS):
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
        assert any("client 9" in w for w in warnings_of(caplog_flwr))
    else:
        assert kind == "tensor" or parameters.tensors == list(tensors), \
            "a malformed reply was aggregated"
