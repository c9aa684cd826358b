"""Weighted averaging of model updates, and the checks every update must pass.

Flower-free on purpose: the plaintext, Paillier and masking strategies all end
in ``sum(n_k * x_k) / sum(n_k)`` over the updates that passed these checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class InvalidUpdate(ValueError):
    """An update that must be left out of the aggregate (the message says why)."""


def check_weight(num_examples: object) -> int:
    """A client's weight: a positive integer number of examples."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)):
        raise InvalidUpdate(f"num-examples must be an int, got {type(num_examples).__name__}")
    if num_examples <= 0:
        raise InvalidUpdate(f"num-examples must be positive, got {num_examples}")
    return int(num_examples)


def check_update(update: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
    """Raise :class:`InvalidUpdate` unless ``update`` matches ``reference`` array by
    array in shape and dtype kind, with only finite values."""
    if len(update) != len(reference):
        raise InvalidUpdate(f"{len(update)} arrays, expected {len(reference)}")
    for i, (arr, ref) in enumerate(zip(update, reference, strict=True)):
        if arr.shape != ref.shape:
            raise InvalidUpdate(f"array {i} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype.kind != ref.dtype.kind:
            raise InvalidUpdate(f"array {i} has dtype {arr.dtype}, expected {ref.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InvalidUpdate(f"array {i} holds NaN or infinity")


def weighted_average(
    updates: Sequence[Sequence[np.ndarray]], weights: Sequence[int]
) -> list[np.ndarray]:
    """``sum(w_k * x_k) / sum(w_k)`` array by array, accumulated in float64 and
    returned in the dtype of the first update."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    out = []
    for arrays in zip(*updates, strict=True):
        acc = np.zeros(arrays[0].shape, dtype=np.float64)
        for arr, w in zip(arrays, weights, strict=True):
            acc += arr.astype(np.float64) * (w / total)
        out.append(acc.astype(arrays[0].dtype))
    return out
