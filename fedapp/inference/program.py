"""The task models as public layer lists, evaluated on shares.

What is public: the architecture (layer kinds and shapes), the input format and the
fixed-point precision. What is secret: every weight, and for housing the federated
standardization, which the model owner folds into the first and last linear layers
(``W' = W / s``, ``b' = b - W' m`` in; ``W' = s_y W``, ``b' = s_y b + m_y`` out).
The folded first layer takes raw features (a tax rate near 700 beside a NOX of 0.5),
so its weights span three orders of magnitude: they carry ``EXTRA_FRACTION`` more
fraction bits than the rest, and its products are truncated by as many more.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from clients.models import HousingMLP, McMahanCNN, SmallCNN, SpamModel
from .engine import Engine
from .ring import WORD, encode

OUTPUTS = {"mnist": "argmax", "spam": "positive", "housing": "value"}
#: Extra weight fraction bits of housing's folded first layer: its smallest weights
#: (about 0.002) keep 4 significant digits, and a pre-activation below 2**5 still
#: wraps a truncation with probability 2**(5 + 14 + 22 + 1 - 64) = 2**-22.
EXTRA_FRACTION = 8


def linear_op(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w.T`` for ``(N, in)`` inputs and ``(out, in)`` weights, in the ring."""
    return x @ w.T


def conv_op(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """A stride-1 2-D convolution of ``(N, C, H, W)`` by ``(O, C, k, k)`` as one matrix
    product over image patches (im2col), in the ring."""
    n, c, h, width = x.shape
    out, _, k, _ = w.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    patches = sliding_window_view(padded, (k, k), axis=(2, 3))  # N C H' W' k k
    oh, ow = patches.shape[2], patches.shape[3]
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * k * k)
    return (cols @ w.reshape(out, -1).T).reshape(n, oh, ow, out).transpose(0, 3, 1, 2)


def _layers(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, (McMahanCNN, SmallCNN)):
        return [*model.features, *model.classifier]
    if isinstance(model, HousingMLP):
        return list(model.net)
    raise ValueError(f"no secure program for {type(model).__name__}")


def compile_model(model: nn.Module, task: str, standardization: dict | None = None
                  ) -> tuple[dict, list[np.ndarray]]:
    """The public plan and the secret weight arrays (float64, in plan order).

    Raises
    ------
    ValueError
        For a layer kind the protocols do not cover, or housing without its
        standardization (``mean`` and ``std`` of the 13 features and the target).
    """
    state = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    if isinstance(model, SpamModel):
        buckets = model.embedding.weight.shape[0]
        plan = {"task": task, "model": "spam", "input_shape": [buckets], "input_fraction": 0,
                "layers": [{"op": "linear", "shape": [1, buckets]}], "output": "positive"}
        return plan, [state["embedding.weight"].T.copy(), state["bias"]]
    layers, weights, shape = [], [], None
    modules = _layers(model)
    for i, module in enumerate(modules):
        following = modules[i + 1] if i + 1 < len(modules) else None
        if isinstance(module, nn.Conv2d):
            if module.stride != (1, 1) or module.padding[0] != module.padding[1]:
                raise ValueError("only stride-1 convolutions with equal padding are covered")
            layers.append({"op": "conv", "shape": list(module.weight.shape),
                           "pad": int(module.padding[0])})
            weights += [module.weight.detach().double().numpy(),
                        module.bias.detach().double().numpy()]
        elif isinstance(module, nn.Linear):
            layers.append({"op": "linear", "shape": list(module.weight.shape)})
            weights += [module.weight.detach().double().numpy(),
                        module.bias.detach().double().numpy()]
        elif isinstance(module, nn.ReLU):
            if not isinstance(following, nn.MaxPool2d):
                layers.append({"op": "relu"})
        elif isinstance(module, nn.MaxPool2d):
            if module.kernel_size not in (2, (2, 2)) or module.stride not in (2, (2, 2)):
                raise ValueError("only 2x2 max-pooling with stride 2 is covered")
            # max(relu(x)) == relu(max(x)): pool first, then one ReLU on a quarter
            layers += [{"op": "maxpool"}, {"op": "relu"}]
        elif isinstance(module, nn.Flatten):
            layers.append({"op": "flatten"})
        else:
            raise ValueError(f"no secure protocol for a {type(module).__name__} layer")
    if task == "housing":
        if standardization is None:
            raise ValueError("housing needs the run's standardization.npz (the federated "
                             "mean and std): it is part of the model")
        mean, std = (np.asarray(standardization[k], dtype=np.float64) for k in ("mean", "std"))
        w_in, b_in = weights[0], weights[1]
        weights[0] = w_in / std[None, :-1]
        weights[1] = b_in - weights[0] @ mean[:-1]
        weights[-2], weights[-1] = weights[-2] * std[-1], weights[-1] * std[-1] + mean[-1]
        layers[0]["extra_fraction"] = EXTRA_FRACTION
        shape = [HousingMLP().net[0].in_features]
    else:
        shape = [1, 28, 28]
    plan = {"task": task, "model": type(model).__name__, "input_shape": shape,
            "layers": layers, "output": OUTPUTS[task]}
    return plan, weights


def check_plan(plan: dict) -> None:
    """Refuse a plan this module cannot run (it comes from another party).

    Raises
    ------
    ValueError
        Naming the first thing wrong.
    """
    def ints(value: object, count: int | None = None) -> bool:
        return isinstance(value, list) and (count is None or len(value) == count) and all(
            isinstance(v, int) and 0 < v <= 1 << 24 for v in value)

    if plan.get("task") not in OUTPUTS or plan.get("output") not in (*OUTPUTS.values(), "logits"):
        raise ValueError("the plan names no known task and output")
    if not ints(plan.get("input_shape")) or plan.get("input_fraction", 0) != 0:
        raise ValueError("the plan's input shape or input precision is invalid")
    for layer in plan.get("layers", []):
        op = layer.get("op") if isinstance(layer, dict) else None
        if op not in ("conv", "linear", "relu", "maxpool", "flatten"):
            raise ValueError(f"the plan holds an unknown layer {op!r}")
        if op in ("conv", "linear") and not ints(layer.get("shape"), 4 if op == "conv" else 2):
            raise ValueError(f"a {op} layer of the plan has an invalid shape")
        if op == "conv" and layer.get("pad") not in range(0, 8):
            raise ValueError("a conv layer of the plan has an invalid padding")
        if layer.get("extra_fraction", 0) not in range(0, 17):
            raise ValueError("a layer of the plan asks for invalid extra precision")


def weight_shapes(plan: dict) -> list[tuple[int, ...]]:
    """Shapes of the weight arrays the plan expects, in order (weight, bias per layer)."""
    shapes = []
    for layer in plan["layers"]:
        if layer["op"] in ("conv", "linear"):
            shapes += [tuple(layer["shape"]), (layer["shape"][0],)]
    return shapes


def load_weights(engine: Engine, plan: dict, shares: list[np.ndarray | None]) -> None:
    """Open every weight under its session mask (the dealer passes ``None`` shares)."""
    for key, shape in enumerate(weight_shapes(plan)):
        if key % 2 == 0:
            engine.load(key, shares[key], shape)
    if not engine.dealer:
        engine.biases = {k: shares[k] for k in range(1, len(shares), 2)}


def evaluate(engine: Engine, plan: dict, x: np.ndarray, fraction_bits: int) -> np.ndarray:
    """Shares of the output of ``plan`` on input shares ``x`` (``N`` rows)."""
    input_fraction = plan.get("input_fraction", fraction_bits)
    fraction, key = input_fraction, 0
    for layer in plan["layers"]:
        op = layer["op"]
        if op in ("conv", "linear"):
            out = layer["shape"][0]
            if op == "conv":
                fn = partial(conv_op, pad=layer["pad"])
                k = layer["shape"][2]
                shape = (x.shape[0], out, x.shape[2] + 2 * layer["pad"] - k + 1,
                         x.shape[3] + 2 * layer["pad"] - k + 1)
            else:
                fn, shape = linear_op, (x.shape[0], out)
            x = engine.bilinear(key, x, shape, fn)
            # the product holds both operands' fraction bits: keep the input's
            weight_fraction = fraction_bits + layer.get("extra_fraction", 0)
            if weight_fraction + fraction != fraction_bits:
                x = engine.truncate(x, weight_fraction + fraction - fraction_bits)
            bias = engine.biases.get(key + 1)
            if bias is not None:
                x = x + (bias[None, :, None, None] if op == "conv" else bias[None, :])
            fraction, key = fraction_bits, key + 2
        elif op == "relu":
            x = engine.relu(x)
        elif op == "maxpool":
            x = engine.maxpool2(x)
        elif op == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            raise ValueError(f"unknown layer '{op}' in the plan")
    if plan["output"] == "logits":  # the last layer's values, for tests and debugging
        return x
    if plan["output"] == "argmax":
        return engine.argmax(x)
    if plan["output"] == "positive":  # logit > 0  <=>  -logit < 0
        return engine.less_than_zero(-x[:, 0])
    return x[:, 0]


def encode_weights(plan: dict, weights: list[np.ndarray], fraction_bits: int
                   ) -> list[np.ndarray]:
    """The model owner's weights as ring elements (biases at the activations' scale)."""
    extra = [layer.get("extra_fraction", 0) for layer in plan["layers"]
             if layer["op"] in ("conv", "linear")]
    return [encode(w, fraction_bits + (extra[i // 2] if i % 2 == 0 else 0))
            for i, w in enumerate(weights)]


def decode_output(plan: dict, words: np.ndarray, fraction_bits: int) -> np.ndarray:
    """The data owner's predictions from the reconstructed output words."""
    if plan["output"] in ("value", "logits"):
        return words.view(np.int64).astype(np.float64) / 2**fraction_bits
    return words.astype(np.int64)


def input_words(plan: dict, inputs: np.ndarray, fraction_bits: int) -> np.ndarray:
    """The data owner's inputs as ring elements, checked against the plan's shape."""
    expected = tuple(plan["input_shape"])
    if tuple(inputs.shape[1:]) != expected:
        raise ValueError(f"inputs have shape {tuple(inputs.shape[1:])} per row, the model "
                         f"takes {expected}")
    return encode(inputs, plan.get("input_fraction", fraction_bits)).astype(WORD)
