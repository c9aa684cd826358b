"""Federated standardization: each client sends counts and sums, never rows.

Clients report ``n``, the column sums and the column sums of squares of their
local training rows (features then target); the server adds them up and sends
back the population mean and standard deviation, so every client scales its
data identically without anyone pooling raw data. Arrays travel as float64
little-endian bytes, a type that both Flower APIs carry in configs.
"""

from __future__ import annotations

import numpy as np
from strategies.checks import is_int

STAT_KEYS = ("stats-n", "stats-sum", "stats-sumsq")


def encode_floats(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f8").tobytes()


def decode_floats(blob: object, length: int, what: str) -> np.ndarray:
    """Decode ``length`` finite float64 values, or raise ``ValueError`` naming ``what``."""
    if not isinstance(blob, bytes) or len(blob) != 8 * length:
        raise ValueError(f"{what}: expected {8 * length} bytes of float64, got "
                         f"{type(blob).__name__} of length {len(blob) if isinstance(blob, bytes) else '?'}")
    values = np.frombuffer(blob, dtype="<f8")
    if not np.isfinite(values).all():
        raise ValueError(f"{what}: contains NaN or infinity")
    return values


def local_stats(table: np.ndarray) -> dict[str, int | bytes]:
    """Sufficient statistics of the rows of ``table`` (one column per variable)."""
    table = np.asarray(table, dtype=np.float64)
    return {
        "stats-n": int(len(table)),
        "stats-sum": encode_floats(table.sum(axis=0)),
        "stats-sumsq": encode_floats((table**2).sum(axis=0)),
    }


def read_stats(report: object, width: int) -> tuple[int, np.ndarray, np.ndarray]:
    """The row count, column sums and sums of squares of one :func:`local_stats` report.

    Raises
    ------
    ValueError
        Naming the entry that is missing or malformed.
    """
    if not isinstance(report, dict):
        raise ValueError(f"a statistics report must be a dict, got {type(report).__name__}")
    count = report.get("stats-n")
    if not is_int(count) or count < 0:
        raise ValueError(f"stats-n must be a non-negative int, got {count!r}")
    return (count, decode_floats(report.get("stats-sum"), width, "stats-sum"),
            decode_floats(report.get("stats-sumsq"), width, "stats-sumsq"))


def combine_stats(reports: list[dict], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Population mean and standard deviation from several :func:`local_stats` reports.

    Raises
    ------
    ValueError
        If a report is malformed (:func:`read_stats`), the reports hold fewer than two
        rows in all, or their sums are too large to combine.
    """
    n, total, total_sq = 0, np.zeros(width), np.zeros(width)
    for report in reports:
        count, sums, sums_sq = read_stats(report, width)
        n += count
        total += sums
        total_sq += sums_sq
    if n < 2:
        raise ValueError(f"need at least 2 rows across clients to standardize, got {n}")
    mean = total / n
    var = np.maximum(total_sq / n - mean**2, 0.0)
    std = np.sqrt(var)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError("the reports' sums overflow float64: one holds values far outside "
                         "any data set")
    std[std == 0] = 1.0  # a constant column stays as it is
    return mean, std
