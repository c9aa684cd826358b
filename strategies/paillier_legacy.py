"""Paillier-encrypted weighted FedAvg on Flower's legacy API: a strategy and a client mod.

Switch an existing legacy project (``NumPyClient``, ``ClientApp(client_fn=...)``,
``ServerApp(server_fn=...)``) with two changes::

    strategy = LegacyPaillierFedAvg(load_public_key(path), clip=1.0, ...)   # server_fn
    app = ClientApp(client_fn=client_fn, mods=[legacy_paillier_mod])          # clients

It shares the protocol with the Message-API adapter :mod:`strategies.paillier_message`
through :mod:`strategies.paillier_node` (same round config, same encrypted model, same
key handling on the nodes); only the envelope differs.

Wire format
-----------
Legacy ``Parameters`` have no array names, only ``tensors: list[bytes]`` and a
``tensor_type``. An encrypted model is::

    Parameters(tensor_type="paillier-v1/numpy.ndarray",
               tensors=[npy(ciphertexts), npy(header)])

two ``.npy`` serializations (``allow_pickle=False``) of the uint8 arrays of
:meth:`EncryptedModel.to_arrays`: the ciphertexts (one fixed-width big-endian
row each) and the UTF-8 JSON header. Flower's compat layer turns ``Parameters``
into an ``ArrayRecord`` of ``Array(data=tensor, stype=tensor_type)`` under keys
``"0"``, ``"1"`` and back, byte for byte and in order, so both arrays arrive
exactly. The distinct ``tensor_type`` marks the model as encrypted (Flower's own
XGBoost strategies also send their own tensor types); a plaintext model keeps
``"numpy.ndarray"``. The arrays of a plaintext legacy model are named ``"0"``,
``"1"``, ... in the layout, as the compat layer names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, FitIns, FitRes, Parameters, Scalar, ndarray_to_bytes,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from .aggregation import InvalidUpdate, check_weight
from .encrypted_result import save_encrypted_model
from .legacy_wire import layout_of, load_npy
from .node_errors import reports_errors
from .node_settings import PLAINTEXT_METRICS, node_setting, refuse_evaluation
from .screening import SECURE_EMPTY_ROUNDS, report_failures
from .paillier import PublicKey
from .paillier_node import (CLIPPED_KEY, PaillierRounds, decrypt_global_model,
                            encrypt_local_model, node_private_key, node_workers,
                            parse_round_config, round_config)
from .paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, MAX_HEADER_BYTES,
                                DecryptionRefused, EncryptedModel)

TENSOR_TYPE = "paillier-v1/numpy.ndarray"
_ARRAYS = ((CIPHERTEXTS_KEY, "ciphertext", None), (HEADER_KEY, "header", MAX_HEADER_BYTES))


def arrays_to_parameters(arrays: Mapping[str, np.ndarray], names: Sequence[str],
                         tensor_type: str) -> Parameters:
    """Named arrays as legacy ``Parameters`` of ``tensor_type``: one ``.npy`` tensor
    each, in the order of ``names``."""
    return Parameters(tensors=[ndarray_to_bytes(arrays[k]) for k in names],
                      tensor_type=tensor_type)


def parameters_to_arrays(parameters: Parameters, tensor_type: str,
                         expected: Sequence[tuple[str, str, int | None]]
                         ) -> dict[str, np.ndarray]:
    """Inverse of :func:`arrays_to_parameters` for uint8 arrays: ``expected`` lists
    ``(name, what, max bytes or None)`` in tensor order.

    Raises
    ------
    InvalidUpdate
        If the tensor type or count differs, or a tensor is not such an array
        (read without pickle, :func:`strategies.legacy_wire.load_npy`).
    """
    if parameters.tensor_type != tensor_type:
        raise InvalidUpdate(f"tensor type {parameters.tensor_type!r}, expected {tensor_type!r}")
    if len(parameters.tensors) != len(expected):
        raise InvalidUpdate(f"{len(parameters.tensors)} tensors, expected "
                            f"{' and '.join(what for _, what, _ in expected)}")
    return {name: load_npy(tensor, what, (np.uint8,), limit)
            for (name, what, limit), tensor in zip(expected, parameters.tensors, strict=True)}


def to_parameters(model: EncryptedModel) -> Parameters:
    """An encrypted model as legacy ``Parameters`` (see the module's docstring)."""
    return arrays_to_parameters(model.to_arrays(), [k for k, _, _ in _ARRAYS], TENSOR_TYPE)


def is_encrypted(parameters: Parameters) -> bool:
    return parameters.tensor_type == TENSOR_TYPE


def parameters_arrays(parameters: Parameters) -> dict[str, np.ndarray]:
    """The two arrays of an encrypted model, for :meth:`EncryptedModel.from_arrays`.

    Raises
    ------
    InvalidUpdate
        If ``parameters`` is not an encrypted model or a tensor is malformed.
    """
    return parameters_to_arrays(parameters, TENSOR_TYPE, _ARRAYS)


class LegacyEncryptedFedAvg(FedAvg):
    """What the legacy Paillier strategies (single key holder and threshold) share on top
    of Flower's FedAvg: no centralized evaluation, the round's Paillier settings in every
    fit instruction, and the fit metrics of the valid replies aggregated as FedAvg does."""

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation: the server cannot see the model."""
        return None

    def _fit_with(self, server_round: int, parameters: Parameters,
                  client_manager: ClientManager, extra: dict[str, Scalar]
                  ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's fit instructions, each config with ``extra`` added."""
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in pairs:  # a new dict: never change the one on_fit_config_fn returned
            ins.config = {**ins.config, **extra}
        return pairs

    def _fit_metrics(self, server_round: int,
                     replies: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
        """``(num_examples, metrics)`` of the valid replies, aggregated."""
        if self.fit_metrics_aggregation_fn:
            return self.fit_metrics_aggregation_fn(replies)
        if server_round == 1:  # as FedAvg: only once
            log(WARNING, "No fit_metrics_aggregation_fn provided")
        return {}


class LegacyPaillierFedAvg(PaillierRounds, LegacyEncryptedFedAvg):
    """Weighted FedAvg over Paillier ciphertexts for legacy projects; the server never
    decrypts.

    Parameters
    ----------
    public_key : PublicKey
        The federation's public key (``strategies.keyfiles.load_public_key``).
    clip : float
        Model values are clipped to ``[-clip, clip]`` before quantization; choose
        it above the largest weight the model reaches.
    max_total_weight : int (default: 65536)
        Largest sum of client weights in one round; sets the headroom bits.
    weight_unit : int (default: 1)
        Client weight = round(num_examples / weight_unit), at least 1.
    value_bits : int (default: 16)
        Quantization bits per value.
    max_empty_rounds : int (default: 1)
        Rounds in a row without a usable update after which the run fails
        (:class:`strategies.screening.NoUsableUpdate`).
    save_to : str or Path, optional
        Where to write each round's encrypted global model (the last round's stays),
        for ``fedapp decrypt`` on a key holder: a ``server_fn`` app has no hook after
        the run (:mod:`strategies.encrypted_result`).
    **kwargs
        Passed to :class:`flwr.server.strategy.FedAvg` (fractions, minimums,
        ``on_fit_config_fn``, ``initial_parameters``, metrics aggregation).
        ``evaluate_fn`` is refused: the server only ever holds the encrypted model,
        so evaluate on the clients (``fraction_evaluate``).

    Replies under another key, with a wrong count or width of ciphertexts, values
    >= n^2, another encoding or layout, unencrypted, or a second reply from the
    same client are left out with a warning naming the client; the round goes on
    with the rest. If none is left the global model stays as it was.
    """

    def __init__(self, public_key: PublicKey, *, clip: float, max_total_weight: int = 65536,
                 weight_unit: int = 1, value_bits: int = 16,
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS,
                 save_to: str | Path | None = None, **kwargs) -> None:
        if kwargs.get("evaluate_fn") is not None:
            raise ValueError("LegacyPaillierFedAvg cannot take an evaluate_fn: the server holds "
                             "only the encrypted model. Evaluate on the clients "
                             "(fraction_evaluate > 0), or save the model (save_to=PATH) and "
                             "decrypt it on a key holder (fedapp decrypt)")
        super().__init__(**kwargs)
        self.save_to = None if save_to is None else Path(save_to)
        self._init_paillier(public_key, clip, max_total_weight, weight_unit, value_bits,
                            max_empty_rounds)
        log(INFO, "LegacyPaillierFedAvg: %s", self._describe())

    def __repr__(self) -> str:
        return (f"LegacyPaillierFedAvg(key={self.public_key.fingerprint[:16]}..., "
                f"accept_failures={self.accept_failures})")

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        if is_encrypted(parameters):
            self._remember_layout(parameters_arrays(parameters))
        else:
            arrays = parameters_to_ndarrays(parameters)
            self._remember_layout(None, arrays, layout_of(arrays).names)
        return self._fit_with(server_round, parameters, client_manager, round_config(
            self.params, self.public_key.fingerprint, self.weight_unit, server_round))

    def _reply_arrays(self, res: FitRes) -> dict[str, np.ndarray]:
        check_weight(res.num_examples)
        if not is_encrypted(res.parameters):
            raise InvalidUpdate("the update is not encrypted: add legacy_paillier_mod to the "
                                "ClientApp")
        return parameters_arrays(res.parameters)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        report_failures(self.watch, failures)
        if not results or (failures and not self.accept_failures):
            self.watch.end_round(server_round, False)
            return None, {}
        round_sum = self._round_sum(server_round)
        valid: list[FitRes] = []
        for proxy, res in results:
            try:
                round_sum.add(int(proxy.cid), self._reply_arrays(res))
            except InvalidUpdate as err:
                log(WARNING, "Left out the reply of client %s in round %d: %s", proxy.cid,
                    server_round, err)
                continue
            valid.append(res)
        log(INFO, "aggregate_fit: %d valid encrypted replies of %d, total weight %d",
            len(valid), len(results), round_sum.total_weight)
        summed = round_sum.result()
        self.watch.end_round(server_round, summed is not None)
        if summed is None:
            return None, {}
        if self.save_to is not None:
            save_encrypted_model(summed.to_arrays(), self.save_to)
        return to_parameters(summed), self._fit_metrics(
            server_round, [(r.num_examples, r.metrics) for r in valid])


# ------------------------------------------------------------------ client mod
def _decrypt_parameters(msg: Message, ins: str, context: Context) -> dict[str, float]:
    """Replace the encrypted global model in a fit or evaluate message by the plaintext;
    what the node releases of its metric sums (``decrypt_global_model``)."""
    name = f"{ins}.parameters"
    record = msg.content.array_records.get(name)
    if record is None:
        return {}
    parameters = compat.arrayrecord_to_parameters(record, keep_input=True)
    if not is_encrypted(parameters):  # the initial model: public, random weights
        return {}
    _, plain, released = decrypt_global_model(
        node_private_key(context), parameters_arrays(parameters), context.node_config,
        node_workers(context))
    msg.content.array_records[name] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(plain), keep_input=True)
    return released


def _fit_config(msg: Message) -> dict:
    return dict(msg.content.config_records.get("fitins.config", {}))


def _encrypt_fitres(msg: Message, reply: Message, context: Context,
                    released: dict[str, float]) -> None:
    """Replace the plaintext model in a fit reply by the encrypted, weighted update,
    which carries the fit metrics as sums; in plaintext only what the node released."""
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    if res.status.code != Code.OK:  # no update: send none, never plaintext
        encrypted = Parameters(tensors=[], tensor_type="")
    else:
        arrays = parameters_to_ndarrays(res.parameters)
        update, clipped = encrypt_local_model(
            _fit_config(msg), layout_of(arrays).names, arrays, res.num_examples,
            node_private_key(context), run=msg.metadata.run_id, node=context.node_id,
            workers=node_workers(context), metrics=res.metrics,
            node_config=context.node_config)
        encrypted = to_parameters(update)
        if node_setting(context.node_config, PLAINTEXT_METRICS):
            reply.content.config_records["fitres.metrics"] = ConfigRecord(
                {**res.metrics, CLIPPED_KEY: clipped, **released})
        else:  # the weight is in the update's header; the metrics travel encrypted
            reply.content.config_records["fitres.metrics"] = ConfigRecord(released)
    reply.content.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
        encrypted, keep_input=True)


@reports_errors(PermissionError, DecryptionRefused)
def legacy_paillier_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt the global model of fit and evaluate messages on the way in; encrypt the
    fit reply's model on the way out. The fit metrics travel inside the encrypted
    update as weighted sums; in plaintext the node sends only the metric means of the
    aggregate it decrypted (``released-*``, the last round's), and it answers no
    evaluation, unless the node's ``plaintext-metrics`` allows them.

    Fails (the node replies with an error) rather than send a plaintext model when the
    server's fit config holds no Paillier parameters or names another key, or the node
    holds no private key (see :func:`strategies.paillier_message.paillier_mod`).
    """
    node_private_key(context)  # no key on this node: fail before anything else
    kind = msg.metadata.message_type
    released: dict[str, float] = {}
    if kind == MessageType.TRAIN:
        parse_round_config(_fit_config(msg))  # before training, not after
        released = _decrypt_parameters(msg, "fitins", context)
    elif kind == MessageType.EVALUATE:
        refuse_evaluation(context.node_config, "Paillier")
        _decrypt_parameters(msg, "evaluateins", context)
    reply = call_next(msg, context)
    if kind == MessageType.TRAIN and reply.has_content():
        _encrypt_fitres(msg, reply, context, released)
    return reply
