"""Flower NumPyClients for the three tasks.

They work unchanged in a legacy ``ClientApp(client_fn=...)`` and behind the
Message-API adapter in :mod:`fedapp.client_app`. Training settings (local
epochs, batch size, learning rate, optimizer and, with ``dp-sgd``, the DP-SGD
settings) come from the server's config.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.client import NumPyClient
from torch import nn

from .dp_sgd_config import DPSGDConfig, load_history, save_history
from .examples import ArrayExamples, Examples
from .models import HOUSING_FEATURES, get_weights, set_weights
from .standardize import decode_floats, local_stats
from .tasks import DataSpec, build_model
from .training import TrainConfig, predict, train


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TaskClient(NumPyClient):
    """Shared logic: load weights, train or evaluate, return weights and metrics.

    Parameters
    ----------
    spec : DataSpec
        The task and model options (the same on every node).
    train, test : Examples or None
        This client's local training and test sets. A client used only for
        centralized evaluation has no training set.
    seed : int
        Seeds local shuffling; the round number is mixed in each round.
    device : torch.device, optional
        Where to train; CUDA when present, else the CPU.
    state : RecordDict, optional
        State that outlives this object: the node's ``context.state`` (Flower
        rebuilds the client for every message). DP-SGD keeps its privacy
        accountant's history here, so epsilon accumulates over rounds. Without
        it, a fresh RecordDict that lasts as long as this object.
    """

    loss_fn: nn.Module

    def __init__(self, spec: DataSpec, train: Examples | None, test: Examples,
                 seed: int = 0, device: torch.device | None = None,
                 state: RecordDict | None = None) -> None:
        self.spec = spec
        self.train_set, self.test_set = train, test
        self.seed = seed
        self.device = device or default_device()
        self.model = build_model(spec)
        self.state = RecordDict() if state is None else state

    def data_for_round(self, config: dict) -> tuple[Examples | None, Examples]:
        """Train and test data as the model sees them this round."""
        return self.train_set, self.test_set

    def score(self, outputs: torch.Tensor, targets: torch.Tensor, config: dict) -> dict:
        """Metrics beyond the loss."""
        return {"accuracy": float((outputs.argmax(1) == targets).float().mean())}

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return get_weights(self.model)

    def fit(self, parameters: list[np.ndarray], config: dict):
        tc = TrainConfig.from_config(config)
        train_set, _ = self.data_for_round(config)
        if train_set is None or len(train_set) == 0:
            raise ValueError("this client has no training data")
        dp = DPSGDConfig.from_config(config)
        set_weights(self.model, parameters)
        if dp is None:
            loss = train(self.model, train_set, self.loss_fn, tc, self.device,
                         seed=self.seed * 1_000_003 + tc.server_round)
            return get_weights(self.model), len(train_set), {"train-loss": loss}
        from .dp_sgd import train_dp_sgd  # Opacus loads only for DP-SGD (about 6 s)

        result = train_dp_sgd(self.model, train_set, self.loss_fn, tc, dp, self.device,
                              load_history(self.state))
        save_history(self.state, result.history)
        return get_weights(self.model), len(train_set), {
            "train-loss": result.loss, "dp-sgd-epsilon": result.epsilon}

    def evaluate(self, parameters: list[np.ndarray], config: dict):
        _, test_set = self.data_for_round(config)
        set_weights(self.model, parameters)
        outputs, targets = predict(self.model, test_set, self.device)
        loss = float(self.loss_fn(outputs, targets))
        return loss, len(test_set), {"loss": loss, **self.score(outputs, targets, config)}


class MnistClient(TaskClient):
    """McMahan et al.'s CNN (or the small edge CNN) on this client's digits."""

    loss_fn = nn.CrossEntropyLoss()


class SpamClient(TaskClient):
    """The book's word-embedding spam filter on this client's emails."""

    loss_fn = nn.BCEWithLogitsLoss()

    def score(self, outputs, targets, config):
        return {"accuracy": float(((outputs > 0).float() == targets).float().mean())}


class HousingClient(TaskClient):
    """The 13-32-24-16-1 regressor; features and target standardized federatedly.

    ``get_properties`` reports this client's row count, sums and sums of squares;
    the server combines them and sends ``norm-mean`` / ``norm-std`` (14 float64
    values: 13 features, then the target) with every fit and evaluate config.
    MSE is reported in the target's own units ($1000s squared).
    """

    loss_fn = nn.MSELoss()

    def get_properties(self, config: dict) -> dict:
        if self.train_set is None:
            return {}
        return local_stats(np.c_[self.train_set.x, self.train_set.y])

    @staticmethod
    def normalization(config: dict) -> tuple[np.ndarray, np.ndarray]:
        width = HOUSING_FEATURES + 1
        if "norm-mean" not in config or "norm-std" not in config:
            raise ValueError("housing needs 'norm-mean' and 'norm-std' in the config: the "
                             "server must run the federated statistics pass first")
        mean = decode_floats(config["norm-mean"], width, "norm-mean")
        std = decode_floats(config["norm-std"], width, "norm-std")
        if (std <= 0).any():
            raise ValueError("norm-std must be positive")
        return mean, std

    def data_for_round(self, config):
        mean, std = self.normalization(config)

        def scale(d: Examples | None) -> ArrayExamples | None:
            if d is None:
                return None
            return ArrayExamples(((d.x - mean[:-1]) / std[:-1]).astype(np.float32),
                                 ((d.y - mean[-1]) / std[-1]).astype(np.float32))

        return scale(self.train_set), scale(self.test_set)

    def score(self, outputs, targets, config):
        _, std = self.normalization(config)
        return {"mse": float(((outputs - targets) ** 2).mean()) * float(std[-1]) ** 2}


CLIENTS: dict[str, type[TaskClient]] = {
    "mnist": MnistClient, "spam": SpamClient, "housing": HousingClient,
}
