"""Client-side DP-SGD (clients.dp_sgd): clipping, noise, the accountant kept across
rounds in the node state, and every task model. (A real Flower run:
tests/runs/test_dp_sgd_runs.py.)"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from clients.dp_sgd import make_dp_training, train_dp_sgd
from clients.dp_sgd_config import STATE_KEY, DPSGDConfig, load_history, save_history
from clients.examples import BagExamples
from clients.loaders import TokenHasher, find_file
from clients.models import HousingMLP, SmallCNN, SpamModel, get_weights
from clients.numpy_clients import CLIENTS, HousingClient, SpamClient
from clients.partition import PartitionSpec
from clients.standardize import encode_floats
from clients.tasks import DataSpec, load_client_data
from clients.training import TrainConfig
from tests.helpers.dp import DP, independent_epsilon


def housing_config(train_set, **extra) -> dict:
    """A fit config for HousingClient, with the client's own standardization."""
    rows = np.c_[train_set.x, train_set.y]
    return {"local-epochs": 1, "batch-size": 8, "learning-rate": 0.01, "optimizer": "sgd",
            "norm-mean": encode_floats(rows.mean(0)), "norm-std": encode_floats(rows.std(0) + 1e-3),
            **DP, **extra}


def housing_client_data(partitions: int = 10):
    spec = DataSpec(task="housing", source="embedded",
                    partition=PartitionSpec(num_partitions=partitions))
    return spec, *load_client_data(spec, 0)


def spam_examples(data_dir: Path, buckets: int, per_class: int = 24) -> BagExamples:
    """The first emails of each class from the shared files (loading all takes ~10 s)."""
    hasher, bags, labels = TokenHasher(buckets), [], []
    for label, name in enumerate(("ham", "spam")):
        path = find_file(data_dir, "enron-spam", f"{name}.txt", f"{name}.txt.gz")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="ignore") as f:
            for line in itertools.islice(f, per_class):
                bags.append(hasher(line.lower()))
                labels.append(label)
    return BagExamples.from_bags(bags, np.asarray(labels))


# ------------------------------------------------------------------ clipping
def _tiny_models():
    """(name, model, inputs, targets, loss, clipping norm) for each kind of layer the
    tasks use; every per-example gradient is far above the clipping norm."""
    torch.manual_seed(0)
    housing = HousingMLP()
    x = torch.randn(6, 13) * 30
    yield "housing", housing, (x,), torch.randn(6) * 30, nn.MSELoss(), 0.5
    cnn = SmallCNN()
    yield "cnn", cnn, (torch.rand(5, 1, 28, 28) * 30,), torch.arange(5), nn.CrossEntropyLoss(), \
        0.5
    spam = SpamModel(40)
    nn.init.normal_(spam.embedding.weight)
    # the second bag repeats token 3: its gradient must count twice
    tokens, offsets = torch.tensor([1, 2, 3, 3, 3, 7, 9, 9, 11]), torch.tensor([0, 2, 5, 6])
    yield "spam", spam, (tokens, offsets), torch.tensor([1.0, 0.0, 1.0, 0.0]), \
        nn.BCEWithLogitsLoss(), 0.05


def _per_example_grads(model, inputs, targets, loss_fn) -> list[list[torch.Tensor]]:
    """Every example's gradient by plain autograd, one example at a time."""
    grads = []
    for i in range(len(targets)):
        if isinstance(model, SpamModel):
            tokens, offsets = inputs
            end = offsets[i + 1] if i + 1 < len(offsets) else len(tokens)
            one = (tokens[offsets[i]:end], torch.tensor([0]))
        else:
            one = (inputs[0][i:i + 1],)
        model.zero_grad()
        loss_fn(model(*one), targets[i:i + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("case", list(_tiny_models()), ids=lambda c: c[0])
def test_each_example_is_clipped_to_the_norm(case):
    """Noise 0, SGD with lr 1: the step is exactly minus the sum of the per-example
    gradients, each scaled to norm <= C, over the expected batch size; so its norm
    is at most C * batch / expected batch."""
    _, model, inputs, targets, loss_fn, clip = case
    expected_batch = 8
    grads = _per_example_grads(model, inputs, targets, loss_fn)
    norms = [math.sqrt(sum(float(g.square().sum()) for g in gs)) for gs in grads]
    assert min(norms) > 4 * clip  # so that clipping is active for every example
    want = [sum(gs[k] * min(1.0, clip / (norm + 1e-6)) for gs, norm in zip(grads, norms))
            / expected_batch for k in range(len(grads[0]))]
    before = [p.detach().clone() for p in model.parameters()]
    module, optimizer = make_dp_training(
        model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
        max_grad_norm=clip, expected_batch_size=expected_batch)
    optimizer.zero_grad()
    loss_fn(module(*inputs), targets).backward()
    optimizer.step()
    module._close()
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    for got, expected in zip(steps, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    step_norm = math.sqrt(sum(float(s.square().sum()) for s in steps))
    assert step_norm <= clip * len(targets) / expected_batch * (1 + 1e-5)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_noise_std_is_multiplier_times_norm_over_expected_batch():
    """A model whose loss has zero gradient: the step is the noise alone,
    N(0, (z C / B)^2) per coordinate."""
    model = nn.Linear(400, 250)  # 100,250 coordinates
    z, clip, batch = 1.3, 0.7, 4
    before = [p.detach().clone() for p in model.parameters()]
    module, optimizer = make_dp_training(
        model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=z,
        max_grad_norm=clip, expected_batch_size=batch)
    optimizer.zero_grad()
    (module(torch.randn(3, 400)) * 0.0).mean().backward()
    optimizer.step()
    module._close()
    noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    std = z * clip / batch
    n = noise.numel()
    # sample std has relative standard error 1/sqrt(2n) = 0.22%; mean has std/sqrt(n)
    assert abs(float(noise.std()) / std - 1) < 0.015
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)


# ------------------------------------------------------------------ settings and errors
def test_batch_larger_than_the_local_data_is_refused():
    spec, train, test = housing_client_data(partitions=40)
    client = HousingClient(spec, train, test)
    config = housing_config(train, **{"batch-size": len(train) + 1})
    with pytest.raises(ValueError, match=f"exceeds this client's {len(train)} training"):
        client.fit(get_weights(client.model), config)


# ------------------------------------------------------------------ the accountant across rounds
def test_accountant_history_survives_rebuilt_clients_through_the_state():
    """As in Flower: a new client per round, the node's state kept; epsilon grows and
    equals Opacus's RDP analysis of the stored history."""
    spec, train, test = housing_client_data()
    state = RecordDict()
    weights = get_weights(HousingClient(spec, train, test).model)
    config = housing_config(train, **{"local-epochs": 2})
    steps_per_round = 2 * math.ceil(len(train) / 8)
    epsilons = []
    for rnd in (1, 2):
        client = HousingClient(spec, train, test, state=state)
        weights, _, metrics = client.fit(weights, config)
        history = load_history(state)
        assert history == [(1.1, 8 / len(train), rnd * steps_per_round)]
        assert metrics["dp-sgd-epsilon"] == pytest.approx(independent_epsilon(history, 1e-5),
                                                          rel=1e-9)
        epsilons.append(metrics["dp-sgd-epsilon"])
    assert 0 < epsilons[0] < epsilons[1]
    # one client trained for both rounds at once spends the same
    assert epsilons[1] == pytest.approx(independent_epsilon(
        [(1.1, 8 / len(train), 2 * steps_per_round)], 1e-5))
    assert json.loads(state.config_records[STATE_KEY]["history"])[0][2] == 2 * steps_per_round


def test_history_composes_changed_settings_and_rejects_foreign_state():
    state = RecordDict()
    save_history(state, [(1.0, 0.1, 5)])
    spec, train, test = housing_client_data()
    data = HousingClient(spec, train, test).data_for_round(housing_config(train))[0]
    result = train_dp_sgd(HousingMLP(), data, nn.MSELoss(), TrainConfig(1, 8, 0.01),
                          DPSGDConfig(2.0, 1.0, 1e-5), torch.device("cpu"), load_history(state))
    assert result.history == [(1.0, 0.1, 5), (2.0, 8 / len(train), result.steps)]
    assert result.epsilon == pytest.approx(independent_epsilon(result.history, 1e-5))
    state.config_records[STATE_KEY]["accountant"] = "prv"
    with pytest.raises(ValueError, match="expected 'rdp'"):
        load_history(state)


def test_empty_poisson_batches_still_take_a_noised_step():
    """batch-size 1 on 20 examples: about a third of the Poisson batches are empty; each
    still counts as a step for the accountant and moves the weights (noise only)."""
    spec, train, test = housing_client_data()
    data = HousingClient(spec, train, test).data_for_round(housing_config(train))[0].subset(
        np.arange(20))
    model = HousingMLP()
    before = get_weights(model)
    result = train_dp_sgd(model, data, nn.MSELoss(), TrainConfig(1, 1, 0.01),
                          DPSGDConfig(1.0, 1.0, 1e-5), torch.device("cpu"), [])
    assert result.steps == 20 and result.history == [(1.0, 1 / 20, 20)]
    assert all(np.isfinite(a).all() and not np.array_equal(a, b)
               for a, b in zip(get_weights(model), before))


# ------------------------------------------------------------------ every task model
def _task_case(task: str, data_dir: Path):
    if task == "spam":
        spec = DataSpec(task="spam", source="files", data_dir=str(data_dir), spam_buckets=4096)
        data = spam_examples(data_dir, spec.spam_buckets)
        return spec, data, data, {}
    partitions = {"housing": 10, "mnist": 200}[task]  # ~36 and ~18 local examples
    spec = DataSpec(task=task, source="embedded",
                    partition=PartitionSpec(num_partitions=partitions))
    train, test = load_client_data(spec, 0)
    return spec, train, test, housing_config(train) if task == "housing" else {}


@pytest.mark.parametrize("task", ["housing", "mnist", "spam"])
def test_one_private_round_for_each_task_model(task, data_dir):
    """One small DP-SGD fit per task: plain weights back (same names, shapes, dtypes),
    changed and finite, the model left without Opacus hooks or attributes."""
    spec, train, test, extra = _task_case(task, data_dir)
    client = CLIENTS[task](spec, train, test)
    names = list(client.model.state_dict())
    before = get_weights(client.model)
    config = {"local-epochs": 1, "batch-size": 8, "learning-rate": 0.05, "optimizer": "sgd",
              **DP, **extra}
    weights, num_examples, metrics = client.fit(before, config)
    assert num_examples == len(train)
    assert list(client.model.state_dict()) == names
    assert [(a.shape, a.dtype) for a in weights] == [(a.shape, a.dtype) for a in before]
    assert all(np.isfinite(a).all() for a in weights)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, before))
    assert metrics["dp-sgd-epsilon"] > 0 and np.isfinite(metrics["train-loss"])
    for module in client.model.modules():
        assert not module._forward_hooks and not module._backward_hooks
    for p in client.model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    client.evaluate(weights, config)  # the plain model still evaluates
    if task == "spam":  # SpamModel trained through the regrouped layers
        assert isinstance(client, SpamClient)
        # the embedding starts at zero; noise reaches every row, even those no email uses
        assert (weights[0] != 0).mean() > 0.99
