"""Masked secure aggregation (weighted FedAvg) on Flower's Message API: a strategy
and a client mod.

Switch an existing Message-API project with two changes::

    strategy = SecAggFedAvg(clip=1.0, ...)          # server
    app = ClientApp(mods=[secagg_mod])              # clients

Each round, before the train messages, the strategy runs two short key stages
with the sampled nodes (``train`` messages holding only a ``secagg`` record, which
the mod answers itself without calling the app), puts
the relayed shares in each train message's config, and after the masked replies
one unmask stage (:mod:`strategies.secagg_protocol`). The unmask replies carry
the survivors' keys for the next round, so from the second round on only the
nodes without such keys are sent an advertise request (none, usually: the stage
is skipped). The server only ever sees
masked vectors and the sum. Node secrets stay in the node's ``context.state``.

Key advertisements are authenticated with HMAC-SHA256 under a federation
authentication key the client nodes hold (node config ``secagg-auth-key=PATH``,
else ``secagg-auth.key`` in the node's key directory,
:func:`strategies.keyfiles.node_key_file`; make one with ``fedapp keygen
--secagg``); the server never holds it. A node without one refuses to take part
(fail closed) unless the run or node config sets
``secagg-allow-unauthenticated = true``: then the server is trusted to relay keys
honestly (semi-honest server), and the node says so once in its log. A node that
holds a key always authenticates, whatever the run config says.

Legacy-API projects use :mod:`strategies.secagg_legacy`, built on the same helpers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord, RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .aggregation import InvalidUpdate, Layout, check_weight
from .fedavg import aggregate_metrics, evaluate_metrics
from .keyfiles import AUTH_KEY_NAME, KeyNotFound, load_auth_key, node_key_file
from .node_errors import NodeError, reports_errors
from .masking import MaskingError, MaskingParams
from .records import array_record, record_arrays
from .screening import SECURE_EMPTY_ROUNDS, RoundWatch
from .secagg_protocol import (HEADER_KEY, MASKED_KEY, PAYLOAD_KEY, RoundAborted, ServerRound,
                              client_mask, client_step)

AUTH_KEY_NODE_CONFIG = "secagg-auth-key"
ALLOW_UNAUTHENTICATED = "secagg-allow-unauthenticated"
# Flower routes a message to a registered function, and the mods wrap those: the
# key stages travel as "train" messages (every training project registers one)
# holding a "secagg" ConfigRecord, which the mod answers without calling the app.
STAGE_MESSAGE_TYPE = MessageType.TRAIN
RECORD_KEY = "secagg"
MAX_HEADER_BYTES = 4096


def masking_params(clip: float, max_total_weight: int, value_bits: int, num_neighbours: int,
                   threshold: float) -> MaskingParams:
    """Check a masking strategy's arguments; the encoding its clients must use."""
    if num_neighbours < 0:
        raise ValueError(f"num_neighbours must be >= 0 (0: SecAgg+'s logarithmic default), "
                         f"got {num_neighbours}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    try:
        return MaskingParams.derive(clip, max_total_weight, value_bits)
    except MaskingError as err:
        raise ValueError(str(err)) from None


# ------------------------------------------------------------------ wire helpers
def header_array(header: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(header).encode(), dtype=np.uint8).copy()


def header_of(array: object) -> dict:
    """The JSON header beside a masked vector; :class:`InvalidUpdate` if malformed."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1 \
            or array.size > MAX_HEADER_BYTES:
        raise InvalidUpdate(f"the masked update's header must be a 1-d uint8 array of at most "
                            f"{MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(array.tobytes().decode())
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise InvalidUpdate("the masked update's header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise InvalidUpdate("the masked update's header is not a JSON object")
    return header


def masked_arrays(record: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """The masked vector and header of a reply's arrays."""
    if set(record) != {MASKED_KEY, HEADER_KEY}:
        raise InvalidUpdate(f"expected arrays {MASKED_KEY!r} and {HEADER_KEY!r}, got "
                            f"{sorted(record)}: is secagg_mod on the ClientApp?")
    return record[MASKED_KEY], header_of(record[HEADER_KEY])


def layout_digest(layout: Layout) -> str:
    """Names, shapes and dtypes in order: the server checks the masked vector's."""
    return hashlib.sha256(json.dumps(layout.to_json()).encode()).hexdigest()


# ------------------------------------------------------------------ strategy
class MaskingRounds:
    """What both masking strategies (Message API and legacy) hold: the encoding, the
    round's settings, the public keys seen so far and the round in progress."""

    def _init_masking(self, clip: float, max_total_weight: int, value_bits: int,
                      num_neighbours: int, threshold: float, stage_timeout: float,
                      max_empty_rounds: int) -> None:
        self.watch = RoundWatch(max_empty_rounds)
        self.params = masking_params(clip, max_total_weight, value_bits, num_neighbours,
                                     threshold)
        self.num_neighbours = num_neighbours
        self.threshold = threshold
        self.stage_timeout = stage_timeout
        self._seen_keys: set[bytes] = set()
        self._round: ServerRound | None = None
        self._layout: Layout | None = None
        # (context, keys) the last unmask stage's survivors pre-advertised for the next round
        self._next: tuple[bytes, dict[int, dict]] | None = None
        self.last_total_weight = 0  # of the last aggregate: central DP reads it

    def _new_round(self, nodes: list[int]) -> ServerRound:
        """The round of ``nodes``; on the context pre-advertised for, if any (used once)."""
        preadvertised, self._next = self._next, None
        return ServerRound(self.params, nodes, self._layout.size, self.num_neighbours,
                           self.threshold, self._seen_keys, preadvertised)

    def _key_stages(self, rnd: ServerRound, exchange: Callable[[dict[int, str], str],
                                                                 dict[int, str]]) -> None:
        """Stages 1 and 2 through ``exchange(requests, stage) -> replies``; stage 1 only
        for the nodes without pre-advertised keys (skipped when there are none)."""
        requests = rnd.advertise_requests()
        if requests:
            rnd.receive_adverts(exchange(requests, "advertise"))
            tagged = sum(1 for a in rnd.adverts.values() if a.get("mac"))
            log(INFO if tagged == len(rnd.adverts) else WARNING, "Secure aggregation: %d of %d "
                "nodes' key advertisements carry an authentication tag", tagged,
                len(rnd.adverts))
        else:
            log(INFO, "Secure aggregation: advertise stage skipped, all %d nodes "
                "pre-advertised their keys", len(rnd.nodes))
            rnd.receive_adverts({})
        rnd.receive_shares(exchange(rnd.share_requests(), "share"))

    def _unmask(self, rnd: ServerRound, exchange: Callable[[dict[int, str], str],
                                                           dict[int, str]]
                ) -> tuple[np.ndarray, int]:
        """Stage 4 through ``exchange``; keeps the keys pre-advertised for the next round
        (even if this one aborts: they are bound to the next round's context only)."""
        replies = exchange(rnd.unmask_requests(), "unmask")
        try:
            return rnd.receive_unmask(replies)
        finally:
            self._next = (rnd.next_context, rnd.next_adverts) if rnd.next_adverts else None

    def _describe(self) -> str:
        return (f"{self.params.value_bits}-bit values in [-{self.params.clip:g}, "
                f"{self.params.clip:g}] mod 2^{self.params.mod_bits}, neighbours "
                f"{self.num_neighbours or 'auto (log n)'}, threshold > {self.threshold:g} "
                "of each share group")


class SecAggFedAvg(MaskingRounds, FedAvg):
    """Weighted FedAvg by secure aggregation: the server sees only masked updates.

    Parameters
    ----------
    clip : float
        Model values are clipped to ``[-clip, clip]`` before quantization.
    max_total_weight : int (default: 65536)
        Largest sum of client weights (examples) in one round; sets the headroom.
    value_bits : int (default: 16)
        Quantization bits per value (error bound ``2 clip / (2^bits - 1)``).
    num_neighbours : int (default: 0)
        Neighbours each node masks with and shares its secrets among; 0 takes
        SecAgg+'s ``2 ceil(log2 n) + 2`` (all nodes for 10 or fewer).
    threshold : float (default: 0.5)
        A node's secrets need shares from more than this fraction of its share
        group (itself and its neighbours): the dropouts tolerated per group, and
        the number of colluders with the server it withstands.
    stage_timeout : float (default: 300)
        Seconds to wait for the replies of each key stage.
    max_empty_rounds : int (default: 1)
        Rounds in a row without a usable update after which the run fails
        (:class:`strategies.screening.NoUsableUpdate`).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimums).

    A round whose key stages or unmasking lose too many nodes is skipped with a
    warning and the global model stays as it was (it counts as an empty round);
    malformed, replayed or mis-addressed replies (evaluation replies too) are left
    out naming the node.
    """

    def __init__(self, *, clip: float, max_total_weight: int = 65536, value_bits: int = 16,
                 num_neighbours: int = 0, threshold: float = 0.5, stage_timeout: float = 300.0,
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_masking(clip, max_total_weight, value_bits, num_neighbours, threshold,
                           stage_timeout, max_empty_rounds)
        self._grid: Grid | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> SecAgg: %s", self._describe())

    def _exchange(self, requests: dict[int, str], stage: str) -> dict[int, str]:
        """Send one key stage's requests; the payloads of the nodes that answered."""
        messages = [Message(RecordDict({RECORD_KEY: ConfigRecord({PAYLOAD_KEY: text})}),
                            dst_node_id=u, message_type=STAGE_MESSAGE_TYPE)
                    for u, text in requests.items()]
        answers = {}
        start = time.monotonic()
        for reply in self._grid.send_and_receive(messages, timeout=self.stage_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.watch.node_failed(node, reply.error.reason, stage)
            elif RECORD_KEY not in reply.content.config_records:
                log(WARNING, "Secure aggregation: node %s sent no %s payload", node, stage)
            else:
                answers[node] = reply.content.config_records[RECORD_KEY].get(PAYLOAD_KEY)
        self.watch.flush()
        log(INFO, "Secure aggregation: %s stage, %d of %d nodes answered in %.2f s", stage,
            len(answers), len(messages), time.monotonic() - start)
        return answers

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid, self._round = grid, None
        plain = record_arrays(arrays)
        self._layout = Layout.of(list(plain), list(plain.values()))
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        if not sampled:
            return []
        try:
            rnd = self._new_round([m.metadata.dst_node_id for m in sampled])
            self._key_stages(rnd, self._exchange)
        except RoundAborted as err:
            log(WARNING, "Round %d skipped, the model stays as it was: %s", server_round, err)
            return []
        self._round = rnd
        base = dict(sampled[0].content.config_records[self.configrecord_key])
        return [Message(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key:
                                    ConfigRecord({**base, PAYLOAD_KEY: payload})}),
                        dst_node_id=u, message_type=MessageType.TRAIN)
                for u, payload in rnd.mask_payloads().items()]

    def _add_reply(self, msg: Message) -> None:
        content = msg.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise InvalidUpdate("expected one ArrayRecord and one MetricRecord")
        weight = check_weight(next(iter(content.metric_records.values())).get(
            self.weighted_by_key))
        vector, header = masked_arrays(record_arrays(next(iter(content.array_records.values()))))
        if header.get("layout") != layout_digest(self._layout):
            raise InvalidUpdate("the masked model's arrays (names, shapes, dtypes) differ from "
                                "the global model's")
        self._round.receive_masked(msg.metadata.src_node_id, vector, header, weight)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._round is None:  # the key stages lost too many nodes
            self.watch.end_round(server_round, False)
            return None, None
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.watch.node_failed(node, msg.error.reason)
                continue
            try:
                self._add_reply(msg)
            except (InvalidUpdate, MaskingError) as err:
                log(WARNING, "Left out the reply of node %s in round %d: %s", node,
                    server_round, err)
                continue
            valid.append(msg)
        rnd, self._round = self._round, None
        self.watch.flush()
        try:
            average, self.last_total_weight = self._unmask(rnd, self._exchange)
        except RoundAborted as err:
            log(WARNING, "Round %d skipped, the model stays as it was: %s", server_round, err)
            self.watch.end_round(server_round, False)
            return None, None
        self.watch.end_round(server_round, True)
        arrays = array_record(dict(zip(self._layout.names, self._layout.unflatten(average),
                                       strict=True)))
        metrics = aggregate_metrics(self.train_metrics_aggr_fn, [m.content for m in valid],
                                    self.weighted_by_key)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return evaluate_metrics(self, replies, self.watch)


# ------------------------------------------------------------------ node side
_WARNED: set[str] = set()


def allows_unauthenticated(context: Context) -> bool:
    """Whether the node or run config says ``secagg-allow-unauthenticated = true``."""
    return any(config.get(ALLOW_UNAUTHENTICATED) in (True, "true")
               for config in (context.node_config, context.run_config))


def node_auth_key(context: Context) -> bytes | None:
    """This node's authentication key (node config ``secagg-auth-key``, else
    ``secagg-auth.key`` in its key directory).

    Returns None, with a one-time warning, only if there is none and the node or run
    config allows unauthenticated key exchange (``secagg-allow-unauthenticated``).

    Raises
    ------
    NodeError
        If there is no key and nothing allows running without one (fail closed), or
        the file the node config names does not exist.
    """
    try:
        path = node_key_file(dict(context.node_config), AUTH_KEY_NODE_CONFIG, AUTH_KEY_NAME,
                             "fedapp keygen --secagg")
    except KeyNotFound as err:
        if AUTH_KEY_NODE_CONFIG in context.node_config or not allows_unauthenticated(context):
            raise NodeError(
                f"secure aggregation needs the federation's authentication key: {err}. To run "
                "without one, trusting the server to relay keys honestly, set "
                f"{ALLOW_UNAUTHENTICATED}=true in the run config") from None
        if "auth" not in _WARNED:
            _WARNED.add("auth")
            log(WARNING, "Secure aggregation without an authentication key (%s = true): the "
                "server is trusted to relay keys honestly", ALLOW_UNAUTHENTICATED)
        return None
    return load_auth_key(path)


def load_state(context: Context) -> dict:
    record = context.state.config_records.get(RECORD_KEY)
    return json.loads(record["state"]) if record and "state" in record else {}


def save_state(context: Context, state: dict) -> None:
    context.state.config_records[RECORD_KEY] = ConfigRecord({"state": json.dumps(state)})


def answer_stage(payload: object, context: Context, node: int) -> str:
    """Answer a key stage (advertise, share, unmask) on this node."""
    if not isinstance(payload, str):
        raise MaskingError("the secure-aggregation request holds no payload")
    reply, state = client_step(payload, load_state(context), node, node_auth_key(context))
    save_state(context, state)
    return reply


def require_payload(config: dict) -> str:
    """The round's mask payload from a train config; refuses to train without one
    (the server is then not a secure-aggregation strategy: never send plaintext)."""
    payload = config.get(PAYLOAD_KEY)
    if not isinstance(payload, str):
        raise NodeError("this node masks its updates (secure-aggregation client mod) but the "
                         "server sent no secure-aggregation payload: the server must run "
                         "SecAggFedAvg (Message API) or LegacySecAggFedAvg (legacy API)")
    return payload


def below_or_at(value: float, dtype: np.dtype) -> np.floating:
    """The largest ``dtype`` number at most ``value``: for ``x`` of that dtype,
    ``x > below_or_at(value)`` exactly when ``x > value``."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: its largest number
        out = np.asarray(value, dtype=dtype)[()]
    return np.nextafter(out, dtype.type(-np.inf)) if float(out) > value else out


def mask_model(payload: str, context: Context, node: int, names: list[str],
               arrays: list[np.ndarray], weight: int) -> tuple[dict[str, np.ndarray], float]:
    """This node's trained model, masked; returns the arrays to send and the fraction
    of values outside the clip range."""
    layout = Layout.of(names, arrays)
    # in the model's own float dtype (float32 for torch): quantize computes in float64
    flat = layout.flatten(arrays, np.result_type(*arrays))
    state = load_state(context)
    clip = float(state.get("params", {}).get("clip", np.inf))
    clipped = float(np.count_nonzero(np.abs(flat) > below_or_at(clip, flat.dtype))
                    / max(flat.size, 1))
    if clipped > 0:
        log(WARNING, "%.4f%% of model values exceed the clip range %g: raise it",
            100 * clipped, clip)
    masked, header, state = client_mask(payload, state, node, flat, weight)
    save_state(context, state)
    header["layout"] = layout_digest(layout)
    return {MASKED_KEY: masked, HEADER_KEY: header_array(header)}, clipped


@reports_errors(MaskingError, PermissionError)
def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer the key stages; mask the train update on the way out.

    Fails closed: without the authentication key (unless allowed), or when the server
    sends no masking payload, the node answers with an error naming the cause and the
    fix, and never sends plaintext; other failures reach the server as their type only
    (:mod:`strategies.node_errors`)."""
    node = msg.metadata.dst_node_id
    if msg.metadata.message_type == STAGE_MESSAGE_TYPE and \
            RECORD_KEY in msg.content.config_records:
        reply = answer_stage(msg.content.config_records[RECORD_KEY].get(PAYLOAD_KEY), context,
                             node)
        return Message(RecordDict({RECORD_KEY: ConfigRecord({PAYLOAD_KEY: reply})}),
                       reply_to=msg)
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    config = next(iter(msg.content.config_records.values()), {})
    payload = require_payload(dict(config))
    reply = call_next(msg, context)
    if reply.has_content():
        if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
            raise ValueError("a train reply must hold one ArrayRecord and one MetricRecord")
        (name, record), = reply.content.array_records.items()
        metrics = next(iter(reply.content.metric_records.values()))
        plain = record_arrays(record)
        arrays, metrics["secagg-clipped"] = mask_model(
            payload, context, node, list(plain), list(plain.values()),
            int(metrics["num-examples"]))
        reply.content[name] = array_record(arrays)
    return reply
