"""Paillier-encrypted weighted FedAvg on Flower's Message API: a strategy and a client mod.

Switch an existing Message-API project with two changes::

    strategy = PaillierFedAvg(load_public_key(path), clip=1.0, ...)   # server
    app = ClientApp(mods=[paillier_mod])                                 # clients

The server holds the public key only. Each client node holds the private key
(node config ``paillier-private-key=PATH``, else ``paillier.key.json`` in the node's
key directory, :func:`strategies.keyfiles.node_key_file`):
the mod decrypts the incoming global model before the ClientApp sees it and
encrypts the outgoing update, so the server adds up ciphertexts and sends the
encrypted aggregate back. The global model is plaintext only on client nodes.
Legacy-API projects use :mod:`strategies.paillier_legacy`; both build on
:mod:`strategies.paillier_node`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from .aggregation import InvalidUpdate
from .encrypted_result import encrypted_record
from .fedavg import aggregate_metrics, evaluate_metrics
from .node_errors import NodeError, reports_errors
from .node_settings import PLAINTEXT_METRICS, node_setting, refuse_evaluation
from .paillier import PrivateKey, PublicKey
from .paillier_node import (CLIPPED_KEY, PaillierRounds, decrypt_global_model,
                            encrypt_local_model, node_private_key, node_workers,
                            open_sealed_model, round_config, seal_global_model)
from .paillier_protocol import DecryptionRefused, EncryptedModel, RoundSum
from .records import (WEIGHT_KEY, array_record, own_train_reply, record_arrays, screen,
                      train_reply)
from .screening import SECURE_EMPTY_ROUNDS
from .threshold_protocol import GroupKey, SealError, is_sealed, sealed_layout

STAGE_KEY = "paillier-stage"  # decrypt-once's request to the designated key holder
SEAL_TRIES = 3  # key holders asked in turn to seal the model


def as_record(model: EncryptedModel) -> ArrayRecord:
    return array_record(model.to_arrays())


class PaillierFedAvg(PaillierRounds, FedAvg):
    """Weighted FedAvg over Paillier ciphertexts; the server never decrypts.

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
        Client weight = round(num_examples / weight_unit), at least 1. 1 weights by
        examples exactly; a larger unit rounds the weights and, with a smaller
        ``max_total_weight``, makes ciphertexts fewer.
    value_bits : int (default: 16)
        Quantization bits per value.
    max_empty_rounds : int (default: 1)
        Rounds in a row without a usable update after which the run fails
        (:class:`strategies.screening.NoUsableUpdate`): in a secure mode an empty
        round usually means the nodes lack their key.
    decrypt_once : bool (default: False)
        Before sending an encrypted aggregate, ask one key holder (a contributor to it)
        to decrypt it, with every check a node makes, and seal the model under the key
        holders' group key; the other nodes then open it with one AES pass instead of
        decrypting it themselves. If no key holder seals it, the nodes get the
        encrypted model as without this option.
    stage_timeout : float (default: 600)
        Seconds to wait for the designated key holder (``decrypt_once``).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (sampling, minimums).

    Replies under another key, with a wrong count or width of ciphertexts, values
    >= n^2, another encoding, or a second reply from the same node are left out
    with a warning naming the node; the round goes on with the rest. If none is
    left the global model stays as it was. Evaluation replies without a valid weight
    are left out too (:func:`strategies.fedavg.evaluate_metrics`).
    """

    def __init__(self, public_key: PublicKey, *, clip: float, max_total_weight: int = 65536,
                 weight_unit: int = 1, value_bits: int = 16,
                 max_empty_rounds: int = SECURE_EMPTY_ROUNDS, decrypt_once: bool = False,
                 stage_timeout: float = 600.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_paillier(public_key, clip, max_total_weight, weight_unit, value_bits,
                            max_empty_rounds)
        self.decrypt_once, self.stage_timeout = decrypt_once, stage_timeout
        self._sealed_cache: tuple[str, ArrayRecord] | None = None

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> Paillier: %s", self._describe())

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None
              ) -> Result:
        """Flower's round loop; the result's ``arrays`` are the encrypted final model, an
        :class:`~strategies.encrypted_result.EncryptedArrayRecord` (save it with
        ``save_encrypted_model``; ``to_numpy_ndarrays`` raises).

        Raises
        ------
        ValueError
            If ``evaluate_fn`` is given: the server holds only ciphertexts, so evaluate
            on the clients (``fraction_evaluate``) or on a key holder.
        """
        if evaluate_fn is not None:
            raise ValueError("PaillierFedAvg cannot take an evaluate_fn: the server holds only "
                             "the encrypted model. Evaluate on the clients (fraction_evaluate "
                             "> 0), or decrypt the saved model on a key holder (fedapp "
                             "decrypt) and evaluate it there")
        result = super().start(grid, initial_arrays, num_rounds, timeout, train_config,
                               evaluate_config)
        result.arrays = encrypted_record(result.arrays)
        return result

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        plain = record_arrays(arrays)
        encrypted = EncryptedModel.is_encrypted(plain)
        self._remember_layout(plain if encrypted else None, list(plain.values()), list(plain))
        config = ConfigRecord({**config, **round_config(
            self.params, self.public_key.fingerprint, self.weight_unit, server_round)})
        return super().configure_train(server_round, self._sealed(arrays, grid), config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0:
            return []
        return super().configure_evaluate(server_round, self._sealed(arrays, grid), config,
                                          grid)

    def _sealed(self, arrays: ArrayRecord, grid: Grid) -> ArrayRecord:
        """Decrypt-once: the encrypted aggregate ``arrays`` sealed by one of its
        contributors (cached for evaluate and the next train), else ``arrays``."""
        plain = record_arrays(arrays)
        if not self.decrypt_once or not EncryptedModel.is_encrypted(plain):
            return arrays
        model = EncryptedModel.from_arrays(plain, self.public_key)
        digest = model.digest()
        if self._sealed_cache and self._sealed_cache[0] == digest:
            return self._sealed_cache[1]
        connected = set(grid.get_node_ids())
        holders = [u for u in sorted(model.contributors) if u in connected][:SEAL_TRIES]
        start = time.monotonic()
        for node in holders:
            request = Message(RecordDict({STAGE_KEY: ConfigRecord({"stage": "seal"}),
                                          "model": arrays}),
                              dst_node_id=node, message_type=MessageType.TRAIN)
            for reply in grid.send_and_receive([request], timeout=self.stage_timeout):
                if reply.has_error():
                    self.watch.node_failed(node, reply.error.reason, "seal")
                    continue
                sealed = record_arrays(reply.content.array_records.get("model", ArrayRecord()))
                if is_sealed(sealed) and sealed_layout(sealed) == model.layout:
                    log(INFO, "Decrypt-once: node %s decrypted and sealed the model in %.2f s",
                        node, time.monotonic() - start)
                    self._sealed_cache = (digest, array_record(sealed))
                    return self._sealed_cache[1]
                log(WARNING, "Decrypt-once: node %s sent no sealed model", node)
        self.watch.flush()
        log(WARNING, "Decrypt-once: no key holder sealed the model (asked %s); the nodes "
            "decrypt it themselves", holders)
        return arrays

    def _accept(self, msg: Message, round_sum: RoundSum) -> None:
        arrays, _ = train_reply(msg, self.weighted_by_key)
        if not EncryptedModel.is_encrypted(arrays):
            raise InvalidUpdate("the update is not encrypted: add paillier_mod to the ClientApp")
        round_sum.add(msg.metadata.src_node_id, arrays)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_sum = self._round_sum(server_round)
        valid = screen(server_round, replies, self.watch,
                       lambda msg: self._accept(msg, round_sum))
        log(INFO, "aggregate_train: %d valid encrypted replies of %d, total weight %d",
            len(valid), len(replies), round_sum.total_weight)
        summed = round_sum.result()
        self.watch.end_round(server_round, summed is not None)
        if summed is None:
            return None, None
        metrics = aggregate_metrics(self.train_metrics_aggr_fn, [m.content for m in valid],
                                    self.weighted_by_key)
        return as_record(summed), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return evaluate_metrics(self, replies, self.watch)


# ------------------------------------------------------------------ client mod


def _decrypt_records(msg: Message, key: PrivateKey, context: Context) -> dict[str, float]:
    """Replace every encrypted (or sealed: decrypt-once) ArrayRecord in ``msg`` by the
    plaintext model; what the node releases of the aggregate's metric sums
    (``decrypt_global_model``)."""
    released: dict[str, float] = {}
    for name, record in list(msg.content.array_records.items()):
        arrays = record_arrays(record)
        if is_sealed(arrays):
            layout, plain, released = open_sealed_model(GroupKey.of_private_key(key), arrays,
                                                        msg.metadata.run_id)
        elif EncryptedModel.is_encrypted(arrays):
            layout, plain, released = decrypt_global_model(key, arrays, context.node_config,
                                                           node_workers(context))
        else:
            continue
        msg.content[name] = array_record(dict(zip(layout.names, plain, strict=True)))
    return released


def _encrypt_reply(msg: Message, reply: Message, key: PrivateKey, context: Context,
                   released: dict[str, float]) -> None:
    config = next(iter(msg.content.config_records.values()), {})
    name, arrays, metrics_name, metrics, weight = own_train_reply(reply)
    own = {k: v for k, v in metrics.items() if k != WEIGHT_KEY}
    update, clipped = encrypt_local_model(
        dict(config), list(arrays), list(arrays.values()), weight, key,
        run=msg.metadata.run_id, node=context.node_id, workers=node_workers(context),
        metrics=own, node_config=context.node_config)
    reply.content[name] = as_record(update)
    if node_setting(context.node_config, PLAINTEXT_METRICS):
        metrics.update({CLIPPED_KEY: clipped, **released})
    else:  # its metrics travel encrypted; the weight is in the update's header too
        reply.content[metrics_name] = MetricRecord({WEIGHT_KEY: weight, **released})


@reports_errors(PermissionError, DecryptionRefused, SealError)
def paillier_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decrypt (or with decrypt-once, open) the global model on the way in; encrypt the
    train update on the way out; as the designated key holder of decrypt-once, decrypt
    and seal the aggregate (a ``train`` message holding a ``paillier-stage`` record,
    answered without calling the app).
    Its train metrics travel inside the encrypted update, as weighted sums; in
    plaintext it sends only its weight (which the update's header holds too) and the
    metric means of the aggregate it decrypted (``released-*``, the last round's), and
    it answers no evaluation, unless the node's ``plaintext-metrics`` allows them.

    Fails closed: without a private key, or when the server sends no Paillier
    parameters, the node answers with an error naming the cause and the fix (and never
    sends plaintext); other failures reach the server as their type only
    (:mod:`strategies.node_errors`)."""
    key = node_private_key(context)
    if msg.metadata.message_type == MessageType.TRAIN \
            and STAGE_KEY in msg.content.config_records:
        if msg.content.config_records[STAGE_KEY].get("stage") != "seal":
            raise NodeError("unknown Paillier stage: server and node run different versions")
        sealed = seal_global_model(key, record_arrays(msg.content.array_records["model"]),
                                   context.node_config, node_workers(context))
        return Message(RecordDict({"model": array_record(sealed)}), reply_to=msg)
    category = msg.metadata.message_type.split(".")[0]
    if category == "evaluate":
        refuse_evaluation(context.node_config, "Paillier")
    released = _decrypt_records(msg, key, context) if category in ("train", "evaluate") else {}
    reply = call_next(msg, context)
    if category == "train" and reply.has_content():
        _encrypt_reply(msg, reply, key, context, released)
    return reply
