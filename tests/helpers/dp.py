"""Helpers of the differential privacy tests: central DP (strategies.dp and its
wrappers) and client-side DP-SGD (clients.dp_sgd)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent


# ------------------------------------------------------------------ central DP (strategies.dp)
BIG = {"w": (400, 500), "b": (500,)}  # 200,500 values: std measured to ~0.3%

ALPHAS = RDPAccountant.DEFAULT_ALPHAS


@contextmanager
def same_noise(seed: int = 5) -> Iterator[None]:
    """Central DP's noise from a fixed seed (the CSPRNG cannot be seeded), so that two
    rounds that must release the same model can be compared value for value."""
    def seeded(sigma, size):
        return np.rint(np.random.default_rng(seed).normal(0, sigma, size)).astype(np.int64)

    with mock.patch("strategies.dp.discrete_gaussian", seeded):
        yield


def model(shapes: dict, seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(-scale, scale, s).astype(np.float32) for k, s in shapes.items()}


def assert_noise_std(shift: np.ndarray, std: float) -> None:
    """``shift`` is N(0, std^2) i.i.d.: sample std within 1% (about 6 standard errors
    at 200k values), mean within 5 standard errors of 0."""
    assert shift.size >= 200_000
    assert np.std(shift) == pytest.approx(std, rel=0.01)
    assert abs(np.mean(shift)) < 5 * std / math.sqrt(shift.size)


def opacus_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ALPHAS)
    eps, _ = opacus_rdp.get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


# ------------------------------------------------------------------ DP-SGD (clients.dp_sgd)
DP = {"dp-sgd-noise-multiplier": 1.1, "dp-sgd-max-grad-norm": 1.0, "dp-delta": 1e-5}


def independent_epsilon(history, delta: float) -> float:
    """Epsilon of an accountant history straight from Opacus's RDP analysis."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=z, steps=s, orders=orders) for z, q, s in history)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])
