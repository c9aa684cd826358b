"""Weighted FedAvg under a threshold Paillier key on Flower's legacy API: a strategy and
a client mod. No node holds the whole private key; ``T`` share holders decrypt each
round's aggregate together, and one of them seals the model for the clients.

Switch an existing legacy project (``NumPyClient``, ``ClientApp(client_fn=...)``,
``ServerApp(server_fn=...)``) with two changes::

    strategy = LegacyThresholdPaillierFedAvg(load_threshold_public_key(path), clip=1.0)
    app = ClientApp(client_fn=client_fn, mods=[legacy_threshold_paillier_mod])

the first in ``server_fn``, the second on the clients. Same protocol, node keys and
round logic as the Message-API adapter :mod:`strategies.threshold_message`
(:mod:`strategies.threshold_rounds`, :mod:`strategies.threshold_node`,
:mod:`strategies.threshold_protocol`); only the envelope differs.

Wire format
-----------
A fit reply's update, and the global model once sealed (the initial model, random
weights, stays plaintext ``"numpy.ndarray"``)::

    Parameters(tensor_type="paillier-threshold-v1/numpy.ndarray",
               tensors=[npy(ciphertexts), npy(header)])
    Parameters(tensor_type="paillier-threshold-sealed-v1/numpy.ndarray",
               tensors=[npy(sealed model), npy(header)])

``.npy`` serializations of uint8 arrays, read back with ``allow_pickle=False``. The
node's identity key, its signature of the update and the number of the key share it
holds ride in the fit metrics (``threshold-identity``, ``threshold-signature``,
``threshold-share``). The view, decrypt and combine stages travel as ``get_properties``
calls whose config holds ``threshold-stage``, answered by the mod (the client's own
``get_properties`` is never called for them): texts as JSON strings, arrays as
``.npy`` bytes under ``threshold-<name>/<array>``, sealed partials as bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, FitIns, FitRes, GetPropertiesIns, GetPropertiesRes, Parameters,
                         Scalar, Status, ndarray_to_bytes, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.constant import MessageTypeLegacy
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from .aggregation import InvalidUpdate, check_weight
from .encrypted_result import save_encrypted_model
from .legacy_wire import layout_of, legacy_names, load_ndarrays, load_npy
from .node_errors import NodeError, reports_errors
from .node_settings import PLAINTEXT_METRICS, node_setting, refuse_evaluation
from .paillier_legacy import LegacyEncryptedFedAvg, arrays_to_parameters, parameters_to_arrays
from .paillier_node import resumed_run, open_sealed_model, parse_round_config, round_config
from .paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, MASKED_KEY, MAX_HEADER_BYTES,
                                DecryptionRefused, EncryptedModel)
from .screening import SECURE_EMPTY_ROUNDS, report_failures
from .threshold_node import (NodeKeys, answer_combine, answer_decrypt, answer_view,
                             contribute, node_keys)
from .threshold_paillier import ThresholdPublicKey
from .threshold_protocol import (MAX_SEALED_HEADER_BYTES, SEALED_HEADER_KEY, SEALED_KEY,
                                 DecryptRequest, SealError, ThresholdRefused, View)
from .threshold_rounds import (CombineRequest, Combined, StageRequest, ThresholdRounds,
                               read_request, read_signature, read_view, request_arrays,
                               request_fields, signature_fields, view_text)

TENSOR_TYPE = "paillier-threshold-v1/numpy.ndarray"
SEALED_TENSOR_TYPE = "paillier-threshold-sealed-v1/numpy.ndarray"
PLAIN_TENSOR_TYPE = "numpy.ndarray"  # ndarrays_to_parameters's
PREFIX = "threshold-"  # of the fit metrics and stage fields this mode adds
STAGE_FIELD = f"{PREFIX}stage"
MOD = "legacy_threshold_paillier_mod"
_UPDATE = ((CIPHERTEXTS_KEY, "ciphertext", None), (HEADER_KEY, "header", MAX_HEADER_BYTES))
_MASKED_UPDATE = (*_UPDATE, (MASKED_KEY, "masked vector", None))
_SEALED = ((SEALED_KEY, "sealed model", None),
           (SEALED_HEADER_KEY, "sealed-model header", MAX_SEALED_HEADER_BYTES))


def update_parameters(model: EncryptedModel) -> Parameters:
    """A node's encrypted update as legacy ``Parameters`` (see the module docstring)."""
    names = _MASKED_UPDATE if model.masks else _UPDATE
    return arrays_to_parameters(model.to_arrays(), [k for k, _, _ in names], TENSOR_TYPE)


def update_arrays(parameters: Parameters) -> dict[str, np.ndarray]:
    """Inverse of :func:`update_parameters`; :class:`InvalidUpdate` if malformed."""
    names = _MASKED_UPDATE if len(parameters.tensors) == len(_MASKED_UPDATE) else _UPDATE
    return parameters_to_arrays(parameters, TENSOR_TYPE, names)


def sealed_parameters(model: Mapping[str, np.ndarray]) -> Parameters:
    """A sealed model (:func:`strategies.threshold_protocol.seal_model`) as legacy
    ``Parameters``."""
    return arrays_to_parameters(model, [k for k, _, _ in _SEALED], SEALED_TENSOR_TYPE)


def sealed_arrays(parameters: Parameters) -> dict[str, np.ndarray]:
    """Inverse of :func:`sealed_parameters`; :class:`InvalidUpdate` if malformed."""
    return parameters_to_arrays(parameters, SEALED_TENSOR_TYPE, _SEALED)


def _put_arrays(out: dict[str, Scalar], name: str, arrays: Mapping[str, np.ndarray]) -> None:
    for key, value in arrays.items():
        out[f"{PREFIX}{name}/{key}"] = ndarray_to_bytes(value)


def _get_arrays(fields: Mapping[str, Scalar], name: str) -> dict[str, np.ndarray]:
    head = f"{PREFIX}{name}/"
    return {key[len(head):]: load_npy(value, key) for key, value in fields.items()
            if key.startswith(head)}


def _own_metrics(metrics: Mapping[str, Scalar]) -> dict[str, Scalar]:
    return {k: v for k, v in metrics.items() if not k.startswith(PREFIX)}


# ------------------------------------------------------------------ strategy
class LegacyThresholdPaillierFedAvg(ThresholdRounds, LegacyEncryptedFedAvg):
    """Weighted FedAvg under a threshold Paillier key for legacy projects: no single
    key holder, the server blind to the updates and to the model.

    Parameters
    ----------
    public_key : ThresholdPublicKey
        The threshold public key (``strategies.keyfiles.load_threshold_public_key``).
    clip, max_total_weight, weight_unit, value_bits, max_empty_rounds
        As for :class:`strategies.paillier_legacy.LegacyPaillierFedAvg`.
    extra_decryptors : int (default: 1)
        Share holders asked beyond ``T`` each round, so that that many may drop out.
    payload : {"masked", "paillier"} (default: "masked")
        What a contribution carries: its levels masked under a fresh Ring-LWE secret,
        with only the secret encrypted (:mod:`strategies.ring_masks`: the decryptors
        decrypt 33 ciphertexts a round, whatever the model's size), or its levels
        packed into Paillier plaintexts and encrypted (security on DCR alone; the
        decryptors decrypt every ciphertext, about 17 ms each on one core).
    stage_timeout : float (default: 600)
        Seconds to wait for each stage's replies (with the ``paillier`` payload a
        partial decryption takes about 17 ms per ciphertext on one core).
    save_to : str or Path, optional
        Where to write each round's sealed global model (the last round's stays): a
        ``server_fn`` app has no hook after the run. ``fedapp decrypt --key
        paillier-group.key --model PATH --out model.npz`` opens it on a client machine.
    **kwargs
        Passed to :class:`flwr.server.strategy.FedAvg` (fractions, minimums,
        ``on_fit_config_fn``, ``initial_parameters``, metrics aggregation).
        ``evaluate_fn`` is refused: the server never holds the model, so evaluate on
        the clients (``fraction_evaluate``; the nodes answer only if their
        ``plaintext-metrics`` allows it).

    As :class:`strategies.threshold_message.ThresholdPaillierFedAvg`: each round needs
    at least ``T + 1`` valid signed contributions, a view signed by all of them, ``T``
    verified partials and one combiner, otherwise it is skipped with a warning and the
    model stays as it was; bad replies are left out naming the client. Share holders
    are known from their fit replies, so the first round's sampling must reach ``T``
    of them.
    """

    def __init__(self, public_key: ThresholdPublicKey, *, clip: float,
                 max_total_weight: int = 65536, weight_unit: int = 1, value_bits: int = 16,
                 extra_decryptors: int = 1, stage_timeout: float = 600.0,
                 payload: str = "masked",
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS,
                 save_to: str | Path | None = None, **kwargs) -> None:
        if kwargs.get("evaluate_fn") is not None:
            raise ValueError("LegacyThresholdPaillierFedAvg cannot take an evaluate_fn: the "
                             "server never holds the model. Evaluate on the clients "
                             "(fraction_evaluate > 0), or save the sealed model (save_to=PATH) "
                             "and open it on a client machine (fedapp decrypt --key "
                             "paillier-group.key)")
        super().__init__(**kwargs)
        self._init_threshold(public_key, clip, max_total_weight, weight_unit, value_bits,
                             extra_decryptors, stage_timeout, max_empty_rounds, payload)
        self.save_to = None if save_to is None else Path(save_to)
        self._clients: ClientManager | None = None
        log(INFO, "LegacyThresholdPaillierFedAvg: %s", self._describe_threshold())

    def __repr__(self) -> str:
        return (f"LegacyThresholdPaillierFedAvg(key={self.public_key.fingerprint[:16]}..., "
                f"accept_failures={self.accept_failures})")

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._clients = client_manager
        if parameters.tensor_type == SEALED_TENSOR_TYPE:
            self._remember_global(sealed_arrays(parameters))
        elif parameters.tensor_type == PLAIN_TENSOR_TYPE:  # the initial model: random weights
            arrays = load_ndarrays(parameters.tensors)
            self._remember_global(dict(zip(legacy_names(len(arrays)), arrays, strict=True)))
        else:
            raise ValueError(f"the global model has tensor type {parameters.tensor_type!r}: "
                             f"expected the sealed model ({SEALED_TENSOR_TYPE!r}) or, in "
                             f"round 1, plaintext initial_parameters ({PLAIN_TENSOR_TYPE!r})")
        return self._fit_with(server_round, parameters, client_manager, round_config(
            self.params, self.public_key.fingerprint, self.weight_unit, server_round,
            masked=self.masked))

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        report_failures(self.watch, failures)
        if not results or (failures and not self.accept_failures):
            self.watch.end_round(server_round, False)
            return None, {}
        round_sum = self._round_sum(server_round)
        signed: dict = {}
        valid: list[FitRes] = []
        for proxy, res in results:
            try:
                check_weight(res.num_examples)
                self._accept(round_sum, signed, int(proxy.cid), update_arrays(res.parameters),
                             read_signature({k[len(PREFIX):]: v for k, v in res.metrics.items()
                                             if k.startswith(PREFIX)}, MOD))
            except InvalidUpdate as err:
                log(WARNING, "Left out the reply of client %s in round %d: %s", proxy.cid,
                    server_round, err)
                continue
            valid.append(res)
        log(INFO, "aggregate_fit: %d valid encrypted replies of %d", len(valid), len(results))
        sealed = self._seal_round(
            server_round, round_sum, signed, self._connected,
            lambda requests, stage: self._exchange(requests, stage, server_round))
        if sealed is None:
            return None, {}
        if self.save_to is not None:
            save_encrypted_model(sealed, self.save_to)
        return sealed_parameters(sealed), self._fit_metrics(
            server_round, [(r.num_examples, _own_metrics(r.metrics)) for r in valid])

    def _proxies(self) -> dict[int, ClientProxy]:
        clients = self._clients.all().values() if self._clients is not None else []
        return {int(proxy.cid): proxy for proxy in clients}

    def _connected(self) -> list[int]:
        return list(self._proxies())

    def _exchange(self, requests: dict[int, StageRequest], stage: str, server_round: int
                  ) -> dict[int, bytes | Combined | None]:
        """One stage over ``get_properties``, all nodes at once; the answers without
        error, read (a failed or silent node is reported to the watch)."""
        proxies, configs, encoded = self._proxies(), {}, {}
        for node, request in requests.items():  # a decrypt request is encoded once
            if id(request) not in encoded:
                encoded[id(request)] = _request_config(request)
            configs[node] = encoded[id(request)]

        def ask(node: int) -> Mapping[str, Scalar]:
            res = proxies[node].get_properties(GetPropertiesIns(config=configs[node]),
                                               timeout=self.stage_timeout,
                                               group_id=server_round)
            if res.status.code != Code.OK:
                raise ValueError(res.status.message)
            return res.properties

        answers = {}
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=min(32, len(requests) or 1)) as pool:
            futures = {node: pool.submit(ask, node) for node in requests}
            for node, future in futures.items():
                try:
                    properties = future.result(
                        timeout=max(1.0, self.stage_timeout - (time.monotonic() - start)))
                except Exception as err:  # a failed, silent or unknown node drops out
                    self.watch.node_failed(node, str(err) or type(err).__name__, stage)
                    continue
                answers[node] = _read_answer(stage, properties)
        return answers


def _request_config(request: StageRequest) -> dict[str, Scalar]:
    """A stage request as a ``get_properties`` config (see the module docstring)."""
    if isinstance(request, View):
        return {STAGE_FIELD: "view", f"{PREFIX}view": view_text(request)}
    if isinstance(request, DecryptRequest):
        out: dict[str, Scalar] = {STAGE_FIELD: "decrypt", **{
            f"{PREFIX}{k}": v for k, v in request_fields(request).items()}}
        for name, arrays in request_arrays(request).items():
            _put_arrays(out, name, arrays)
        return out
    out = {STAGE_FIELD: "combine"}
    _put_arrays(out, "aggregate", request.aggregate.to_arrays())
    out.update({f"{PREFIX}partial-{node}": blob for node, blob in request.partials.items()})
    return out


def _read_answer(stage: str, properties: Mapping[str, Scalar]) -> bytes | Combined | None:
    """A node's answer to a stage request; ``None`` if it cannot be read."""
    try:
        if stage == "view":
            return bytes.fromhex(str(properties[f"{PREFIX}signature"]))
        if stage == "decrypt":
            partial = properties[f"{PREFIX}partial"]
            return partial if isinstance(partial, bytes) else None
        left_out = json.loads(str(properties.get(f"{PREFIX}left-out", "[]")))
        return Combined(_get_arrays(properties, "model"), [int(node) for node in left_out])
    except (KeyError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------ client mod
def _answer_stage(config: Mapping[str, Scalar], context: Context, keys: NodeKeys
                  ) -> dict[str, Scalar]:
    """This node's answer to a stage request (the config of a ``get_properties`` call)."""
    stage = config.get(STAGE_FIELD)
    if stage == "view":
        signature = answer_view(read_view(config.get(f"{PREFIX}view")), keys, context)
        return {f"{PREFIX}signature": signature.hex()}
    if stage == "decrypt":
        return {f"{PREFIX}partial": answer_decrypt(_decrypt_request(config, keys), keys,
                                                   context)}
    if stage == "combine":
        head = f"{PREFIX}partial-"
        partials = {int(k[len(head):]): v for k, v in config.items()
                    if k.startswith(head) and k[len(head):].isdigit() and isinstance(v, bytes)}
        aggregate = EncryptedModel.from_arrays(_get_arrays(config, "aggregate"), keys.public)
        combined = answer_combine(CombineRequest(aggregate, partials), keys, context)
        out: dict[str, Scalar] = {f"{PREFIX}left-out": json.dumps(combined.left_out)}
        _put_arrays(out, "model", combined.model)
        return out
    raise NodeError(f"unknown threshold stage {stage!r}: server and node run different "
                    "versions")


def _decrypt_request(config: Mapping[str, Scalar], keys: NodeKeys) -> DecryptRequest:
    return read_request({k[len(PREFIX):]: v for k, v in config.items() if k.startswith(PREFIX)},
                        lambda name: _get_arrays(config, name), keys.public)


def _fit_config(msg: Message) -> dict:
    return dict(msg.content.config_records.get("fitins.config", {}))


def _open_parameters(msg: Message, ins: str, keys: NodeKeys) -> dict[str, float]:
    """Replace the sealed global model of a fit or evaluate message by the plaintext;
    the metric means it releases (``released-*``)."""
    name = f"{ins}.parameters"
    record = msg.content.array_records.get(name)
    if record is None:
        return {}
    parameters = compat.arrayrecord_to_parameters(record, keep_input=True)
    if parameters.tensor_type != SEALED_TENSOR_TYPE:  # the initial model: public
        return {}
    _, plain, released = open_sealed_model(keys.group, sealed_arrays(parameters),
                                           msg.metadata.run_id,
                                           resumed_run(_fit_config(msg)))
    msg.content.array_records[name] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(plain), keep_input=True)
    return released


def _encrypt_fitres(msg: Message, reply: Message, keys: NodeKeys, context: Context,
                    released: dict[str, float]) -> None:
    """Replace the plaintext model in a fit reply by the encrypted, weighted update and
    its signature; the fit metrics travel inside the update as sums, in plaintext only
    what the node releases."""
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    if res.status.code != Code.OK:  # no update: send none, never plaintext
        encrypted, metrics = Parameters(tensors=[], tensor_type=""), {}
    else:
        arrays = parameters_to_ndarrays(res.parameters)
        contribution = contribute(_fit_config(msg), layout_of(arrays).names, arrays,
                                  res.num_examples, keys, context,
                                  run=msg.metadata.run_id, metrics=res.metrics)
        encrypted = update_parameters(contribution.model)
        own = dict(res.metrics) if node_setting(context.node_config, PLAINTEXT_METRICS) else {}
        metrics = {**own, **released, **{
            f"{PREFIX}{k}": v for k, v in signature_fields(
                keys.identity.key.public, contribution, keys.share_index).items()}}
    reply.content.config_records["fitres.metrics"] = ConfigRecord(metrics)
    reply.content.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
        encrypted, keep_input=True)


@reports_errors(PermissionError, DecryptionRefused, SealError, InvalidUpdate, ThresholdRefused)
def legacy_threshold_paillier_mod(msg: Message, context: Context,
                                  call_next: ClientAppCallable) -> Message:
    """Open the sealed global model of fit and evaluate messages on the way in; encrypt
    and sign the fit reply's model on the way out; answer the view, decrypt and
    combine stages (``get_properties`` calls holding ``threshold-stage``, answered
    without calling the client). The fit metrics travel inside the encrypted update;
    in plaintext the node sends the metric means of the model it opened
    (``released-*``), and it answers no evaluation, unless its ``plaintext-metrics``
    allows them.

    Fails closed: without the threshold public key, the group key, its identity key or
    the roster, or when the server's fit config holds no Paillier parameters, the node
    answers with an error naming the cause and the fix, and never sends plaintext.
    """
    keys = node_keys(context)  # no keys on this node: fail before anything else
    kind = msg.metadata.message_type
    if kind == MessageTypeLegacy.GET_PROPERTIES:
        config = msg.content.config_records.get("getpropertiesins.config", {})
        if STAGE_FIELD in config:
            res = GetPropertiesRes(status=Status(Code.OK, "Success"),
                                   properties=_answer_stage(config, context, keys))
            return Message(compat.getpropertiesres_to_recorddict(res), reply_to=msg)
    released: dict[str, float] = {}
    if kind == MessageType.TRAIN:
        parse_round_config(_fit_config(msg))  # before training, not after
        released = _open_parameters(msg, "fitins", keys)
    elif kind == MessageType.EVALUATE:
        refuse_evaluation(context.node_config, "threshold Paillier")
        _open_parameters(msg, "evaluateins", keys)
    reply = call_next(msg, context)
    if kind == MessageType.TRAIN and reply.has_content():
        _encrypt_fitres(msg, reply, keys, context, released)
    return reply
