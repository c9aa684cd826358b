"""Named numpy arrays in and out of Flower's ``ArrayRecord`` (Message API)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of ``record`` by name, in order."""
    return {k: v.numpy() for k, v in record.items()}


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of named arrays, in order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
