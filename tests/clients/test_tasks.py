"""The Hugging Face hub path of clients.tasks, run offline: ``datasets.load_dataset``
(as called by flwr-datasets' FederatedDataset) is replaced by hub-shaped local data
sets."""

from __future__ import annotations

import flwr_datasets.federated_dataset as fd_module
import numpy as np
import pytest
from PIL import Image as PILImage
from datasets import Dataset, DatasetDict, Features, Image, Value

from clients.partition import PartitionSpec
from clients.tasks import HUB_DATASETS, DataSpec, load_central_test, load_client_data


def fake_hub(monkeypatch, splits: dict[str, Dataset]) -> list[str]:
    asked = []

    def load_dataset(path, name=None, **kwargs):
        asked.append(path)
        return DatasetDict(splits)

    monkeypatch.setattr(fd_module.datasets, "load_dataset", load_dataset)
    return asked


def mnist_split(n: int) -> Dataset:
    images = [PILImage.fromarray(np.full((28, 28), i % 255, np.uint8)) for i in range(n)]
    return Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]},
                             features=Features({"image": Image(), "label": Value("int64")}))


def test_mnist_from_the_hub_through_flwr_datasets(monkeypatch):
    asked = fake_hub(monkeypatch, {"train": mnist_split(40), "test": mnist_split(10)})
    spec = DataSpec(task="mnist", source="hub", partition=PartitionSpec("iid", 2))
    train, test = load_client_data(spec, 1)
    assert len(train) + len(test) == 20 and train.x.shape[1:] == (1, 28, 28)
    assert len(load_central_test(spec)) == 10
    assert set(asked) == {HUB_DATASETS["mnist"]}


def test_spam_from_the_hub_and_what_the_hub_cannot_do(monkeypatch):
    emails = Dataset.from_dict({"text": ["win money now", "lunch at noon"] * 10,
                                "label": [1, 0] * 10})
    fake_hub(monkeypatch, {"train": emails, "test": emails})
    spec = DataSpec(task="spam", source="hub", partition=PartitionSpec("iid", 2))
    train, _ = load_client_data(spec, 0)
    assert set(train.y.tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="no mailbox column"):
        load_client_data(DataSpec(task="spam", source="hub",
                                  partition=PartitionSpec("natural", 6)), 0)
    with pytest.raises(ValueError, match="no hub data set"):
        load_client_data(DataSpec(task="housing", source="hub"), 0)
