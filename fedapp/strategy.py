"""The one place where the run's ``aggregation`` setting becomes a strategy."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from pathlib import Path

from strategies.dp_flower import CentralDP
from strategies.fedavg import WeightedFedAvg
from strategies.keyfiles import load_public_key
from strategies.paillier_flower import PaillierFedAvg
from strategies.secagg_flower import SecAggFedAvg

from .config import RunSettings


def build_strategy(settings: RunSettings) -> Strategy:
    """The run's strategy: the aggregation's, wrapped in central DP when
    ``dp-noise-multiplier`` > 0."""
    strategy = aggregation_strategy(settings)
    if settings.dp_noise_multiplier <= 0:
        return strategy
    return CentralDP(
        strategy, noise_multiplier=settings.dp_noise_multiplier, clip=settings.dp_clip,
        population=settings.dp_population, delta=settings.dp_delta,
        max_epsilon=settings.dp_max_epsilon, adaptive=settings.dp_adaptive_clip,
        target_quantile=settings.dp_target_quantile,
        clip_learning_rate=settings.dp_clip_learning_rate,
        clipped_count_stddev=settings.dp_clipped_count_stddev)


def aggregation_strategy(settings: RunSettings) -> Strategy:
    """The Message-API strategy for ``settings.aggregation``.

    ``paillier`` loads the public key file named by ``paillier-public-key``; the
    server never loads a private key.
    """
    sampling = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        min_available_nodes=settings.min_available_nodes,
    )
    if settings.max_empty_rounds is not None:  # else each strategy's own default
        sampling["max_empty_rounds"] = settings.max_empty_rounds
    if settings.aggregation == "paillier":
        return PaillierFedAvg(
            load_public_key(Path(settings.paillier_public_key).expanduser()),
            clip=settings.paillier_clip, value_bits=settings.paillier_value_bits,
            max_total_weight=settings.paillier_max_total_weight,
            weight_unit=settings.paillier_weight_unit, **sampling)
    if settings.aggregation == "secagg":
        return SecAggFedAvg(
            clip=settings.secagg_clip, value_bits=settings.secagg_value_bits,
            max_total_weight=settings.secagg_max_total_weight,
            num_neighbours=settings.secagg_neighbors, threshold=settings.secagg_threshold,
            stage_timeout=settings.round_timeout, **sampling)
    return WeightedFedAvg(**sampling)
