"""Arrays inside legacy ``Parameters`` tensors: ``.npy`` bytes read without pickle,
the header checked before any data is read."""

from __future__ import annotations

import io

import numpy as np

from .aggregation import InvalidUpdate


def load_npy(tensor: object, what: str, dtypes: tuple[type, ...],
             max_bytes: int | None = None) -> np.ndarray:
    """An array of one of ``dtypes`` from ``.npy`` bytes; :class:`InvalidUpdate` if the
    bytes are not such an array with its data complete, or exceed ``max_bytes``."""
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
    except ValueError as err:
        raise InvalidUpdate(f"the {what} tensor is not a .npy array: {err}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    names = "/".join(np.dtype(d).name for d in dtypes)
    if dtype not in [np.dtype(d) for d in dtypes] or nbytes != len(tensor) - stream.tell():
        raise InvalidUpdate(f"the {what} tensor must be {names} with its data complete, got "
                            f"{dtype} of shape {shape} in {len(tensor)} bytes")
    if max_bytes is not None and nbytes > max_bytes:
        raise InvalidUpdate(f"the {what} tensor is larger than {max_bytes} bytes")
    return np.load(io.BytesIO(tensor), allow_pickle=False)
