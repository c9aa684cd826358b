"""Central DP-FedAvg on Flower's Message API: a strategy wrapper and a client mod.

Wrap the run's strategy::

    strategy = CentralDP(WeightedFedAvg(...), noise_multiplier=1.0, clip=0.1)      # plaintext
    strategy = CentralDP(SecAggFedAvg(...), noise_multiplier=1.0, clip=0.1)        # masking
    app = ClientApp(mods=[secagg_mod, dp_clip_mod])                                # its clients
    strategy = CentralDP(PaillierFedAvg(...), noise_multiplier=1.0, clip=0.1)      # Paillier
    app = ClientApp(mods=[paillier_mod, dp_clip_mod])                              # its clients
    strategy = CentralDP(ThresholdPaillierFedAvg(...), noise_multiplier=1.0, clip=0.1,
                         mode="distributed")        # threshold (or central: server noise)
    app = ClientApp(mods=[threshold_paillier_mod, dp_clip_mod])                    # its clients

With a plaintext strategy the server sees each update and clips it itself. With
masking or Paillier it cannot, so each client clips its own update
(:func:`dp_clip_mod`, inside the secure mod). Clients count equally (weight 1).
The server adds discrete Gaussian noise to the plain sum (on a fine grid) or the
unmasked sum (on the quantization grid) and divides by the number of clients sampled
(:mod:`strategies.dp`); under Paillier it adds it encrypted to the encrypted sum of the
``n`` updates that arrived. The
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

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging import INFO, WARNING

from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType,
                      MetricRecord)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .aggregation import InvalidUpdate
from .dp_rounds import BIT_KEY, DPRounds, clip_local_update
from .fedavg import aggregate_metrics
from .paillier_protocol import EncryptedModel
from .records import WEIGHT_KEY, array_record, record_arrays, screen, train_reply
from .secagg_wire import STAGE_RECORD_KEY


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
    sampling : str (default: "auto")
        ``"poisson"``: each connected node takes part in a round with probability
        ``q = m / population`` (``m`` from the wrapped strategy's ``fraction_train``
        and ``min_train_nodes``, as it would sample), and the Poisson accountant
        applies; ``"fixed"``: the wrapped strategy samples ``m`` nodes and the
        fixed-size (replace-one) accountant applies (:mod:`strategies.dp`).
        ``"auto"``: Poisson, except under Paillier (fixed: there the average is
        divided by the number of updates, so Poisson is refused).
    mode : str (default: "central")
        ``"central"``: the server adds the noise to the sum (around
        ``ThresholdPaillierFedAvg`` it encrypts the noise and proves it knows it, and
        the decryptors add it only with their ``paillier-accept-server-noise``).
        ``"distributed"`` (with :class:`SecAggFedAvg`, ``PaillierFedAvg`` or
        ``ThresholdPaillierFedAvg``, a fixed clip): each node adds its
        share of discrete Gaussian noise to what it masks or encrypts (``dp_clip_mod``
        inside the secure mod), so the sum already carries all of it and no party,
        the server included, sees an un-noised aggregate; the server adds nothing.
    quorum : float (default: 0.8)
        Distributed DP: each update carries the noise of a quorum of ``k`` clients, and
        no sum of fewer is ever unmasked or decrypted, so up to ``1 - quorum`` of them
        may drop out; with none dropping the noise is ``1 / sqrt(quorum)`` times the
        mechanism's. Under Paillier ``k = ceil(quorum m)`` (at least 2) of the ``m``
        sampled; under masking ``ceil(quorum n)`` of the round's ``n`` members, or the
        masking quorum if that is more.

    Rounds without a usable update count towards the wrapped strategy's
    ``max_empty_rounds`` (3 around Flower's own FedAvg); the rounds after the privacy
    budget is spent do not.
    """

    def __init__(self, strategy: FedAvg, *, noise_multiplier: float, clip: float,
                 population: int = 0, delta: float = 1e-5, max_epsilon: float = 0.0,
                 adaptive: bool = False, target_quantile: float = 0.5,
                 clip_learning_rate: float = 0.2,
                 clipped_count_stddev: float | None = None, sampling: str = "auto",
                 mode: str = "central", quorum: float = 0.8) -> None:
        if not isinstance(strategy, FedAvg):
            raise TypeError("CentralDP wraps a FedAvg strategy (WeightedFedAvg, FedAvg, "
                            "SecAggFedAvg or PaillierFedAvg)")
        self.strategy = strategy
        self._init_dp(strategy,
                      noise_multiplier=noise_multiplier, clip=clip, population=population,
                      delta=delta, max_epsilon=max_epsilon, adaptive=adaptive,
                      target_quantile=target_quantile, clip_learning_rate=clip_learning_rate,
                      clipped_count_stddev=clipped_count_stddev, sampling=sampling, mode=mode,
                      quorum=quorum)

    def summary(self) -> None:
        self.strategy.summary()
        log(INFO, "\t└──> Central DP: %s", self._describe_dp())

    # ------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.config is None:
            connected = len(list(grid.get_node_ids()))
            self._start_dp(connected, max(int(connected * self.strategy.fraction_train),
                                          self.strategy.min_train_nodes),
                           sum(a.size for a in record_arrays(arrays).values()))
        if not self._budget_left(server_round):
            return []
        self._global = record_arrays(arrays)
        config = ConfigRecord({**config, **self._round_config()})
        arrays = array_record(self._with_bit(self._global))
        if self.config.sampling != "poisson":
            return self.strategy.configure_train(server_round, arrays, config, grid)
        chosen = self._poisson_round(wait_for_nodes(grid, self.strategy.min_available_nodes))
        if self.noise_only:
            return []
        with _trains_every_node(self.strategy):
            return list(self.strategy.configure_train(server_round, arrays, config,
                                                      _NodesOnly(grid, chosen)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.budget_exhausted:  # Flower's Strategy.start goes on calling: nothing to do
            return None, None
        if self.noise_only:
            new, dp_metrics = self._release(server_round, None, 0.0, 0, 0)
            return array_record(new), MetricRecord(dp_metrics)
        if self.masked or self.encrypted:
            self._arm_sealed()
            arrays, metrics = self._inner_aggregate(
                server_round, lambda: self.strategy.aggregate_train(server_round, replies))
            if arrays is None and self.encrypted:
                spent = self._spent_without_model(server_round)
                if spent is not None:
                    return None, MetricRecord(spent)
                log(WARNING, "Round %d: no update to add noise to; nothing released",
                    server_round)
                return None, None
            if self.sealed:  # threshold: the clients sealed the noised model
                return arrays, MetricRecord({**(metrics or {}),
                                             **self._release_sealed(server_round)})
            if self.encrypted:
                model = EncryptedModel.from_arrays(record_arrays(arrays),
                                                   self.strategy.public_key)
                noisy, dp_metrics = self._release_encrypted(server_round, model)
                return array_record(noisy.to_arrays()), MetricRecord({**(metrics or {}),
                                                                     **dp_metrics})
            n = self.strategy.last_total_weight if arrays is not None else 0
            total, step, unclipped = self._unmasked_sum(
                record_arrays(arrays), n, self.strategy.last_level_sum) if n else (None, 0.0, 0)
        else:
            updates, contents = [], []

            def accept(msg: Message) -> None:
                arrays, _ = train_reply(msg, self.strategy.weighted_by_key)
                if list(arrays) != list(self._global):
                    raise InvalidUpdate("array names differ from the global model's")
                updates.append((f"node {msg.metadata.src_node_id}", list(arrays.values())))
                contents.append(msg.content)

            screen(server_round, replies, self.watch, accept)
            total, step, n, unclipped, valid = self._clipped_sum(updates)
            self.watch.end_round(server_round, n > 0)
            metrics = aggregate_metrics(
                self.strategy.train_metrics_aggr_fn, [contents[i] for i in valid],
                self.strategy.weighted_by_key) if valid else None
        released = self._release(server_round, total, step, n, unclipped)
        if released is None:
            return None, None
        new, dp_metrics = released
        return array_record(new), MetricRecord({**(metrics or {}), **dp_metrics})

    # ------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The connected nodes, once at least ``count`` are."""
    while len(nodes := list(grid.get_node_ids())) < count:
        log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).",
            len(nodes), count)
        time.sleep(1)
    return nodes


class _NodesOnly:
    """A Grid that shows only the round's Poisson-sampled nodes (all else is the
    real Grid's)."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@contextmanager
def _trains_every_node(strategy: FedAvg) -> Iterator[None]:
    """The wrapped strategy samples every node it is shown (the Poisson sample),
    without waiting for more; its own settings come back afterwards."""
    saved = strategy.fraction_train, strategy.min_train_nodes, strategy.min_available_nodes
    strategy.fraction_train, strategy.min_train_nodes, strategy.min_available_nodes = 1.0, 0, 0
    try:
        yield
    finally:
        strategy.fraction_train, strategy.min_train_nodes, strategy.min_available_nodes = saved


# ------------------------------------------------------------------ client mod

def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this client's update to the round's ``dp-clip`` norm and weight it 1.

    Put it inside the secure aggregation's mod (``mods=[secagg_mod, dp_clip_mod]``)
    so it sees the plaintext model both ways. Refuses to train when the server sent
    no clipping norm (it is not running :class:`CentralDP`).
    """
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN \
            or STAGE_RECORD_KEY in msg.content.config_records:  # key stages pass through
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
    metrics[WEIGHT_KEY] = 1  # DP weighs every client the same
    return reply
