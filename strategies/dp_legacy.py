"""Central DP-FedAvg on Flower's legacy API: a strategy wrapper and a client mod.

Wrap the strategy a ``server_fn`` returns::

    strategy = LegacyCentralDP(FedAvg(...), noise_multiplier=1.0, clip=0.1)           # plaintext
    strategy = LegacyCentralDP(LegacySecAggFedAvg(...), noise_multiplier=1.0, clip=0.1)
    app = ClientApp(client_fn=client_fn, mods=[legacy_secagg_mod, legacy_dp_clip_mod])

The same DP-FedAvg as :mod:`strategies.dp_message` (shared :class:`DPRounds`): the
server clips in plaintext mode; with masking (``LegacySecAggFedAvg``) or Paillier
(``LegacyPaillierFedAvg``) each client clips its own update with
:func:`legacy_dp_clip_mod` inside the secure mod.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from .aggregation import InvalidUpdate
from .dp_rounds import BIT_KEY, DPRounds, clip_local_update
from .legacy_wire import legacy_names, load_ndarrays
from .paillier_legacy import is_encrypted, parameters_arrays, to_parameters
from .paillier_protocol import EncryptedModel
from .screening import report_failures


class LegacyCentralDP(DPRounds, Strategy):
    """DP-FedAvg around a legacy FedAvg, ``LegacySecAggFedAvg``,
    ``LegacyPaillierFedAvg`` or ``LegacyThresholdPaillierFedAvg`` (the arguments are
    those of :class:`strategies.dp_message.CentralDP`; ``mode="distributed"`` with the
    secure ones, the only mode around the threshold one), with fixed-size sampling
    only: Flower's legacy server skips a round in which no client is selected, so a Poisson round that draws nobody could not
    release its noise, and its absence would tell."""

    def __init__(self, strategy: FedAvg, *, noise_multiplier: float, clip: float,
                 population: int = 0, delta: float = 1e-5, max_epsilon: float = 0.0,
                 adaptive: bool = False, target_quantile: float = 0.5,
                 clip_learning_rate: float = 0.2,
                 clipped_count_stddev: float | None = None, sampling: str = "fixed",
                 mode: str = "central", quorum: float = 0.8) -> None:
        if sampling != "fixed":
            raise ValueError(f"LegacyCentralDP samples a fixed number of clients (sampling "
                             f"'fixed'), got {sampling!r}: for Poisson sampling use the "
                             "Message API's CentralDP")
        if not isinstance(strategy, FedAvg):
            raise TypeError("LegacyCentralDP wraps a flwr.server.strategy.FedAvg (or "
                            "LegacySecAggFedAvg, LegacyPaillierFedAvg)")
        self.strategy = strategy
        self._init_dp(strategy,
                      noise_multiplier=noise_multiplier, clip=clip, population=population,
                      delta=delta, max_epsilon=max_epsilon, adaptive=adaptive,
                      target_quantile=target_quantile, clip_learning_rate=clip_learning_rate,
                      clipped_count_stddev=clipped_count_stddev, sampling=sampling,
                      mode=mode, quorum=quorum)

    def __repr__(self) -> str:
        return f"LegacyCentralDP({self.strategy!r}; {self._describe_dp()})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        if self.config is None:
            connected = client_manager.num_available()
            self._start_dp(connected, self.strategy.num_fit_clients(connected)[0],
                           self._model_size(parameters))
        if not self._budget_left(server_round):
            return []
        if not self.encrypted:
            arrays = parameters_to_ndarrays(parameters)
            self._global = dict(zip(legacy_names(len(arrays)), arrays, strict=True))
            parameters = ndarrays_to_parameters(list(self._with_bit(self._global).values()))
        pairs = self.strategy.configure_fit(server_round, parameters, client_manager)
        extra = self._round_config()
        return [(proxy, FitIns(ins.parameters, {**ins.config, **extra})) for proxy, ins in pairs]

    def _model_size(self, parameters: Parameters) -> int:
        """The model's number of values, from plaintext or encrypted ``parameters``."""
        if self.encrypted and is_encrypted(parameters):
            return EncryptedModel.from_arrays(parameters_arrays(parameters),
                                              self.strategy.public_key).layout.size
        return sum(a.size for a in parameters_to_ndarrays(parameters))

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self.masked or self.encrypted:
            self._arm_sealed()
            parameters, metrics = self._inner_aggregate(
                server_round, lambda: self.strategy.aggregate_fit(server_round, results, failures))
            if parameters is None and self.encrypted:
                spent = self._spent_without_model(server_round)
                if spent is not None:
                    return None, spent
                log(WARNING, "Round %d: no update to add noise to; nothing released",
                    server_round)
                return None, {}
            if self.sealed:  # threshold: the clients sealed the noised model
                return parameters, {**metrics, **self._release_sealed(server_round)}
            if self.encrypted:
                model = EncryptedModel.from_arrays(parameters_arrays(parameters),
                                                   self.strategy.public_key)
                noisy, dp_metrics = self._release_encrypted(server_round, model)
                return to_parameters(noisy), {**metrics, **dp_metrics}
            n, total, step, unclipped = 0, None, 0.0, 0
            if parameters is not None:
                n = self.strategy.last_total_weight
                total, step, unclipped = self._unmasked_sum(dict(zip(
                    list(self._with_bit(self._global)), parameters_to_ndarrays(parameters),
                    strict=True)), n, self.strategy.last_level_sum)
        else:
            report_failures(self.watch, failures)
            decoded = []
            for proxy, res in results:
                try:
                    decoded.append((proxy, res, load_ndarrays(res.parameters.tensors)))
                except InvalidUpdate as err:
                    log(WARNING, "Left out the reply of client %s: %s", proxy.cid, err)
            total, step, n, unclipped, valid = self._clipped_sum(
                [(f"client {proxy.cid}", arrays) for proxy, _, arrays in decoded])
            self.watch.end_round(server_round, n > 0)
            metrics = {}
            if valid and self.strategy.fit_metrics_aggregation_fn:
                metrics = self.strategy.fit_metrics_aggregation_fn(
                    [(1, decoded[i][1].metrics) for i in valid])
        released = self._release(server_round, total, step, n, unclipped)
        if released is None:
            return None, {}
        new, dp_metrics = released
        return ndarrays_to_parameters(list(new.values())), {**(metrics or {}), **dp_metrics}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int,
                           results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)


def legacy_dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip the fit reply's update to the round's ``dp-clip`` norm and weight it 1.

    Put it inside the secure aggregation's mod
    (``mods=[legacy_secagg_mod, legacy_dp_clip_mod]``). Fails before training when
    the fit config holds no clipping norm.
    """
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    clip_local_update(ins.config, {}, {})  # no norm: fail before training
    incoming = parameters_to_ndarrays(ins.parameters)
    if ins.config.get(BIT_KEY):
        incoming = incoming[:-1]  # the bit slot: the app never sees it
        msg.content.array_records["fitins.parameters"] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(incoming), keep_input=True)
    reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    if res.status.code != Code.OK:
        return reply
    names = legacy_names(len(incoming))
    update = clip_local_update(ins.config, dict(zip(names, incoming, strict=True)),
                               dict(zip(names, parameters_to_ndarrays(res.parameters),
                                        strict=True)))
    reply.content.array_records["fitres.parameters"] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters(list(update.values())), keep_input=True)
    # DP weighs every client the same
    reply.content.metric_records["fitres.num_examples"]["num_examples"] = 1
    return reply
