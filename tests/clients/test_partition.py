"""Partitioning the data among clients (clients.partition)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.partition import PartitionSpec, local_split, partition_indices


def all_parts(labels, groups, spec):
    return [partition_indices(labels, groups, spec, i) for i in range(spec.num_partitions)]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(50, 400), k=st.integers(1, 8), seed=st.integers(0, 5))
def test_iid_partitions_are_disjoint_and_cover_everything(n, k, seed):
    labels = np.arange(n) % 10
    parts = all_parts(labels, None, PartitionSpec("iid", k, seed=seed))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_iid_mixes_sorted_labels():
    labels = np.repeat(np.arange(10), 100)
    part = partition_indices(labels, None, PartitionSpec("iid", 10), 3)
    assert len(set(labels[part])) == 10


def test_dirichlet_skews_labels_and_stays_disjoint():
    labels = np.repeat(np.arange(10), 200)
    parts = all_parts(labels, None, PartitionSpec("dirichlet", 5, dirichlet_alpha=0.1))
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)
    shares = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert max(shares) > 0.3  # alpha=0.1 concentrates labels


def test_mcmahan_shards_give_two_labels_of_300_each():
    labels = np.repeat(np.arange(10), 600)
    spec = PartitionSpec("shards", 10, shards_per_client=2, shard_size=300)
    parts = all_parts(labels, None, spec)
    assert all(len(p) == 600 for p in parts)
    assert all(len(set(labels[p])) <= 2 for p in parts)
    assert len(set(np.concatenate(parts).tolist())) == 6000


def test_natural_split_by_group_and_its_errors():
    labels = np.zeros(9, int)
    groups = np.array(["b", "a", "c"] * 3)
    parts = all_parts(labels, groups, PartitionSpec("natural", 3))
    assert sorted(len(set(groups[p])) for p in parts) == [1, 1, 1]
    assert sorted(np.concatenate(parts).tolist()) == list(range(9))
    with pytest.raises(ValueError, match="3 groups"):
        partition_indices(labels, groups, PartitionSpec("natural", 4), 0)
    with pytest.raises(ValueError, match="needs a group"):
        partition_indices(labels, None, PartitionSpec("natural", 3), 0)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="partitioning must be one of"):
        PartitionSpec("random")
    with pytest.raises(ValueError, match="outside"):
        partition_indices(np.zeros(10), None, PartitionSpec("iid", 2), 2)


@given(n=st.integers(2, 500), frac=st.floats(0.05, 0.5))
def test_local_split(n, frac):
    tr, te = local_split(n, frac, 0)
    assert len(te) >= 1 and sorted(np.r_[tr, te].tolist()) == list(range(n))


def test_a_dirichlet_split_too_fine_for_the_data_says_why_and_what_to_do():
    labels = np.random.default_rng(0).integers(0, 2, 3000)
    with pytest.raises(ValueError, match=r"3000 rows into 1000 clients \(3.0 rows each.*"
                                         r"raise dirichlet-alpha, use fewer clients"):
        partition_indices(labels, None, PartitionSpec("dirichlet", 1000), 0)
