"""In-memory example sets: dense arrays (MNIST, housing) and token bags (spam)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ArrayExamples:
    """Dense inputs ``x`` (one row per example) with targets ``y``."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} targets")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayExamples:
        return ArrayExamples(self.x[idx], self.y[idx])

    def batch(self, idx: np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Model inputs and targets for the rows ``idx``."""
        return (torch.from_numpy(self.x[idx]),), torch.from_numpy(self.y[idx])


@dataclass(frozen=True)
class BagExamples:
    """Variable-length token-id bags in CSR form (``tokens[offsets[i]:offsets[i+1]]``)."""

    tokens: np.ndarray  # int64
    offsets: np.ndarray  # int64, len(y) + 1 entries, offsets[0] == 0
    y: np.ndarray  # float32 labels, 1.0 = spam

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.y) + 1 or self.offsets[-1] != len(self.tokens):
            raise ValueError("offsets do not match the tokens and labels")

    def __len__(self) -> int:
        return len(self.y)

    @staticmethod
    def from_bags(bags: list[np.ndarray], labels: np.ndarray) -> BagExamples:
        lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags))
        offsets = np.zeros(len(bags) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(bags).astype(np.int64) if bags else np.zeros(0, np.int64)
        return BagExamples(tokens, offsets, np.asarray(labels, dtype=np.float32))

    def bag(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, idx: np.ndarray) -> BagExamples:
        return BagExamples.from_bags([self.bag(i) for i in idx], self.y[idx])

    def batch(self, idx: np.ndarray) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``(tokens, offsets)`` for ``nn.EmbeddingBag`` and the labels of rows ``idx``."""
        bags = [self.bag(i) for i in idx]
        lengths = np.fromiter((len(b) for b in bags), dtype=np.int64, count=len(bags))
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        tokens = np.concatenate(bags) if bags else np.zeros(0, np.int64)
        return (
            (torch.from_numpy(tokens), torch.from_numpy(offsets)),
            torch.from_numpy(self.y[idx]),
        )


Examples = ArrayExamples | BagExamples
