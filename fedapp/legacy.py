"""The same NumPyClients under Flower's legacy API (``client_fn`` / ``server_fn``).

Many existing Flower projects are written this way: a ``ClientApp(client_fn=...)``
returning ``NumPyClient.to_client()`` and a ``ServerApp(server_fn=...)`` with a
``flwr.server.strategy`` strategy. Point a project's components at
``fedapp.legacy:serverapp`` and ``fedapp.legacy:clientapp`` to run it so.

``fedapp.legacy:secaggplus_serverapp`` and ``fedapp.legacy:secaggplus_clientapp``
run the same strategy and clients with Flower's own SecAgg+ protocol
(``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the clients): the
baseline for our own secure aggregation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import (GetPropertiesIns, Metrics, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext, ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from clients.models import HOUSING_FEATURES, get_weights, set_weights
from clients.numpy_clients import CLIENTS
from clients.standardize import combine_stats, encode_floats, read_stats
from clients.tasks import build_model, load_central_test
from strategies.aggregation import InvalidUpdate, check_update, check_weight
from strategies.legacy_wire import load_ndarrays
from strategies.secagg_masks import default_degree, threshold_for
from strategies.screening import PLAINTEXT_EMPTY_ROUNDS, RoundWatch, report_failures

from .config import RunSettings
from .nodes import make_client
from .outputs import RunRecorder
from .polling import PollingGrid
from strategies.checks import is_number


def client_fn(context: Context):
    return make_client(context).to_client()


clientapp = ClientApp(client_fn=client_fn)


def weighted_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """Average every numeric metric weighted by the number of examples."""
    total = sum(n for n, _ in results)
    keys = {k for _, m in results for k, v in m.items() if isinstance(v, (int, float))}

    def number(value: object) -> float:  # a client may send anything: count it as missing
        return float(value) if isinstance(value, (int, float)) else 0.0
    return {k: sum(n * number(m.get(k, 0.0)) for n, m in results) / total
            for k in keys} if total else {}


class StandardizingFedAvg(FedAvg):
    """Legacy FedAvg that, when ``needs_stats``, first gathers every client's
    statistics (``get_properties``) and adds ``norm-mean`` / ``norm-std`` to all
    fit and evaluate configs, and to :attr:`extra_config` for central evaluation.

    Replies that Flower's FedAvg would choke on (tensors that are no ``.npy`` arrays,
    arrays that differ from the global model's or hold NaN or infinity, weights that
    are no positive int, losses that are no finite number) are logged and left out."""

    def __init__(self, *, needs_stats: bool, max_empty_rounds: int = PLAINTEXT_EMPTY_ROUNDS,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.watch = RoundWatch(max_empty_rounds)
        self.needs_stats = needs_stats
        self.extra_config: dict = {}
        self._sent: list[np.ndarray] = []

    def _gather_stats(self, client_manager, server_round: int) -> None:
        client_manager.wait_for(self.min_available_clients)
        reports = []
        for proxy in client_manager.all().values():
            res = proxy.get_properties(GetPropertiesIns(config={}), timeout=None,
                                       group_id=server_round)
            if res.status.code.value != 0:
                log(WARNING, "Client %s sent no statistics", proxy.cid)
                continue
            report = dict(res.properties)  # a ConfigRecord in Flower's legacy layer
            try:
                read_stats(report, HOUSING_FEATURES + 1)
            except ValueError as err:
                log(WARNING, "Left out the statistics of client %s: %s", proxy.cid, err)
                continue
            reports.append(report)
        mean, std = combine_stats(reports, HOUSING_FEATURES + 1)
        self.extra_config = {"norm-mean": encode_floats(mean), "norm-std": encode_floats(std)}
        log(INFO, "Federated standardization from %d clients", len(reports))

    def configure_fit(self, server_round, parameters, client_manager):
        if self.needs_stats and not self.extra_config:
            self._gather_stats(client_manager, server_round)
        self._sent = parameters_to_ndarrays(parameters)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.update(self.extra_config)
        return pairs

    def aggregate_fit(self, server_round, results, failures):
        valid = []
        for proxy, res in results:
            try:
                check_weight(res.num_examples)
                check_update(load_ndarrays(res.parameters.tensors), self._sent)
            except InvalidUpdate as err:
                log(WARNING, "Left out the reply of client %s in round %d: %s", proxy.cid,
                    server_round, err)
                continue
            valid.append((proxy, res))
        report_failures(self.watch, failures)
        self.watch.end_round(server_round, bool(valid))
        return super().aggregate_fit(server_round, valid, failures)

    def aggregate_evaluate(self, server_round, results, failures):
        valid = []
        for proxy, res in results:
            try:
                check_weight(res.num_examples)
                if not is_number(res.loss) \
                        or not math.isfinite(res.loss):
                    raise InvalidUpdate(f"the loss must be a finite number, got {res.loss!r}")
            except InvalidUpdate as err:
                log(WARNING, "Left out the evaluation of client %s in round %d: %s",
                    proxy.cid, server_round, err)
                continue
            valid.append((proxy, res))
        return super().aggregate_evaluate(server_round, valid, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        pairs = super().configure_evaluate(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.update(self.extra_config)
        return pairs


def build_legacy_server(
    context: Context,
    config_extra: dict[str, Any] | None = None,
    round_extra: Callable[[], dict[str, Any]] | None = None,
) -> tuple[RunSettings, StandardizingFedAvg, ServerConfig]:
    """The legacy strategy and server config of a run, recording into its run directory.

    Every round ends with a row in ``metrics.json``: its seconds (since the previous
    row, so from round 2 on one round's federated evaluation and the next round's
    fit), the centralized metrics when ``central-eval`` is on and, once the
    federated evaluation is aggregated, its ``fed-*`` metrics.

    Parameters
    ----------
    context : Context
        The ServerApp's context; its run config holds the run settings.
    config_extra : dict[str, Any], optional
        Added to the run's ``config.json`` (after ``"api": "legacy"``).
    round_extra : Callable[[], dict[str, Any]], optional
        Called as each round's row is written; what it returns is added to the row.

    Returns
    -------
    tuple[RunSettings, StandardizingFedAvg, ServerConfig]
        The checked settings, the strategy and the number of rounds.
    """
    settings = RunSettings.from_run_config(dict(context.run_config))
    recorder = RunRecorder.create(settings.resolved_run_dir(), settings.task, context.run_id)
    recorder.write_config({**settings.as_dict(), "api": "legacy", **(config_extra or {})})
    torch.manual_seed(settings.seed)
    spec = settings.data_spec(1)
    model = build_model(spec)
    evaluator = CLIENTS[settings.task](spec, None, load_central_test(spec)) \
        if settings.central_eval else None
    clock = {"last": time.monotonic()}
    strategy: StandardizingFedAvg

    def central_eval(rnd: int, ndarrays, _config):
        """Runs after every round: records seconds and the held-out metrics, and
        after the last one saves the model and the plot."""
        row = {"round": rnd, "seconds": round(time.monotonic() - clock["last"], 3)}
        if round_extra is not None:
            row.update(round_extra())
        result = None
        if evaluator is not None and (settings.task != "housing" or strategy.extra_config):
            loss, _, metrics = evaluator.evaluate(ndarrays, strategy.extra_config)
            row.update({f"central-{k}": v for k, v in metrics.items()})
            result = (loss, metrics)
        recorder.add_round(row)
        if rnd == settings.num_server_rounds:
            set_weights(model, ndarrays)
            recorder.save_arrays("model.npz", {k: v.numpy() for k, v in model.state_dict().items()})
            recorder.save_standardization(strategy.extra_config)
            recorder.set_status("completed")  # publishes the plot and report
        clock["last"] = time.monotonic()
        return result

    def fed_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
        """Aggregates the clients' evaluation metrics and adds them, as ``fed-*``, to
        the row of the round they belong to (the last one written)."""
        metrics = weighted_metrics(results)
        if recorder.rows and metrics:
            row = recorder.rows.pop()
            recorder.add_round({**row, **{f"fed-{k}": v for k, v in metrics.items()}})
            if row["round"] == settings.num_server_rounds:
                recorder.publish()
        return metrics

    strategy = StandardizingFedAvg(
        needs_stats=settings.task == "housing",
        fraction_fit=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_fit_clients=settings.min_train_nodes,
        min_evaluate_clients=settings.min_evaluate_nodes,
        min_available_clients=settings.min_available_nodes,
        on_fit_config_fn=lambda rnd: {**settings.train_config(), "server-round": rnd},
        evaluate_fn=central_eval,
        initial_parameters=ndarrays_to_parameters(get_weights(model)),
        fit_metrics_aggregation_fn=weighted_metrics,
        evaluate_metrics_aggregation_fn=fed_metrics,
    )
    return settings, strategy, ServerConfig(num_rounds=settings.num_server_rounds)


def server_fn(context: Context) -> ServerAppComponents:
    _, strategy, config = build_legacy_server(context)
    return ServerAppComponents(strategy=strategy, config=config)


serverapp = ServerApp(server_fn=server_fn)


# -- Flower's SecAgg+ ------------------------------------------------------------------------

def secaggplus_shares(num_sampled: int, neighbors: int, threshold: float) -> tuple[int, int]:
    """Number of key shares (a node and its neighbors) and reconstruction threshold
    for ``num_sampled`` nodes, by the same rule as our ``secagg`` aggregation
    (:class:`strategies.secagg_protocol.ServerRound`).

    Parameters
    ----------
    num_sampled : int
        Nodes sampled for the round.
    neighbors : int
        ``secagg-neighbors``; 0 takes SecAgg+'s ``2 ceil(log2 n) + 2``.
    threshold : float
        ``secagg-threshold``: a key needs more than this fraction of its shares.
    """
    shares = min(num_sampled, (neighbors or default_degree(num_sampled)) + 1)
    return shares, threshold_for(shares, threshold)


class SettingsSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ fit workflow with the shares and threshold set each round
    by :func:`secaggplus_shares` from the number of nodes the strategy sampled.

    Flower's own float options round (``round``, not ``ceil``) and adjust the share
    count, so the count is taken from the strategy's sampling instead: the
    strategy's ``configure_fit`` is observed for the duration of the setup stage.
    Clipping range, quantization levels (``2**secagg-value-bits``), the largest
    client weight (``secagg-max-total-weight``) and the per-stage timeout
    (``round-timeout``) come from the settings too.

    Parameters
    ----------
    settings : RunSettings
        The run's settings.
    """

    def __init__(self, settings: RunSettings) -> None:
        super().__init__(
            num_shares=1.0,  # placeholders, replaced in every setup stage
            reconstruction_threshold=1.0,
            max_weight=float(settings.secagg.max_total_weight),
            clipping_range=float(settings.secagg.clip),
            quantization_range=2 ** settings.secagg.value_bits,
            timeout=settings.round_timeout,
        )
        self.neighbors = settings.secagg.neighbors
        self.threshold_fraction = settings.secagg.threshold

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage, with the shares and threshold for this round's sample."""
        strategy = context.strategy
        configure_fit = strategy.configure_fit

        def sampled(*args: Any, **kwargs: Any):
            pairs = configure_fit(*args, **kwargs)
            if pairs:
                self.num_shares, self.reconstruction_threshold = secaggplus_shares(
                    len(pairs), self.neighbors, self.threshold_fraction)
                log(INFO, "SecAgg+: %d sampled nodes, %d shares, threshold %d",
                    len(pairs), self.num_shares, self.reconstruction_threshold)
            return pairs

        strategy.configure_fit = sampled  # type: ignore[method-assign]
        try:
            return super().setup_stage(grid, context, state)
        finally:
            del strategy.configure_fit  # the class's method again


class _CountingGrid:
    """A Grid that counts the bytes of every message's records each way."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.down = 0
        self.up = 0

    @staticmethod
    def _bytes(messages: Iterable[Message]) -> int:
        total = 0
        for msg in messages:
            if msg.has_content():
                content = msg.content
                for records in (content.array_records, content.metric_records):
                    total += sum(r.count_bytes() for r in records.values())
                for config in content.config_records.values():
                    # ConfigRecord.count_bytes fails on an empty list (SecAgg+ sends some)
                    total += ConfigRecord({k: v for k, v in config.items() if v != []}
                                          ).count_bytes()
        return total

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.down += self._bytes(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.up += self._bytes(replies)
        return replies

    def take(self) -> dict[str, int]:
        """Bytes since the last call, as ``bytes-down`` / ``bytes-up``; resets them."""
        out = {"bytes-down": self.down, "bytes-up": self.up}
        self.down = self.up = 0
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


secaggplus_serverapp = ServerApp()


@secaggplus_serverapp.main()
def secaggplus_main(grid: Grid, context: Context) -> None:
    """The legacy strategy of :func:`server_fn` with Flower's SecAgg+ as fit workflow.

    Rows of ``metrics.json`` also hold ``bytes-down`` / ``bytes-up``: every record
    (arrays, configs, metrics) of the messages since the previous row, which covers
    SecAgg+'s key exchange and its masked vectors (sent as bytes in config records).

    Parameters
    ----------
    grid : Grid
        The Grid of the run.
    context : Context
        The ServerApp's context; its run config holds the run settings.
    """
    counting = _CountingGrid(PollingGrid(grid))
    settings = RunSettings.from_run_config(dict(context.run_config))
    fit_workflow = SettingsSecAggPlusWorkflow(settings)
    described = {"fit-workflow": "flower-secaggplus", "secaggplus": {
        "max-weight": fit_workflow.max_weight, "clipping-range": fit_workflow.clipping_range,
        "quantization-range": fit_workflow.quantization_range,
        "modulus-range": fit_workflow.modulus_range, "timeout": fit_workflow.timeout}}
    _, strategy, config = build_legacy_server(context, described, counting.take)
    legacy = LegacyContext(context=context, config=config, strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_workflow)(counting, legacy)  # type: ignore[arg-type]


secaggplus_clientapp = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
