"""The fuzz tests' toolkit: every decoder of data that comes from the network or from
the other party gets random garbage and near-valid mutations of valid messages (bit
flips, truncation, extension, wrong dtypes, swapped or ill-typed fields, NaN and
infinity, very deep JSON). It must either accept the input (and then give a
well-formed result) or refuse it with the exception its callers catch and a
message that says what was wrong: never another exception, never a hang, and a
bad input among good ones leaves what the good ones build up unchanged.

``FEDAPP_FUZZ_SCALE=10`` runs ten times the examples of every fuzz test."""

from __future__ import annotations

import binascii
import copy
import json
import logging
import os
import signal
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status
from flwr.server.client_manager import SimpleClientManager
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from strategies.paillier import PublicKey
from strategies.paillier_protocol import CIPHERTEXTS_KEY, HEADER_KEY
from strategies.records import record_arrays
from strategies.secagg_masks import SecAggParams
from tests.helpers import metadata
from tests.helpers.fakes import FakeProxy


HANG_SECONDS = 20
# ValueError subclasses that only ever mean "a parser below us failed": a decoder must say
# what was wrong in its own words instead.
LEAKS = (json.JSONDecodeError, UnicodeError, binascii.Error)

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

SHAPES = {"w": (4, 3), "b": (3,)}

WEIGHTS = (10, 30)


def plain_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-1.5, 1.5, s).astype(np.float32) for k, s in SHAPES.items()}


def header_of_model(arrays: dict[str, np.ndarray]) -> dict:
    return json.loads(arrays[HEADER_KEY].tobytes())


def with_header(arrays: dict[str, np.ndarray], header: object) -> dict[str, np.ndarray]:
    text = json.dumps(header).encode()
    return {**arrays, HEADER_KEY: np.frombuffer(text, np.uint8).copy()}


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


MASK_PARAMS = SecAggParams.derive(1.0, 1000)
MASK_NODES = [11, 22, 33, 44, 55]  # complete graph; a secret needs 3 of 5 shares
MASK_LENGTH = 6
BAD = 11  # the node whose messages are tampered with
XS = {u: np.random.default_rng(u).uniform(-1, 1, MASK_LENGTH) for u in MASK_NODES}
WS = {u: u // 11 * 10 for u in MASK_NODES}
LOW_ORDER_POINTS = [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    (2**255 - 20).to_bytes(32, "little"), (2**255 - 19).to_bytes(32, "little")]


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
        width = arrays["secagg-masked"].size  # the model, then the weight and metric sums
        must_fail = vector.dtype != np.uint32 or vector.shape != (width,)
        record["secagg-masked"] = Array(np.ascontiguousarray(vector))
    elif kind == "header":
        header = draw(mutated_json(json.loads(arrays["secagg-header"].tobytes())))
        record["secagg-header"] = Array(np.frombuffer(json.dumps(header).encode(), np.uint8))
        must_fail = False
    elif kind == "weight":  # the server reads the weight only as a masked sum
        metrics["num-examples"] = draw(st.sampled_from(
            [w for w in BAD_WEIGHTS if isinstance(w, (int, float)) and not isinstance(w, bool)]
            + [2000]))
        must_fail = False
    elif kind == "metrics":
        metrics.update(draw(st.sampled_from(BAD_METRICS)))
        must_fail = False
    else:  # the server needs the masked arrays only (the metrics travel inside them)
        arrays_gone = draw(st.booleans())
        return reply(node, None if arrays_gone else ArrayRecord(record), None), arrays_gone
    return reply(node, ArrayRecord(record), metrics), must_fail


PLAIN_WEIGHTS = {1: 10, 2: 30}


def plain_reply(node: int, arrays: dict[str, np.ndarray], n: object) -> Message:
    return reply(node, ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                 {"num-examples": n, "train-loss": 1.0})


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
