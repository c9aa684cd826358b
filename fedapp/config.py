"""Run settings: ``[tool.flwr.app.config]`` plus ``--run-config`` overrides, checked.

``DEFAULTS`` mirrors ``[tool.flwr.app.config]`` in pyproject.toml (a test keeps
them equal). Settings that say ``"auto"`` take the task's own default.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.partition import PartitionSpec
from clients.tasks import DataSpec, get_task
from clients.training import OPTIMIZERS

DEFAULTS: dict[str, Any] = {
    "task": "mnist",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": 2,
    "round-timeout": 3600.0,
    "max-empty-rounds": "auto",
    "aggregation": "fedavg",
    "paillier-public-key": "",
    "paillier-clip": "auto",
    "paillier-value-bits": 16,
    "paillier-max-total-weight": 65536,
    "paillier-weight-unit": 1,
    "secagg-clip": "auto",
    "secagg-value-bits": 16,
    "secagg-max-total-weight": 65536,
    "secagg-neighbors": 0,
    "secagg-threshold": 0.5,
    "secagg-allow-unauthenticated": False,
    "dp-noise-multiplier": 0.0,
    "dp-clip": 1.0,
    "dp-adaptive-clip": False,
    "dp-target-quantile": 0.5,
    "dp-clip-learning-rate": 0.2,
    "dp-clipped-count-stddev": "auto",
    "dp-delta": 1e-5,
    "dp-max-epsilon": 0.0,
    "dp-population": 0,
    "dp-sgd": False,
    "dp-sgd-noise-multiplier": 1.0,
    "dp-sgd-max-grad-norm": 1.0,
    "local-epochs": "auto",
    "batch-size": "auto",
    "learning-rate": "auto",
    "optimizer": "auto",
    "momentum": 0.0,
    "weight-decay": "auto",
    "data-source": "auto",
    "data-dir": "",
    "partitioning": "iid",
    "dirichlet-alpha": 0.5,
    "shards-per-client": 2,
    "shard-size": 300,
    "local-test-fraction": 0.1,
    "mnist-model": "cnn",
    "spam-buckets": 65536,
    "central-eval": True,
    "seed": 42,
    "run-dir": "fedapp-runs",
    "resume-from": "",
}


#: Clip range of the secure aggregations' fixed-point encoding per task: above the
#: largest weight each model reaches.
CLIP_RANGE = {"mnist": 1.0, "housing": 2.0, "spam": 8.0}


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number",
               str: "a string"}


def _check_type(key: str, value: Any) -> None:
    """Refuse a value of another type than its setting's: no silent conversion
    (``bool("false")`` is True, ``int(2.7)`` is 2, NaN passes every range check)."""
    if DEFAULTS[key] == "auto" and value == "auto":
        return
    kind = _KINDS[key]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    else:
        ok = type(value) is kind
    if not ok:
        auto = "'auto' or " if DEFAULTS[key] == "auto" else ""
        raise ValueError(f"{key} must be {auto}{_KIND_NAMES[kind]}, got {value!r}")


def _auto(value: Any, default: Any, kind: type, key: str) -> Any:
    if value == "auto":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key} must be 'auto' or a {kind.__name__}, got {value!r}") from err


@dataclass(frozen=True)
class RunSettings:
    """Every run setting, typed and checked; build with :meth:`from_run_config`."""

    task: str
    num_server_rounds: int
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    round_timeout: float
    max_empty_rounds: int | None
    aggregation: str
    paillier_public_key: str
    paillier_clip: float
    paillier_value_bits: int
    paillier_max_total_weight: int
    paillier_weight_unit: int
    secagg_clip: float
    secagg_value_bits: int
    secagg_max_total_weight: int
    secagg_neighbors: int
    secagg_threshold: float
    secagg_allow_unauthenticated: bool
    dp_noise_multiplier: float
    dp_clip: float
    dp_adaptive_clip: bool
    dp_target_quantile: float
    dp_clip_learning_rate: float
    dp_clipped_count_stddev: float | None
    dp_delta: float
    dp_max_epsilon: float
    dp_population: int
    dp_sgd: bool
    dp_sgd_noise_multiplier: float
    dp_sgd_max_grad_norm: float
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    data_source: str
    data_dir: str
    partitioning: str
    dirichlet_alpha: float
    shards_per_client: int
    shard_size: int
    local_test_fraction: float
    mnist_model: str
    spam_buckets: int
    central_eval: bool
    seed: int
    run_dir: str
    resume_from: str

    @staticmethod
    def from_run_config(run_config: dict[str, Any]) -> RunSettings:
        """Merge ``run_config`` over :data:`DEFAULTS` and check every value.

        Raises
        ------
        ValueError
            On an unknown key or a value of the wrong type or range.
        """
        unknown = set(run_config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown run settings {sorted(map(str, unknown))}; known: "
                             f"{sorted(DEFAULTS)}")
        for key, value in run_config.items():
            _check_type(key, value)
        c = {**DEFAULTS, **run_config}
        task = get_task(str(c["task"]))
        s = RunSettings(
            task=task.name,
            num_server_rounds=int(c["num-server-rounds"]),
            fraction_train=float(c["fraction-train"]),
            fraction_evaluate=float(c["fraction-evaluate"]),
            min_train_nodes=int(c["min-train-nodes"]),
            min_evaluate_nodes=int(c["min-evaluate-nodes"]),
            min_available_nodes=int(c["min-available-nodes"]),
            round_timeout=float(c["round-timeout"]),
            max_empty_rounds=_auto(c["max-empty-rounds"], None, int, "max-empty-rounds"),
            aggregation=str(c["aggregation"]),
            paillier_public_key=str(c["paillier-public-key"]),
            paillier_clip=_auto(c["paillier-clip"], CLIP_RANGE[task.name], float,
                                "paillier-clip"),
            paillier_value_bits=int(c["paillier-value-bits"]),
            paillier_max_total_weight=int(c["paillier-max-total-weight"]),
            paillier_weight_unit=int(c["paillier-weight-unit"]),
            secagg_clip=_auto(c["secagg-clip"], CLIP_RANGE[task.name], float, "secagg-clip"),
            secagg_value_bits=int(c["secagg-value-bits"]),
            secagg_max_total_weight=int(c["secagg-max-total-weight"]),
            secagg_neighbors=int(c["secagg-neighbors"]),
            secagg_threshold=float(c["secagg-threshold"]),
            secagg_allow_unauthenticated=bool(c["secagg-allow-unauthenticated"]),
            dp_noise_multiplier=float(c["dp-noise-multiplier"]),
            dp_clip=float(c["dp-clip"]),
            dp_adaptive_clip=bool(c["dp-adaptive-clip"]),
            dp_target_quantile=float(c["dp-target-quantile"]),
            dp_clip_learning_rate=float(c["dp-clip-learning-rate"]),
            dp_clipped_count_stddev=_auto(c["dp-clipped-count-stddev"], None, float,
                                          "dp-clipped-count-stddev"),
            dp_delta=float(c["dp-delta"]),
            dp_max_epsilon=float(c["dp-max-epsilon"]),
            dp_population=int(c["dp-population"]),
            dp_sgd=bool(c["dp-sgd"]),
            dp_sgd_noise_multiplier=float(c["dp-sgd-noise-multiplier"]),
            dp_sgd_max_grad_norm=float(c["dp-sgd-max-grad-norm"]),
            local_epochs=_auto(c["local-epochs"], task.local_epochs, int, "local-epochs"),
            batch_size=_auto(c["batch-size"], task.batch_size, int, "batch-size"),
            learning_rate=_auto(c["learning-rate"], task.learning_rate, float, "learning-rate"),
            optimizer=_auto(c["optimizer"], task.optimizer, str, "optimizer"),
            momentum=float(c["momentum"]),
            weight_decay=_auto(c["weight-decay"], task.weight_decay, float, "weight-decay"),
            data_source=str(c["data-source"]),
            data_dir=str(c["data-dir"]),
            partitioning=str(c["partitioning"]),
            dirichlet_alpha=float(c["dirichlet-alpha"]),
            shards_per_client=int(c["shards-per-client"]),
            shard_size=int(c["shard-size"]),
            local_test_fraction=float(c["local-test-fraction"]),
            mnist_model=str(c["mnist-model"]),
            spam_buckets=int(c["spam-buckets"]),
            central_eval=bool(c["central-eval"]),
            seed=int(c["seed"]),
            run_dir=str(c["run-dir"]),
            resume_from=str(c["resume-from"]),
        )
        s.check()
        return s

    def check(self) -> None:
        from .modes import mode_of

        mode_of(self.aggregation).check(self)
        if self.dp_noise_multiplier > 0:
            from strategies.dp import DPConfig

            # the default count noise depends on the clients per round: checked at round 1
            adaptive = self.dp_adaptive_clip and self.dp_clipped_count_stddev is not None
            DPConfig(self.dp_noise_multiplier, self.dp_clip, 1, 1, self.dp_delta,
                     self.dp_max_epsilon, adaptive, self.dp_target_quantile,
                     self.dp_clip_learning_rate, self.dp_clipped_count_stddev)
        if self.num_server_rounds < 1:
            raise ValueError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        for key in ("fraction_train", "fraction_evaluate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key.replace('_', '-')} must be in [0, 1]")
        if min(self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes) < 0:
            raise ValueError("min-*-nodes must be >= 0")
        if self.local_epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("local-epochs, batch-size and learning-rate must be positive")
        if self.max_empty_rounds is not None and self.max_empty_rounds < 1:
            raise ValueError(f"max-empty-rounds must be 'auto' or >= 1, got "
                             f"{self.max_empty_rounds}")
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout must be positive, got {self.round_timeout}")
        for key in ("momentum", "weight_decay", "dp_noise_multiplier", "dp_population", "seed"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        for key in ("shards_per_client", "shard_size", "spam_buckets"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.local_test_fraction < 1:
            raise ValueError(f"local-test-fraction must be in (0, 1), got "
                             f"{self.local_test_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'auto' or one of {OPTIMIZERS}, got "
                             f"'{self.optimizer}'")
        if self.dp_sgd:
            from clients.dp_sgd_config import DPSGDConfig

            DPSGDConfig(self.dp_sgd_noise_multiplier, self.dp_sgd_max_grad_norm, self.dp_delta)
        self.data_spec(1)  # validates data-source, partitioning, model options

    def data_spec(self, num_partitions: int, data_dir: str | None = None) -> DataSpec:
        """The data description for a node; ``data_dir`` (node config) wins if given."""
        return DataSpec(
            task=self.task,
            source=self.data_source,
            data_dir=self.data_dir if data_dir is None else data_dir,
            partition=PartitionSpec(
                scheme=self.partitioning, num_partitions=num_partitions,
                dirichlet_alpha=self.dirichlet_alpha, shards_per_client=self.shards_per_client,
                shard_size=self.shard_size, seed=self.seed,
            ),
            local_test_fraction=self.local_test_fraction,
            spam_buckets=self.spam_buckets,
            mnist_model=self.mnist_model,
        )

    def train_config(self) -> dict[str, Any]:
        """What each client gets for local training (and, with ``dp-sgd``, its DP-SGD
        settings)."""
        config = {"local-epochs": self.local_epochs, "batch-size": self.batch_size,
                  "learning-rate": self.learning_rate, "optimizer": self.optimizer,
                  "momentum": self.momentum, "weight-decay": self.weight_decay}
        if self.dp_sgd:
            config.update({"dp-sgd-noise-multiplier": self.dp_sgd_noise_multiplier,
                           "dp-sgd-max-grad-norm": self.dp_sgd_max_grad_norm,
                           "dp-delta": self.dp_delta})
        return config

    def resolved_run_dir(self) -> Path:
        """Absolute: a relative ``run-dir`` is taken from the home directory, because the
        ServerApp's working directory is wherever the SuperLink was started."""
        path = Path(self.run_dir).expanduser()
        return path if path.is_absolute() else Path.home() / path

    def resolved_resume_dir(self) -> Path | None:
        """The run directory to resume (``resume-from``), absolute as ``run-dir``; or None."""
        if not self.resume_from:
            return None
        path = Path(self.resume_from).expanduser()
        return path if path.is_absolute() else Path.home() / path

    def as_dict(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


#: Each setting's type, from the fields of RunSettings (``T | None``: a T or "auto").
_KINDS = {name.replace("_", "-"): typing.get_args(hint)[0] if typing.get_args(hint) else hint
          for name, hint in typing.get_type_hints(RunSettings).items()}
