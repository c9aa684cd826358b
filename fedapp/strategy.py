"""The one place where the run's ``aggregation`` setting becomes a strategy."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from strategies.fedavg import WeightedFedAvg

from .config import RunSettings

AGGREGATIONS = ("fedavg",)


def build_strategy(settings: RunSettings) -> Strategy:
    """The Message-API strategy for ``settings.aggregation``.

    Raises
    ------
    ValueError
        For an aggregation this build does not offer.
    """
    if settings.aggregation == "fedavg":
        return WeightedFedAvg(
            fraction_train=settings.fraction_train,
            fraction_evaluate=settings.fraction_evaluate,
            min_train_nodes=settings.min_train_nodes,
            min_evaluate_nodes=settings.min_evaluate_nodes,
            min_available_nodes=settings.min_available_nodes,
        )
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got '{settings.aggregation}'")
