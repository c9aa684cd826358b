"""The task models (clients.models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.models import (HousingMLP, McMahanCNN, SmallCNN, SpamModel, count_parameters,
                            get_weights, load_npz, save_npz, set_weights)


def test_mcmahan_cnn_has_the_papers_parameter_count():
    assert count_parameters(McMahanCNN()) == 1_663_370
    assert McMahanCNN()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert SmallCNN()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(SmallCNN()) < count_parameters(McMahanCNN()) / 50


def test_housing_mlp_is_13_32_24_16_1():
    shapes = [tuple(w.shape) for w in get_weights(HousingMLP())]
    assert shapes == [(32, 13), (32,), (24, 32), (24,), (16, 24), (16,), (1, 16), (1,)]
    assert HousingMLP()(torch.zeros(5, 13)).shape == (5,)


def test_spam_model_sums_word_embeddings_from_zero():
    model = SpamModel(100)
    assert float(model(torch.tensor([1, 2, 3]), torch.tensor([0, 2])).detach().abs().sum()) == 0.0
    with torch.no_grad():
        model.embedding.weight[[1, 2, 3]] = torch.tensor([[1.0], [2.0], [4.0]])
    out = model(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    assert out.tolist() == [3.0, 4.0]


def test_weights_round_trip_and_shape_errors(tmp_path):
    a, b = McMahanCNN(), McMahanCNN()
    set_weights(b, get_weights(a))
    assert all(np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(b)))
    with pytest.raises(ValueError, match="expected 8 arrays"):
        set_weights(b, get_weights(a)[:-1])
    bad = get_weights(a)
    bad[0] = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="shape"):
        set_weights(b, bad)
    save_npz(a, tmp_path / "m.npz")
    c = McMahanCNN()
    load_npz(c, tmp_path / "m.npz")
    assert all(np.array_equal(x, y) for x, y in zip(get_weights(a), get_weights(c)))
