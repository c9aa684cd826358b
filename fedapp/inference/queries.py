"""What the model owner and the data owner load: a trained model from a run directory,
and query files in each task's format. Shared by plaintext and secure prediction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.loaders import MNIST_MEAN, MNIST_STD, TokenHasher, read_idx
from clients.models import HOUSING_FEATURES, load_npz
from clients.tasks import DataSpec, build_model
from fedapp.outputs import STANDARDIZATION_FILE

from .channel import InferenceError


def load_trained(model_path: Path, task: str | None = None, mnist_model: str | None = None,
                 spam_buckets: int | None = None) -> tuple[str, nn.Module, dict | None]:
    """The task, the model with its weights, and housing's standardization.

    The task and architecture come from the run's ``config.json`` beside the model,
    unless given.

    Raises
    ------
    InferenceError
        If a file is missing, encrypted, or holds another model's weights.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InferenceError(f"no model at {model_path}: give a run directory's model.npz")
    if model_path.name in ("model.encrypted.npz", "model.sealed.npz"):
        raise InferenceError(f"{model_path} is encrypted: a key holder turns it into model.npz "
                             "with `fedapp decrypt` first")
    config_path = model_path.parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    task = task or config.get("task")
    if task is None:
        raise InferenceError(f"no config.json beside {model_path}: say which task it is for "
                             "with --task")
    spec = DataSpec(task=task, mnist_model=mnist_model or config.get("mnist-model", "cnn"),
                    spam_buckets=spam_buckets or int(config.get("spam-buckets", 65536)))
    model = build_model(spec)
    try:
        load_npz(model, model_path)
    except (KeyError, ValueError) as err:
        raise InferenceError(f"{model_path} does not hold a {task} {type(model).__name__}: "
                             f"{err}") from None
    model.eval()
    standardization = None
    if task == "housing":
        path = model_path.parent / STANDARDIZATION_FILE
        if not path.is_file():
            raise InferenceError(f"no {STANDARDIZATION_FILE} beside {model_path}: a housing "
                                 "model needs the run's federated mean and std")
        with np.load(path, allow_pickle=False) as data:
            standardization = {"mean": data["mean"], "std": data["std"]}
    return task, model, standardization


def read_queries(task: str, path: Path, spam_buckets: int = 65536) -> np.ndarray:
    """Query rows as the model takes them (float64).

    - mnist: ``.npy`` images (N, 28, 28) or (N, 1, 28, 28) with pixels 0-255, or an IDX
      image file (``t10k-images-idx3-ubyte``);
    - housing: a CSV of the 13 raw features per row (a header line is skipped);
    - spam: a directory of ``.txt`` emails, one per file, or a ``.txt`` file of one
      email per line; the tokens become the model's hashed bucket set.

    Raises
    ------
    InferenceError
        Naming what is wrong with the file.
    """
    path = Path(path)
    if not path.exists():
        raise InferenceError(f"no input file at {path}")
    if task == "mnist":
        images = read_idx(path) if "idx" in path.name else np.load(path, allow_pickle=False)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise InferenceError(f"{path}: MNIST inputs are 28x28 images, got shape "
                                 f"{images.shape}")
        pixels = images.astype(np.float64)
        if pixels.min() < 0 or pixels.max() > 255:
            raise InferenceError(f"{path}: pixel values must be in 0..255")
        return ((pixels / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
    if task == "housing":
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r]
        if rows and not _numeric(rows[0]):
            rows = rows[1:]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != HOUSING_FEATURES or not _numeric(r)]
        if not rows or bad:
            raise InferenceError(f"{path}: housing inputs are rows of {HOUSING_FEATURES} "
                                 f"numbers; {'no rows' if not rows else f'row {bad[0]} is not'}")
        return np.array(rows, dtype=np.float64)
    if task == "spam":
        if path.is_dir():
            texts = [p.read_text(errors="replace") for p in sorted(path.glob("*.txt"))]
        else:
            texts = [line for line in path.read_text(errors="replace").splitlines()]
        if not texts:
            raise InferenceError(f"{path}: no emails (a directory of .txt files, or one email "
                                 "per line)")
        return bucket_sets(texts, spam_buckets)
    raise InferenceError(f"unknown task '{task}'")


def bucket_sets(texts: list[str], buckets: int) -> np.ndarray:
    """One 0/1 row per email marking its distinct hashed tokens (the spam model's input)."""
    hasher = TokenHasher(buckets)
    rows = np.zeros((len(texts), buckets))
    for i, text in enumerate(texts):
        rows[i, hasher(text)] = 1.0
    return rows


def _numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def predict_plain(task: str, model: nn.Module, standardization: dict | None,
                  queries: np.ndarray) -> np.ndarray:
    """The plaintext model's predictions: labels (mnist, spam) or prices (housing)."""
    with torch.no_grad():
        if task == "spam":
            out = queries @ model.embedding.weight.double().numpy()[:, 0] + float(model.bias)
            return (out > 0).astype(np.int64)
        if task == "housing":
            mean, std = standardization["mean"], standardization["std"]
            x = torch.as_tensor((queries - mean[:-1]) / std[:-1], dtype=torch.float32)
            return model(x).double().numpy() * std[-1] + mean[-1]
        return model(torch.as_tensor(queries, dtype=torch.float32)).argmax(1).numpy()
