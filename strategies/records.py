"""Named numpy arrays in and out of Flower's ``ArrayRecord`` (Message API)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from .aggregation import InvalidUpdate
from .legacy_wire import load_npy


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of ``record`` by name, in order.

    Raises
    ------
    InvalidUpdate
        If an array is not numpy ``.npy`` bytes of plain values (a sender can put any
        bytes in an ``Array``); nothing is unpickled.
    """
    out = {}
    for name, array in record.items():
        if array.stype != SType.NUMPY:
            raise InvalidUpdate(f"array {name!r} is serialized as {array.stype!r}, not as "
                                f"{SType.NUMPY!r}")
        out[name] = load_npy(array.data, f"{name!r}")
    return out


def array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of named arrays, in order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
