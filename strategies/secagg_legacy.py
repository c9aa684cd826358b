"""Masked secure aggregation (weighted FedAvg) on Flower's legacy API: a strategy
and a client mod.

Switch an existing legacy project (``NumPyClient``, ``ClientApp(client_fn=...)``,
``ServerApp(server_fn=...)``) with two changes::

    strategy = LegacySecAggFedAvg(clip=1.0, ...)                        # server_fn
    app = ClientApp(client_fn=client_fn, mods=[legacy_secagg_mod])      # clients

Same protocol and node-side helpers as :mod:`strategies.secagg_message`; only the
envelope differs. The key stages travel as ``get_properties`` calls whose config
holds the ``secagg-payload`` (answered by the mod; the client's own
``get_properties`` is never called for them), the mask payload rides in the fit
config, and a masked update is::

    Parameters(tensor_type="secagg-v1/numpy.ndarray",
               tensors=[npy(masked vector), npy(header)])

two ``.npy`` serializations (read back with ``allow_pickle=False``): the
uint32/uint64 masked vector and the UTF-8 JSON header as uint8.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, FitIns, FitRes, GetPropertiesIns, GetPropertiesRes, Parameters,
                         Scalar, Status, ndarray_to_bytes, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.constant import MessageTypeLegacy
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from .aggregation import InvalidUpdate, check_weight
from .legacy_wire import layout_of, load_npy
from .secagg_masks import SecAggError
from .node_errors import reports_errors
from .node_settings import refuse_evaluation
from .screening import SECURE_EMPTY_ROUNDS, report_failures
from .secagg_node import answer_stage, mask_model, model_digest, require_payload
from .secagg_rounds import SecAggRounds
from .secagg_wire import header_of, layout_digest
from .secagg_protocol import (HEADER_KEY, MASKED_KEY, MAX_HEADER_BYTES, PAYLOAD_KEY,
                              RoundAborted)

TENSOR_TYPE = "secagg-v1/numpy.ndarray"


def to_parameters(arrays: dict[str, np.ndarray]) -> Parameters:
    return Parameters(tensors=[ndarray_to_bytes(arrays[MASKED_KEY]),
                               ndarray_to_bytes(arrays[HEADER_KEY])], tensor_type=TENSOR_TYPE)


def parameters_masked(parameters: Parameters) -> tuple[np.ndarray, dict]:
    """The masked vector and header of a fit reply; :class:`InvalidUpdate` if malformed."""
    if parameters.tensor_type != TENSOR_TYPE:
        raise InvalidUpdate(f"tensor type {parameters.tensor_type!r}, expected {TENSOR_TYPE!r}: "
                            "is legacy_secagg_mod on the ClientApp?")
    if len(parameters.tensors) != 2:
        raise InvalidUpdate(f"{len(parameters.tensors)} tensors, expected masked vector and "
                            "header")
    vector = load_npy(parameters.tensors[0], "masked vector", (np.uint32, np.uint64))
    header = load_npy(parameters.tensors[1], "header", (np.uint8,), MAX_HEADER_BYTES)
    return vector, header_of(header)


class LegacySecAggFedAvg(SecAggRounds, FedAvg):
    """Weighted FedAvg by secure aggregation for legacy projects: the server sees only
    masked updates and their sum.

    Parameters
    ----------
    clip, max_total_weight, value_bits, num_neighbors, threshold_fraction, stage_timeout,
    max_empty_rounds
        As for :class:`strategies.secagg_message.SecAggFedAvg` (the Message-API adapter).
    **kwargs
        Passed to :class:`flwr.server.strategy.FedAvg` (fractions, minimums,
        ``on_fit_config_fn``, ``initial_parameters``, ``evaluate_fn``, metrics
        aggregation). The aggregate is public, so centralized evaluation works.

    A round whose key stages or unmasking lose too many clients is skipped with a
    warning and the global model stays as it was; malformed, replayed or
    mis-addressed replies are left out naming the client.
    """

    def __init__(self, *, clip: float, max_total_weight: int = 65536, value_bits: int = 16,
                 num_neighbors: int = 0, threshold_fraction: float = 0.5, stage_timeout: float = 300.0,
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_masking(clip, max_total_weight, value_bits, num_neighbors, threshold_fraction,
                           stage_timeout, max_empty_rounds)
        self._proxies: dict[int, ClientProxy] = {}
        log(INFO, "LegacySecAggFedAvg: %s", self._describe())

    def __repr__(self) -> str:
        return f"LegacySecAggFedAvg(accept_failures={self.accept_failures})"

    def _exchange(self, requests: dict[int, str], stage: str, server_round: int
                  ) -> dict[int, str]:
        """One key stage over ``get_properties``, all clients at once."""
        def ask(u: int) -> str:
            res = self._proxies[u].get_properties(
                GetPropertiesIns(config={PAYLOAD_KEY: requests[u]}), timeout=self.stage_timeout,
                group_id=server_round)
            if res.status.code != Code.OK:
                raise ValueError(res.status.message)
            return res.properties.get(PAYLOAD_KEY)

        answers = {}
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(32, len(requests) or 1)) as pool:
            futures = {u: pool.submit(ask, u) for u in requests}
            for u, future in futures.items():
                try:
                    answers[u] = future.result(timeout=self.stage_timeout)
                except Exception as err:  # a failed or silent client is a dropout
                    self.watch.node_failed(u, str(err) or type(err).__name__,
                                           stage)
        self.watch.flush()
        log(INFO, "Secure aggregation: %s stage, %d of %d clients answered in %.2f s", stage,
            len(answers), len(requests), time.monotonic() - start)
        return answers

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._round = None
        if parameters.tensor_type == TENSOR_TYPE:
            raise ValueError("the global model must be plaintext")
        self._layout = layout_of(parameters_to_ndarrays(parameters))
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self._proxies = {int(proxy.node_id): proxy for proxy, _ in pairs}
        try:
            rnd = self._new_round(list(self._proxies))
            self._key_stages(rnd, lambda requests, stage: self._exchange(requests, stage,
                                                                         server_round))
        except RoundAborted as err:
            log(WARNING, "Round %d skipped, the model stays as it was: %s", server_round, err)
            # Flower's legacy loop calls no aggregate_fit for a round without clients
            self.watch.end_round(server_round, False)
            return []
        self._round = rnd
        payloads = rnd.mask_payloads()
        return [(proxy, FitIns(ins.parameters, {**ins.config, PAYLOAD_KEY: payloads[u]}))
                for (proxy, ins), u in zip(pairs, self._proxies, strict=True) if u in payloads]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        report_failures(self.watch, failures)
        rnd, self._round = self._round, None
        if rnd is None:
            return None, {}
        for proxy, res in results:
            try:
                vector, header = parameters_masked(res.parameters)
                if header.get("layout") != layout_digest(self._layout):
                    raise InvalidUpdate("the masked model's arrays differ from the global "
                                        "model's")
                rnd.receive_masked(int(proxy.node_id), vector, header)
            except (InvalidUpdate, SecAggError) as err:
                log(WARNING, "Left out the reply of client %s in round %d: %s", proxy.cid,
                    server_round, err)
        self.watch.flush()
        try:
            average, self.last_total_weight, metrics = self._unmask(
                rnd, lambda requests, stage: self._exchange(requests, stage, server_round))
        except RoundAborted as err:
            log(WARNING, "Round %d skipped, the model stays as it was: %s", server_round, err)
            self.watch.end_round(server_round, False)
            return None, {}
        self.watch.end_round(server_round, True)
        return ndarrays_to_parameters(self._layout.unflatten(average)), dict(metrics)


# ------------------------------------------------------------------ client mod
def _answer_properties(msg: Message, context: Context) -> Message | None:
    """The reply to a key-stage ``get_properties`` call, or None for any other."""
    config = msg.content.config_records.get("getpropertiesins.config", {})
    if PAYLOAD_KEY not in config:
        return None
    reply = answer_stage(config[PAYLOAD_KEY], context, msg.metadata.dst_node_id)
    res = GetPropertiesRes(status=Status(Code.OK, "Success"), properties={PAYLOAD_KEY: reply})
    return Message(compat.getpropertiesres_to_recorddict(res), reply_to=msg)


def _mask_fitres(payload: str, received: str, msg: Message, reply: Message, context: Context
                 ) -> None:
    """Replace the plaintext model in a fit reply by the masked, weighted update."""
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    if res.status.code != Code.OK:  # no update: send none, never plaintext
        masked = Parameters(tensors=[], tensor_type="")
    else:
        arrays = parameters_to_ndarrays(res.parameters)
        masked = to_parameters(mask_model(
            payload, context, msg.metadata.dst_node_id, layout_of(arrays).names, arrays,
            check_weight(res.num_examples), received, res.metrics,
            dict(msg.content.config_records.get("fitins.config", {}))))
    # the weight and metrics travel only inside the masked vector, as sums
    reply.content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 0})
    reply.content.config_records["fitres.metrics"] = ConfigRecord()
    reply.content.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
        masked, keep_input=True)


@reports_errors(SecAggError, PermissionError)
def legacy_secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer the key stages; mask the fit reply's model on the way out.

    Fails (the client replies with an error) rather than send a plaintext model when
    the fit config holds no secure-aggregation payload.
    """
    kind = msg.metadata.message_type
    if kind == MessageTypeLegacy.GET_PROPERTIES:
        answer = _answer_properties(msg, context)
        if answer is not None:
            return answer
    if kind == MessageType.EVALUATE:
        refuse_evaluation(context.node_config, "masking")
    if kind != MessageType.TRAIN:
        return call_next(msg, context)
    config = dict(msg.content.config_records.get("fitins.config", {}))
    payload = require_payload(config)
    record = msg.content.array_records.get("fitins.parameters")
    tensors = [] if record is None else compat.arrayrecord_to_parameters(
        record, keep_input=True).tensors
    received = model_digest({str(i): np.frombuffer(t, np.uint8) for i, t in enumerate(tensors)},
                            config)
    reply = call_next(msg, context)
    if reply.has_content():
        _mask_fitres(payload, received, msg, reply, context)
    return reply
