"""The same NumPyClients under Flower's legacy API (``client_fn`` / ``server_fn``).

Many existing Flower projects are written this way: a ``ClientApp(client_fn=...)``
returning ``NumPyClient.to_client()`` and a ``ServerApp(server_fn=...)`` with a
``flwr.server.strategy`` strategy. Point a project's components at
``fedapp.legacy:serverapp`` and ``fedapp.legacy:clientapp`` to run it so.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING

import torch
from flwr.app import Context
from flwr.client import ClientApp
from flwr.common import GetPropertiesIns, Metrics, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from clients.models import HOUSING_FEATURES, get_weights, set_weights
from clients.numpy_clients import CLIENTS
from clients.standardize import combine_stats, encode_floats
from clients.tasks import build_model, load_central_test

from .config import RunSettings
from .nodes import make_client
from .outputs import RunRecorder


def client_fn(context: Context):
    return make_client(context).to_client()


clientapp = ClientApp(client_fn=client_fn)


def weighted_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
    """Average every numeric metric weighted by the number of examples."""
    total = sum(n for n, _ in results)
    keys = {k for _, m in results for k, v in m.items() if isinstance(v, (int, float))}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in results) / total for k in keys} if total else {}


class StandardizingFedAvg(FedAvg):
    """Legacy FedAvg that, when ``needs_stats``, first gathers every client's
    statistics (``get_properties``) and adds ``norm-mean`` / ``norm-std`` to all
    fit and evaluate configs, and to :attr:`extra_config` for central evaluation."""

    def __init__(self, *, needs_stats: bool, **kwargs) -> None:
        super().__init__(**kwargs)
        self.needs_stats = needs_stats
        self.extra_config: dict = {}

    def _gather_stats(self, client_manager, server_round: int) -> None:
        client_manager.wait_for(self.min_available_clients)
        reports = []
        for proxy in client_manager.all().values():
            res = proxy.get_properties(GetPropertiesIns(config={}), timeout=None,
                                       group_id=server_round)
            if res.status.code.value != 0:
                log(WARNING, "Client %s sent no statistics", proxy.cid)
                continue
            reports.append(res.properties)
        mean, std = combine_stats(reports, HOUSING_FEATURES + 1)
        self.extra_config = {"norm-mean": encode_floats(mean), "norm-std": encode_floats(std)}
        log(INFO, "Federated standardization from %d clients", len(reports))

    def configure_fit(self, server_round, parameters, client_manager):
        if self.needs_stats and not self.extra_config:
            self._gather_stats(client_manager, server_round)
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.update(self.extra_config)
        return pairs

    def configure_evaluate(self, server_round, parameters, client_manager):
        pairs = super().configure_evaluate(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.update(self.extra_config)
        return pairs


def server_fn(context: Context) -> ServerAppComponents:
    settings = RunSettings.from_run_config(dict(context.run_config))
    recorder = RunRecorder.create(settings.resolved_run_dir(), settings.task, context.run_id)
    recorder.write_config({**settings.as_dict(), "api": "legacy"})
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
        result = None
        if evaluator is not None and (settings.task != "housing" or strategy.extra_config):
            loss, _, metrics = evaluator.evaluate(ndarrays, strategy.extra_config)
            row.update({f"central-{k}": v for k, v in metrics.items()})
            result = (loss, metrics)
        recorder.add_round(row)
        if rnd == settings.num_server_rounds:
            set_weights(model, ndarrays)
            recorder.save_arrays("model.npz", {k: v.numpy() for k, v in model.state_dict().items()})
            recorder.plot()
        clock["last"] = time.monotonic()
        return result

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
        evaluate_metrics_aggregation_fn=weighted_metrics,
    )
    return ServerAppComponents(strategy=strategy,
                               config=ServerConfig(num_rounds=settings.num_server_rounds))


serverapp = ServerApp(server_fn=server_fn)
