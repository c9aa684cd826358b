"""Exact discrete Gaussian noise from the operating system's CSPRNG (Flower-free).

The discrete Gaussian ``N_Z(0, sigma^2)`` puts probability proportional to
``exp(-x^2 / (2 sigma^2))`` on each integer ``x``. Added to an integer vector whose
neighbouring values differ by an integer shift of L2 norm ``Delta``, it has exactly
the Renyi divergence of the continuous Gaussian at integer orders, ``alpha Delta^2 /
(2 sigma^2)`` (Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
Privacy", NeurIPS 2020, Proposition 5 / Theorem 15), and being integer it has none of
the floating-point weaknesses of sampled reals (Mironov, CCS 2012).

The sampler is CKS's Algorithm 3 (rejection from a discrete Laplace proposal, their
Algorithm 2), vectorized with numpy over arrays of candidates. Every random choice is
a Bernoulli(``exp(-gamma)``) for a rational ``gamma``, or a uniform integer, and all
randomness comes from ``os.urandom``. CKS make each Bernoulli exact with a loop of
rational Bernoullis; here each one compares a uniform real ``U`` with ``exp(-gamma)``
instead, which is the same event:

- the first 53 bits of ``U`` are drawn; if ``U``'s interval lies below
  ``exp(-gamma) - MARGIN`` or above ``exp(-gamma) + MARGIN`` (``exp`` in float64,
  whose error is below 2^-48 here, far inside ``MARGIN`` = 2^-40), the answer is
  decided;
- otherwise (probability about 2^-39) more bits of ``U`` are drawn and
  ``exp(-gamma)`` is bounded with Python's ``decimal`` (correctly rounded ``exp``,
  ``gamma`` rounded down and up) at growing precision until the comparison is
  decided: ``exp(-gamma)`` is irrational for rational ``gamma > 0``, so this ends.

So the samples follow the discrete Gaussian exactly, not within some distance of it;
``sigma``'s float value is the parameter, taken as the exact rational it is.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from fractions import Fraction

import numpy as np

MARGIN = 2.0 ** -40  # float64's exp(-gamma) is trusted to within this (see the module)
MAX_SIGMA = 2.0 ** 40  # keeps every candidate well inside int64
_BITS = 53


def random_u64(n: int) -> np.ndarray:
    """``n`` uniform 64-bit integers from the OS's CSPRNG."""
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64).copy()


def uniform_below(bound: int, n: int) -> np.ndarray:
    """``n`` uniform integers in ``[0, bound)`` (rejection: no modulo bias)."""
    if not 1 <= bound < 2 ** 63:
        raise ValueError(f"bound {bound} out of range")
    limit = np.uint64((2 ** 64 // bound) * bound - 1)  # accept draws <= limit
    out = np.empty(n, np.int64)
    missing = np.arange(n)
    while missing.size:
        draws = random_u64(missing.size)
        ok = draws <= limit
        out[missing[ok]] = (draws[ok] % np.uint64(bound)).astype(np.int64)
        missing = missing[~ok]
    return out


def _exp_bounds(gamma: Fraction, digits: int) -> tuple[Fraction, Fraction]:
    """Rational ``lo <= exp(-gamma) <= hi``, about ``digits`` significant digits apart."""
    with localcontext() as ctx:
        ctx.prec = digits
        ctx.rounding = ROUND_FLOOR
        low_gamma = Decimal(gamma.numerator) / Decimal(gamma.denominator)
        ctx.rounding = ROUND_CEILING
        high_gamma = Decimal(gamma.numerator) / Decimal(gamma.denominator)
        # exp is correctly rounded (half even): within half a unit in the last place
        hi, lo = (-low_gamma).exp(), (-high_gamma).exp()
    slack = Fraction(1, 10 ** (digits - 2))
    return Fraction(lo) * (1 - slack), Fraction(hi) * (1 + slack)


def _exact_below(prefix: int, bits: int, gamma: Fraction) -> bool:
    """Whether ``U < exp(-gamma)`` for the uniform real ``U`` whose first ``bits``
    bits are ``prefix``, drawing its further bits as needed."""
    digits = 40
    while True:
        lo, hi = _exp_bounds(gamma, digits)
        if Fraction(prefix + 1, 1 << bits) <= lo:
            return True
        if Fraction(prefix, 1 << bits) >= hi:
            return False
        prefix, bits, digits = (prefix << 64) | secrets.randbits(64), bits + 64, digits + 25


def bernoulli_exp(gamma: np.ndarray, exact: Callable[[int], Fraction]) -> np.ndarray:
    """Independent Bernoulli(``exp(-gamma[i])``) draws, exactly.

    Parameters
    ----------
    gamma : numpy.ndarray
        ``gamma`` in float64 (for the fast comparison; non-negative).
    exact : callable
        ``exact(i)``: ``gamma[i]`` as the exact rational it stands for, asked only in
        the rare undecided case (see the module).
    """
    gamma = np.asarray(gamma, np.float64)
    p = np.exp(-gamma)
    u = random_u64(gamma.size) >> np.uint64(64 - _BITS)
    low = u.astype(np.float64) * 2.0 ** -_BITS  # exact: u < 2^53
    yes = low + 2.0 ** -_BITS <= p - MARGIN
    no = low >= p + MARGIN
    for i in np.flatnonzero(~(yes | no)):
        yes[i] = _exact_below(int(u[i]), _BITS, exact(int(i)))
    return yes


def _discrete_laplace(t: int, n: int) -> np.ndarray:
    """``n`` draws of the discrete Laplace of scale ``t``: ``P(y)`` proportional to
    ``exp(-|y| / t)`` (CKS Algorithm 2)."""
    out = np.empty(0, np.int64)
    while out.size < n:
        want = int((n - out.size) * 1.7) + 16
        drawn = uniform_below(t, want)
        u = drawn[bernoulli_exp(drawn / t, lambda i: Fraction(int(drawn[i]), t))]
        v = np.zeros(u.size, np.int64)  # geometric: how many Bernoulli(exp(-1)) in a row
        going = np.arange(u.size)
        while going.size:
            hit = bernoulli_exp(np.ones(going.size), lambda i: Fraction(1))
            going = going[hit]
            v[going] += 1
        x = u + t * v
        negative = (random_u64(x.size) & np.uint64(1)).astype(bool)
        keep = ~(negative & (x == 0))  # otherwise 0 would come twice as often
        out = np.concatenate([out, np.where(negative, -x, x)[keep]])
    return out[:n]


def discrete_gaussian(sigma: float, size: int | tuple[int, ...]) -> np.ndarray:
    """Independent draws of ``N_Z(0, sigma^2)`` (int64), exactly, from the OS's CSPRNG.

    Parameters
    ----------
    sigma : float
        The scale, in ``(0, 2^40]``; its float value is taken as an exact rational.
    size : int or tuple of int
        The shape of the result.

    Raises
    ------
    ValueError
        If ``sigma`` is not a positive finite number up to ``2^40``.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) \
            or not 0 < sigma <= MAX_SIGMA:
        raise ValueError(f"sigma must be a number in (0, 2^40], got {sigma!r}")
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    n = math.prod(shape)
    sigma2 = Fraction(sigma) ** 2
    t = math.floor(Fraction(sigma)) + 1
    s2, center = float(sigma2), float(sigma2 / t)
    out = np.empty(0, np.int64)
    while out.size < n:
        y = _discrete_laplace(t, int((n - out.size) * 1.5) + 16)
        a = np.abs(y)
        gamma = (a - center) ** 2 / (2 * s2)
        out = np.concatenate([out, y[bernoulli_exp(
            gamma, lambda i: (int(a[i]) - sigma2 / t) ** 2 / (2 * sigma2))]])
    return out[:n].reshape(shape)


def tail_bound(sigma: float, k: float) -> float:
    """An upper bound on ``P(|X| > k)`` for ``X ~ N_Z(0, sigma^2)``, ``k >= 0``:
    ``erfc(floor(k) / (sigma sqrt 2)) * sigma sqrt(2 pi) / (sigma sqrt(2 pi) - 1)``.

    The sum over ``x >= floor(k) + 1`` is at most the integral from ``floor(k)`` (the
    density decreases there), and the normalizer at least the integral minus the
    peak, 1 (a symmetric unimodal sum).
    """
    mass = sigma * math.sqrt(2 * math.pi)
    if mass <= 1:
        return 1.0
    return min(1.0, math.erfc(math.floor(k) / (sigma * math.sqrt(2))) * mass / (mass - 1))
