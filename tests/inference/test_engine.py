"""The two-party protocols through the real engine (three roles in threads): products,
the sign circuit, ReLU, max-pool, argmax and the layers, against plaintext."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.models import HousingMLP, McMahanCNN, SmallCNN, SpamModel
from fedapp.inference.program import (compile_model, conv_op, decode_output, encode_weights,
                                      input_words)
from fedapp.inference.ring import DEFAULT_FRACTION_BITS, Prg, decode, encode, split
from tests.helpers.inference import make_engines, run_parties, secure_predict

F = DEFAULT_FRACTION_BITS
EDGES = np.array([0, 1, -1, 2, -2, 2**62 - 1, -(2**62), 2**63 - 1, -(2**63), 12345, -12345],
                 dtype=np.int64).view(np.uint64)


def shared_run(job, *secrets_words):
    """Run ``job(engine, *shares)`` on fresh shares of each array; return the sum of
    the two parties' outputs."""
    prg = Prg(secrets.token_bytes(32))
    shares = [split(w, prg) for w in secrets_words]
    dealer, p0, p1 = make_engines()

    def run(engine):
        if engine.dealer:
            return job(engine, *[np.zeros_like(w) for w in secrets_words])
        return job(engine, *[s[engine.party] for s in shares])

    a, b = run_parties(dealer, p0, p1, run)
    return a + b


def test_the_sign_circuit_is_exact_on_every_edge_of_the_ring():
    got = shared_run(lambda e, x: e.less_than_zero(x), EDGES)
    assert (got == (EDGES.view(np.int64) < 0)).all()


@settings(max_examples=15)
@given(arrays(np.int64, st.integers(1, 300)))
def test_the_sign_circuit_is_exact_on_any_word(x):
    words = x.view(np.uint64)
    assert (shared_run(lambda e, s: e.less_than_zero(s), words) == (x < 0)).all()


@settings(max_examples=10)
@given(arrays(np.float64, st.integers(1, 100), elements=st.floats(-1000, 1000)),
       arrays(np.float64, 100, elements=st.floats(-1000, 1000)))
def test_products_relu_and_maximum(x, y):
    y = y[: len(x)]
    wx, wy = encode(x, F), encode(y, F)
    prod = shared_run(lambda e, a, b: e.truncate(e.mul(a, b), F), wx, wy)
    assert np.allclose(decode(prod, F), x * y, atol=1000 * 2.0 ** -F + 2.0 ** -F)
    assert (shared_run(lambda e, a: e.relu(a), wx) == np.where(x > 0, wx, 0)).all()
    assert (shared_run(lambda e, a, b: e.maximum(a, b), wx, wy)
            == np.where(wx.view(np.int64) >= wy.view(np.int64), wx, wy)).all()


def test_maxpool_and_argmax_match_numpy():
    rng = np.random.default_rng(1)
    images = encode(rng.normal(size=(3, 2, 6, 8)), F)
    pooled = shared_run(lambda e, a: e.maxpool2(a), images)
    expected = images.view(np.int64).reshape(3, 2, 3, 2, 4, 2).max(axis=(3, 5))
    assert (pooled.view(np.int64) == expected).all()
    logits = encode(rng.normal(size=(400, 10)), F)
    got = shared_run(lambda e, a: e.argmax(a), logits)
    assert (got.astype(np.int64) == logits.view(np.int64).argmax(1)).all()


def test_convolution_in_the_ring_equals_torch():
    rng = np.random.default_rng(2)
    x = rng.integers(-50, 50, size=(2, 3, 7, 7))
    w = rng.integers(-5, 5, size=(4, 3, 3, 3))
    ours = conv_op(x.astype(np.uint64), w.astype(np.uint64), pad=1).view(np.int64)
    ref = torch.nn.functional.conv2d(torch.tensor(x, dtype=torch.float64),
                                     torch.tensor(w, dtype=torch.float64), padding=1)
    assert (ours == ref.numpy().astype(np.int64)).all()


@pytest.mark.parametrize("model_cls", [SmallCNN, McMahanCNN])
def test_a_cnn_on_shares_gives_the_plaintext_logits_within_the_fixed_point_error(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.rand(4, 1, 28, 28) * 3 - 0.4  # the normalized pixel range
    with torch.no_grad():
        ref = model(x).double().numpy()
    plan, weights = compile_model(model, "mnist")
    plan["output"] = "logits"
    words = secure_predict(plan, encode_weights(plan, weights, F), input_words(plan, x.numpy(), F), F)
    assert np.abs(decode_output(plan, words, F) - ref).max() < 5e-3


def test_housing_folds_its_standardization_into_the_model():
    torch.manual_seed(0)
    model = HousingMLP().eval()
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=14) * 100, rng.uniform(0.05, 200, size=14)
    raw = mean[:-1] + rng.normal(size=(30, 13)) * std[:-1]
    with torch.no_grad():
        ref = model(torch.tensor((raw - mean[:-1]) / std[:-1], dtype=torch.float32))
    ref = ref.double().numpy() * std[-1] + mean[-1]
    plan, weights = compile_model(model, "housing", {"mean": mean, "std": std})
    words = secure_predict(plan, encode_weights(plan, weights, F), input_words(plan, raw, F), F)
    assert np.abs(decode_output(plan, words, F) - ref).max() < 1e-3 * std[-1]
    with pytest.raises(ValueError, match="standardization"):
        compile_model(model, "housing")


def test_spam_on_shares_is_the_sign_of_the_logit():
    model = SpamModel(64)
    with torch.no_grad():
        model.embedding.weight.normal_()
        model.bias.fill_(-0.3)
    rows = (np.random.default_rng(4).random((200, 64)) < 0.1).astype(np.float64)
    logits = rows @ model.embedding.weight.detach().double().numpy()[:, 0] - 0.3
    plan, weights = compile_model(model, "spam")
    words = secure_predict(plan, encode_weights(plan, weights, F), input_words(plan, rows, F), F)
    decided = np.abs(logits) > 1e-3  # away from the fixed-point rounding of the bias
    assert (decode_output(plan, words, F)[decided] == (logits > 0)[decided]).all()


def test_layers_without_a_protocol_are_refused():
    with pytest.raises(ValueError, match="no secure protocol for a Tanh"):
        model = SmallCNN()
        model.classifier[2] = torch.nn.Tanh()
        compile_model(model, "mnist")


def test_inputs_of_the_wrong_shape_are_refused():
    plan, _ = compile_model(SmallCNN(), "mnist")
    with pytest.raises(ValueError, match=r"shape \(13,\) per row, the model takes \(1, 28, 28\)"):
        input_words(plan, np.zeros((2, 13)), F)
