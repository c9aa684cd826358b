"""Client-side DP-SGD with Opacus: per-example clipping, Gaussian noise, Poisson
sampling, and an RDP accountant whose history outlives the round.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): each
step draws a batch by Poisson sampling (every local example independently with
probability ``q = batch-size / local examples``), computes every example's
gradient, scales it down to L2 norm at most ``C`` (``dp-sgd-max-grad-norm``, all
parameters together), sums the clipped gradients, adds Gaussian noise of std
``z C`` (``z`` = ``dp-sgd-noise-multiplier``) and divides by the expected batch
size ``q n = batch-size``:

    g_t = (sum_{i in B_t} clip_C(grad_i) + N(0, (z C)^2 I)) / batch-size

The optimizer (SGD or AdamW, as without DP) then steps with ``g_t``. Opacus does
the per-example gradients (:class:`opacus.GradSampleModule`), the clipping and
the noise (:class:`opacus.optimizers.DPOptimizer`); one local epoch is
``ceil(n / batch-size)`` steps, as many as without DP.

Accounting. Each step is a subsampled Gaussian mechanism of multiplier ``z`` and
sample rate ``q``; Opacus's :class:`~opacus.accountants.RDPAccountant` composes
them (Mironov, CSF 2017; Mironov, Talwar and Zhang 2019). Its ``history``, a list
of ``(noise_multiplier, sample_rate, steps)``, is kept in the node's state between
rounds (:func:`load_history`, :func:`save_history`), so the epsilon a client
reports is **cumulative** over every round it trained in, at ``dp-delta``, for
record-level privacy of its own local data. (Flower's Opacus example builds a new
``PrivacyEngine`` each round: its epsilon is one round's.)

Randomness. Batch sampling and noise draw from fresh OS entropy, never from the
run's ``seed``: the seed is in the run config, and both the amplification by
sampling and the noise assume nobody can replay them. (Not Opacus's
``secure_mode``, which needs torchcsprng: the floating-point attacks on Gaussian
sampling that it defends against are not covered.)

Models. ``SpamModel`` keeps its bias on the top-level module, so Opacus would
hand the whole model, ragged token bags and all, to functorch, which fails. Its
parameters are regrouped, shared, into Opacus-supported layers for training
(:func:`opacus_layers`); names and shapes of the model's weights do not change.
``nn.EmbeddingBag`` gets a vectorized grad sampler that also counts a token
repeated inside one bag (Opacus 1.6's counts it once; our tokenizer never
repeats one, other token sources may).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import strategies.opacus_import  # noqa: F401  (before opacus: keeps logging as it was)
from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from .dp_sgd_config import DPSGDConfig, DPSGDResult, History, epsilon
from .examples import Examples
from .models import SpamModel
from .training import TrainConfig, make_optimizer


# -- Layers Opacus can compute per-example gradients for --------------------------------------

class ScalarBias(nn.Module):
    """Adds a one-element bias; holds (shares) the Parameter it is given."""

    def __init__(self, bias: nn.Parameter) -> None:
        super().__init__()
        if bias.numel() != 1:
            raise ValueError(f"ScalarBias takes a one-element bias, got shape {tuple(bias.shape)}")
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def _scalar_bias_grad_sample(layer: ScalarBias, activations: list[torch.Tensor],
                             backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient of the bias: the example's output gradients, summed."""
    n = backprops.shape[0]
    return {layer.bias: backprops.reshape(n, -1).sum(1).reshape(n, *layer.bias.shape)}


def _embedding_bag_grad_sample(layer: nn.EmbeddingBag, activations: list[torch.Tensor],
                               backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient of an ``nn.EmbeddingBag`` (``sum`` or ``mean``) weight.

    Inputs as 1-D tokens with offsets, or as 2-D fixed-length bags. A token that
    occurs k times in a bag contributes k times (``index_put_`` with accumulation).
    """
    if layer.mode not in ("sum", "mean") or layer.include_last_offset:
        raise NotImplementedError("DP-SGD supports nn.EmbeddingBag with mode 'sum' or 'mean' "
                                  "and include_last_offset=False")
    tokens = activations[0]
    if tokens.dim() == 2:
        n, length = tokens.shape
        bag = torch.arange(n, device=tokens.device).repeat_interleave(length)
        tokens = tokens.reshape(-1)
    else:
        if len(activations) < 2:
            raise ValueError("1-D EmbeddingBag input needs offsets passed positionally")
        offsets = activations[1]
        n = offsets.shape[0]
        bag = torch.bucketize(torch.arange(len(tokens), device=tokens.device), offsets,
                              right=True) - 1
    contributions = backprops[bag]
    if layer.mode == "mean":
        sizes = torch.bincount(bag, minlength=n).clamp(min=1).to(backprops.dtype)
        contributions = contributions / sizes[bag].unsqueeze(-1)
    grad = torch.zeros(n, *layer.weight.shape, device=backprops.device, dtype=backprops.dtype)
    grad.index_put_((bag, tokens), contributions, accumulate=True)
    if layer.padding_idx is not None:
        grad[:, layer.padding_idx] = 0
    return {layer.weight: grad}


class TaskGradSampleModule(GradSampleModule):
    """Opacus's GradSampleModule with our grad samplers for ``nn.EmbeddingBag`` and
    :class:`ScalarBias` (for this class only: Opacus's own registry is unchanged)."""

    GRAD_SAMPLERS = {
        **GradSampleModule.GRAD_SAMPLERS,
        nn.EmbeddingBag: _embedding_bag_grad_sample,
        ScalarBias: _scalar_bias_grad_sample,
    }


class _SpamLayers(nn.Module):
    """``SpamModel``'s forward pass with its parameters (shared) in supported layers."""

    def __init__(self, model: SpamModel) -> None:
        super().__init__()
        self.embedding = model.embedding
        self.add_bias = ScalarBias(model.bias)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.embedding(tokens, offsets).squeeze(-1))


def opacus_layers(model: nn.Module) -> nn.Module:
    """A module computing ``model``'s forward pass with the same Parameter objects,
    laid out so Opacus can compute per-example gradients (``model`` itself for the
    MNIST CNNs and the housing MLP).

    Raises
    ------
    ValueError
        If Opacus's ModuleValidator rejects a layer (e.g. BatchNorm).
    """
    layers = _SpamLayers(model) if isinstance(model, SpamModel) else model
    errors = ModuleValidator.validate(layers, strict=False)
    if errors:
        raise ValueError(f"{type(model).__name__} cannot be trained with DP-SGD: {errors}; "
                         "opacus.validators.ModuleValidator.fix(model) replaces such layers")
    return layers


def make_dp_training(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                     noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                     generator: torch.Generator | None = None,
                     ) -> tuple[GradSampleModule, DPOptimizer]:
    """Wrap ``model`` and its ``optimizer`` for DP-SGD.

    Call the returned module for forward passes (losses averaged over the batch);
    ``optimizer.step()`` clips every example's gradient to ``max_grad_norm``, adds
    N(0, (noise_multiplier max_grad_norm)^2) to their sum and divides by
    ``expected_batch_size``. Call ``module._close()`` when done: it removes the
    hooks and per-example gradients from ``model``'s parameters.

    Parameters
    ----------
    model : nn.Module
        The model; see :func:`opacus_layers`. ``optimizer`` must optimize its parameters.
    optimizer : torch.optim.Optimizer
        The non-private optimizer.
    noise_multiplier : float
        ``z`` (0 is allowed here, for tests; :class:`DPSGDConfig` requires ``z > 0``).
    max_grad_norm : float
        ``C``.
    expected_batch_size : int
        The divisor: sample rate times examples.
    generator : torch.Generator, optional
        Source of the noise; by default one seeded from OS entropy.
    """
    if noise_multiplier < 0 or not max_grad_norm > 0 or expected_batch_size < 1:
        raise ValueError("need noise_multiplier >= 0, max_grad_norm > 0 and "
                         "expected_batch_size >= 1")
    if generator is None:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device)
        generator.seed()  # OS entropy
    module = TaskGradSampleModule(opacus_layers(model), batch_first=True,
                                  loss_reduction="mean", strict=True)
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                               max_grad_norm=max_grad_norm,
                               expected_batch_size=expected_batch_size,
                               loss_reduction="mean", generator=generator)
    return module, dp_optimizer


# -- Local training ---------------------------------------------------------------------------

def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sample rate ``batch_size / num_examples``.

    Raises
    ------
    ValueError
        If there are no examples or the batch is larger than the data.
    """
    if num_examples < 1:
        raise ValueError("DP-SGD needs at least one training example")
    if batch_size > num_examples:
        raise ValueError(
            f"batch-size {batch_size} exceeds this client's {num_examples} training examples: "
            "DP-SGD samples each example with probability batch-size / examples, which must "
            "be at most 1; lower batch-size or use fewer partitions")
    return batch_size / num_examples


def train_dp_sgd(
    model: nn.Module,
    data: Examples,
    loss_fn: nn.Module,
    tc: TrainConfig,
    dp: DPSGDConfig,
    device: torch.device,
    history: History,
) -> DPSGDResult:
    """Train ``model`` in place with DP-SGD for ``tc.local_epochs`` epochs.

    Parameters
    ----------
    model : nn.Module
        One of the task models; trained in place, left unwrapped.
    data : Examples
        This client's training set.
    loss_fn : nn.Module
        A loss averaged over the batch (one output per example).
    tc : TrainConfig
        Epochs, batch size (the expected Poisson batch), optimizer and learning rate.
    dp : DPSGDConfig
        Noise multiplier, clipping norm and delta.
    device : torch.device
        Where to train.
    history : History
        The accountant's history from earlier rounds (:func:`load_history`).

    Returns
    -------
    DPSGDResult
        Mean loss, the accountant's new history and the cumulative epsilon.

    Raises
    ------
    ValueError
        If ``tc.batch_size`` exceeds the number of examples.
    FloatingPointError
        If the loss becomes NaN or infinite.
    """
    n = len(data)
    q = sample_rate_for(n, tc.batch_size)
    model.to(device).train()
    module, optimizer = make_dp_training(
        model, make_optimizer(model, tc), noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm, expected_batch_size=tc.batch_size)
    accountant = RDPAccountant()
    accountant.history = list(history)
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    sampling = torch.Generator()
    sampling.seed()  # OS entropy, not the run's seed
    steps = tc.local_epochs * math.ceil(n / tc.batch_size)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=sampling,
                                            steps=steps)
    params = [p for p in model.parameters() if p.requires_grad]
    total, count = 0.0, 0
    try:
        with warnings.catch_warnings():
            # Opacus's backward hooks on layers whose inputs need no gradient (the first
            # layer, embeddings): expected, and PyTorch warns about it every step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for idx in sampler:
                optimizer.zero_grad(set_to_none=True)
                if idx:
                    inputs, target = data.batch(np.asarray(idx, dtype=np.int64))
                    inputs = tuple(t.to(device) for t in inputs)
                    loss = loss_fn(module(*inputs), target.to(device))
                    loss.backward()
                    total += loss.item() * len(idx)
                    count += len(idx)
                else:  # an empty Poisson batch still takes a (pure noise) step
                    for p in params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device,
                                                    dtype=p.dtype)
                optimizer.step()
    finally:
        optimizer.zero_grad(set_to_none=True)
        module._close()  # hooks and per-example gradients off the model's parameters
    if not np.isfinite(total):
        raise FloatingPointError("DP-SGD training diverged (loss is NaN or infinite): lower "
                                 "learning-rate or dp-sgd-max-grad-norm")
    new_history = [(float(z), float(r), int(s)) for z, r, s in accountant.history]
    return DPSGDResult(loss=total / max(count, 1), history=new_history,
                       epsilon=epsilon(new_history, dp.delta), steps=steps)
