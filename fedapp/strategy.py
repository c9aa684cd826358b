"""The run's server strategy: its aggregation mode's, wrapped in central DP."""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from strategies.dp_message import CentralDP

from .config import RunSettings
from .modes import mode_of


def build_strategy(settings: RunSettings) -> Strategy:
    """The run's strategy: the aggregation's, wrapped in central DP when
    ``dp-noise-multiplier`` > 0."""
    strategy = aggregation_strategy(settings)
    if settings.dp.noise_multiplier <= 0:
        return strategy
    return CentralDP(
        strategy, noise_multiplier=settings.dp.noise_multiplier, clip=settings.dp.clip,
        population=settings.dp.population, delta=settings.dp.delta,
        max_epsilon=settings.dp.max_epsilon, adaptive=settings.dp.adaptive_clip,
        target_quantile=settings.dp.target_quantile,
        clip_learning_rate=settings.dp.clip_learning_rate,
        clipped_count_stddev=settings.dp.clipped_count_stddev, sampling=settings.dp.sampling,
        mode=settings.dp.mode, quorum=settings.dp.quorum)


def aggregation_strategy(settings: RunSettings) -> Strategy:
    """The Message-API strategy of the run's aggregation mode (:data:`fedapp.modes.MODES`)."""
    sampling = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        min_available_nodes=settings.min_available_nodes,
    )
    if settings.max_empty_rounds is not None:  # else each strategy's own default
        sampling["max_empty_rounds"] = settings.max_empty_rounds
    mode = mode_of(settings.aggregation)
    if mode.server_sees != "plain" and not settings.plaintext_metrics \
            and settings.fraction_evaluate > 0:
        log(INFO, "Federated evaluation is off under %s: each node's evaluation would reach "
            "the server in plaintext (set plaintext-metrics = true here and on the nodes to "
            "ask for it); train metrics arrive as sums", mode.name)
        sampling.update(fraction_evaluate=0.0, min_evaluate_nodes=0)
    return mode.strategy(settings, sampling)
