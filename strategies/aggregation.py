"""Weighted averaging of model updates, and the checks every update must pass.

Flower-free on purpose: the plaintext, Paillier and masking strategies all end
in ``sum(n_k * x_k) / sum(n_k)`` over the updates that passed these checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from .checks import is_int


class InvalidUpdate(ValueError):
    """An update that must be left out of the aggregate (the message says why)."""


def check_weight(num_examples: object) -> int:
    """A client's weight: a positive integer number of examples."""
    if not is_int(num_examples):
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


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a model's float arrays, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.shapes) == len(self.dtypes)) or not self.names:
            raise ValueError("a layout needs one name, shape and dtype per array")
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            if not isinstance(name, str) or not all(
                    is_int(d) and d >= 0 for d in shape):
                raise ValueError(f"bad layout entry {name!r} {shape!r}: a name and a shape of "
                                 "non-negative ints")
            if math.prod(shape) >= 2**63:
                raise ValueError(f"array '{name}' of shape {shape} is larger than numpy allows")
            try:
                kind = np.dtype(dtype).kind if isinstance(dtype, str) else ""
            except (TypeError, ValueError):  # not a dtype numpy knows
                kind = ""
            if kind != "f":
                raise ValueError(f"array '{name}' is {dtype!r}: only float arrays can be encrypted")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"a layout's array names must be distinct, got {list(self.names)}")

    @staticmethod
    def of(names: Sequence[str], arrays: Sequence[np.ndarray]) -> Layout:
        return Layout(tuple(names), tuple(tuple(int(d) for d in a.shape) for a in arrays),
                      tuple(str(a.dtype) for a in arrays))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)  # Python ints: a shape can't overflow

    def flatten(self, arrays: Sequence[np.ndarray], dtype: type | np.dtype = np.float64
                ) -> np.ndarray:
        """The arrays as one 1-d array of ``dtype`` (float64 unless asked otherwise)."""
        if [tuple(a.shape) for a in arrays] != list(self.shapes):
            raise ValueError("the arrays do not match the model's layout")
        return np.concatenate([np.asarray(a).ravel() for a in arrays], dtype=dtype)

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            out.append(flat[start:start + size].reshape(shape).astype(dtype))
            start += size
        return out

    def to_json(self) -> list:
        return [[n, d, list(s)] for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)]

    @staticmethod
    def from_json(data: object) -> Layout:
        """Inverse of :meth:`to_json`; ``ValueError`` unless ``data`` is a list of
        ``[name, dtype, shape]`` entries that make a valid layout."""
        if not isinstance(data, list) or not all(
                isinstance(e, list) and len(e) == 3 and isinstance(e[2], list) for e in data):
            raise ValueError("malformed layout: expected a list of [name, dtype, shape] entries")
        return Layout(tuple(e[0] for e in data), tuple(tuple(e[2]) for e in data),
                      tuple(e[1] for e in data))
