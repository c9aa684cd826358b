"""The fixed-point quantizer both secure aggregations build on (Flower-free).

A value ``x`` is clipped to ``[-clip, clip]``, offset to ``[0, 2 clip]`` and rounded
stochastically to an integer level ``q`` in ``[0, 2^value_bits - 1]``, one ``step =
2 clip / (2^value_bits - 1)`` apart. A client sends ``w q`` for its integer weight
``w``; a sum of such values of total weight ``W`` is at most ``W (2^value_bits - 1)``
and decodes to the weighted average as ``S / W * step - clip``.

Paillier packs the weighted levels into slots of big plaintexts
(:mod:`strategies.encoding`); masking adds them in ``Z_{2^32}`` or ``Z_{2^64}``
(:mod:`strategies.secagg_masks`). Each adds its own headroom and overflow checks on
top; the arithmetic of values is here, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FixedPoint", "FixedPointParams"]


@dataclass(frozen=True)
class FixedPoint:
    """Clip to ``[-clip, clip]`` and round stochastically to ``value_bits`` bits.

    The callers check ``clip`` and ``value_bits`` (each protocol has its own limits).
    """

    clip: float
    value_bits: int

    @property
    def levels(self) -> int:
        """The largest level, ``2^value_bits - 1``."""
        return (1 << self.value_bits) - 1

    @property
    def step(self) -> float:
        """The distance between two levels, ``2 clip / (2^value_bits - 1)``."""
        return 2.0 * self.clip / self.levels

    def quantize(self, values: np.ndarray, rng: np.random.Generator, weight: int = 1,
                 dtype: type = np.uint64) -> np.ndarray:
        """``weight * q`` for each value, as ``dtype`` (unbiased: ``E[q] = (x + clip) /
        step`` for ``x`` inside the clip range).

        ``values`` must be finite (the callers check: each says why in its own terms).
        The arithmetic is float64 whatever the input dtype, in place on one copy (this
        runs on every node for every value of the model). ``floor(s + u)`` with ``u``
        uniform in ``[0, 1)`` is ``floor(s) + 1`` with probability ``s - floor(s)``,
        unbiased up to the rounding of ``s + u`` (below ``2^(value_bits - 53)`` of a
        step), and always one of the two levels around ``s`` (``s + u`` rounds to at
        least ``s`` and at most ``s + 1``, both exact in float64), so each value moves
        by less than one step.
        """
        scaled = np.array(values, dtype=np.float64)
        np.clip(scaled, -self.clip, self.clip, out=scaled)
        scaled += self.clip
        scaled /= self.step
        scaled += rng.random(scaled.shape)
        np.floor(scaled, out=scaled)
        np.clip(scaled, 0, self.levels, out=scaled)
        out = scaled.astype(dtype)
        if weight != 1:
            out *= dtype(weight)
        return out

    def max_sum(self, total_weight: int) -> int:
        """The largest sum clients of total weight ``total_weight`` can send."""
        return int(total_weight) * self.levels

    def dequantize(self, sums: np.ndarray, total_weight: int, offset: int = 0) -> np.ndarray:
        """The weighted average ``(S - offset) / W * step - clip`` as float64; its error
        against the exact weighted average of the clipped values is below one step."""
        average = (np.asarray(sums).astype(np.float64) - float(offset)) / float(total_weight)
        average *= self.step
        average -= self.clip
        return average


class FixedPointParams:
    """Mixin for parameter classes with ``clip`` and ``value_bits`` fields: their
    quantizer and its ``levels`` and ``step``."""

    clip: float
    value_bits: int

    @property
    def fixed_point(self) -> FixedPoint:
        """The quantizer of values."""
        return FixedPoint(self.clip, self.value_bits)

    @property
    def levels(self) -> int:
        """The largest quantized value, ``2^value_bits - 1``."""
        return self.fixed_point.levels

    @property
    def step(self) -> float:
        """Width of one quantization step, ``2 clip / (2^value_bits - 1)``."""
        return self.fixed_point.step
