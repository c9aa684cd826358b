"""Fast tests of the Paillier strategies of both Flower APIs with replies built by hand:
valid replies add up to the weighted average, bad ones are left out with the node
named, and no strategy object ever holds private key material."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata,
                      MetricRecord, RecordDict)
from flwr.common import (Code, EvaluateIns, FitIns, FitRes, Parameters, Status,
                         ndarray_to_bytes, ndarrays_to_parameters)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager

from fakes import FakeProxy
from strategies.keyfiles import KEY_DIR_ENV, load_private_key, write_keypair
from strategies.paillier import Encryptor, PrivateKey, generate_keypair
from strategies.paillier_message import PaillierFedAvg, as_record
from strategies.paillier_node import encrypt_local_model, round_config
from strategies.records import record_arrays
from strategies.legacy_wire import layout_of
from strategies.paillier_legacy import (TENSOR_TYPE, LegacyPaillierFedAvg, legacy_paillier_mod,
                                        parameters_arrays, to_parameters)
from strategies.paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, EncryptedModel, Layout,
                                          decrypt_model, encrypt_update)

CLIP = 2.0
SHAPES = {"w": (40, 3), "b": (3,)}  # 123 values: 2 ciphertexts of 63 slots


@pytest.fixture(scope="session")
def keypair():
    return generate_keypair(2048)


@pytest.fixture(scope="session")
def other_public_key():
    """A second federation's key, for replies encrypted under the wrong key."""
    return generate_keypair(2048)[0]


def model(value: float, seed: int | None = None) -> dict[str, np.ndarray]:
    """Arrays of SHAPES around ``value``, jittered when ``seed`` is given."""
    rng = np.random.default_rng(seed)
    return {k: (value + (rng.uniform(-0.5, 0.5, s) if seed is not None else np.zeros(s)))
            .astype(np.float32) for k, s in SHAPES.items()}


def expected_average(models: list[dict[str, np.ndarray]], weights: list[int]) -> list[np.ndarray]:
    return [np.average(np.stack([m[k].astype(np.float64) for m in models]), axis=0,
                       weights=weights) for k in SHAPES]


def assert_weighted_average_of_good(arrays, keypair, good, strategy) -> None:
    """The aggregate holds the two good replies (weights 10 and 30), averaged within
    one quantization step."""
    summed = EncryptedModel.from_arrays(arrays, keypair[0])
    assert summed.total_weight == 40
    for out, exp in zip(decrypt_model(keypair[1], summed), expected_average(good, [10, 30]),
                        strict=True):
        np.testing.assert_allclose(out, exp, rtol=0, atol=strategy.params.max_error())


def encrypted_arrays(keypair, arrays: list[np.ndarray], names: list[str], n: int,
                     strategy) -> dict[str, np.ndarray]:
    """A client's update as the client mods make it."""
    config = round_config(strategy.params, keypair[0].fingerprint, strategy.weight_unit)
    update, _ = encrypt_local_model(config, names, arrays, n, keypair[1], 1)
    return update.to_arrays()


def foreign_arrays(public_key, arrays: list[np.ndarray], names: list[str], n: int, params
                   ) -> dict[str, np.ndarray]:
    """An update encrypted under another federation's key, encoding otherwise right."""
    return encrypt_update(arrays, Layout.of(names, arrays), n, params,
                          Encryptor(public_key)).to_arrays()


def truncated(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**arrays, CIPHERTEXTS_KEY: arrays[CIPHERTEXTS_KEY][:, :-1].copy()}


def with_big_row(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    cts = arrays[CIPHERTEXTS_KEY].copy()
    cts[0, :] = 0xFF  # 2^(8 * width) - 1 >= n^2
    return {**arrays, CIPHERTEXTS_KEY: cts}


def find_secrets(obj, private_key: PrivateKey, path: str = "strategy", seen=None) -> list[str]:
    """Paths below ``obj`` (attributes, slots, containers) that hold a PrivateKey, a prime
    or a subgroup prime (the order of ``h``: it decrypts too)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, float, bool, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, PrivateKey):
        return [path]
    try:
        if int(obj) in (int(private_key.p), int(private_key.q), int(private_key.alpha_p),
                        int(private_key.alpha_q), int(private_key.alpha_p * private_key.alpha_q)):
            return [path]
    except (TypeError, ValueError, OverflowError):
        pass
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += find_secrets(k, private_key, f"{path}[key]", seen)
            found += find_secrets(v, private_key, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            found += find_secrets(v, private_key, f"{path}[{i}]", seen)
    elif isinstance(obj, np.ndarray):
        return []
    children = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                children[slot] = getattr(obj, slot)
    for name, value in children.items():
        found += find_secrets(value, private_key, f"{path}.{name}", seen)
    return found


def test_secret_search_finds_a_key(keypair):
    """The search below would catch a strategy that kept the private key or a prime."""

    class Leaky:
        def __init__(self):
            self.cache = {"k": [keypair[1]]}
            self.prime = int(keypair[1].q)

    assert find_secrets(Leaky(), keypair[1]) == ["strategy.cache['k'][0]", "strategy.prime"]


# ------------------------------------------------------------------ Message API
def metadata(node: int) -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def rec(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def reply(node: int, record: ArrayRecord, n: int, loss: float = 1.0) -> Message:
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": n, "train-loss": loss})}), metadata=metadata(node))


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5, 6, 7, 8]


def test_message_api_strategy_aggregates_valid_replies_and_names_bad_ones(
        keypair, other_public_key, task_identity, flwr_caplog):
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, min_available_nodes=1, min_train_nodes=1)
    names = list(SHAPES)
    messages = list(strategy.configure_train(1, rec(model(0.0)), ConfigRecord(),
                                             FakeGrid()))
    config = next(iter(messages[0].content.config_records.values()))
    assert config["paillier-fingerprint"] == keypair[0].fingerprint

    def enc(m, n):
        return encrypted_arrays(keypair, list(m.values()), names, n, strategy)

    good = [model(0.5, seed=1), model(-0.25, seed=2)]
    replies = [reply(1, rec(enc(good[0], 10)), 10, loss=1.0),
               reply(2, rec(enc(good[1], 30)), 30, loss=2.0),
               reply(1, rec(enc(model(1.5), 10)), 10),  # a second reply from node 1
               reply(3, rec(foreign_arrays(other_public_key, list(good[0].values()), names, 10,
                                           strategy.params)), 10),
               reply(4, rec(truncated(enc(good[0], 10))), 10),
               reply(5, rec(with_big_row(enc(good[0], 10))), 10),
               reply(6, rec(good[0]), 10),  # plaintext
               Message(error=Error(code=1, reason="crashed"), metadata=metadata(7))]
    flwr_caplog.clear()
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert_weighted_average_of_good(record_arrays(arrays), keypair, good, strategy)
    assert metrics["train-loss"] == pytest.approx(1.75)
    warnings = [r.getMessage() for r in flwr_caplog.records if r.levelno == logging.WARNING]
    for node, why in [(1, "second reply"), (3, "another key pair"), (4, "got (2, 511)"),
                      (5, "n^2"), (6, "not encrypted"), (7, "crashed")]:
        assert any(f"node {node} " in w.lower() and why in w for w in warnings), (node, warnings)
    assert len(set(warnings)) == 6
    assert find_secrets(strategy, keypair[1]) == []


def test_message_api_strategy_refuses_a_total_weight_overflow(keypair, task_identity,
                                                              flwr_caplog):
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, max_total_weight=64,
                              min_available_nodes=1, min_train_nodes=1)
    list(strategy.configure_train(1, rec(model(0.0)), ConfigRecord(), FakeGrid()))
    names = list(SHAPES)
    replies = [reply(node, as_record(EncryptedModel.from_arrays(encrypted_arrays(
        keypair, list(model(0.1).values()), names, 40, strategy), keypair[0])), 40)
        for node in (1, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert EncryptedModel.from_arrays(record_arrays(arrays), keypair[0]).total_weight == 40
    assert any("node 2" in r.getMessage() and "past 64" in r.getMessage()
               for r in flwr_caplog.records)


# ------------------------------------------------------------------ legacy API
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

    def enc(m, n):
        arrays = list(m.values())
        return encrypted_arrays(keypair, arrays, layout_of(arrays).names, n, strategy)

    params = raw_parameters
    good = [model(0.5, seed=1), model(-0.25, seed=2)]
    valid = to_parameters(EncryptedModel.from_arrays(enc(good[0], 10), keypair[0]))
    cut_bytes = Parameters(tensors=[valid.tensors[0][:-7], valid.tensors[1]],
                           tensor_type=TENSOR_TYPE)
    plain = list(good[0].values())
    results = [(FakeProxy(1), fit_res(valid, 10, loss=1.0)),
               (FakeProxy(2), fit_res(params(enc(good[1], 30)), 30, loss=2.0)),
               (FakeProxy(1), fit_res(params(enc(model(1.5), 10)), 10)),  # second reply
               (FakeProxy(3), fit_res(params(foreign_arrays(
                   other_public_key, plain, layout_of(plain).names, 10, strategy.params)), 10)),
               (FakeProxy(4), fit_res(params(truncated(enc(good[0], 10))), 10)),
               (FakeProxy(5), fit_res(params(with_big_row(enc(good[0], 10))), 10)),
               (FakeProxy(6), fit_res(ndarrays_to_parameters(plain), 10)),  # plaintext
               (FakeProxy(7), fit_res(cut_bytes, 10))]  # tensor bytes cut short
    flwr_caplog.clear()
    parameters, metrics = strategy.aggregate_fit(1, results, [RuntimeError("node 8 is gone")])

    assert parameters.tensor_type == TENSOR_TYPE
    assert_weighted_average_of_good(parameters_arrays(parameters), keypair, good, strategy)
    assert metrics["train-loss"] == pytest.approx(1.75)
    warnings = [r.getMessage() for r in flwr_caplog.records if r.levelno == logging.WARNING]
    for client, why in [(1, "second reply"), (3, "another key pair"), (4, "got (2, 511)"),
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
    parameters = to_parameters(EncryptedModel.from_arrays(encrypted_arrays(
        keypair, plain, layout_of(plain).names, 40, strategy), keypair[0]))
    out, _ = strategy.aggregate_fit(1, [(FakeProxy(1), fit_res(parameters, 40)),
                                        (FakeProxy(2), fit_res(parameters, 40))], [])
    assert EncryptedModel.from_arrays(parameters_arrays(out), keypair[0]).total_weight == 40
    assert any("client 2" in r.getMessage() and "past 64" in r.getMessage()
               for r in flwr_caplog.records)


def test_legacy_wire_format_survives_flowers_conversions(keypair):
    """Parameters -> ArrayRecord -> protobuf -> ArrayRecord -> Parameters, byte for byte."""
    from flwr.common.serde import array_record_from_proto, array_record_to_proto

    plain = list(model(0.3).values())
    update = encrypt_update(plain, layout_of(plain), 5, LegacyPaillierFedAvg(
        keypair[0], clip=CLIP).params, Encryptor(keypair[0]))
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
    global_model = list(model(0.1, seed=3).values())
    encrypted = encrypt_update(global_model, layout_of(global_model), 3, strategy.params,
                               Encryptor(key.public_key))

    def fit_message(parameters: Parameters, config: dict) -> Message:
        return Message(content=compat.fitins_to_recorddict(FitIns(parameters, config), True),
                       dst_node_id=1, message_type="train")

    config = round_config(strategy.params, key.fingerprint, 1)
    out = legacy_paillier_mod(fit_message(to_parameters(encrypted), config), context, call_next)
    for got, exp in zip(seen["fit"], global_model, strict=True):
        np.testing.assert_allclose(got, exp, atol=strategy.params.max_error())
    res = compat.recorddict_to_fitres(out.content, keep_input=True)
    assert res.parameters.tensor_type == TENSOR_TYPE and res.num_examples == 20
    assert res.metrics["paillier-clipped"] == 0.0
    update = EncryptedModel.from_arrays(parameters_arrays(res.parameters), key.public_key)
    assert update.total_weight == 20
    for got, exp in zip(decrypt_model(key, update), seen["fit"], strict=True):
        np.testing.assert_allclose(got, exp + 0.5, atol=strategy.params.max_error())

    # evaluate: decrypted too
    msg = Message(content=compat.evaluateins_to_recorddict(
        EvaluateIns(to_parameters(encrypted), {}), True), dst_node_id=1, message_type="evaluate")
    legacy_paillier_mod(msg, context, call_next)
    assert [a.shape for a in seen["evaluate"]] == [a.shape for a in global_model]

    # a server without the Paillier strategy: the node refuses to train, nothing is sent
    seen.clear()
    reply = legacy_paillier_mod(fit_message(ndarrays_to_parameters(global_model), {"lr": 0.1}),
                                context, call_next)
    assert reply.has_error() and "no Paillier parameters" in reply.error.reason
    assert "fit" not in seen

    # a node without its private key answers with the cause and the fix, and trains not
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "empty"))
    reply = legacy_paillier_mod(fit_message(to_parameters(encrypted), config), context,
                                call_next)
    assert reply.has_error() and "no paillier.key.json on this node" in reply.error.reason
    assert "fedapp keygen" in reply.error.reason and "fit" not in seen
