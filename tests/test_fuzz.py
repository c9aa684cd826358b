"""Fuzzing every decoder of data that comes from the network or from the other party.

Each decoder gets random garbage and near-valid mutations of valid messages (bit
flips, truncation, extension, wrong dtypes, swapped or ill-typed fields, NaN and
infinity, very deep JSON). It must either accept the input (and then give a
well-formed result) or refuse it with the exception its callers catch and a
message that says what was wrong: never another exception, never a hang, and a
bad input among good ones leaves what the good ones build up unchanged.

One real 2048-bit Paillier key serves the whole module.
"""

from __future__ import annotations

import binascii
import copy
import json
import logging
import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, Metadata,
                      MetricRecord, RecordDict)
from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeProxy
from strategies import keyfiles
from strategies.aggregation import InvalidUpdate, Layout, check_update, check_weight
from strategies.dp_message import CentralDP
from strategies.dp_rounds import clip_local_update
from strategies.dp_legacy import LegacyCentralDP
from strategies.encoding import EncodingParams, decode, dequantize, encode, unpack
from strategies.fedavg import WeightedFedAvg
from strategies.legacy_wire import load_ndarrays, load_npy
from strategies.secagg_masks import (SEED_BYTES, SHARE_BYTES, KeyPair, SecAggError, SecAggParams,
                                MaskOverflow, agree, decode_sum, reconstruct_secret, seal,
                                share_secret, unseal)
from strategies.paillier import (Encryptor, PrivateKey, PublicKey, aggregate_arrays,
                                 check_ciphertext_array, generate_keypair)
from strategies.paillier_message import PaillierFedAvg
from strategies.paillier_node import (decrypt_global_model, encrypt_local_model,
                                      parse_round_config, round_config)
from strategies.paillier_legacy import LegacyPaillierFedAvg, parameters_arrays
from strategies.paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, EncryptedModel, RoundSum,
                                          encrypt_update)
from strategies.records import record_arrays
from strategies.secagg_message import SecAggFedAvg, secagg_mod
from strategies.secagg_node import answer_stage
from strategies.secagg_wire import header_of, masked_arrays
from strategies.secagg_legacy import TENSOR_TYPE as SECAGG_TENSOR_TYPE
from strategies.secagg_legacy import parameters_masked
from strategies.secagg_protocol import (RoundAborted, ServerRound, b64, client_mask, client_step,
                                        loads, node_map, unb64)

HANG_SECONDS = 20
# ValueError subclasses that only ever mean "a parser below us failed": a decoder must say
# what was wrong in its own words instead.
LEAKS = (json.JSONDecodeError, UnicodeError, binascii.Error)
AUTH = bytes(range(32))

# Values that break naive decoders; all of them survive json.dumps (NaN and infinity as
# Python's json writes them).
NASTY = [None, True, False, 0, -1, 1, 2, 3, 2**31, 2**63, 2**64 + 1, 2**600, -2**63, 0.0, 0.5,
         -0.5, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), "", "x", "auto",
         "NaN", "1e999", "0x10", "-1", "A" * 44, "\u0661", [], [1], [[]], {}, {"a": 1}]
json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
             | st.text(max_size=12))
json_values = st.sampled_from(NASTY) | st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
garbage = st.binary(max_size=300)


def fuzz(examples: int):
    """Hypothesis settings of one fuzz test (no deadline, as conftest.py's profile);
    ``FEDAPP_FUZZ_SCALE=10`` runs ten times the examples, for a deeper search."""
    scale = float(os.environ.get("FEDAPP_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, round(examples * scale)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ mutations
@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` with one near-valid change: a bit flip, a truncation, an extension, an
    overwritten, deleted or duplicated range."""
    out = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "delete",
                                 "duplicate"]))
    if kind == "extend" or not out:
        return bytes(out) + draw(st.binary(min_size=1, max_size=64))
    i = draw(st.integers(0, len(out) - 1))
    if kind == "flip":
        out[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del out[i:]
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        out[i:i + len(chunk)] = chunk
    else:
        j = draw(st.integers(i + 1, min(len(out), i + 64)))
        if kind == "delete":
            del out[i:j]
        else:
            out[i:i] = out[i:j]
    return bytes(out)


def _places(value: object, path: tuple = ()) -> list[tuple]:
    """The path of every value inside a JSON document."""
    found = []
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append(path + (key,))
        found += _places(child, path + (key,))
    return found


def _at(value: object, path: tuple) -> object:
    for key in path:
        value = value[key]
    return value


@st.composite
def mutated_json(draw, document: object) -> object:
    """``document`` with one near-valid change somewhere inside: a value set to anything
    (NaN, infinity, huge or negative numbers, wrong types), dropped, swapped with a
    sibling, or an unknown entry added; or the whole document replaced."""
    document = copy.deepcopy(document)
    places = _places(document)
    kind = draw(st.sampled_from(["set", "drop", "swap", "add", "whole"] if places else ["whole"]))
    if kind == "whole":
        return draw(json_values)
    path = draw(st.sampled_from(places))
    parent, key = _at(document, path[:-1]), path[-1]
    if kind == "set":
        parent[key] = draw(json_values)
    elif kind == "drop":
        del parent[key]
    elif kind == "swap":
        other = draw(st.sampled_from(list(parent) if isinstance(parent, dict)
                                     else range(len(parent))))
        parent[key], parent[other] = parent[other], parent[key]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return document


def deep_json(depth: int = 100_000) -> str:
    """JSON nested deeper than Python's recursion limit."""
    return "[" * depth + "]" * depth


@st.composite
def mutated_array(draw, array: np.ndarray) -> np.ndarray:
    """``array`` retyped, reshaped, cut, grown, transposed, or with values changed
    (NaN and infinity for floats, extremes for integers)."""
    kind = draw(st.sampled_from(["dtype", "reshape", "cut", "grow", "values", "transpose",
                                 "scalar", "empty"]))
    a = array.copy()
    if kind == "dtype":
        return a.astype(draw(st.sampled_from(
            ["<f4", ">f8", "<f2", "<i8", ">u4", "<u8", "|u1", "|b1", "<c8", "|S4", "<U2"])))
    if kind == "reshape":
        return a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1)
    if kind == "cut":
        return a[: draw(st.integers(0, max(0, len(a) - 1)))]
    if kind == "grow":
        return np.concatenate([a, a[:1]]) if a.size else np.zeros(1, a.dtype)
    if kind == "transpose":
        return a.T
    if kind == "scalar":
        return a.reshape(-1)[0] if a.size else np.float32(0)
    if kind == "empty":
        return np.zeros((0,) + a.shape[1:], a.dtype)
    flat = a.reshape(-1)
    if flat.size:
        i = draw(st.integers(0, flat.size - 1))
        if flat.dtype.kind == "f":
            flat[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45]))
        else:
            info = np.iinfo(flat.dtype)
            flat[i] = draw(st.sampled_from([info.max, info.min, info.max // 2 + 1]))
    return a


# ------------------------------------------------------------------ checking outcomes
class Hang(BaseException):
    """A decoder ran past HANG_SECONDS (a BaseException: no `except Exception` hides it)."""


@contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s: the decoder hangs")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(call, refusal: type[BaseException] | tuple[type[BaseException], ...]):
    """``call()``'s result, or the ``refusal`` exception it raised.

    Any other exception fails the test (it propagates), and so does a refusal whose
    message is not a sentence saying what was wrong, or a call that hangs.
    """
    with no_hang():
        try:
            return call()
        except refusal as err:
            assert not isinstance(err, LEAKS), f"a raw {type(err).__name__} leaked: {err}"
            message = str(err)
            assert len(message) >= 12 and " " in message, \
                f"{type(err).__name__} without a useful message: {message!r}"
            return err


def refused(result: object) -> bool:
    return isinstance(result, BaseException)


def must_refuse(call, refusal) -> BaseException:
    result = attempt(call, refusal)
    assert refused(result), f"accepted: {result!r}"
    return result


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture(scope="module", autouse=True)
def task_identity():
    """Messages built outside a Flower process need the run and node ids set."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        for name in ("_run_id", "_node_id", "_task_id"):
            patch.setattr(TaskIdentity, name, 1, raising=False)
        yield


@pytest.fixture
def caplog_flwr(caplog):
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def metadata(node: int, kind: str = "train") -> Metadata:
    return Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
                    message_type=kind)


def reply(node: int, arrays: ArrayRecord | None, metrics: dict | None) -> Message:
    records = {}
    if arrays is not None:
        records["arrays"] = arrays
    if metrics is not None:
        records["metrics"] = MetricRecord(metrics)
    return Message(content=RecordDict(records), metadata=metadata(node))


def garbage_array(data: bytes, stype: str = "numpy.ndarray") -> Array:
    """An Array as a sender can make it: any bytes under any serialization type."""
    return Array(dtype="float32", shape=(3,), stype=stype, data=data)


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def client_manager(nodes: int = 8) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node in range(1, nodes + 1):
        manager.register(FakeProxy(node))
    return manager


def fit_res(parameters: Parameters, n: object, metrics: dict | None = None) -> FitRes:
    return FitRes(status=Status(Code.OK, ""), parameters=parameters, num_examples=n,
                  metrics=metrics or {"train-loss": 1.0})


# Bad weights as a sender can put them in a MetricRecord / FitRes.
BAD_WEIGHTS = [0, -1, -2**40, 1.5, float("nan"), float("inf"), [1, 2], None, "10", True]
# Metrics that do not average with the others' (which send "train-loss" and "loss" as floats).
BAD_METRICS = [{"train-loss": [1.0, 2.0]}, {"loss": [1.0]}, {"train-loss": float("nan")},
               {"loss": float("inf")}, {"other": 1.0}, {"train-loss": 2**62}]


# ================================================================== Paillier
SHAPES = {"w": (4, 3), "b": (3,)}
CLIP = 2.0
WEIGHTS = (10, 30)


def plain_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-1.5, 1.5, s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.fixture(scope="module")
def keys() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(2048)


@pytest.fixture(scope="module")
def encryptor(keys) -> Encryptor:
    return Encryptor(*keys)


@pytest.fixture(scope="module")
def paillier(keys, encryptor) -> dict:
    """A round's encoding and layout, and two clients' encrypted updates."""
    params = EncodingParams.for_key(keys[0].n_bits, 1000, clip=CLIP)
    models = [plain_model(seed) for seed in (1, 2)]
    layout = Layout.of(list(SHAPES), list(models[0].values()))
    updates = [encrypt_update(list(m.values()), layout, w, params, encryptor)
               for m, w in zip(models, WEIGHTS, strict=True)]
    legacy = Layout.of(["0", "1"], list(models[0].values()))  # names as Flower's compat layer
    legacy_updates = [encrypt_update(list(m.values()), legacy, w, params, encryptor)
                      for m, w in zip(models, WEIGHTS, strict=True)]
    return {"params": params, "layout": layout, "models": models, "updates": updates,
            "legacy_updates": legacy_updates}


def header_of_model(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(arrays[HEADER_KEY].tobytes())


def with_header(arrays: dict[str, np.ndarray], header: object) -> dict[str, np.ndarray]:
    text = json.dumps(header).encode()
    return {**arrays, HEADER_KEY: np.frombuffer(text, np.uint8).copy()}


# ------------------------------------------------------------------ keys and key files
@fuzz(60)
@given(data=st.data())
def test_public_key_dict(keys, data):
    document = data.draw(mutated_json(keys[0].to_dict()))
    result = attempt(lambda: PublicKey.from_dict(document), ValueError)
    assert refused(result) or result == keys[0]


@fuzz(60)
@given(data=st.data())
def test_private_key_dict(keys, data):
    document = data.draw(mutated_json(keys[1].to_dict()))
    result = attempt(lambda: PrivateKey.from_dict(document), ValueError)
    assert refused(result) or result.fingerprint == keys[1].fingerprint


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-keys")


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    os.chmod(path, 0o600)
    return path


@fuzz(40)
@given(data=st.data())
def test_key_files(keys, key_dir, data):
    public = json.dumps(keys[0].to_dict()).encode()
    private = json.dumps(keys[1].to_dict()).encode()
    auth = (AUTH.hex() + "\n").encode()
    change = st.one_of(
        st.sampled_from([public, private]).flatmap(mutated_bytes),
        st.sampled_from([keys[0].to_dict(), keys[1].to_dict()]).flatmap(mutated_json).map(
            lambda d: json.dumps(d).encode()),
        garbage)
    content = data.draw(change)
    path = write_file(key_dir / "key.json", content)
    result = attempt(lambda: keyfiles.load_public_key(path), ValueError)
    assert refused(result) or result == keys[0]
    result = attempt(lambda: keyfiles.load_private_key(path), ValueError)
    assert refused(result) or result.fingerprint == keys[1].fingerprint
    path = write_file(key_dir / "auth.key", data.draw(mutated_bytes(auth) | garbage))
    result = attempt(lambda: keyfiles.load_auth_key(path), ValueError)
    assert refused(result) or len(result) == keyfiles.AUTH_KEY_BYTES


@pytest.mark.parametrize("content", [deep_json(), '"paillier-public-key"', "[1, 2]", "null",
                                     '{"p": 1}', "\udcff".encode("utf-8", "surrogatepass")])
def test_key_files_that_are_no_key_objects(key_dir, content):
    path = write_file(key_dir / "odd.json",
                      content if isinstance(content, bytes) else content.encode())
    for load in (keyfiles.load_public_key, keyfiles.load_private_key):
        must_refuse(lambda: load(path), ValueError)
    if content == '"paillier-public-key"':  # a string: not mistaken for private key material
        assert "private key material" not in str(must_refuse(
            lambda: keyfiles.load_public_key(path), ValueError))


def test_readable_secret_files_are_refused(keys, key_dir):
    path = write_file(key_dir / "open.json", json.dumps(keys[1].to_dict()).encode())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        keyfiles.load_private_key(path)
    with pytest.raises(PermissionError, match="chmod 600"):
        keyfiles.load_auth_key(path)


# ------------------------------------------------------------------ encoding
@fuzz(80)
@given(data=st.data())
def test_encoding_params_dict(paillier, data):
    document = data.draw(mutated_json(paillier["params"].to_dict()))
    result = attempt(lambda: EncodingParams.from_dict(document), ValueError)
    assert refused(result) or isinstance(result, EncodingParams)


@fuzz(60)
@given(data=st.data())
def test_encoding_params_from_the_header(paillier, data):
    document = data.draw(mutated_json(paillier["params"].to_dict()))
    result = attempt(lambda: EncodingParams.from_dict(document), ValueError)
    assert refused(result) or isinstance(result, EncodingParams)


@fuzz(80)
@given(document=json_values | st.just([["w", "float32", [4, 3]], ["b", "float32", [3]]])
       .flatmap(mutated_json))
def test_layout_json(document):
    result = attempt(lambda: Layout.from_json(document), ValueError)
    if not refused(result):
        assert all(type(d) is int and d >= 0 for s in result.shapes for d in s)
        assert len(set(result.names)) == len(result.names)
        assert result.size == sum(math.prod(s) for s in result.shapes)


@pytest.mark.parametrize("document", [
    [["w", "float32", [10**30]]], [["w", "float32", [2**32, 2**32]]],
    [["w", "float32", [True]]], [["w", "zz", [1]]], [["w", "float32", [1]], ["w", "float32", [1]]],
    {"abc": 1}, [["w", "float32", "12"]], [["w", "float32", [-1]]], [], "w"])
def test_layout_json_refusals(document):
    must_refuse(lambda: Layout.from_json(document), ValueError)


@fuzz(80)
@given(data=st.data(), num_values=st.integers(-2, 130),
       total=st.sampled_from([1, 5, 40, 1000, 1024, 1025, 2**70] + BAD_WEIGHTS),
       offset=st.sampled_from([0, 1, -1, 7, 2**40, 2**400, 10**400, 1.5, None]))
def test_unpack_and_decode(paillier, data, num_values, total, offset):
    params = paillier["params"]
    valid = encode(np.linspace(-CLIP, CLIP, 100), params, weight=40)
    plaintexts = data.draw(st.one_of(
        st.lists(st.integers(-2**70, 2**2100), max_size=4),
        st.just(valid).map(list).flatmap(lambda pts: st.tuples(
            st.integers(0, len(pts) - 1), st.integers(-2**2047, 2**2047)).map(
            lambda change: [p + change[1] if i == change[0] else p
                            for i, p in enumerate(pts)]))))
    for call in (lambda: unpack(plaintexts, params, num_values, total, offset),
                 lambda: decode(plaintexts, params, num_values, total, offset)):
        result = attempt(call, ValueError)
        if not refused(result):
            assert result.shape == (num_values,) and np.isfinite(
                result.astype(np.float64)).all()
    result = attempt(lambda: dequantize(np.arange(4, dtype=np.uint64), params, total, offset),
                     ValueError)
    assert refused(result) or np.isfinite(result).all()


def test_decode_with_a_noise_offset_past_the_slots_is_refused(paillier):
    params = paillier["params"]
    plaintexts = encode(np.zeros(5), params, weight=3)
    with pytest.raises(ValueError, match="noise offset"):
        decode(plaintexts, params, 5, 3, 10**400)


# ------------------------------------------------------------------ ciphertext arrays
@st.composite
def bad_row(draw, public_key: PublicKey, cts: np.ndarray) -> np.ndarray:
    """``cts`` with one row set to a value near or past n^2."""
    width = public_key.ciphertext_bytes
    value = draw(st.sampled_from([0, 1, int(public_key.nsquare) - 1, int(public_key.nsquare),
                                  int(public_key.nsquare) + 1, 256**width - 1]))
    out = cts.copy()
    out[draw(st.integers(0, len(cts) - 1))] = np.frombuffer(value.to_bytes(width, "big"),
                                                           np.uint8)
    return out


@fuzz(80)
@given(data=st.data())
def test_ciphertext_arrays(keys, paillier, data):
    pk = keys[0]
    cts = np.concatenate([u.ciphertexts for u in paillier["updates"]])
    array = data.draw(st.one_of(
        mutated_array(cts), bad_row(pk, cts),
        garbage.map(lambda b: np.frombuffer(b, np.uint8)),
        st.sampled_from([None, b"\x01" * 512, [[1] * 512], cts.tolist()])))
    count = data.draw(st.sampled_from([None, 0, 1, 2, 3]))
    result = attempt(lambda: check_ciphertext_array(pk, array, count), ValueError)
    if not refused(result):
        assert result.dtype == np.uint8 and result.shape[1:] == (pk.ciphertext_bytes,)
        assert count is None or len(result) == count
        assert all(0 < int.from_bytes(row.tobytes(), "big") < pk.nsquare for row in result)
    good = paillier["updates"][0].ciphertexts
    result = attempt(lambda: aggregate_arrays(pk, [good, array, good]), ValueError)
    assert not refused(result) or "array 1" in str(result)


# ------------------------------------------------------------------ encrypted models
def check_encrypted_model(keys, arrays: object) -> EncryptedModel | BaseException:
    """Parse as the server does; if accepted, decrypt as a client node does."""
    pk, sk = keys
    model = attempt(lambda: EncryptedModel.from_arrays(arrays, pk), InvalidUpdate)
    if refused(model):
        return model
    assert model.ciphertexts.shape == (model.params.num_plaintexts(model.layout.size),
                                       pk.ciphertext_bytes)
    model.params.check_modulus_bits(pk.n_bits)
    assert 1 <= model.total_weight <= model.params.max_total_weight
    out = attempt(lambda: decrypt_global_model(sk, arrays, 1), ValueError)
    if not refused(out):
        layout, plain = out
        assert [a.shape for a in plain] == list(layout.shapes)
        assert all(np.isfinite(a).all() for a in plain)
    return model


@fuzz(80)
@given(data=st.data())
def test_encrypted_model_header(keys, paillier, data):
    arrays = paillier["updates"][0].to_arrays()
    header = data.draw(mutated_json(header_of_model(arrays)))
    check_encrypted_model(keys, with_header(arrays, header))


@fuzz(60)
@given(data=st.data())
def test_encrypted_model_header_bytes(keys, paillier, data):
    arrays = paillier["updates"][0].to_arrays()
    raw = data.draw(mutated_bytes(arrays[HEADER_KEY].tobytes()) | garbage)
    check_encrypted_model(keys, {**arrays, HEADER_KEY: np.frombuffer(raw, np.uint8).copy()})


@fuzz(60)
@given(data=st.data())
def test_encrypted_model_ciphertexts(keys, paillier, data):
    arrays = paillier["updates"][0].to_arrays()
    cts = arrays[CIPHERTEXTS_KEY]
    changed = data.draw(mutated_array(cts) | bad_row(keys[0], cts))
    check_encrypted_model(keys, {**arrays, CIPHERTEXTS_KEY: changed})


@fuzz(40)
@given(arrays=st.dictionaries(st.sampled_from([CIPHERTEXTS_KEY, HEADER_KEY, "x"]),
                              garbage.map(lambda b: np.frombuffer(b, np.uint8)) | json_values))
def test_encrypted_model_garbage(keys, arrays):
    assert refused(check_encrypted_model(keys, arrays))


@pytest.mark.parametrize("change", [
    {"encoding": "slots"}, {"noise-offset": 10**400}, {"layout": [["w", "float32", [10**30]]]},
    {"total-weight": 2**64}, {"version": 2}, {"fingerprint": None}])
def test_encrypted_model_header_refusals(keys, paillier, change):
    arrays = paillier["updates"][0].to_arrays()
    header = header_of_model(arrays)
    if change == {"encoding": "slots"}:  # more slots than fit below n: a client can't decode
        change = {"encoding": {**header["encoding"], "slots-per-plaintext": 10**9}}
    assert refused(check_encrypted_model(keys, with_header(arrays, {**header, **change})))


def test_encrypted_model_deep_header(keys, paillier):
    arrays = paillier["updates"][0].to_arrays()
    raw = np.frombuffer(deep_json(300_000).encode(), np.uint8)
    assert refused(check_encrypted_model(keys, {**arrays, HEADER_KEY: raw}))


@fuzz(40)
@given(data=st.data())
def test_round_sum_keeps_only_good_updates(keys, paillier, data):
    pk = keys[0]
    good = [u.to_arrays() for u in paillier["updates"]]
    bad = data.draw(st.one_of(
        st.just(good[0]).map(header_of_model).flatmap(mutated_json).map(
            lambda h: with_header(good[0], h)),
        st.just(good[0][CIPHERTEXTS_KEY]).flatmap(
            lambda c: mutated_array(c) | bad_row(pk, c)).map(
            lambda c: {**good[0], CIPHERTEXTS_KEY: c}),
        st.dictionaries(st.sampled_from([CIPHERTEXTS_KEY, HEADER_KEY]),
                        garbage.map(lambda b: np.frombuffer(b, np.uint8)))))
    round_sum = RoundSum(pk, paillier["params"], paillier["layout"])
    round_sum.add(good[0])
    before = (list(round_sum.updates), round_sum.total_weight)
    result = attempt(lambda: round_sum.add(bad), InvalidUpdate)
    if refused(result):
        assert (round_sum.updates, round_sum.total_weight) == before
    round_sum.add(good[1])
    if refused(result):
        expected = RoundSum(pk, paillier["params"], paillier["layout"])
        for g in good:
            expected.add(g)
        assert np.array_equal(round_sum.result().ciphertexts, expected.result().ciphertexts)
        assert round_sum.total_weight == sum(WEIGHTS)


# ------------------------------------------------------------------ Paillier strategies
@st.composite
def bad_paillier_reply(draw, good: dict[str, np.ndarray], plain: dict[str, np.ndarray],
                       node: int) -> tuple[Message, bool]:
    """A reply that is malformed one way or another, and whether it must be left out
    (near-valid ciphertext mutations may still be valid ciphertexts)."""
    kind = draw(st.sampled_from(["array-data", "stype", "header", "ciphertexts", "weight",
                                 "metrics", "records", "plaintext", "error"]))
    weight = {"num-examples": 7}
    if kind == "metrics":
        return reply(node, ArrayRecord({k: Array(v) for k, v in good.items()}),
                     {**weight, **draw(st.sampled_from(BAD_METRICS))}), False
    if kind == "array-data":
        key = draw(st.sampled_from([CIPHERTEXTS_KEY, HEADER_KEY]))
        raw = Array(good[key]).data
        data = draw(garbage | mutated_bytes(raw))
        record = ArrayRecord({k: garbage_array(data) if k == key else Array(v)
                              for k, v in good.items()})
        return reply(node, record, weight), not data.startswith(b"\x93NUMPY")
    if kind == "stype":
        record = ArrayRecord({CIPHERTEXTS_KEY: Array(good[CIPHERTEXTS_KEY]),
                              HEADER_KEY: garbage_array(Array(good[HEADER_KEY]).data,
                                                        draw(st.text(max_size=10)))})
        return reply(node, record, weight), True
    if kind == "header":
        header = draw(mutated_json(header_of_model(good)))
        return reply(node, ArrayRecord({k: Array(v) for k, v in
                                        with_header(good, header).items()}), weight), False
    if kind == "ciphertexts":
        cts = draw(mutated_array(good[CIPHERTEXTS_KEY]))
        if not isinstance(cts, np.ndarray) or cts.dtype.kind in "SU":
            cts = np.zeros(3, np.uint8)
        return reply(node, ArrayRecord({CIPHERTEXTS_KEY: Array(np.ascontiguousarray(cts)),
                                        HEADER_KEY: Array(good[HEADER_KEY])}), weight), False
    if kind == "weight":
        metrics = {} if draw(st.booleans()) else {"num-examples": draw(st.sampled_from(
            [w for w in BAD_WEIGHTS if isinstance(w, (int, float)) and not isinstance(w, bool)]
            + [[1.0, 2.0]]))}
        return reply(node, ArrayRecord({k: Array(v) for k, v in good.items()}), metrics), True
    if kind == "records":
        msg = reply(node, None if draw(st.booleans()) else
                    ArrayRecord({k: Array(v) for k, v in good.items()}), None)
        if draw(st.booleans()):
            msg.content["extra"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
        return msg, True
    if kind == "plaintext":
        return reply(node, ArrayRecord({k: Array(v) for k, v in plain.items()}), weight), True
    return Message(Error(code=1, reason="crashed"), metadata=metadata(node)), True


def paillier_result(record: ArrayRecord | None, pk: PublicKey) -> EncryptedModel | None:
    return None if record is None else EncryptedModel.from_arrays(record_arrays(record), pk)


@fuzz(40)
@given(data=st.data())
def test_paillier_strategy_leaves_out_bad_replies(keys, paillier, caplog_flwr, data):
    pk = keys[0]
    strategy = PaillierFedAvg(pk, clip=CLIP, max_total_weight=1000, min_available_nodes=1,
                              min_train_nodes=1)
    plain = paillier["models"][0]
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in plain.items()}),
                                  ConfigRecord(), FakeGrid([1, 2, 3])))
    good = [u.to_arrays() for u in paillier["updates"]]
    replies = [reply(node, ArrayRecord({k: Array(v) for k, v in g.items()}),
                     {"num-examples": w})
               for node, g, w in zip((1, 2), good, WEIGHTS, strict=True)]
    expected = paillier_result(strategy.aggregate_train(1, replies)[0], pk)
    bad, must_fail = data.draw(bad_paillier_reply(good[0], plain, 3))
    caplog_flwr.clear()
    with no_hang():
        got = paillier_result(strategy.aggregate_train(1, [replies[0], bad, replies[1]])[0], pk)
    if got.total_weight == expected.total_weight:  # left out
        assert np.array_equal(got.ciphertexts, expected.ciphertexts)
        assert any("node 3" in w.lower() for w in warnings_of(caplog_flwr))
    else:
        assert not must_fail, "a malformed reply was aggregated"


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
    good = [(FakeProxy(i + 1), fit_res(to_parameters(u), w))
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
    bad = (FakeProxy(9), fit_res(parameters, n))
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


# ------------------------------------------------------------------ Paillier client side
@fuzz(60)
@given(data=st.data())
def test_round_config_on_the_client(keys, paillier, data):
    config = round_config(paillier["params"], keys[0].fingerprint, 1)
    document = data.draw(mutated_json(config).filter(lambda d: isinstance(d, dict)))
    result = attempt(lambda: parse_round_config(document), ValueError)
    if refused(result):
        return
    plain = paillier["models"][0]
    update = attempt(lambda: encrypt_local_model(document, list(plain), list(plain.values()),
                                                 10, keys[1], 1), ValueError)
    if not refused(update):
        model, clipped = update
        model.params.check_modulus_bits(keys[0].n_bits)
        assert 0 <= clipped <= 1


def test_round_config_with_slots_past_the_key_is_refused(keys, paillier):
    params = paillier["params"]
    config = round_config(params, keys[0].fingerprint, 1)
    config["paillier-encoding-slots-per-plaintext"] = 10**9
    plain = paillier["models"][0]
    with pytest.raises(ValueError, match="do not fit below"):
        encrypt_local_model(config, list(plain), list(plain.values()), 10, keys[1], 1)


# ================================================================== masking
MASK_PARAMS = SecAggParams.derive(1.0, 1000)
MASK_NODES = [11, 22, 33, 44, 55]  # complete graph; a secret needs 3 of 5 shares
MASK_LENGTH = 6
BAD = 11  # the node whose messages are tampered with
XS = {u: np.random.default_rng(u).uniform(-1, 1, MASK_LENGTH) for u in MASK_NODES}
WS = {u: u // 11 * 10 for u in MASK_NODES}
LOW_ORDER_POINTS = [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    (2**255 - 20).to_bytes(32, "little"), (2**255 - 19).to_bytes(32, "little")]


@fuzz(80)
@given(data=st.data())
def test_masking_params_dict(data):
    document = data.draw(mutated_json(MASK_PARAMS.to_dict()))
    result = attempt(lambda: SecAggParams.from_dict(document), SecAggError)
    if not refused(result):
        result.check()


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
    valid = json.dumps({"version": 1, "stage": stage, "node": 11, "shares": {}})
    text = data.draw(st.one_of(
        st.just(valid.encode()).flatmap(mutated_bytes).map(lambda b: b.decode("latin-1")),
        st.just(json.loads(valid)).flatmap(mutated_json).map(json.dumps),
        st.text(max_size=100), json_values))
    result = attempt(lambda: loads(text, stage), SecAggError)
    assert refused(result) or (isinstance(result, dict) and result["stage"] == stage)


def test_deep_json_payloads_are_refused():
    must_refuse(lambda: loads(deep_json(), "share"), SecAggError)
    must_refuse(lambda: client_step(deep_json(), {}, 11, AUTH), SecAggError)
    must_refuse(lambda: header_of(np.frombuffer(deep_json(2000).encode(), np.uint8)),
                InvalidUpdate)


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


# ------------------------------------------------------------------ secagg: client side
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
            replies[u], states[u] = client_step(request, states[u], u, AUTH)
        return replies

    sr.receive_adverts(ask(sr.advertise_requests(), "advertise"))
    sr.receive_shares(ask(sr.share_requests(), "share"))
    for u, payload in sr.mask_payloads().items():
        if u == BAD:
            stages["mask"] = (payload, states[u])
        vector, header, states[u] = client_mask(payload, states[u], u, XS[u], WS[u])
        sr.receive_masked(u, vector, header, WS[u])
    ask(sr.unmask_requests(), "unmask")
    return stages


@fuzz(120)
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "mask", "unmask"]))
def test_client_stage_requests(secagg_stages, data, stage):
    request, state = secagg_stages[stage]
    text = data.draw(st.one_of(
        st.just(json.loads(request)).flatmap(mutated_json).map(json.dumps),
        st.just(request.encode()).flatmap(mutated_bytes).map(lambda b: b.decode("latin-1")),
        st.text(max_size=100), json_values))
    before = copy.deepcopy(state)
    if stage == "mask":
        result = attempt(lambda: client_mask(text, state, BAD, XS[BAD], WS[BAD]), SecAggError)
        assert refused(result) or result[0].shape == (MASK_LENGTH,)
    else:
        result = attempt(lambda: client_step(text, state, BAD, AUTH), SecAggError)
        assert refused(result) or json.loads(result[0])["node"] == BAD
    assert state == before, "a request changed the node's state in place"


def test_a_stage_message_without_payload_is_refused():
    context = Context(run_id=1, node_id=BAD, node_config={}, state=RecordDict(), run_config={})
    for payload in (None, 5, b"{}", ["x"]):
        must_refuse(lambda: answer_stage(payload, context, BAD), SecAggError)


@pytest.mark.parametrize("points", [{"11": None}, {"11": float("inf")}, {"11": "x" * 5000},
                                    {"11": [1]}, {"11": 1, "22": 1}, {"11": 0}, {"11": True}])
def test_advertise_requests_with_bad_share_points_are_refused(points):
    sr = ServerRound(MASK_PARAMS, MASK_NODES, MASK_LENGTH)
    request = {**json.loads(sr.advertise_requests()[BAD]), "points": points}
    must_refuse(lambda: client_step(json.dumps(request), {}, BAD, AUTH), SecAggError)


# ------------------------------------------------------------------ secagg: server side
def run_masked_round(stage: str, tamper, auth: bytes | None = AUTH):
    """One round with honest nodes, except that node BAD's message of ``stage``
    (advertise, share, masked, unmask) goes through ``tamper``. Returns the server's
    round and its outcome: ``(average, weight)`` or the RoundAborted."""
    sr = ServerRound(MASK_PARAMS, MASK_NODES, MASK_LENGTH)
    states: dict[int, dict] = {u: {} for u in MASK_NODES}

    def ask(requests: dict[int, str], name: str) -> dict[int, object]:
        replies: dict[int, object] = {}
        for u, request in requests.items():
            try:
                replies[u], states[u] = client_step(request, states[u], u, auth)
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
                result = attempt(lambda: sr.receive_masked(u, vector, header, WS[u]),
                                 InvalidUpdate)
                assert not refused(result) or u == BAD
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
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "unmask"]))
def test_server_round_with_a_tampered_reply(data, stage):
    """A near-valid reply may be refused, accepted, or make the round abort (a wrong
    share is caught by the commitment); an accepted round is the average of the
    survivors."""
    sr, outcome = run_masked_round(stage, lambda text: data.draw(tampered_reply(text)))
    if not isinstance(outcome, RoundAborted):
        assert_average_of_survivors(sr, outcome)


@fuzz(40)
@given(data=st.data(), stage=st.sampled_from(["advertise", "share", "unmask"]))
def test_server_round_with_a_garbage_reply(caplog_flwr, data, stage):
    """Garbage is left out, naming the node, and the round goes on with the others."""
    junk = data.draw(st.text(max_size=80) | json_values | st.sampled_from(
        [deep_json(), b"{}", json.dumps({"version": 1, "stage": stage, "node": BAD})]))
    caplog_flwr.clear()
    sr, outcome = run_masked_round(stage, lambda text: junk)
    assert not isinstance(outcome, RoundAborted), outcome
    assert any(f"node {BAD} at the {stage} stage" in w for w in warnings_of(caplog_flwr))
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
            and vector.shape == (MASK_LENGTH,)
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
        sr, outcome = run_masked_round("advertise", tamper, auth=None)
        assert BAD not in sr.adverts
        assert any(f"node {BAD} at the advertise stage" in w for w in warnings_of(caplog_flwr))
        assert_average_of_survivors(sr, outcome)


def test_a_low_order_key_cannot_crash_the_unmasking():
    """With a sparse graph the neighbors of a node that advertised a low-order key drop
    out; rebuilding their masks must not fail with anything but RoundAborted."""
    nodes = list(range(101, 111))
    sr = ServerRound(MASK_PARAMS, nodes, MASK_LENGTH, degree=2, threshold_fraction=0.0)
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
            sr.receive_shares(ask(sr.share_requests()))
            for u, payload in sr.mask_payloads().items():
                try:
                    vector, header, states[u] = client_mask(
                        payload, states[u], u, np.zeros(MASK_LENGTH), 10)
                except SecAggError:
                    continue
                sr.receive_masked(u, vector, header, 10)
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
    assert any(f"node {BAD} at the unmask stage" in w for w in warnings_of(caplog_flwr))
    assert_average_of_survivors(sr, outcome)


# ------------------------------------------------------------------ secagg strategies
def masked_header(length: int = MASK_LENGTH) -> np.ndarray:
    header = {"version": 1, "context": b64(bytes(32)), "node": BAD, "mod-bits": 32,
              "length": length, "layout": "0" * 64}
    return np.frombuffer(json.dumps(header).encode(), np.uint8).copy()


@fuzz(80)
@given(data=st.data())
def test_masked_update_arrays(data):
    vector = np.arange(MASK_LENGTH, dtype=np.uint32)
    header = masked_header()
    raw = data.draw(mutated_bytes(header.tobytes()) | garbage)
    record = data.draw(st.sampled_from([
        {"secagg-masked": vector, "secagg-header": np.frombuffer(raw, np.uint8)},
        {"secagg-masked": vector, "secagg-header": np.frombuffer(raw, np.uint8).reshape(1, -1)},
        {"secagg-masked": vector, "secagg-header": raw},
        {"secagg-masked": vector},
        {"secagg-masked": vector, "secagg-header": header, "x": vector}]))
    result = attempt(lambda: masked_arrays(record), InvalidUpdate)
    assert refused(result) or isinstance(result[1], dict)
    tensors = data.draw(st.lists(st.sampled_from([ndarray_to_bytes(vector),
                                                  ndarray_to_bytes(header)])
                                 .flatmap(lambda t: st.just(t) | mutated_bytes(t)) | garbage,
                                 max_size=3))
    parameters = Parameters(tensors=tensors, tensor_type=data.draw(
        st.sampled_from([SECAGG_TENSOR_TYPE, "numpy.ndarray", ""])))
    result = attempt(lambda: parameters_masked(parameters), (InvalidUpdate, SecAggError))
    if not refused(result):
        assert result[0].dtype in (np.uint32, np.uint64) and isinstance(result[1], dict)


def secagg_train(msg: Message, context: Context) -> Message:
    node = msg.metadata.dst_node_id
    arrays = ArrayRecord({"w": Array(XS[node].astype(np.float32))})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(
        {"num-examples": WS[node], "train-loss": 1.0})}), reply_to=msg)


class SecAggGrid:
    """Nodes that run secagg_mod in-process and answer every message."""

    def __init__(self) -> None:
        self.contexts = {u: Context(run_id=1, node_id=u, node_config={}, state=RecordDict(),
                                    run_config={}) for u in MASK_NODES}

    def get_node_ids(self):
        return list(MASK_NODES)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            reply = secagg_mod(msg, self.contexts[node], secagg_train)
            reply.metadata.__dict__["_src_node_id"] = node  # as Flower routes the reply
            out.append(reply)
        return out


@st.composite
def bad_masked_reply(draw, good: Message) -> tuple[Message, bool]:
    """A node's masked train reply made malformed; and whether it must be left out."""
    arrays = record_arrays(next(iter(good.content.array_records.values())))
    metrics = dict(next(iter(good.content.metric_records.values())))
    kind = draw(st.sampled_from(["array-data", "vector", "header", "weight", "metrics",
                                 "records", "error"]))
    node = good.metadata.src_node_id
    if kind == "error":
        return Message(Error(code=1, reason="crashed"), metadata=metadata(node)), True
    record = {k: Array(v) for k, v in arrays.items()}
    must_fail = True
    if kind == "array-data":
        key = draw(st.sampled_from(list(arrays)))
        record[key] = garbage_array(draw(garbage))
    elif kind == "vector":
        vector = draw(mutated_array(arrays["secagg-masked"]))
        if not isinstance(vector, np.ndarray) or vector.dtype.kind in "SU":
            vector = np.zeros(2, np.float32)
        must_fail = vector.dtype != np.uint32 or vector.shape != (MASK_LENGTH,)
        record["secagg-masked"] = Array(np.ascontiguousarray(vector))
    elif kind == "header":
        header = draw(mutated_json(json.loads(arrays["secagg-header"].tobytes())))
        record["secagg-header"] = Array(np.frombuffer(json.dumps(header).encode(), np.uint8))
        must_fail = False
    elif kind == "weight":
        metrics["num-examples"] = draw(st.sampled_from(
            [w for w in BAD_WEIGHTS if isinstance(w, (int, float)) and not isinstance(w, bool)]
            + [2000]))
    elif kind == "metrics":
        metrics.update(draw(st.sampled_from(BAD_METRICS)))
        must_fail = False
    else:
        return reply(node, None if draw(st.booleans()) else ArrayRecord(record), None), True
    return reply(node, ArrayRecord(record), metrics), must_fail


@fuzz(25)
@given(data=st.data())
def test_secagg_strategy_leaves_out_bad_replies(caplog_flwr, data):
    strategy = SecAggFedAvg(clip=MASK_PARAMS.clip, max_total_weight=1000,
                            min_available_nodes=5, min_train_nodes=5,
                            max_empty_rounds=2)  # an aborted round is the subject here
    grid = SecAggGrid()
    start = ArrayRecord({"w": Array(np.zeros(MASK_LENGTH, np.float32))})
    messages = list(strategy.configure_train(1, start, ConfigRecord({"lr": 0.1}), grid))
    replies = grid.send_and_receive(messages)
    i = next(i for i, r in enumerate(replies) if r.metadata.src_node_id == BAD)
    replies[i], must_fail = data.draw(bad_masked_reply(replies[i]))
    caplog_flwr.clear()
    with no_hang():
        arrays, _ = strategy.aggregate_train(1, replies)
    if arrays is None:  # only a reply that looked valid may make the round abort
        assert not must_fail, warnings_of(caplog_flwr)
        return
    left_out = any(f"node {BAD} " in w.lower() for w in warnings_of(caplog_flwr))
    assert left_out or not must_fail, "a malformed reply was aggregated"
    if left_out:
        others = [u for u in MASK_NODES if u != BAD]
        expected = sum(WS[u] * XS[u] for u in others) / sum(WS[u] for u in others)
        got = record_arrays(arrays)["w"]
        assert np.abs(got - expected).max() <= MASK_PARAMS.error_bound + 1e-6


# ================================================================== plaintext models
PLAIN_WEIGHTS = {1: 10, 2: 30}


def plain_reply(node: int, arrays: dict[str, np.ndarray], n: object) -> Message:
    return reply(node, ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                 {"num-examples": n, "train-loss": 1.0})


@fuzz(80)
@given(value=json_values | st.sampled_from(BAD_WEIGHTS) | st.integers())
def test_weights(value):
    result = attempt(lambda: check_weight(value), InvalidUpdate)
    assert refused(result) or (type(result) is int and result >= 1)


@st.composite
def bad_model(draw, model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``model`` with one array mutated, renamed, dropped, or one array added."""
    out = dict(model)
    key = draw(st.sampled_from(list(out)))
    kind = draw(st.sampled_from(["array", "array", "rename", "drop", "add"]))
    if kind == "array":
        changed = draw(mutated_array(out[key]))
        out[key] = changed if isinstance(changed, np.ndarray) and changed.dtype.kind not in "SU" \
            else np.asarray(np.nan, np.float32)
    elif kind == "rename":
        out = {(k + "x" if k == key else k): v for k, v in out.items()}
    elif kind == "drop":
        del out[key]
    else:
        out["extra"] = np.zeros(2, np.float32)
    return out


def is_valid_model(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> bool:
    return list(arrays) == list(reference) and all(
        a.shape == r.shape and a.dtype.kind == r.dtype.kind and np.isfinite(a).all()
        for a, r in zip(arrays.values(), reference.values()))


@fuzz(60)
@given(data=st.data())
def test_update_checks(data):
    reference = plain_model(1)
    update = data.draw(bad_model(reference))
    result = attempt(lambda: check_update(list(update.values()), list(reference.values())),
                     InvalidUpdate)
    if not refused(result):
        assert all(a.shape == r.shape and a.dtype.kind == r.dtype.kind and np.isfinite(a).all()
                   for a, r in zip(update.values(), reference.values()))


@st.composite
def bad_plain_reply(draw, node: int, model: dict[str, np.ndarray]) -> tuple[Message, bool]:
    """A plaintext train reply made malformed; and whether it must be left out."""
    kind = draw(st.sampled_from(["model", "model", "array-data", "weight", "metrics",
                                 "records", "error"]))
    if kind == "metrics":  # a valid update whose metrics do not average with the others
        record = ArrayRecord({k: Array(v) for k, v in model.items()})
        return reply(node, record, {"num-examples": 7, **draw(st.sampled_from(BAD_METRICS))}), \
            False
    if kind == "model":
        arrays = draw(bad_model(model))
        return plain_reply(node, arrays, 7), not is_valid_model(arrays, model)
    if kind == "array-data":
        record = ArrayRecord({k: Array(v) for k, v in model.items()})
        key = draw(st.sampled_from(list(model)))
        data = draw(garbage | mutated_bytes(Array(model[key]).data))
        stype = draw(st.sampled_from(["numpy.ndarray", "torch", ""]))
        record[key] = garbage_array(data, stype)
        # a mutated .npy file may still hold a valid array (numpy even re-parses headers)
        return reply(node, record, {"num-examples": 7}), \
            stype != "numpy.ndarray" or not data.startswith(b"\x93NUMPY")
    if kind == "weight":
        weight = draw(st.sampled_from([w for w in BAD_WEIGHTS if isinstance(w, (int, float))
                                       and not isinstance(w, bool)]))
        return plain_reply(node, model, weight), True
    if kind == "records":
        msg = reply(node, None if draw(st.booleans()) else
                    ArrayRecord({k: Array(v) for k, v in model.items()}), None)
        msg.content["more"] = MetricRecord({"num-examples": 3})
        msg.content["again"] = MetricRecord({"num-examples": 3})
        return msg, True
    return Message(Error(code=1, reason="crashed"), metadata=metadata(node)), True


def arrays_of(record: ArrayRecord | None) -> list[np.ndarray] | None:
    return None if record is None else list(record_arrays(record).values())


@fuzz(50)
@given(data=st.data())
def test_weighted_fedavg_leaves_out_bad_replies(caplog_flwr, data):
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy = WeightedFedAvg(min_available_nodes=1, min_train_nodes=1)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}),
                                  ConfigRecord(), FakeGrid([1, 2, 3])))
    good = [plain_reply(n, plain_model(n), w) for n, w in PLAIN_WEIGHTS.items()]
    expected = arrays_of(strategy.aggregate_train(1, good)[0])
    bad, must_fail = data.draw(bad_plain_reply(3, plain_model(3)))
    caplog_flwr.clear()
    with no_hang():
        got = arrays_of(strategy.aggregate_train(1, [good[0], bad, good[1]])[0])
    if any("node 3" in w.lower() for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    else:
        assert not must_fail, "a malformed reply was aggregated"
        assert all(np.isfinite(g).all() for g in got)


def central_dp(global_model: dict[str, np.ndarray]) -> CentralDP:
    strategy = CentralDP(WeightedFedAvg(min_available_nodes=1, min_train_nodes=3),
                         noise_multiplier=0.5, clip=1.0, population=3)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in
                                                  global_model.items()}),
                                  ConfigRecord(), FakeGrid([1, 2, 3])))
    return strategy


def seeded_dp_round(strategy, replies: list[Message]) -> list[np.ndarray] | None:
    strategy._rng = np.random.default_rng(5)  # the same noise for both runs compared
    with no_hang():
        return arrays_of(strategy.aggregate_train(1, replies)[0])


@pytest.fixture(scope="module")
def dp_round() -> tuple[CentralDP, list[Message], list[np.ndarray]]:
    """A plaintext central-DP strategy after configure_train, two good replies and what
    it releases for them (noise from a fixed seed)."""
    strategy = central_dp({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    good = [plain_reply(n, plain_model(n), w) for n, w in PLAIN_WEIGHTS.items()]
    return strategy, good, seeded_dp_round(strategy, good)


@fuzz(30)
@given(data=st.data())
def test_central_dp_leaves_out_bad_replies(dp_round, caplog_flwr, data):
    strategy, good, expected = dp_round
    bad, must_fail = data.draw(bad_plain_reply(3, plain_model(3)))
    caplog_flwr.clear()
    got = seeded_dp_round(strategy, [good[0], bad, good[1]])
    assert all(np.isfinite(g).all() for g in got)
    if any("node 3" in w.lower() for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    else:
        assert not must_fail, "a malformed reply was aggregated"


@pytest.mark.parametrize("dtype, extreme", [(np.float32, 3e38), (np.float64, 1e308)])
def test_central_dp_with_updates_of_extreme_norm(caplog_flwr, dtype, extreme):
    """Finite values whose difference from the global model, or whose norm, overflows:
    never NaN in the released model."""
    start = {k: np.full(s, -extreme, dtype) for k, s in SHAPES.items()}
    strategy = central_dp(start)
    far = {k: np.full(s, extreme, dtype) for k, s in SHAPES.items()}
    got = seeded_dp_round(strategy, [plain_reply(1, far, 10), plain_reply(2, far, 10)])
    assert got is None or all(np.isfinite(g).all() for g in got)


def legacy_dp_round(strategy: LegacyCentralDP, results: list) -> list[np.ndarray] | None:
    strategy._rng = np.random.default_rng(5)  # the same noise for both runs compared
    with no_hang():
        out, _ = strategy.aggregate_fit(1, results, [])
    return None if out is None else load_ndarrays(out.tensors)


@pytest.fixture(scope="module")
def legacy_dp() -> tuple[LegacyCentralDP, list, list[np.ndarray]]:
    strategy = LegacyCentralDP(FedAvg(min_fit_clients=3, min_available_clients=3),
                               noise_multiplier=0.5, clip=1.0, population=3)
    start = [np.zeros(s, np.float32) for s in SHAPES.values()]
    strategy.configure_fit(1, ndarrays_to_parameters(start), client_manager(3))
    good = [(FakeProxy(n), fit_res(ndarrays_to_parameters(list(plain_model(n).values())), w))
            for n, w in PLAIN_WEIGHTS.items()]
    return strategy, good, legacy_dp_round(strategy, good)


@fuzz(25)
@given(data=st.data())
def test_legacy_central_dp_leaves_out_bad_replies(legacy_dp, caplog_flwr, data):
    strategy, good, expected = legacy_dp
    tensors = ndarrays_to_parameters(list(plain_model(3).values())).tensors
    kind = data.draw(st.sampled_from(["tensor", "count", "values"]))
    if kind == "tensor":
        i = data.draw(st.integers(0, len(tensors) - 1))
        tensors[i] = data.draw(garbage | mutated_bytes(tensors[i]))
    elif kind == "count":
        tensors = data.draw(st.lists(st.sampled_from(tensors) | garbage, max_size=3))
    else:
        tensors = ndarrays_to_parameters(list(data.draw(bad_model(plain_model(3))).values())
                                         ).tensors
    caplog_flwr.clear()
    got = legacy_dp_round(strategy, [
        good[0], (FakeProxy(9), fit_res(Parameters(tensors, "numpy.ndarray"), 7)), good[1]])
    assert all(np.isfinite(g).all() for g in got)
    if any("client 9" in w for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))


@fuzz(60)
@given(clip=json_values, bit=json_values)
def test_dp_clip_sent_by_the_server(clip, bit):
    incoming = {"w": np.zeros(3, np.float32)}
    trained = {"w": np.array([3.0, 4.0, 0.0], np.float32)}
    result = attempt(lambda: clip_local_update({"dp-clip": clip, "dp-unclipped": bit},
                                               incoming, trained), ValueError)
    if not refused(result):
        assert math.isfinite(clip) and clip > 0
        assert np.linalg.norm(result["w"]) <= clip * (1 + 1e-6)


# ================================================================== legacy .npy tensors
DESCRS = ["'<f4'", "'>u8'", "'|u1'", "'|O'", "[('a', '|O')]", "[('a', '<i4')]", "'|V0'",
          "'<U0'", "'|S0'", "'<U2'", "'|b1'", "'<c16'", "'x'", "None", "5", "[('a',"]


def npy_file(descr: str, shape: list[int], data: bytes = b"", fortran: str = "False") -> bytes:
    """A hand-made .npy file (format 1.0) with any header values."""
    header = "{'descr': %s, 'fortran_order': %s, 'shape': (%s), }" % (
        descr, fortran, "".join(f"{d}, " for d in shape))
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


@st.composite
def npy_bytes(draw) -> bytes:
    """A hand-made .npy file: any dtype descriptor, shape and amount of data."""
    shape = draw(st.lists(st.integers(-3, 5) | st.sampled_from([2**31, 2**32, 2**63, 2**70]),
                          max_size=3))
    return npy_file(draw(st.sampled_from(DESCRS)), shape, draw(st.binary(max_size=64)),
                    draw(st.sampled_from(["False", "True", "0"])))


@fuzz(120)
@given(data=st.data(), dtypes=st.sampled_from([None, (np.uint8,), (np.uint32, np.uint64),
                                                (np.float32,)]))
def test_npy_tensors(data, dtypes):
    valid = ndarray_to_bytes(data.draw(st.sampled_from(
        [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, np.uint8),
         np.array([1.5]), np.arange(4, dtype=np.uint64)])))
    raw = data.draw(st.one_of(mutated_bytes(valid), garbage, npy_bytes(),
                              st.sampled_from([valid, None, "text", bytearray(valid)])))
    result = attempt(lambda: load_npy(raw, "fuzzed", dtypes), InvalidUpdate)
    if not refused(result):
        assert isinstance(result, np.ndarray) and not result.dtype.hasobject
        assert dtypes is None or result.dtype in [np.dtype(d) for d in dtypes]


@pytest.mark.parametrize("descr, shape", [
    ("'<f8'", [0, 10, 2 * 10**17]), ("'|u1'", [0, 2**63]), ("'|u1'", [2**70]),
    ("'<f4'", [-1, -1]), ("'|u1'", [2**32, 2**32])])
def test_npy_tensors_with_impossible_shapes(descr, shape):
    for data in (b"", b"\x00", bytes(4)):
        must_refuse(lambda: load_npy(npy_file(descr, shape, data), "odd", None), InvalidUpdate)


class _Canary:
    ran = False

    def __reduce__(self):
        return (_Canary._trip, ())

    @staticmethod
    def _trip():
        _Canary.ran = True
        return 0


def test_npy_tensors_are_never_unpickled():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([_Canary()], dtype=object), allow_pickle=True)
    for dtypes in (None, (np.uint8,)):
        must_refuse(lambda: load_npy(buffer.getvalue(), "pickled", dtypes), InvalidUpdate)
    record = ArrayRecord({"x": garbage_array(buffer.getvalue())})
    must_refuse(lambda: record_arrays(record), InvalidUpdate)
    assert not _Canary.ran


# ================================================================== legacy FedAvg (fedapp)
@pytest.fixture(scope="module")
def legacy_fedavg():
    """The app's legacy plaintext strategy after configure_fit, two good replies and
    their aggregate."""
    from fedapp.legacy import StandardizingFedAvg

    strategy = StandardizingFedAvg(needs_stats=False, min_fit_clients=3,
                                   min_available_clients=3)
    start = [np.zeros(s, np.float32) for s in SHAPES.values()]
    strategy.configure_fit(1, ndarrays_to_parameters(start), client_manager(3))
    good = [(FakeProxy(n), fit_res(ndarrays_to_parameters(list(plain_model(n).values())), w))
            for n, w in PLAIN_WEIGHTS.items()]
    return strategy, good, load_ndarrays(strategy.aggregate_fit(1, good, [])[0].tensors)


@fuzz(40)
@given(data=st.data())
def test_legacy_fedavg_leaves_out_bad_replies(legacy_fedavg, caplog_flwr, data):
    strategy, good, expected = legacy_fedavg
    tensors = ndarrays_to_parameters(list(plain_model(3).values())).tensors
    kind = data.draw(st.sampled_from(["tensor", "count", "values", "weight"]))
    n: object = 7
    if kind == "tensor":
        i = data.draw(st.integers(0, len(tensors) - 1))
        tensors[i] = data.draw(garbage | mutated_bytes(tensors[i]))
    elif kind == "count":
        tensors = data.draw(st.lists(st.sampled_from(tensors) | garbage, max_size=3))
    elif kind == "values":
        tensors = ndarrays_to_parameters(list(data.draw(bad_model(plain_model(3))).values())
                                         ).tensors
    else:
        n = data.draw(st.sampled_from(BAD_WEIGHTS))
    caplog_flwr.clear()
    with no_hang():
        out, _ = strategy.aggregate_fit(1, [good[0], (FakeProxy(9), fit_res(
            Parameters(tensors, "numpy.ndarray"), n)), good[1]], [])
    got = load_ndarrays(out.tensors)
    assert all(np.isfinite(g).all() for g in got)
    if any("client 9" in w for w in warnings_of(caplog_flwr)):
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    else:
        assert kind in ("tensor", "count", "values"), "a bad weight was used"


def test_legacy_fedavg_evaluation_with_bad_weights_or_losses(legacy_fedavg, caplog_flwr):
    from flwr.common import EvaluateRes

    strategy, _, _ = legacy_fedavg

    def res(n, loss):
        return EvaluateRes(status=Status(Code.OK, ""), loss=loss, num_examples=n, metrics={})

    good = [(FakeProxy(1), res(10, 1.0)), (FakeProxy(2), res(30, 2.0))]
    for n, loss in [(-40, 1.0), (0, 1.0), (10, float("nan")), (10, float("inf")), (None, 1.0)]:
        caplog_flwr.clear()
        with no_hang():
            loss_avg, _ = strategy.aggregate_evaluate(1, [good[0], (FakeProxy(9), res(n, loss)),
                                                          good[1]], [])
        assert loss_avg == pytest.approx(1.75)
        assert any("client 9" in w for w in warnings_of(caplog_flwr))


# ================================================================== clients' settings
@fuzz(80)
@given(data=st.data())
def test_standardization_reports(data):
    from clients.standardize import combine_stats, decode_floats, local_stats

    width = 3
    reports = [local_stats(np.arange(12.0).reshape(4, 3) + i) for i in range(2)]
    i = data.draw(st.integers(0, 1))
    key = data.draw(st.sampled_from(["stats-n", "stats-sum", "stats-sumsq"]))
    value = data.draw(st.one_of(
        st.just(reports[i][key]).filter(lambda v: isinstance(v, bytes)).flatmap(mutated_bytes),
        st.sampled_from(NASTY), garbage,
        st.lists(st.floats(), min_size=width, max_size=width).map(
            lambda v: np.asarray(v, "<f8").tobytes())))
    reports[i] = {**reports[i], key: value}
    result = attempt(lambda: combine_stats(reports, width), ValueError)
    if not refused(result):
        mean, std = result
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
    result = attempt(lambda: decode_floats(value, width, key), ValueError)
    assert refused(result) or (result.shape == (width,) and np.isfinite(result).all())


@fuzz(60)
@given(data=st.data())
def test_housing_normalization_config(data):
    from clients.numpy_clients import HousingClient
    from clients.standardize import encode_floats

    config = {"norm-mean": encode_floats(np.zeros(14)), "norm-std": encode_floats(np.ones(14))}
    key = data.draw(st.sampled_from(sorted(config)))
    config[key] = data.draw(st.one_of(mutated_bytes(config[key]), st.sampled_from(NASTY),
                                      st.lists(st.floats(), min_size=14, max_size=14).map(
                                          lambda v: np.asarray(v, "<f8").tobytes())))
    if data.draw(st.booleans()):
        del config[key]
    result = attempt(lambda: HousingClient.normalization(config), ValueError)
    if not refused(result):
        mean, std = result
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()


TRAIN_CONFIG = {"local-epochs": 1, "batch-size": 32, "learning-rate": 0.05, "optimizer": "sgd",
                "momentum": 0.0, "weight-decay": 0.0, "server-round": 1,
                "dp-sgd-noise-multiplier": 1.0, "dp-sgd-max-grad-norm": 1.0, "dp-delta": 1e-5}


@fuzz(100)
@given(data=st.data())
def test_train_config_sent_by_the_server(data):
    from clients.dp_sgd_config import DPSGDConfig
    from clients.training import TrainConfig

    config = data.draw(mutated_json(TRAIN_CONFIG).filter(lambda c: isinstance(c, dict)))
    tc = attempt(lambda: TrainConfig.from_config(config), ValueError)
    if not refused(tc):
        assert tc.local_epochs >= 1 and tc.batch_size >= 1 and tc.optimizer in ("sgd", "adam")
        for value in (tc.learning_rate, tc.momentum, tc.weight_decay):
            assert math.isfinite(value) and value >= 0
    dp = attempt(lambda: DPSGDConfig.from_config(config), ValueError)
    if not refused(dp) and dp is not None:
        assert all(math.isfinite(v) and v > 0 for v in
                   (dp.noise_multiplier, dp.max_grad_norm, dp.delta))


@fuzz(100)
@given(data=st.data())
def test_run_settings(data):
    from fedapp.config import DEFAULTS, RunSettings

    keys = st.sampled_from(sorted(DEFAULTS))
    overrides = data.draw(st.dictionaries(keys, json_values | keys.map(DEFAULTS.get), max_size=3))
    if data.draw(st.booleans()):  # one value of another setting's type: a swapped field
        a, b = data.draw(st.tuples(keys, keys))
        overrides[a] = DEFAULTS[b]
    if data.draw(st.integers(0, 9)) == 0:
        overrides[data.draw(st.text(max_size=10))] = 1
    result = attempt(lambda: RunSettings.from_run_config(overrides), ValueError)
    if refused(result):
        return
    s = result
    for key, value in overrides.items():  # taken as given, never converted from another type
        got = s.value(key)
        if value != "auto":
            assert type(got) in (type(value), float), (key, value, got)
            assert got == (float(value) if type(got) is float else value), (key, value, got)
    assert s.round_timeout > 0 and 0 < s.data.local_test_fraction < 1
    assert min(s.data.spam_buckets, s.data.shards_per_client, s.data.shard_size) >= 1
    assert min(s.train.momentum, s.train.weight_decay, s.dp.noise_multiplier, s.dp.population,
               s.seed) >= 0
    for name, value in s.as_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), name


# ================================================================== evaluation replies
@fuzz(40)
@given(data=st.data(), which=st.sampled_from(["plain", "paillier", "secagg"]))
def test_evaluation_replies(keys, caplog_flwr, data, which):
    strategy = {"plain": lambda: WeightedFedAvg(),
                "paillier": lambda: PaillierFedAvg(keys[0], clip=CLIP),
                "secagg": lambda: SecAggFedAvg(clip=CLIP)}[which]()
    good = [reply(1, None, {"num-examples": 10, "loss": 1.0, "accuracy": 0.5}),
            reply(2, None, {"num-examples": 30, "loss": 2.0, "accuracy": 0.7})]
    expected = strategy.aggregate_evaluate(1, good)
    kind = data.draw(st.sampled_from(["weight", "metrics", "records", "error"]))
    if kind == "weight":
        weight = data.draw(st.sampled_from([w for w in BAD_WEIGHTS if isinstance(w, (int, float))
                                            and not isinstance(w, bool)] + [[1, 2]]))
        bad = reply(3, None, {"num-examples": weight, "loss": 1.0, "accuracy": 0.5})
    elif kind == "metrics":
        bad = reply(3, None, {"num-examples": 10, "accuracy": 0.5,
                              **data.draw(st.sampled_from(BAD_METRICS))})
    elif kind == "records":
        bad = reply(3, None, None)
        if data.draw(st.booleans()):
            bad.content["a"] = MetricRecord({"num-examples": 10, "loss": 1.0})
            bad.content["b"] = MetricRecord({"num-examples": 10, "loss": 1.0})
    else:
        bad = Message(Error(code=1, reason="crashed"), metadata=metadata(3, "evaluate"))
    caplog_flwr.clear()
    with no_hang():
        got = strategy.aggregate_evaluate(1, [good[0], bad, good[1]])
    if any("node 3" in w.lower() for w in warnings_of(caplog_flwr)):
        assert dict(got) == dict(expected)
    else:
        assert kind == "metrics", "a malformed evaluation reply was aggregated"


def test_legacy_weighted_metrics_of_any_type():
    from fedapp.legacy import weighted_metrics

    metrics = weighted_metrics([(10, {"loss": 1.0}), (30, {"loss": [1.0, 2.0]}),
                                (10, {"loss": "x"})])
    assert metrics == {"loss": pytest.approx(0.2)}
