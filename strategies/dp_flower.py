"""Central DP-FedAvg on Flower's Message API: a strategy wrapper and a client mod.

Wrap the run's strategy::

    strategy = CentralDP(WeightedFedAvg(...), noise_multiplier=1.0, clip=0.1)      # plaintext
    strategy = CentralDP(SecAggFedAvg(...), noise_multiplier=1.0, clip=0.1)        # masking
    app = ClientApp(mods=[secagg_mod, dp_clip_mod])                                # its clients
    strategy = CentralDP(PaillierFedAvg(...), noise_multiplier=1.0, clip=0.1)      # Paillier
    app = ClientApp(mods=[paillier_mod, dp_clip_mod])                              # its clients

With a plaintext strategy the server sees each update and clips it itself. With
masking or Paillier it cannot, so each client clips its own update
(:func:`dp_clip_mod`, inside the secure mod). Clients count equally (weight 1).
The server adds the noise to the plain sum or the unmasked sum and divides by the
number of clients sampled (:mod:`strategies.dp`); under Paillier it adds encrypted,
quantized noise to the encrypted average of the ``n`` updates that arrived. The
cumulative epsilon after every round goes into the train metrics (``dp-epsilon``)
and the log; with ``max_epsilon`` set, training stops before the round that would
exceed it (:attr:`CentralDP.budget_exhausted`).

Adaptive clipping needs the number of clients whose update was not clipped: the
server counts it in plaintext mode; with masking each client adds a one-value
array ``dp-unclipped`` (0 or 1) to its update, so only the masked sum of the bits
is revealed, like the model. Legacy-API projects use :mod:`strategies.dp_legacy`,
built on the same :class:`DPRounds`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .aggregation import InvalidUpdate, check_update, check_weight
from .dp import (AdaptiveClip, BudgetExhausted, DPConfig, PrivacyLedger, clip_update,
                 noised_average)
from .fedavg import aggregate_metrics
from .paillier import Encryptor
from .paillier_flower import PaillierFedAvg, as_record
from .paillier_protocol import EncryptedModel, add_noise
from .records import array_record, record_arrays
from .screening import PLAINTEXT_EMPTY_ROUNDS, RoundWatch
from .secagg_flower import SecAggFedAvg

CLIP_KEY = "dp-clip"
BIT_KEY = "dp-unclipped"  # config flag (ask for the bit) and array name


def _has_weight(msg: Message, key: str) -> bool:
    """Whether a reply's metrics hold a valid weight (its metrics are averaged by it)."""
    try:
        check_weight(next(iter(msg.content.metric_records.values())).get(key))
    except InvalidUpdate:
        return False
    return True


class DPRounds:
    """The central-DP state both wrappers (Message API and legacy) hold: settings,
    accountant, clipping norm, the round's global model, and the steps of a round."""

    def _init_dp(self, mode: str, strategy: object, *, noise_multiplier: float,
                 clip: float, population: int, delta: float, max_epsilon: float,
                 adaptive: bool, target_quantile: float, clip_learning_rate: float,
                 clipped_count_stddev: float | None) -> None:
        self.masked, self.encrypted = mode == "masked", mode == "encrypted"
        if self.encrypted and adaptive:
            raise ValueError("adaptive clipping needs the count of unclipped updates, which "
                             "the server cannot read under Paillier: use a fixed clip")
        if self.masked and adaptive and strategy.params.clip < 1:
            raise ValueError("adaptive clipping with masking sends a 0/1 value through the "
                             f"masked sum, but its clip range is {strategy.params.clip:g}: "
                             "use a masking clip of at least 1")
        self._encryptor = Encryptor(strategy.public_key) if self.encrypted else None
        # the wrapped strategy's (so its max_empty_rounds holds); Flower's FedAvg has none
        self.watch = getattr(strategy, "watch", None) or RoundWatch(PLAINTEXT_EMPTY_ROUNDS)
        self.population = population
        self._settings = dict(noise_multiplier=noise_multiplier, clip=clip, delta=delta,
                              max_epsilon=max_epsilon, adaptive=adaptive,
                              target_quantile=target_quantile,
                              clip_learning_rate=clip_learning_rate,
                              clipped_count_stddev=clipped_count_stddev)
        # check the arguments now (the default count noise depends on m: at round 1)
        DPConfig(num_sampled=1, population=1, **{
            **self._settings, "adaptive": adaptive and clipped_count_stddev is not None})
        self.config: DPConfig | None = None
        self.ledger: PrivacyLedger | None = None
        self.clipper: AdaptiveClip | None = None
        self.budget_exhausted = False
        self._global: dict[str, np.ndarray] = {}
        self._rng = np.random.default_rng()  # from the OS: noise must not be reproducible

    def _describe_dp(self) -> str:
        s = self._settings
        budget = f", budget epsilon {s['max_epsilon']:g}" if s["max_epsilon"] else ""
        where = "clients" if self.masked or self.encrypted else "server"
        return (f"noise multiplier {s['noise_multiplier']:g}, clip {s['clip']:g}"
                f"{' (adaptive)' if s['adaptive'] else ''}, delta {s['delta']:g}{budget}, "
                f"clipping on the {where}")

    def _start_dp(self, connected: int, sampled: int) -> None:
        """Fix the sampling figures at the first round: the denominator is the number
        of clients the strategy samples (even if some drop out later)."""
        population = self.population or connected
        self.config = DPConfig(num_sampled=sampled, population=max(population, sampled),
                               **self._settings)
        self.ledger = PrivacyLedger(self.config)
        self.clipper = AdaptiveClip(self.config)
        log(INFO, "Central DP: %d of %d clients per round (sample rate %.4f), update noise "
            "multiplier %.4f", sampled, self.config.population, self.config.sample_rate,
            self.config.update_noise_multiplier)

    def state_dict(self) -> dict:
        """What a restarted server needs to go on (JSON-able): the sampling figures
        fixed at round 1, the accountant's history and the clipping norm."""
        if self.config is None:
            return {}
        return {"num-sampled": self.config.num_sampled, "population": self.config.population,
                "history": [list(h) for h in self.ledger.accountant.history],
                "clip": self.clipper.clip}

    def load_state_dict(self, state: dict) -> None:
        """Go on from :meth:`state_dict` of an earlier run (same settings)."""
        if not state:
            return
        self.config = DPConfig(num_sampled=int(state["num-sampled"]),
                               population=int(state["population"]), **self._settings)
        self.ledger = PrivacyLedger(self.config)
        self.ledger.accountant.history = [(float(z), float(q), int(s))
                                          for z, q, s in state["history"]]
        self.clipper = AdaptiveClip(self.config, clip=float(state["clip"]))
        log(INFO, "Central DP resumed: epsilon %.3f after %d rounds, clip %.4g",
            self.ledger.epsilon(), sum(s for _, _, s in self.ledger.accountant.history),
            self.clipper.clip)

    def _budget_left(self, server_round: int) -> bool:
        try:
            self.ledger.check_budget()
        except BudgetExhausted as err:
            log(WARNING, "Round %d not run: %s", server_round, err)
            self.budget_exhausted = True
            return False
        return True

    def _round_config(self) -> dict:
        """What the clients' clip mod needs this round."""
        config = {CLIP_KEY: self.clipper.clip}
        if self.masked and self.config.adaptive:
            config[BIT_KEY] = True
        return config

    def _with_bit(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global arrays as sent for training (masked adaptive mode: plus the bit)."""
        if self.masked and self.config.adaptive:
            return {**arrays, BIT_KEY: np.zeros(1, np.float32)}
        return arrays

    def _clipped_sum(self, updates: Sequence[tuple[object, list[np.ndarray]]]
                     ) -> tuple[list[np.ndarray], int, int, list[int]]:
        """Plaintext mode: check, clip and sum ``(client, arrays)`` updates; the sum, how
        many were summed and were not clipped, and the indices of the valid ones."""
        reference = list(self._global.values())
        total = [np.zeros(a.shape) for a in reference]
        n = unclipped = 0
        valid = []
        for i, (client, update) in enumerate(updates):
            try:
                check_update(update, reference)
                # in float64: finite float32 values can differ by more than float32 holds
                clipped, norm = clip_update([np.asarray(u, np.float64) - g
                                             for u, g in zip(update, reference)],
                                            self.clipper.clip)
            except ValueError as err:  # InvalidUpdate, or a norm too large to measure
                log(WARNING, "Left out the reply of %s: %s", client, err)
                continue
            total = [t + c for t, c in zip(total, clipped)]
            n += 1
            unclipped += norm <= self.clipper.clip
            valid.append(i)
        return total, n, unclipped, valid

    def _unmasked_sum(self, average: dict[str, np.ndarray], n: int
                      ) -> tuple[list[np.ndarray], int]:
        """Masking mode: the sum of the clients' clipped updates from their average,
        and the number of them that were not clipped."""
        unclipped = round(float(average.pop(BIT_KEY, np.zeros(1))[0]) * n)
        total = [n * (average[k].astype(np.float64) - g.astype(np.float64))
                 for k, g in self._global.items()]
        return total, unclipped

    def _release(self, server_round: int, total: list[np.ndarray], n: int, unclipped: int
                 ) -> tuple[dict[str, np.ndarray], dict]:
        """The noised new global model and the round's DP metrics."""
        clip = self.clipper.clip
        new = noised_average(list(self._global.values()), total, self.config, clip, self._rng)
        epsilon = self.ledger.step()
        next_clip = self.clipper.update(unclipped, self._rng)
        log(INFO, "Central DP round %d: %d of %d sampled clients summed, clip %.4g, "
            "epsilon %.4f at delta %g", server_round, n, self.config.num_sampled, clip,
            epsilon, self.config.delta)
        metrics = {"dp-epsilon": epsilon, "dp-clip": clip, "dp-next-clip": next_clip}
        if not self.masked:  # plaintext: the server sees every update anyway
            metrics["dp-unclipped-fraction"] = unclipped / n
        elif self.config.adaptive:  # masked: only the noised count is released
            metrics["dp-unclipped-fraction"] = self.clipper.noisy_fraction
        return dict(zip(self._global, new, strict=True)), metrics

    def _release_encrypted(self, server_round: int, model: EncryptedModel
                           ) -> tuple[EncryptedModel, dict]:
        """Paillier mode: noise added to the encrypted average of the ``n`` clipped
        updates, homomorphically. The server cannot rescale an encrypted average to
        the fixed denominator, so the noise is ``z C`` on the sum divided by ``n``:
        the same Gaussian mechanism on the sum, then a division by the public ``n``."""
        std = self.config.update_noise_multiplier * self.clipper.clip / model.total_weight
        noise = self._rng.normal(0.0, std, model.layout.size)
        # clipping the noise at 8 std changes it with probability < 1e-15 per value
        noisy = add_noise(model, noise, 8 * std, self._encryptor, rng=self._rng)
        epsilon = self.ledger.step()
        log(INFO, "Central DP round %d (Paillier): noise added to the encrypted average of %d "
            "updates, clip %.4g, epsilon %.4f at delta %g", server_round, model.total_weight,
            self.clipper.clip, epsilon, self.config.delta)
        return noisy, {"dp-epsilon": epsilon, "dp-clip": self.clipper.clip}


def wrapped_mode(strategy: object) -> str:
    if isinstance(strategy, SecAggFedAvg) or type(strategy).__name__ == "LegacySecAggFedAvg":
        return "masked"
    if isinstance(strategy, PaillierFedAvg) or \
            type(strategy).__name__ == "LegacyPaillierFedAvg":
        return "encrypted"
    return "plain"


class CentralDP(DPRounds, Strategy):
    """DP-FedAvg around a plaintext, masking or Paillier FedAvg strategy (Message API).

    Parameters
    ----------
    strategy : FedAvg
        The strategy to wrap: a plaintext FedAvg (``WeightedFedAvg`` or Flower's
        ``FedAvg``; the server clips), :class:`SecAggFedAvg` or ``PaillierFedAvg``
        (the clients clip, with :func:`dp_clip_mod` inside the secure mod).
    noise_multiplier : float
        ``z``: noise std on the sum of clipped updates over the clipping norm.
    clip : float
        ``C``, the L2 clipping norm of an update (initial value if adaptive).
    population : int (default: 0)
        Clients the round's sample is drawn from, for the sample rate; 0 takes the
        number of connected nodes at the first round.
    delta, max_epsilon, adaptive, target_quantile, clip_learning_rate,
    clipped_count_stddev
        As in :class:`strategies.dp.DPConfig`.

    Rounds without a usable update count towards the wrapped strategy's
    ``max_empty_rounds`` (3 around Flower's own FedAvg); the rounds after the privacy
    budget is spent do not.
    """

    def __init__(self, strategy: FedAvg, *, noise_multiplier: float, clip: float,
                 population: int = 0, delta: float = 1e-5, max_epsilon: float = 0.0,
                 adaptive: bool = False, target_quantile: float = 0.5,
                 clip_learning_rate: float = 0.2,
                 clipped_count_stddev: float | None = None) -> None:
        if not isinstance(strategy, FedAvg):
            raise TypeError("CentralDP wraps a FedAvg strategy (WeightedFedAvg, FedAvg, "
                            "SecAggFedAvg or PaillierFedAvg)")
        self.strategy = strategy
        mode = wrapped_mode(strategy)
        self._init_dp(mode, strategy,
                      noise_multiplier=noise_multiplier, clip=clip, population=population,
                      delta=delta, max_epsilon=max_epsilon, adaptive=adaptive,
                      target_quantile=target_quantile, clip_learning_rate=clip_learning_rate,
                      clipped_count_stddev=clipped_count_stddev)

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t└──> Central DP: %s", self._describe_dp())

    # ------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.config is None:
            connected = len(list(grid.get_node_ids()))
            self._start_dp(connected, max(int(connected * self.strategy.fraction_train),
                                          self.strategy.min_train_nodes))
        if not self._budget_left(server_round):
            return []
        self._global = record_arrays(arrays)
        config = ConfigRecord({**config, **self._round_config()})
        arrays = array_record(self._with_bit(self._global))
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.budget_exhausted:  # Flower's Strategy.start goes on calling: nothing to do
            return None, None
        if self.masked or self.encrypted:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
            if arrays is None:
                log(WARNING, "Round %d: no update to add noise to; nothing released",
                    server_round)
                return None, None
            if self.encrypted:
                model = EncryptedModel.from_arrays(record_arrays(arrays),
                                                   self.strategy.public_key)
                noisy, dp_metrics = self._release_encrypted(server_round, model)
                return as_record(noisy), MetricRecord({**(metrics or {}), **dp_metrics})
            n = self.strategy.last_total_weight
            total, unclipped = self._unmasked_sum(record_arrays(arrays), n)
        else:
            updates, contents = [], []
            for msg in replies:
                node = msg.metadata.src_node_id
                if msg.has_error():
                    self.watch.node_failed(node, msg.error.reason)
                elif len(msg.content.array_records) != 1 or \
                        len(msg.content.metric_records) != 1:
                    log(WARNING, "Left out the reply of node %s: expected one ArrayRecord and "
                        "one MetricRecord", node)
                elif not _has_weight(msg, self.strategy.weighted_by_key):
                    log(WARNING, "Left out the reply of node %s: no valid %s", node,
                        self.strategy.weighted_by_key)
                else:
                    try:
                        arrays = record_arrays(next(iter(msg.content.array_records.values())))
                        if list(arrays) != list(self._global):
                            raise InvalidUpdate("array names differ from the global model's")
                    except InvalidUpdate as err:
                        log(WARNING, "Left out the reply of node %s: %s", node, err)
                        continue
                    updates.append((f"node {node}", list(arrays.values())))
                    contents.append(msg.content)
            total, n, unclipped, valid = self._clipped_sum(updates)
            self.watch.end_round(server_round, n > 0)
            metrics = aggregate_metrics(
                self.strategy.train_metrics_aggr_fn, [contents[i] for i in valid],
                self.strategy.weighted_by_key) if valid else None
        if n == 0:
            log(WARNING, "Round %d: no update to add noise to; nothing released", server_round)
            return None, None
        new, dp_metrics = self._release(server_round, total, n, unclipped)
        return array_record(new), MetricRecord({**(metrics or {}), **dp_metrics})

    # ------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


# ------------------------------------------------------------------ client mod
def clip_local_update(config: dict, incoming: dict[str, np.ndarray],
                      trained: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained model with its update clipped to the round's ``dp-clip`` norm (and
    the unclipped bit when the round asks for it). Refuses when the server sent no
    clipping norm (it is not running central DP)."""
    clip = config.get(CLIP_KEY)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < math.inf:
        raise ValueError("this node clips its updates for central DP (dp_clip_mod) but the "
                         "server sent no dp-clip norm: the server must wrap its strategy in "
                         "CentralDP (Message API) or LegacyCentralDP (legacy API); got "
                         f"{clip!r}, not a positive finite number")
    if list(trained) != list(incoming):
        raise ValueError("the trained model's arrays differ from the global model's")
    clipped, norm = clip_update([trained[k] - incoming[k] for k in incoming], float(clip))
    update = {k: (incoming[k].astype(np.float64) + c).astype(incoming[k].dtype)
              for k, c in zip(incoming, clipped, strict=True)}
    if config.get(BIT_KEY):
        update[BIT_KEY] = np.array([1.0 if norm <= clip else 0.0], np.float32)
    return update


def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this client's update to the round's ``dp-clip`` norm and weight it 1.

    Put it inside the secure aggregation's mod (``mods=[secagg_mod, dp_clip_mod]``)
    so it sees the plaintext model both ways. Refuses to train when the server sent
    no clipping norm (it is not running :class:`CentralDP`).
    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN \
            or "secagg" in msg.content.config_records:  # key stages pass through
        return call_next(msg, context)
    config = dict(next(iter(msg.content.config_records.values()), {}))
    clip_local_update(config, {}, {})  # no norm: fail before training
    (name, record), = msg.content.array_records.items()
    incoming = record_arrays(record)
    incoming.pop(BIT_KEY, None)
    msg.content[name] = array_record(incoming)
    reply = call_next(msg, context)
    if not reply.has_content():
        return reply
    (out_name, out_record), = reply.content.array_records.items()
    reply.content[out_name] = array_record(
        clip_local_update(config, incoming, record_arrays(out_record)))
    metrics = next(iter(reply.content.metric_records.values()))
    metrics["num-examples"] = 1  # DP weighs every client the same
    return reply
