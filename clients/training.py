"""Local training and evaluation loops shared by the three NumPyClients."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .examples import Examples
from strategies.checks import is_number

OPTIMIZERS = ("sgd", "adam")  # "adam" is AdamW: decoupled weight decay


def config_number(config: dict, key: str, kind: type, default: float | None = None
                  ) -> int | float:
    """A number the server sent in a config, as ``kind`` (int or float).

    Raises
    ------
    ValueError
        Naming ``key``, if it is missing and has no ``default``, or is not a finite
        number (an integral one for ``int``).
    """
    if key not in config and default is None:
        raise ValueError(f"the server's config lacks '{key}': is the ServerApp ours?")
    value = config.get(key, default)
    if not is_number(value) \
            or not math.isfinite(value) or (kind is int and value != int(value)):
        raise ValueError(f"{key} must be a finite {'integer' if kind is int else 'number'}, "
                         f"got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings, as sent by the server each round."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    server_round: int = 0

    @staticmethod
    def from_config(config: dict) -> TrainConfig:
        """Read and check ``local-epochs``, ``batch-size``, ``learning-rate``, ...

        Raises
        ------
        ValueError
            If a setting is missing or out of range.
        """
        tc = TrainConfig(
            local_epochs=config_number(config, "local-epochs", int),
            batch_size=config_number(config, "batch-size", int),
            learning_rate=config_number(config, "learning-rate", float),
            optimizer=str(config.get("optimizer", "sgd")),
            momentum=config_number(config, "momentum", float, 0.0),
            weight_decay=config_number(config, "weight-decay", float, 0.0),
            server_round=config_number(config, "server-round", int, 0),
        )
        if tc.local_epochs < 1 or tc.batch_size < 1 or not tc.learning_rate > 0 \
                or tc.momentum < 0 or tc.weight_decay < 0:
            raise ValueError(f"local-epochs, batch-size and learning-rate must be positive: {tc}")
        if tc.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got '{tc.optimizer}'")
        return tc


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=tc.learning_rate,
                                 weight_decay=tc.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=tc.learning_rate, momentum=tc.momentum,
                           weight_decay=tc.weight_decay)


def _to(device: torch.device, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def train(
    model: nn.Module,
    data: Examples,
    loss_fn: nn.Module,
    tc: TrainConfig,
    device: torch.device,
    seed: int,
) -> float:
    """Run ``tc.local_epochs`` epochs of minibatch training; return the mean loss."""
    model.to(device).train()
    optimizer = make_optimizer(model, tc)
    rng = np.random.default_rng(seed)
    total, count = 0.0, 0
    for _ in range(tc.local_epochs):
        order = rng.permutation(len(data))
        for start in range(0, len(order), tc.batch_size):
            idx = order[start : start + tc.batch_size]
            inputs, target = data.batch(idx)
            inputs, (target,) = _to(device, inputs), _to(device, (target,))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(*inputs), target)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            count += len(idx)
    if not np.isfinite(total):
        raise FloatingPointError("training diverged (loss is NaN or infinite): lower "
                                 "learning-rate")
    return total / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, data: Examples, device: torch.device,
            batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs and targets for every example of ``data``."""
    model.to(device).eval()
    outputs, targets = [], []
    for start in range(0, len(data), batch_size):
        inputs, target = data.batch(np.arange(start, min(start + batch_size, len(data))))
        outputs.append(model(*_to(device, inputs)).cpu())
        targets.append(target)
    return torch.cat(outputs), torch.cat(targets)
