"""Arrays that arrive as ``.npy`` bytes (legacy ``Parameters`` tensors, the data of a
Message-API ``Array``): read without pickle, the header checked before any data is read;
and the names a legacy model's arrays go by."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

from .aggregation import InvalidUpdate, Layout


def load_npy(tensor: object, what: str, dtypes: tuple[type, ...] | None = None,
             max_bytes: int | None = None) -> np.ndarray:
    """An array of one of ``dtypes`` (``None``: any dtype without Python objects) from
    ``.npy`` bytes; :class:`InvalidUpdate` if the bytes are not such an array with its
    data complete, or exceed ``max_bytes``. Never unpickles."""
    if not isinstance(tensor, bytes):
        raise InvalidUpdate(f"the {what} tensor is {type(tensor).__name__}, not bytes")
    stream = io.BytesIO(tensor)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version}")
    except Exception as err:  # numpy's header parser (ast, tokenize, dtypes) raises many kinds
        raise InvalidUpdate(f"the {what} tensor is not a .npy array: {err}") from None
    if dtypes is None:
        allowed, names = not dtype.hasobject and dtype.itemsize > 0, "an array of plain values"
    else:
        allowed = dtype in [np.dtype(d) for d in dtypes]
        names = "/".join(np.dtype(d).name for d in dtypes)
    # Python ints: a product of header dimensions never overflows
    nbytes = math.prod(shape) * dtype.itemsize if all(d >= 0 for d in shape) else -1
    if not allowed or nbytes != len(tensor) - stream.tell():
        raise InvalidUpdate(f"the {what} tensor must be {names} with its data complete, got "
                            f"{dtype} of shape {shape} in {len(tensor)} bytes")
    if max_bytes is not None and nbytes > max_bytes:
        raise InvalidUpdate(f"the {what} tensor is larger than {max_bytes} bytes")
    try:
        return np.load(io.BytesIO(tensor), allow_pickle=False)
    except (ValueError, OverflowError) as err:  # a zero-size shape whose other dimensions
        # overflow numpy's int64 product: ValueError, or OverflowError past 2^64
        raise InvalidUpdate(f"the {what} tensor is not a loadable array: {err}") from None


def load_ndarrays(tensors: Sequence[object], what: str = "model") -> list[np.ndarray]:
    """The arrays of legacy ``Parameters`` tensors, each read by :func:`load_npy` (any
    dtype without Python objects); :class:`InvalidUpdate` names the first bad one."""
    return [load_npy(tensor, f"{what} array {i}") for i, tensor in enumerate(tensors)]


def legacy_names(count: int) -> list[str]:
    """The names Flower's compat layer gives a legacy model's arrays: "0", "1", ..."""
    return [str(i) for i in range(count)]


def layout_of(arrays: Sequence[np.ndarray]) -> Layout:
    """A plaintext legacy model's layout, its arrays named as :func:`legacy_names`."""
    return Layout.of(legacy_names(len(arrays)), arrays)
