"""The three PyTorch models and helpers to move their weights as NumPy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

#: Feature count of the Boston housing data (CRIM ... LSTAT).
HOUSING_FEATURES = 13


class HousingMLP(nn.Module):
    """The PySyft tutorial's 13-32-24-16-1 regressor, on standardized inputs."""

    def __init__(self, hidden: tuple[int, ...] = (32, 24, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = HOUSING_FEATURES
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class SpamModel(nn.Module):
    """Grokking Deep Learning ch. 15: a sum of one-dimensional word embeddings.

    The book looks words up in a vocabulary built from every mailbox; here each
    token is feature-hashed into ``num_buckets`` rows, so no client needs anyone
    else's vocabulary. The output is a logit: ``sigmoid(logit)`` is P(spam).
    Embeddings start at zero, as in the book.
    """

    def __init__(self, num_buckets: int) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_buckets, 1, mode="sum")
        nn.init.zeros_(self.embedding.weight)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens, offsets).squeeze(-1) + self.bias


class McMahanCNN(nn.Module):
    """The MNIST CNN of McMahan et al. 2017 ("same" padding): 1,663,370 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A 3x3-conv CNN for edge devices: 20,338 parameters, ~80x fewer than McMahan's."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(7 * 7 * 16, 24), nn.ReLU(), nn.Linear(24, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """Return the model's state as float32 NumPy arrays, in ``state_dict`` order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights` (or an aggregate of them).

    Raises
    ------
    ValueError
        If the number of arrays or any shape differs from the model's.
    """
    state = model.state_dict()
    if len(weights) != len(state):
        raise ValueError(
            f"expected {len(state)} arrays for {type(model).__name__}, got "
            f"{len(weights)}: the model on this node differs from the server's"
        )
    new_state = {}
    for (name, current), array in zip(state.items(), weights, strict=True):
        if tuple(array.shape) != tuple(current.shape):
            raise ValueError(
                f"array '{name}' has shape {tuple(array.shape)}, the model "
                f"expects {tuple(current.shape)}"
            )
        new_state[name] = torch.as_tensor(np.asarray(array), dtype=current.dtype)
    model.load_state_dict(new_state, strict=True)


def save_npz(model: nn.Module, path: Path) -> None:
    """Save a model's weights as a pickle-free ``.npz`` keyed by parameter name."""
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def load_npz(model: nn.Module, path: Path) -> None:
    """Load weights saved by :func:`save_npz` (never unpickles)."""
    with np.load(path, allow_pickle=False) as data:
        set_weights(model, [data[k] for k in model.state_dict()])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
