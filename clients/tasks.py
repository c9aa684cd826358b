"""The three tasks: their models, defaults and data, in one registry.

``load_client_data`` gives one client its own partition (local train/test);
``load_central_test`` gives the server the held-out test set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import loaders
from .examples import Examples
from .models import HousingMLP, McMahanCNN, SmallCNN, SpamModel
from .partition import PartitionSpec, local_split, partition_indices

SOURCES = ("auto", "files", "embedded", "hub")
HUB_DATASETS = {"mnist": "ylecun/mnist", "spam": "SetFit/enron_spam"}


@dataclass(frozen=True)
class Task:
    """A learning task: its metric and the training settings that suit it."""

    name: str
    metric: str  # "accuracy" or "mse" (higher is better only for accuracy)
    learning_rate: float
    optimizer: str
    batch_size: int
    local_epochs: int
    weight_decay: float
    has_embedded_data: bool


TASKS = {
    "mnist": Task("mnist", "accuracy", 0.05, "sgd", 32, 1, 0.0, True),
    "spam": Task("spam", "accuracy", 0.01, "adam", 32, 1, 0.0, False),
    "housing": Task("housing", "mse", 0.003, "adam", 16, 10, 0.1, True),
}
MNIST_MODELS = ("cnn", "small-cnn")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got '{name}'")
    return TASKS[name]


@dataclass(frozen=True)
class DataSpec:
    """Where a task's data comes from and how it is split across clients."""

    task: str
    source: str = "auto"
    data_dir: str = ""
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    local_test_fraction: float = 0.1
    spam_buckets: int = 65536
    mnist_model: str = "cnn"

    def __post_init__(self) -> None:
        get_task(self.task)
        if self.source not in SOURCES:
            raise ValueError(f"data-source must be one of {SOURCES}, got '{self.source}'")
        if self.mnist_model not in MNIST_MODELS:
            raise ValueError(f"mnist-model must be one of {MNIST_MODELS}, got '{self.mnist_model}'")
        if not 0 < self.local_test_fraction < 1:
            raise ValueError(f"local-test-fraction must be in (0, 1), got "
                             f"{self.local_test_fraction}")
        if self.spam_buckets < 1:
            raise ValueError(f"spam-buckets must be >= 1, got {self.spam_buckets}")

    @property
    def resolved_source(self) -> str:
        """``auto`` means files when a data directory is set, else the embedded data."""
        if self.source != "auto":
            return self.source
        if self.data_dir:
            return "files"
        if not get_task(self.task).has_embedded_data:
            raise loaders.DataNotFoundError(loaders.missing_data_message(self.task, None))
        return "embedded"


def build_model(spec: DataSpec) -> nn.Module:
    """A freshly initialized model for ``spec.task`` (seeded by the caller)."""
    if spec.task == "mnist":
        return McMahanCNN() if spec.mnist_model == "cnn" else SmallCNN()
    if spec.task == "spam":
        return SpamModel(spec.spam_buckets)
    return HousingMLP()


@functools.lru_cache(maxsize=4)
def _pool(task: str, source: str, data_dir: str, buckets: int, seed: int):
    """Training pool, held-out test set and row groups; cached per process, since
    simulation re-creates clients every round inside the same worker."""
    if source == "embedded":
        if task == "mnist":
            return (*loaders.load_mnist_embedded(seed), None)
        if task == "housing":
            return (*loaders.load_housing_embedded(), None)
        raise loaders.DataNotFoundError(loaders.missing_data_message(task, None))
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise loaders.DataNotFoundError(loaders.missing_data_message(task, data_dir))
    if task == "mnist":
        return (*loaders.load_mnist_files(path), None)
    if task == "housing":
        return (*loaders.load_housing_files(path), None)
    return loaders.load_spam_files(path, buckets, seed)


def _hub(spec: DataSpec, partition_id: int | None):
    """Partition ``partition_id`` (or the test split, if None) from the Hugging Face hub."""
    if spec.task not in HUB_DATASETS:
        raise ValueError(f"task '{spec.task}' has no hub data set; use data-source "
                         "'files' or 'embedded'")
    from flwr_datasets import FederatedDataset

    from .partition import make_partitioner

    if spec.partition.scheme == "natural":
        raise ValueError(f"{HUB_DATASETS[spec.task]} has no mailbox column: partitioning "
                         "'natural' needs the files with index.tsv.gz")
    fds = FederatedDataset(dataset=HUB_DATASETS[spec.task],
                           partitioners={"train": make_partitioner(spec.partition)})
    ds = fds.load_split("test") if partition_id is None else fds.load_partition(partition_id)
    if spec.task == "mnist":
        return loaders.mnist_from_hf(ds)
    return loaders.spam_from_hf(ds, spec.spam_buckets)


def load_client_data(spec: DataSpec, partition_id: int) -> tuple[Examples, Examples]:
    """This client's partition, split into local train and test sets."""
    seed = spec.partition.seed
    if spec.resolved_source == "hub":
        part = _hub(spec, partition_id)
    else:
        train, _, groups = _pool(spec.task, spec.resolved_source, spec.data_dir,
                                 spec.spam_buckets, seed)
        part = train.subset(partition_indices(train.y, groups, spec.partition, partition_id))
    if len(part) < 2:
        raise ValueError(f"partition {partition_id} has {len(part)} rows: too few to train "
                         "and test; use fewer partitions or another partitioning")
    tr, te = local_split(len(part), spec.local_test_fraction, seed + partition_id)
    return part.subset(tr), part.subset(te)


def load_central_test(spec: DataSpec) -> Examples:
    """The held-out test set for centralized evaluation on the server."""
    if spec.resolved_source == "hub":
        return _hub(spec, None)
    return _pool(spec.task, spec.resolved_source, spec.data_dir, spec.spam_buckets,
                 spec.partition.seed)[1]
