"""Metrics as sums inside a secure aggregate (Flower-free).

A client's metrics leak what its update hides: a train loss, an exact example count,
the accuracy of a model the server chose (one that always predicts class ``c`` reads
the share of ``c`` in a client's labels). Under masking each client therefore appends
its weight and metrics to the vector it masks, and the server learns only the
round's sums.

Each sum is a signed 64-bit integer ``V`` (the weight as it is; a metric ``v`` as the
fixed-point ``round(v 2^16)``, :func:`to_fixed`), offset to ``V + 2^63`` and split
into four 16-bit limbs, one per slot. Each limb is below ``2^16``, so the limb sums of
up to :data:`MAX_CLIENTS` clients stay below ``2^32`` and never wrap in a 32- or
64-bit masking modulus; the server recombines the limbs exactly (Python ints) and
removes ``n 2^63`` for ``n`` clients. Metric values outside ``(-2^47, 2^47)`` are
clamped to it (:func:`clamp`; the client says so in its own log).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from logging import WARNING

import numpy as np

LIMB_BITS = 16
LIMBS = 4
FRACTION_BITS = 16
OFFSET = 1 << (LIMB_BITS * LIMBS - 1)  # 2^63: a sum is a signed 64-bit int
LIMIT = OFFSET >> FRACTION_BITS  # a metric's |value| below 2^47
MAX_CLIENTS = 1 << 16  # limb sums stay below 2^32
WEIGHT = "weight"  # masking: the sum every client sends, its integer weight
MAX_SUMS = 64  # sums beside a model
MAX_SUM_NAME = 64  # characters in a sum's name
# Flower's logger by name: its lines show where Flower's do, without importing Flower
log = logging.getLogger("flwr").log


def check_names(names: object) -> list[str]:
    """``names`` if it is a sorted list of at most :data:`MAX_SUMS` distinct strings of
    1 to :data:`MAX_SUM_NAME` characters.

    Raises
    ------
    ValueError
        Otherwise, saying so.
    """
    if not isinstance(names, list) or len(names) > MAX_SUMS or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_SUM_NAME for k in names) \
            or names != sorted(set(names)):
        raise ValueError(f"sums must be a sorted list of at most {MAX_SUMS} distinct names "
                         f"of 1 to {MAX_SUM_NAME} characters")
    return names


def metric_sums(metrics: Mapping[str, object], weight: int) -> dict[str, float]:
    """What the server may learn of a node's train metrics: ``weight * value`` for
    each number (summed over the round, then divided by the total weight: Flower's
    example-weighted average), clamped to what a slot holds (with a warning in the
    node's own log). Lists, strings and booleans are left out, and so is anything
    beyond :data:`MAX_SUMS` - 1 sums or with a longer name."""
    sums = {}
    for name, value in sorted(metrics.items()):
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 < len(name) <= MAX_SUM_NAME or len(sums) == MAX_SUMS - 1:
            continue
        sums[name], clamped = clamp(weight * float(value))
        if clamped:
            log(WARNING, "Metric %s is outside what a secure sum holds: clamped", name)
    return sums


def sum_slots(names: Sequence[str]) -> int:
    """Vector slots that hold the sums of ``names``."""
    return LIMBS * len(names)


def clamp(value: float) -> tuple[float, bool]:
    """``value`` within what a metric slot holds, and whether it had to be clamped
    (NaN becomes 0)."""
    if math.isnan(value):
        return 0.0, True
    bound = LIMIT - 1.0
    return min(max(value, -bound), bound), not -bound <= value <= bound


def to_fixed(value: float) -> int:
    """A metric value (within :func:`clamp`) as a fixed-point int."""
    return round(value * (1 << FRACTION_BITS))


def from_fixed(total: int) -> float:
    return total / (1 << FRACTION_BITS)


def encode_sums(values: Mapping[str, int], dtype: type) -> tuple[list[str], np.ndarray]:
    """The sorted names and the limb vector of the ints ``values`` in ``dtype``
    (``uint32`` or ``uint64``).

    Raises
    ------
    ValueError
        If a value is not an int in ``[-2^63, 2^63)``.
    """
    names = sorted(values)
    limbs = np.zeros(sum_slots(names), dtype=dtype)
    for i, name in enumerate(names):
        value = values[name]
        if not isinstance(value, int) or not -OFFSET <= value < OFFSET:
            raise ValueError(f"the sum {name!r} must be an int in [-2^63, 2^63)")
        encoded = value + OFFSET
        for j in range(LIMBS):
            limbs[LIMBS * i + j] = (encoded >> (LIMB_BITS * j)) & ((1 << LIMB_BITS) - 1)
    return names, limbs


def decode_sums(names: Sequence[str], limbs: np.ndarray, clients: int) -> dict[str, int]:
    """The int sums of ``names`` from the limb sums of ``clients`` clients.

    Raises
    ------
    ValueError
        If ``limbs`` has the wrong length or ``clients`` is outside ``[1, MAX_CLIENTS]``.
    """
    if len(limbs) != sum_slots(names):
        raise ValueError(f"{len(limbs)} limb sums for {len(names)} sums")
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"sums of {clients} clients: between 1 and {MAX_CLIENTS} fit")
    return {name: sum(int(limbs[LIMBS * i + j]) << (LIMB_BITS * j) for j in range(LIMBS))
            - clients * OFFSET for i, name in enumerate(names)}
