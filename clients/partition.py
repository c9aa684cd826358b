"""Split a training pool across clients with flwr-datasets partitioners.

The partitioners run on a small index table (row id, label, group), so the
same code serves MNIST images, token bags and housing rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    ShardPartitioner,
)

SCHEMES = ("iid", "dirichlet", "shards", "natural")


@dataclass(frozen=True)
class PartitionSpec:
    """How the population is split. ``shards`` is McMahan et al.'s pathological non-IID:
    rows sorted by label, cut into shards of ``shard_size``, ``shards_per_client`` each."""

    scheme: str = "iid"
    num_partitions: int = 2
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    shard_size: int = 300
    seed: int = 42

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"partitioning must be one of {SCHEMES}, got '{self.scheme}'")
        if self.num_partitions < 1:
            raise ValueError(f"num-partitions must be >= 1, got {self.num_partitions}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        if self.shards_per_client < 1 or self.shard_size < 1:
            raise ValueError(f"shards-per-client and shard-size must be >= 1, got "
                             f"{self.shards_per_client} and {self.shard_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def make_partitioner(spec: PartitionSpec) -> Partitioner:
    """The flwr-datasets partitioner for ``spec`` (labels in ``label``, groups in ``group``)."""
    if spec.scheme == "iid":
        return IidPartitioner(spec.num_partitions)
    if spec.scheme == "dirichlet":
        return DirichletPartitioner(
            spec.num_partitions, "label", spec.dirichlet_alpha, seed=spec.seed
        )
    if spec.scheme == "shards":
        return ShardPartitioner(
            spec.num_partitions, "label", num_shards_per_partition=spec.shards_per_client,
            shard_size=spec.shard_size, seed=spec.seed,
        )
    return NaturalIdPartitioner("group")


def partition_indices(
    labels: np.ndarray, groups: np.ndarray | None, spec: PartitionSpec, partition_id: int
) -> np.ndarray:
    """Row ids of partition ``partition_id`` of a pool with these labels (and groups)."""
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{spec.num_partitions - 1}"
        )
    # Shuffle first, as FederatedDataset does: IidPartitioner cuts contiguous ranges.
    rows = np.random.default_rng(spec.seed).permutation(len(labels))
    table = {"row": rows, "label": np.asarray(labels)[rows].astype(np.int64)}
    if spec.scheme == "natural":
        if groups is None:
            raise ValueError("partitioning='natural' needs a group per row (for spam: "
                             "index.tsv.gz beside ham.txt/spam.txt)")
        names = sorted(set(groups.tolist()))
        if len(names) != spec.num_partitions:
            raise ValueError(
                f"the natural split has {len(names)} groups ({', '.join(names)}): "
                f"run with {len(names)} clients (num-partitions), not {spec.num_partitions}"
            )
        table["group"] = np.searchsorted(names, np.asarray(groups)[rows])
    partitioner = make_partitioner(spec)
    partitioner.dataset = Dataset.from_dict(table)
    try:
        part = partitioner.load_partition(partition_id)
    except ValueError as err:
        if spec.scheme != "dirichlet" or "max number of attempts" not in str(err):
            raise
        raise ValueError(
            f"dirichlet partitioning of {len(labels)} rows into {spec.num_partitions} clients "
            f"({len(labels) / spec.num_partitions:.1f} rows each on average) failed: "
            "flwr-datasets redraws until every client has at least 10 rows and gave up; "
            "raise dirichlet-alpha, use fewer clients, or partitioning='iid'") from None
    rows = part.with_format("numpy", dtype=np.int64)["row"]
    return np.sort(np.asarray(rows, dtype=np.int64))


def local_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded local train/test split of a partition's ``n`` rows (test gets >= 1 row)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"local-test-fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction))) if n > 1 else 0
    return np.sort(order[n_test:]), np.sort(order[:n_test])
