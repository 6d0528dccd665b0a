"""Fused DP-SGD for fully connected networks: per-sample clipping at the cost of one backward.

DP-SGD (Abadi et al. 2016, arXiv:1607.00133) needs each example's gradient norm. For a
``Linear`` layer with input ``a_i`` and output gradient ``g_i`` (example ``i``), the weight's
per-sample gradient is the outer product ``g_i a_i^T``, so its squared norm is
``|g_i|^2 |a_i|^2`` and the bias's is ``|g_i|^2`` (the "ghost norm" of Goodfellow 2015,
arXiv:1510.01799; Li et al. 2021, arXiv:2110.05679). The clipped sum of the per-sample
weight gradients is again one matrix product, ``(c * G)^T A`` with ``c_i`` the clip factors.
So one forward pass, one backward pass to the layers' outputs, and one small product per
layer give exactly the clipped gradient sum, with no per-sample gradient ever materialised
and no second backward pass (Opacus' ghost clipping needs two).

This module covers ``nn.Sequential`` stacks of ``Linear`` layers and parameter-free
element-wise activations (ReLU, Tanh, ...): fedgov's ``logreg`` and ``mlp``. Any other model
goes through Opacus' grad-sample modes (:func:`fused_supported` says which).

The arithmetic is the same as Opacus' ``DPOptimizer``: clip factor
``min(1, C / (norm + 1e-6))``, Gaussian noise of standard deviation ``sigma * C`` on the
clipped sum, division by the expected batch size; the tests compare it with Opacus' own
per-sample gradients. Free of I/O.

Randomness: the Poisson batches and the noise are drawn from ``generator``, a
:class:`~fedgov.privacy.rng.SecureRNG` (AES-256-CTR keyed from the OS: what a node uses) or a
seeded ``torch.Generator`` (reproducible, for tests and Opacus replays only); ``None`` draws a
fresh :class:`~fedgov.privacy.rng.SecureRNG`, never torch's global generator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedgov.privacy.rng import RandomSource, SecureRNG, draw_normal, draw_uniform

__all__ = ["FusedClipper", "FusedStep", "clipped_grad_sum", "fused_supported", "noised_mean_grad", "poisson_batches", "poisson_indices"]

# Parameter-free, element-wise layers a fused stack may hold between its Linear layers.
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Identity,
)


def fused_supported(model: nn.Module) -> bool:
    """True when ``model`` is an ``nn.Sequential`` of ``Linear`` layers (at least one, each
    taking a 2-d batch) and parameter-free element-wise activations, every parameter trainable.
    """
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return False
    linear = 0
    for layer in model:
        if isinstance(layer, nn.Linear):
            if not layer.weight.requires_grad or (layer.bias is not None and not layer.bias.requires_grad):
                return False
            linear += 1
        elif not isinstance(layer, _ELEMENTWISE) or any(True for _ in layer.parameters()) or any(True for _ in layer.buffers()):
            return False
    return linear > 0


class FusedStep:
    """The clipped per-sample gradient sum of one batch, and what was seen on the way."""

    __slots__ = ("flat", "grads", "loss", "norms")

    def __init__(self, flat: torch.Tensor, grads: list[torch.Tensor], loss: torch.Tensor, norms: torch.Tensor) -> None:
        self.flat = flat  # all parameters' clipped sums, one vector
        self.grads = grads  # views of ``flat``, one per parameter, in model.parameters() order
        self.loss = loss  # sum of the per-example losses (before clipping), a 0-d tensor
        self.norms = norms  # each example's gradient norm, before clipping

    @property
    def loss_sum(self) -> float:
        return float(self.loss)


class FusedClipper:
    """Computes clipped per-sample gradient sums for one model, step after step.

    Built once per round: it walks the model once and keeps one flat gradient buffer (with a
    view per parameter) that every step overwrites, so a step runs no Python beyond the layers
    and a few tensor operations. ``model`` must satisfy :func:`fused_supported`.
    """

    def __init__(self, model: nn.Sequential) -> None:
        if not fused_supported(model):
            raise ValueError("FusedClipper needs an nn.Sequential of Linear layers and element-wise activations")
        params = list(model.parameters())
        sizes = [p.numel() for p in params]
        self.flat = torch.empty(sum(sizes), dtype=params[0].dtype)
        self.grads = [v.view_as(p) for v, p in zip(torch.split(self.flat, sizes), params, strict=True)]
        slot = {id(p): v for p, v in zip(params, self.grads, strict=True)}
        # (layer, weight slot, bias slot) for a Linear layer; (layer, None, None) for an activation
        self._program: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]] = []
        for layer in model:
            if isinstance(layer, nn.Linear):
                bias = slot[id(layer.bias)] if layer.bias is not None else None
                self._program.append((layer, slot[id(layer.weight)], bias))
            else:
                self._program.append((layer, None, None))

    def step(
        self, xb: torch.Tensor, yb: torch.Tensor, max_grad_norm: float, input_sq_norms: torch.Tensor | None = None
    ) -> FusedStep:
        """The batch's clipped gradient sum, written into ``self.flat``.

        ``input_sq_norms``: each row's squared L2 norm of ``xb`` when the caller has them (a
        property of the data, computed once per round); else computed here.
        """
        if len(yb) == 0:
            self.flat.zero_()
            return FusedStep(self.flat, self.grads, torch.zeros(()), torch.zeros(0))
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        linear: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        h = xb
        for layer, w_slot, b_slot in self._program:
            if w_slot is None:
                h = layer(h)
                continue
            assert isinstance(layer, nn.Linear)
            inputs.append(h.detach())
            h = nn.functional.linear(h, layer.weight, layer.bias)
            outputs.append(h)
            linear.append((w_slot, b_slot))
        losses = nn.functional.cross_entropy(h, yb, reduction="none")
        # Gradients with respect to the layers' outputs only: weight gradients are built below.
        out_grads = torch.autograd.grad(losses.sum(), outputs)
        with torch.no_grad():
            sq = torch.zeros(len(yb), dtype=xb.dtype)
            for i, (a, g, (_, b_slot)) in enumerate(zip(inputs, out_grads, linear, strict=True)):
                a2 = input_sq_norms if i == 0 and input_sq_norms is not None else torch.linalg.vecdot(a, a)
                if b_slot is not None:
                    a2 = a2 + 1.0  # the bias is a weight on a constant input 1
                sq.addcmul_(torch.linalg.vecdot(g, g), a2)
            norms = sq.sqrt_()
            factor = (max_grad_norm / (norms + 1e-6)).clamp_(max=1.0)[:, None]
            for a, g, (w_slot, b_slot) in zip(inputs, out_grads, linear, strict=True):
                cg = g * factor
                torch.mm(cg.T, a, out=w_slot)
                if b_slot is not None:
                    torch.sum(cg, dim=0, out=b_slot)
        return FusedStep(self.flat, self.grads, losses.detach().sum(), norms)


def clipped_grad_sum(model: nn.Sequential, xb: torch.Tensor, yb: torch.Tensor, max_grad_norm: float) -> FusedStep:
    """Sum over the batch of each example's cross-entropy gradient, clipped to ``max_grad_norm``.

    ``model`` must satisfy :func:`fused_supported`. An empty batch gives zero gradients. For
    many steps on one model, build a :class:`FusedClipper` once instead.
    """
    return FusedClipper(model).step(xb, yb, max_grad_norm)


def poisson_indices(rows: int, rate: float, generator: RandomSource | None) -> torch.Tensor:
    """The rows of one Poisson-sampled batch: each row independently with probability ``rate``.

    Drawn as the gaps between chosen rows, which are independent and geometric with parameter
    ``rate``: about ``rows * rate`` random numbers instead of ``rows``. The batch has exactly
    the law of Opacus' ``rand(rows) < rate`` mask (the draws differ).
    """
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    generator = SecureRNG.fresh() if generator is None else generator
    log_keep = math.log1p(-rate)
    mean = rows * rate
    k = int(mean + 6 * math.sqrt(mean) + 16)
    chosen: list[torch.Tensor] = []
    last = -1.0  # position of the last chosen row
    while True:
        u = draw_uniform(k, generator)
        # P(gap >= j) = (1 - rate)^(j - 1): gap = 1 + floor(log(1 - u) / log(1 - rate)), 1 - u in (0, 1].
        pos = torch.cumsum(torch.log1p(-u).div_(log_keep).floor_().add_(1), 0).add_(last)
        inside = pos[pos < rows]
        chosen.append(inside)
        if len(inside) < k:  # the walk left the table: done
            break
        last = float(pos[-1])
    return (chosen[0] if len(chosen) == 1 else torch.cat(chosen)).long()


def poisson_batches(rows: int, rate: float, steps: int, generator: RandomSource | None) -> list[torch.Tensor]:
    """``steps`` independent Poisson batches (:func:`poisson_indices`), drawn together: one
    ``steps x k`` array of gaps instead of ``steps`` small draws (the per-step Python and
    dispatch cost is what a small model's DP step is made of)."""
    if not 0 < rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if steps < 1:
        return []
    generator = SecureRNG.fresh() if generator is None else generator
    log_keep = math.log1p(-rate)
    mean = rows * rate
    k = int(mean + 6 * math.sqrt(mean) + 16)
    u = draw_uniform((steps, k), generator)
    pos = torch.cumsum(torch.log1p(-u).div_(log_keep).floor_().add_(1), 1).sub_(1)
    out = []
    for i in range(steps):
        row = pos[i]
        if row[-1] < rows:  # the walk did not leave the table within k draws (rare): go on
            rest = poisson_indices(rows - int(row[-1]) - 1, rate, generator) + int(row[-1]) + 1
            out.append(torch.cat([row.long(), rest]))
        else:
            out.append(row[row < rows].long())
    return out


def noised_mean_grad(
    step: FusedStep,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: RandomSource | None,
    per_parameter_draws: bool = False,
    standard_normal: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``(clipped sum + N(0, (sigma C)^2 I)) / expected_batch_size`` for every parameter, in place.

    Overwrites ``step.flat`` and returns its views. The noise is one draw for all parameters
    together, or ``standard_normal`` (N(0, 1) numbers drawn ahead for this step) times its
    scale; ``per_parameter_draws`` draws it parameter by parameter instead, as Opacus does (the
    same law, and with a seeded ``torch.Generator`` Opacus' exact numbers).
    """
    std = noise_multiplier * max_grad_norm
    if std > 0:
        if standard_normal is not None:
            step.flat.add_(standard_normal, alpha=std)
            step.flat.div_(expected_batch_size)
            return step.grads
        generator = SecureRNG.fresh() if generator is None else generator
        if per_parameter_draws:
            for g in step.grads:
                g.add_(draw_normal(g.shape, generator, dtype=g.dtype, std=std))
        else:
            step.flat.add_(draw_normal(step.flat.shape, generator, dtype=step.flat.dtype, std=std))
    step.flat.div_(expected_batch_size)
    return step.grads
