"""Run settings: ``[tool.flwr.app.config]`` plus ``--run-config`` overrides, checked.

The settings come in groups, one dataclass each (:class:`PaillierSettings`,
:class:`SecAggSettings`, :class:`DPSettings`, :class:`DPSGDSettings`,
:class:`TrainSettings`, :class:`DataSettings`; the run's shape sits on
:class:`RunSettings` itself). Each field declares its setting: default, whether a
resumed run must keep it, and the range checks that belong to no other module.
:data:`DEFAULTS` (which pyproject.toml and the table in docs/configuration.md must equal: a test
keeps them so) and :data:`MUST_MATCH` (for the checkpoint) are generated from them.

Values are checked once, where they are used: the data, training, DP and
aggregation modules' own constructors refuse what they cannot run with, and
:meth:`RunSettings.from_run_config` builds each of them once to ask. Settings that
say ``"auto"`` take the task's own default.
"""

from __future__ import annotations

from difflib import get_close_matches

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from clients.partition import PartitionSpec
from clients.tasks import DataSpec, Task, get_task
from strategies.checks import is_number
from strategies.threshold_rounds import PAYLOADS

#: Clip range of the secure aggregations' fixed-point encoding per task: above the
#: largest weight each model reaches.
CLIP_RANGE = {"mnist": 1.0, "housing": 2.0, "spam": 8.0}


def setting(default: Any, *, must_match: bool = False,
            auto: Callable[[Task], Any] | None = None,
            valid: tuple[Callable[[Any], bool], str] | None = None,
            key: str | None = None) -> Any:
    """A dataclass field that is a run setting.

    Parameters
    ----------
    default
        Its value in ``[tool.flwr.app.config]``.
    must_match
        A resumed run must have the same value (:data:`MUST_MATCH`).
    auto
        What ``"auto"`` means, from the task (``"auto"`` on a ``T | None`` field is None).
    valid
        ``(predicate, "must be ...")`` for a range no other module checks.
    key
        The setting's name, when it is not the group's prefix plus the field's name.
    """
    return field(metadata={"default": default, "must_match": must_match, "auto": auto,
                           "valid": valid, "key": key})


def _clip_range(task: Task) -> float:
    return CLIP_RANGE[task.name]


_POSITIVE = (lambda v: v > 0, "must be positive")
_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_NOT_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_FRACTION = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")


@dataclass(frozen=True)
class PaillierSettings:
    """``paillier-*``: Paillier-encrypted aggregation (``aggregation = "paillier"`` or
    ``"paillier-threshold"``)."""

    prefix: ClassVar[str] = "paillier-"
    public_key: str = setting("", must_match=True)
    clip: float = setting("auto", must_match=True, auto=_clip_range)
    value_bits: int = setting(16, must_match=True)
    max_total_weight: int = setting(65536, must_match=True)
    weight_unit: int = setting(1, must_match=True)
    extra_decryptors: int = setting(1, valid=_NOT_NEGATIVE)
    threshold_payload: str = setting("masked", valid=(lambda v: v in PAYLOADS,
                                                      f"must be {' or '.join(PAYLOADS)}"))
    decrypt_once: bool = setting(False)


@dataclass(frozen=True)
class SecAggSettings:
    """``secagg-*``: masked secure aggregation (``aggregation = "secagg"``)."""

    prefix: ClassVar[str] = "secagg-"
    clip: float = setting("auto", must_match=True, auto=_clip_range)
    value_bits: int = setting(16, must_match=True)
    max_total_weight: int = setting(65536, must_match=True)
    neighbors: int = setting(0)
    threshold: float = setting(0.5)


@dataclass(frozen=True)
class DPSettings:
    """``dp-*``: central DP-FedAvg (on when ``dp-noise-multiplier`` > 0)."""

    prefix: ClassVar[str] = "dp-"
    noise_multiplier: float = setting(0.0, must_match=True, valid=_NOT_NEGATIVE)
    clip: float = setting(1.0, must_match=True)
    adaptive_clip: bool = setting(False, must_match=True)
    target_quantile: float = setting(0.5)
    clip_learning_rate: float = setting(0.2)
    clipped_count_stddev: float | None = setting("auto")
    delta: float = setting(1e-5, must_match=True)
    max_epsilon: float = setting(0.0)
    population: int = setting(0, must_match=True, valid=_NOT_NEGATIVE)
    sampling: str = setting("auto", must_match=True, valid=(
        lambda v: v in ("auto", "poisson", "fixed"), "must be 'auto', 'poisson' or 'fixed'"))
    mode: str = setting("central", must_match=True, valid=(
        lambda v: v in ("central", "distributed"), "must be 'central' or 'distributed'"))
    quorum: float = setting(0.8, must_match=True, valid=(
        lambda v: 0 < v <= 1, "must be in (0, 1]"))


@dataclass(frozen=True)
class DPSGDSettings:
    """``dp-sgd*``: DP-SGD on each client with Opacus (its delta is ``dp-delta``)."""

    prefix: ClassVar[str] = "dp-sgd-"
    enabled: bool = setting(False, key="dp-sgd")
    noise_multiplier: float = setting(1.0)
    max_grad_norm: float = setting(1.0)


@dataclass(frozen=True)
class TrainSettings:
    """Local training on each client (``"auto"``: the task's default)."""

    prefix: ClassVar[str] = ""
    local_epochs: int = setting("auto", auto=lambda t: t.local_epochs)
    batch_size: int = setting("auto", auto=lambda t: t.batch_size)
    learning_rate: float = setting("auto", auto=lambda t: t.learning_rate)
    optimizer: str = setting("auto", auto=lambda t: t.optimizer)
    momentum: float = setting(0.0)
    weight_decay: float = setting("auto", auto=lambda t: t.weight_decay)


@dataclass(frozen=True)
class DataSettings:
    """Where the data comes from and how it is split across clients."""

    prefix: ClassVar[str] = ""
    data_source: str = setting("auto")
    data_dir: str = setting("")
    partitioning: str = setting("iid")
    dirichlet_alpha: float = setting(0.5)
    shards_per_client: int = setting(2)
    shard_size: int = setting(300)
    local_test_fraction: float = setting(0.1)
    mnist_model: str = setting("cnn", must_match=True)
    spam_buckets: int = setting(65536, must_match=True)


#: The groups, by their attribute on :class:`RunSettings`.
GROUPS: dict[str, type] = {"paillier": PaillierSettings, "secagg": SecAggSettings,
                           "dp": DPSettings, "dp_sgd": DPSGDSettings,
                           "train": TrainSettings, "data": DataSettings}


@dataclass(frozen=True)
class RunSettings:
    """Every run setting, typed and checked; build with :meth:`from_run_config`.

    The run's shape is here; the rest is in groups (``settings.paillier.clip`` is
    ``paillier-clip``).
    """

    prefix: ClassVar[str] = ""
    task: str = setting("mnist", must_match=True)
    num_server_rounds: int = setting(3, valid=_AT_LEAST_1)
    fraction_train: float = setting(1.0, valid=_FRACTION)
    fraction_evaluate: float = setting(1.0, valid=_FRACTION)
    min_train_nodes: int = setting(2, valid=_NOT_NEGATIVE)
    min_evaluate_nodes: int = setting(2, valid=_NOT_NEGATIVE)
    min_available_nodes: int = setting(2, valid=_NOT_NEGATIVE)
    round_timeout: float = setting(3600.0, valid=_POSITIVE)
    max_empty_rounds: int | None = setting("auto", valid=_AT_LEAST_1)
    aggregation: str = setting("fedavg", must_match=True)
    central_eval: bool = setting(True)
    plaintext_metrics: bool = setting(False)
    seed: int = setting(42)
    run_dir: str = setting("fedapp-runs")
    resume_from: str = setting("")
    paillier: PaillierSettings = field(default_factory=PaillierSettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    dp_sgd: DPSGDSettings = field(default_factory=DPSGDSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)

    @staticmethod
    def from_run_config(run_config: dict[str, Any]) -> RunSettings:
        """Merge ``run_config`` over :data:`DEFAULTS` and check every value.

        Raises
        ------
        ValueError
            On an unknown key or a value of the wrong type or range.
        """
        unknown = sorted(map(str, set(run_config) - set(DEFAULTS)))
        if unknown:
            hints = [f"'{k}' (did you mean '{close[0]}'?)" if close else f"'{k}'"
                     for k in unknown for close in [get_close_matches(k, DEFAULTS, n=1)]]
            raise ValueError(f"unknown run setting{'s' * (len(unknown) > 1)} "
                             f"{', '.join(hints)}: see docs/configuration.md for the "
                             f"{len(DEFAULTS)} settings")
        for key, value in run_config.items():
            _check_type(key, value)
        values = {**DEFAULTS, **run_config}
        task = get_task(str(values["task"]))

        def build(cls: type, **extra: Any) -> Any:
            return cls(**{f.name: _resolve(key, values[key], f, task)
                          for f, key in _settings_of(cls)}, **extra)

        settings = build(RunSettings, **{name: build(cls) for name, cls in GROUPS.items()})
        settings.check()
        return settings

    def check(self) -> None:
        """Ask each module that runs with these settings whether it can."""
        from clients.training import TrainConfig

        from .modes import mode_of

        mode_of(self.aggregation).check(self)
        if self.dp.noise_multiplier > 0:
            from strategies.dp import DPConfig

            dp = self.dp  # one client per round: the count noise's default depends on it
            DPConfig(dp.noise_multiplier, dp.clip, 1, max(1, dp.population), dp.delta,
                     dp.max_epsilon, dp.adaptive_clip and dp.clipped_count_stddev is not None,
                     dp.target_quantile, dp.clip_learning_rate, dp.clipped_count_stddev)
            if dp.mode == "distributed" and (
                    mode_of(self.aggregation).server_sees == "plain" or dp.adaptive_clip):
                raise ValueError("dp-mode 'distributed' needs aggregation 'secagg', "
                                 "'paillier' or 'paillier-threshold' (the nodes add the noise "
                                 "to what they mask or encrypt) and a fixed clip "
                                 "(dp-adaptive-clip false)")
        from clients.dp_sgd_config import DPSGDConfig

        TrainConfig.from_config(self.train_config())
        DPSGDConfig.from_config(self.train_config())  # None unless dp-sgd is on
        self.data_spec(1)

    def data_spec(self, num_partitions: int, data_dir: str | None = None) -> DataSpec:
        """The data description for a node; ``data_dir`` (node config) wins if given."""
        d = self.data
        return DataSpec(
            task=self.task,
            source=d.data_source,
            data_dir=d.data_dir if data_dir is None else data_dir,
            partition=PartitionSpec(
                scheme=d.partitioning, num_partitions=num_partitions,
                dirichlet_alpha=d.dirichlet_alpha, shards_per_client=d.shards_per_client,
                shard_size=d.shard_size, seed=self.seed,
            ),
            local_test_fraction=d.local_test_fraction,
            spam_buckets=d.spam_buckets,
            mnist_model=d.mnist_model,
        )

    def train_config(self) -> dict[str, Any]:
        """What each client gets for local training (and, with ``dp-sgd``, its DP-SGD
        settings)."""
        config = {key: self.value(key) for _, key in _settings_of(TrainSettings)}
        if self.dp_sgd.enabled:
            config.update({"dp-sgd-noise-multiplier": self.dp_sgd.noise_multiplier,
                           "dp-sgd-max-grad-norm": self.dp_sgd.max_grad_norm,
                           "dp-delta": self.dp.delta})
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

    def value(self, key: str) -> Any:
        """The resolved value of setting ``key`` (``"auto"`` resolved)."""
        group, name = _WHERE[key]
        return getattr(getattr(self, group) if group else self, name)

    def as_dict(self) -> dict[str, Any]:
        """Every setting by its key, resolved (what a run directory records)."""
        return {key: self.value(key) for key in DEFAULTS}


def _settings_of(cls: type) -> Iterator[tuple[dataclasses.Field, str]]:
    for f in dataclasses.fields(cls):
        if "default" in f.metadata:
            yield f, f.metadata["key"] or cls.prefix + f.name.replace("_", "-")


_ALL: list[tuple[str | None, type]] = [(None, RunSettings), *GROUPS.items()]
#: setting key -> (group attribute or None, field name)
_WHERE = {key: (group, f.name) for group, cls in _ALL for f, key in _settings_of(cls)}
_FIELDS = {key: f for _, cls in _ALL for f, key in _settings_of(cls)}
_HINTS = {key: typing.get_type_hints(cls)[f.name] for _, cls in _ALL
          for f, key in _settings_of(cls)}

#: Every setting's default, as ``[tool.flwr.app.config]`` has it.
DEFAULTS: dict[str, Any] = {key: f.metadata["default"] for key, f in _FIELDS.items()}

#: Settings a resumed run must share with the run it resumes (the others, e.g. the
#: number of rounds or the timeout, may change).
MUST_MATCH: tuple[str, ...] = tuple(k for k, f in _FIELDS.items() if f.metadata["must_match"])

_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a finite number",
               str: "a string"}


def _kind(key: str) -> type:
    """The setting's type (``T | None``: T, with "auto" meaning None)."""
    hint = _HINTS[key]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _check_type(key: str, value: Any) -> None:
    """Refuse a value of another type than its setting's: no silent conversion
    (``bool("false")`` is True, ``int(2.7)`` is 2, NaN passes every range check)."""
    if DEFAULTS[key] == "auto" and value == "auto":
        return
    kind = _kind(key)
    if kind is float:
        ok = is_number(value) \
            and math.isfinite(value)
    else:
        ok = type(value) is kind
    if not ok:
        auto = "'auto' or " if DEFAULTS[key] == "auto" else ""
        raise ValueError(f"{key} must be {auto}{_KIND_NAMES[kind]}, got {value!r}")


def _resolve(key: str, value: Any, f: dataclasses.Field, task: Task) -> Any:
    """``value`` as its field holds it: "auto" resolved, ints as floats where a float
    is wanted, and the field's own range checked."""
    if value == "auto" and f.metadata["auto"] is not None:
        return f.metadata["auto"](task)
    if value == "auto" and _kind(key) is not _HINTS[key]:  # T | None
        return None
    value = float(value) if _kind(key) is float else value
    valid = f.metadata["valid"]
    if valid is not None and not valid[0](value):
        raise ValueError(f"{key} {valid[1]}, got {value!r}")
    return value
