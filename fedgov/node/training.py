"""Node-side training and evaluation: one federated round of local DP-SGD, free of Flower and files.

A round takes the model (holding the global weights), the node's rows as arrays, the task's
specs, the node's :class:`~fedgov.privacy.DPPlan` and its privacy ledger so far, and returns the
new weights, the new ledger and the epsilon of the *whole* ledger. The ledger is loaded into a
fresh Opacus accountant every round (``accountant.history``), so epsilon adds up across rounds
and processes; a fresh accountant without it would report one round's epsilon only, which is
the mistake in Flower's Opacus example.

DP-SGD is that of Abadi et al. 2016 (arXiv:1607.00133): Poisson sampling, per-sample clipping
to ``max_grad_norm``, Gaussian noise of ``noise_multiplier * max_grad_norm``. FedProx is Li et
al. 2020 (arXiv:1812.06127).

Randomness: with ``seed=None`` (what a deployed node does) the Poisson sampler and the noise
each get a fresh :class:`~fedgov.privacy.rng.SecureRNG`: AES-256-CTR keyed with 256 bits from
``os.urandom``, new for every round, so nobody, the coordinator included, can regenerate the
noise. That holds in the fused path and in Opacus' modes, whose sampler and ``add_noise`` are
redirected to it (Opacus' own ``secure_mode`` needs ``torchcsprng``, which has no wheel here).
Only the non-private round's shuffling, which no guarantee rests on, uses a torch generator.
A given ``seed`` derives two seeded ``torch.Generator`` instead, so the same seed gives the
same round (and, with ``replay_opacus``, Opacus' exact draws); it makes the noise
*reproducible by whoever knows the seed*, which voids the guarantee against that party: for
tests and simulations only (``privacy.reproducible_noise``, refused by a deployed node).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedgov.config.task import PrivacySpec, TrainingSpec
from fedgov.errors import ModelError, PrivacyError
from fedgov.models import as_tensors, check_labels, dp_problems, eval_mode, get_state
from fedgov.privacy.accounting import DPPlan, HistoryEntry, epsilon_from_history, merge_history
from fedgov.privacy.dpsgd import FusedClipper, fused_supported, noised_mean_grad, poisson_batches, poisson_indices
from fedgov.privacy.rng import RandomSource, SecureRNG, draw_normal

__all__ = [
    "FineTuned",
    "RoundResult",
    "fine_tune",
    "train_dp_round",
    "train_nonprivate_round",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What one local round produced.

    ``history`` is the node's whole ledger after the round (merged, see
    :func:`~fedgov.privacy.merge_history`) and ``epsilon`` that of the whole ledger at
    ``delta``; both None/empty for non-private training.
    """

    state: dict[str, np.ndarray]
    num_examples: int
    steps: int
    train_loss: float
    history: list[HistoryEntry] = field(default_factory=list)
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    accounting_seconds: float = 0.0  # the round's privacy accounting, before training

    @property
    def loss(self) -> float:
        """Alias of ``train_loss`` (``fedgov.node`` reads ``res.loss``)."""
        return self.train_loss


class _Rows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory rows that a DataLoader fetches a whole batch at a time.

    ``__getitems__`` (used by torch's fetcher when present) indexes the tensors once per batch;
    with ``TensorDataset`` the loader indexes and stacks row by row, which took about a third
    of a DP epoch of logistic regression on 26,000 rows. Use with :func:`_pass_through`.
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.X[idx], self.y[idx]


def _pass_through(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate function for :class:`_Rows`: the batch is already stacked (empty included)."""
    return batch


def _seeds(seed: int | None) -> tuple[int, int]:
    """Independent seeds for the sampler and the noise (fresh OS entropy when ``seed`` is None)."""
    if seed is None:
        return secrets.randbits(63), secrets.randbits(63)
    a, b = np.random.SeedSequence(seed % (1 << 64)).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def _dp_sources(seed: int | None) -> tuple[RandomSource, RandomSource]:
    """The Poisson sampler's and the noise's randomness: two fresh :class:`SecureRNG` (new OS
    keys every call, i.e. every round) when ``seed`` is None, else two seeded torch generators."""
    if seed is None:
        return SecureRNG.fresh(), SecureRNG.fresh()
    sample_seed, noise_seed = _seeds(seed)
    return torch.Generator().manual_seed(sample_seed), torch.Generator().manual_seed(noise_seed)


def _privacy_engine(accountant: str) -> Any:
    """A fresh ``PrivacyEngine`` (secure_mode off), without its secure-RNG warning.

    Opacus warns on every ``PrivacyEngine(secure_mode=False)`` that its noise is not from a
    CSPRNG. fedgov draws the noise and the Poisson batches of a round without seed from a
    :class:`SecureRNG` itself (:func:`_secure_opacus`), so the warning does not apply: it is
    caught *here only*; every other warning from the constructor passes through unchanged.
    """
    from opacus import PrivacyEngine

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)
    for w in caught:
        if "Secure RNG turned off" not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return engine


def _secure_opacus(optimizer: Any, dp_loader: Any, sampler: SecureRNG, noise: SecureRNG) -> None:
    """Redirect the two draws Opacus makes to :class:`SecureRNG`: the Poisson batches of
    ``dp_loader``'s ``UniformWithReplacementSampler`` (``torch.rand(rows) < q``) and the noise
    of ``optimizer.add_noise`` (``torch.normal``, parameter by parameter). The same laws, and
    the rest of Opacus (clipping, scaling, accounting) unchanged.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    batches = dp_loader.batch_sampler
    if type(batches) is not UniformWithReplacementSampler or not hasattr(optimizer, "add_noise"):
        raise PrivacyError(
            f"cannot draw Opacus' randomness from the secure generator: unexpected sampler "
            f"{type(batches).__name__} or optimizer {type(optimizer).__name__} (has Opacus changed?)"
        )
    batches.__class__ = _secure_sampler_class()
    batches.rng = sampler

    def add_noise() -> None:  # Opacus' DPOptimizer.add_noise with the draw from ``noise``
        multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            g = p.summed_grad
            g = g + draw_normal(g.shape, noise, dtype=g.dtype, std=std) if std > 0 else g.clone()
            p.grad = g.view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise  # the instance's attribute: pre_step calls self.add_noise()


@functools.cache
def _secure_sampler_class() -> type:
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    class SecureUniformSampler(UniformWithReplacementSampler):  # type: ignore[misc]  # opacus is untyped: its sampler is Any
        """Opacus' Poisson sampler (each row with probability ``sample_rate``), drawn from ``rng``."""

        rng: SecureRNG

        def __iter__(self) -> Iterator[list[int]]:
            for _ in range(self.steps):
                if self.sample_rate >= 1:
                    yield list(range(self.num_samples))
                else:
                    yield poisson_indices(self.num_samples, self.sample_rate, self.rng).tolist()

    return SecureUniformSampler


def _optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=training.lr)
    return torch.optim.SGD(model.parameters(), lr=training.lr, momentum=training.momentum)


def _proximal_anchor(
    model: nn.Module, training: TrainingSpec, global_state: Mapping[str, np.ndarray] | None
) -> list[tuple[nn.Parameter, torch.Tensor]] | None:
    """(parameter, its global value) pairs when FedProx applies, else None."""
    if training.strategy != "fedprox" or global_state is None or training.proximal_mu == 0:
        return None
    pairs = []
    for name, p in model.named_parameters():
        if name not in global_state:
            raise ModelError(f"global_state lacks parameter '{name}' needed for the FedProx term")
        g = torch.as_tensor(np.asarray(global_state[name]), dtype=p.dtype)
        if g.shape != p.shape:
            raise ModelError(f"global_state parameter '{name}' has shape {tuple(g.shape)}, the model {tuple(p.shape)}")
        pairs.append((p, g))
    return pairs


def _check_plan(X_rows: int, training: TrainingSpec, privacy: PrivacySpec, plan: DPPlan) -> None:
    problems = []
    if not privacy.enabled:
        problems.append("privacy.enabled is false: use train_nonprivate_round")
    # plan.rows is the node's released (noisy) row count, not len(X): the plan, the sample
    # rate and the expected batch size depend on public values only (fedgov.node.hello).
    if plan.batch_size != training.batch_size:
        problems.append(f"the plan is for batch size {plan.batch_size}, training asks {training.batch_size}")
    if plan.local_epochs != training.local_epochs:
        problems.append(f"the plan is for {plan.local_epochs} local epochs, training asks {training.local_epochs}")
    if plan.accountant != privacy.accountant:
        problems.append(f"the plan uses accountant '{plan.accountant}', privacy asks '{privacy.accountant}'")
    if problems:
        raise PrivacyError("the DP plan does not fit this round:\n" + "\n".join(f"  - {p}" for p in problems))


def _grad_sample_mode(model: nn.Module, requested: str) -> str:
    """``auto``: fedgov's fused clipping where the model allows it (a stack of Linear layers and
    activations: ``logreg`` and ``mlp``), else Opacus' ghost clipping for a model with several
    layers and hooks for one.

    Measured (benchmarks/bench_dp_cost.py): fused is the fastest for both tabular models; of
    Opacus' modes, ghost is faster than hooks for the MLP, hooks for logistic regression.
    """
    if requested == "fused" and not fused_supported(model):
        raise ModelError(
            "grad_sample_mode 'fused' needs an nn.Sequential of Linear layers and element-wise "
            "activations; use 'auto' or one of Opacus' modes (hooks, ghost, functorch, ew) for this model"
        )
    if requested != "auto":
        return requested
    if fused_supported(model):
        return "fused"
    layers = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    return "ghost" if layers > 1 else "hooks"


_FAST_PLAIN_SGD = True
"""Apply a plain SGD step straight from the fused clipper's buffer (tests compare it with the
optimizer's own step by turning it off)."""


def _train_fused(
    model: nn.Sequential,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    *,
    training: TrainingSpec,
    privacy: PrivacySpec,
    plan: DPPlan,
    sampler: RandomSource,
    noise: RandomSource,
    anchor: list[tuple[nn.Parameter, torch.Tensor]] | None,
    replay_opacus: bool = False,
) -> tuple[list[float], int]:
    """The local epochs of DP-SGD with :mod:`fedgov.privacy.dpsgd`.

    As Opacus does it: ``steps_per_epoch`` steps per epoch, each on a Poisson batch that takes
    every row with probability ``1 / loader_batches``; noise ``sigma * C`` on the clipped sum;
    division by Opacus' expected batch size ``int(rows / loader_batches)``. An epoch's batches
    are drawn together (:func:`~fedgov.privacy.dpsgd.poisson_batches`) and the noise ahead, in
    chunks of at most 16 MiB: a small model's step costs little beyond its Python calls.

    ``sampler`` and ``noise``: :class:`SecureRNG` outside tests, seeded torch generators for a
    reproducible round. ``replay_opacus`` (torch generators only) draws batches and noise exactly
    as Opacus' ``DPDataLoader`` and ``DPOptimizer`` do (the DataLoader's base-seed draw at each
    epoch, a ``rand(rows)`` mask per step, noise parameter by parameter): with the same seed the
    round then equals Opacus' hooks and ghost modes up to float rounding, which the tests check.
    """
    if replay_opacus and not (isinstance(sampler, torch.Generator) and isinstance(noise, torch.Generator)):
        raise PrivacyError("replay_opacus replays Opacus' torch draws: it needs a seed")
    optimizer = _optimizer(model, training)
    params = list(model.parameters())
    rows = len(yt)
    rate = 1 / plan.loader_batches
    expected = max(1, int(plan.rows * rate))  # from the released row count: no data-dependent scale
    row_sq = torch.linalg.vecdot(Xt, Xt)  # the first layer's input norms, once per round
    clipper = FusedClipper(model)  # one gradient buffer, reused by every step
    dim = clipper.flat.numel()
    chunk = max(1, min(plan.steps_per_epoch, (1 << 22) // max(dim, 1)))  # noise drawn ahead, <= 16 MiB at a time
    loss_total = torch.zeros((), dtype=torch.float64)
    batches_with_rows = 0
    # Plain SGD without FedProx: the step is applied straight from the clipper's buffer.
    plain_sgd = _FAST_PLAIN_SGD and training.optimizer == "sgd" and training.momentum == 0 and anchor is None
    noise_std = plan.noise_multiplier * privacy.max_grad_norm
    steps = 0
    for _ in range(training.epochs):
        if replay_opacus:
            assert isinstance(sampler, torch.Generator)
            torch.empty((), dtype=torch.int64).random_(generator=sampler)  # DataLoader's _base_seed
            epoch: list[torch.Tensor] = []  # drawn step by step below, as Opacus' sampler does
        else:
            epoch = poisson_batches(rows, rate, plan.steps_per_epoch, sampler)
        ahead: torch.Tensor | None = None
        for i in range(plan.steps_per_epoch):
            if replay_opacus:
                assert isinstance(sampler, torch.Generator)
                idx = (torch.rand(rows, generator=sampler) < rate).nonzero(as_tuple=False).reshape(-1)
            else:
                idx = epoch[i]
                if i % chunk == 0:
                    ahead = draw_normal((min(chunk, plan.steps_per_epoch - i), dim), noise)
            yb = yt[idx]
            step = clipper.step(Xt[idx], yb, privacy.max_grad_norm, input_sq_norms=row_sq[idx])
            if len(yb):
                loss_total += step.loss / len(yb)
                batches_with_rows += 1
            if plain_sgd and ahead is not None:
                # p -= lr * (clipped sum + std * z) / B, in two calls: the same update as below.
                step.flat.add_(ahead[i % chunk], alpha=noise_std)
                with torch.no_grad():
                    torch._foreach_add_(list[torch.Tensor](params), clipper.grads, alpha=-training.lr / expected)
                steps += 1
                continue
            grads = noised_mean_grad(
                step, noise_multiplier=plan.noise_multiplier, max_grad_norm=privacy.max_grad_norm,
                expected_batch_size=expected, generator=noise, per_parameter_draws=replay_opacus,
                standard_normal=None if ahead is None else ahead[i % chunk],
            )
            with torch.no_grad():
                if steps == 0:
                    for p, g in zip(params, grads, strict=True):  # the buffer's views stay the gradients
                        p.grad = g
                if anchor is not None:  # FedProx: post-processing of the noised gradient
                    for p, g0 in anchor:
                        cast(torch.Tensor, p.grad).add_(p.detach() - g0, alpha=training.proximal_mu)  # set above
            optimizer.step()
            steps += 1
    losses = [float(loss_total) / batches_with_rows] if batches_with_rows else []
    optimizer.zero_grad(set_to_none=True)
    return losses, steps


def train_dp_round(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    training: TrainingSpec,
    privacy: PrivacySpec,
    plan: DPPlan,
    history: list[HistoryEntry],
    seed: int | None,
    global_state: Mapping[str, np.ndarray] | None = None,
    replay_opacus: bool = False,
) -> RoundResult:
    """One round of local DP-SGD on ``model`` (trained in place), accounted on the node's ledger.

    ``training.local_epochs`` epochs of ``plan.steps_per_epoch`` Poisson-sampled steps each
    (automatic settings, None in ``training``, are resolved from ``plan.rows``, the node's
    released row count, exactly as :func:`fedgov.privacy.plans.node_plan` resolved them).
    Before any step, the epsilon of ``history`` plus this round is computed; if it exceeds
    ``plan.target_epsilon`` the round is refused (:class:`PrivacyError`): the node's hard cap.
    After the round, Opacus' recorded history is checked against the plan.

    FedProx (``training.strategy == "fedprox"`` with ``global_state``): the gradient of
    ``mu/2 * ||w - w_global||^2``, ``mu * (w - w_global)``, is added to the *noised* gradient,
    after clipping. It depends on the current weights and the global model only, never on a
    record, so adding it is post-processing and costs no privacy. Putting the term into the
    loss instead does not work with Opacus (checked): with ``hooks`` the per-sample gradients
    come from the layers' activations only, so the term's gradient is silently dropped when the
    optimizer replaces ``p.grad``; with ``ghost`` it reaches the update unclipped.

    ``seed=None`` (the only choice outside tests and simulations) draws the Poisson batches and
    the noise from two fresh :class:`~fedgov.privacy.rng.SecureRNG` (256-bit keys from the OS),
    in every mode. A ``seed`` fixes both, with torch generators; it must differ between rounds
    (derive it from task seed, node and round), or the rounds reuse the same noise, which the
    accounting assumes independent.

    ``replay_opacus`` (fused mode only): draw batches and noise as Opacus would, so that the
    round can be checked number for number against Opacus' own modes.

    Returns the new plain-model weights, the merged ledger, its epsilon, the number of steps,
    the mean training loss over non-empty batches, and ``num_examples = rows``.
    """
    Xt, yt = as_tensors(X, y)
    # Automatic settings from the plan's (released) row count, as the plan itself was made.
    training = training.resolved(plan.rows, dp_sgd=True)
    _check_plan(len(yt), training, privacy, plan)
    prior = merge_history(list(history))
    expected = merge_history(prior + [plan.round_entry()])
    t_accounting = time.perf_counter()
    eps_after = epsilon_from_history(history=expected, delta=plan.delta, accountant=plan.accountant)
    t_accounting = time.perf_counter() - t_accounting
    if eps_after > plan.target_epsilon:
        spent = epsilon_from_history(history=prior, delta=plan.delta, accountant=plan.accountant)
        raise PrivacyError(
            f"refusing to train: this round would take epsilon from {spent:.3f} to {eps_after:.3f}, "
            f"beyond the target {plan.target_epsilon} (delta {plan.delta:g}); the plan allows {plan.rounds} rounds"
        )
    model.train()
    problems = dp_problems(model)
    if problems:
        raise ModelError(
            "Opacus rejects this model; pass it through make_dp_compatible first:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    with eval_mode(model):
        n_classes = model(Xt[:1]).shape[1]
    check_labels(yt, n_classes)
    anchor = _proximal_anchor(model, training, global_state)

    mode = _grad_sample_mode(model, privacy.grad_sample_mode)
    sampler, noise = _dp_sources(seed)
    if mode == "fused":
        losses, steps = _train_fused(
            cast(nn.Sequential, model), Xt, yt, training=training, privacy=privacy, plan=plan,  # fused only for an nn.Sequential
            sampler=sampler, noise=noise, anchor=anchor, replay_opacus=replay_opacus,
        )
        return _dp_result(model, yt, losses, steps, expected, eps_after, plan, t_accounting)
    losses, steps, new_history = _train_opacus(
        model, Xt, yt, mode=mode, training=training, privacy=privacy, plan=plan, prior=prior,
        sampler=sampler, noise=noise, anchor=anchor,
    )
    if new_history == expected:
        epsilon = eps_after
    else:  # not expected with Poisson sampling; the ledger is the authority
        logger.warning("Opacus recorded %s, the plan expected %s", new_history, expected)
        epsilon = epsilon_from_history(history=new_history, delta=plan.delta, accountant=plan.accountant)
    return _dp_result(model, yt, losses, steps, new_history, epsilon, plan, t_accounting)


def _train_opacus(
    model: nn.Module,
    Xt: torch.Tensor,
    yt: torch.Tensor,
    *,
    mode: str,
    training: TrainingSpec,
    privacy: PrivacySpec,
    plan: DPPlan,
    prior: list[HistoryEntry],
    sampler: RandomSource,
    noise: RandomSource,
    anchor: list[tuple[nn.Parameter, torch.Tensor]] | None,
) -> tuple[list[float], int, list[HistoryEntry]]:
    """The local epochs of DP-SGD with Opacus' own ``mode`` (hooks, ghost, functorch, ew), its
    accountant continuing from ``prior``: the losses, the steps and the accountant's history."""
    # Exactly plan.loader_batches batches, whatever the true row count: Opacus derives the
    # sample rate from the loader's length, and the plan's comes from the released row count.
    chunks = [c.tolist() for c in np.array_split(np.arange(len(yt)), plan.loader_batches)]
    loader = DataLoader(
        _Rows(Xt, yt),
        batch_sampler=chunks,
        collate_fn=_pass_through,  # type: ignore[arg-type]  # torch types collate_fn per row; _Rows hands over whole batches
        # DPDataLoader samples with a seeded generator; with SecureRNG it only draws the
        # DataLoader's worker base seed from it (no worker here), so the global RNG stays untouched.
        generator=sampler if isinstance(sampler, torch.Generator) else torch.Generator().manual_seed(secrets.randbits(63)),
    )
    engine = _privacy_engine(plan.accountant)
    engine.accountant.history = list(prior)
    criterion = nn.CrossEntropyLoss()
    made: Any = engine.make_private(
        module=model,
        optimizer=_optimizer(model, training),
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=mode,
        noise_generator=noise if isinstance(noise, torch.Generator) else None,
    )
    if mode == "ghost":
        dp_model, optimizer, criterion, dp_loader = made
    else:
        dp_model, optimizer, dp_loader = made
    # The noisy sum is divided by the expected batch size of the *released* row count (Opacus
    # would use len(dataset), a data-dependent scale).
    optimizer.expected_batch_size = max(1, int(plan.rows * plan.sample_rate))
    try:
        if isinstance(sampler, SecureRNG) and isinstance(noise, SecureRNG):
            _secure_opacus(optimizer, dp_loader, sampler, noise)
        if not (len(dp_loader) == plan.steps_per_epoch and 1 / len(dp_loader) == plan.sample_rate):
            raise PrivacyError(
                f"Opacus samples {len(dp_loader)} batches per epoch at rate 1/{len(dp_loader)}; the plan "
                f"expects {plan.steps_per_epoch} at {plan.sample_rate:.6g} (has Opacus changed?)"
            )
        losses = []
        steps = 0
        for _ in range(training.epochs):
            for xb, yb in dp_loader:
                # With Opacus' full backward hooks, torch warns at every backward that the first
                # layer's input needs no gradient. Asking for it costs little (measured) and
                # removes the cause instead of filtering the warning.
                xb.requires_grad_(True)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(dp_model(xb), yb)
                loss.backward()
                if len(yb):
                    losses.append(float(loss.item()))
                if anchor is None:
                    optimizer.step()
                elif optimizer.pre_step():  # clip, noise, scale, account
                    with torch.no_grad():
                        for p, g in anchor:
                            if p.grad is not None:  # a parameter without gradient gets no pull either
                                p.grad.add_(p.detach() - g, alpha=training.proximal_mu)
                    optimizer.original_optimizer.step()
                steps += 1
        new_history = merge_history(list(engine.accountant.history))
    finally:
        optimizer.zero_grad(set_to_none=True)
        dp_model._close()  # remove Opacus' hooks and per-parameter attributes
        for p in model.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad
    return losses, steps, new_history


def _dp_result(
    model: nn.Module, yt: torch.Tensor, losses: list[float], steps: int,
    history: list[HistoryEntry], epsilon: float, plan: DPPlan, accounting_seconds: float,
) -> RoundResult:
    return RoundResult(
        state=get_state(model),
        num_examples=len(yt),
        steps=steps,
        train_loss=float(np.mean(losses)) if losses else math.nan,
        history=history,
        epsilon=epsilon,
        delta=plan.delta,
        noise_multiplier=plan.noise_multiplier,
        accounting_seconds=accounting_seconds,
    )


def train_nonprivate_round(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    *,
    training: TrainingSpec,
    seed: int | None,
    global_state: Mapping[str, np.ndarray] | None = None,
) -> RoundResult:
    """One round of ordinary mini-batch training (shuffled, ``training.batch_size``), in place.

    For ``privacy.enabled = false`` and for baselines. No guarantee: ``epsilon`` is None.
    FedProx adds ``mu/2 * ||w - w_global||^2`` to the loss.
    """
    Xt, yt = as_tensors(X, y)
    if len(yt) == 0:
        raise ModelError("cannot train on 0 rows")
    training = training.resolved(len(yt), dp_sgd=False)  # automatic settings: no DP-SGD plan to follow
    with eval_mode(model):
        n_classes = model(Xt[:1]).shape[1]
    check_labels(yt, n_classes)
    anchor = _proximal_anchor(model, training, global_state)
    sample_seed, _ = _seeds(seed)
    loader = DataLoader(
        _Rows(Xt, yt),
        batch_size=training.batch,
        collate_fn=_pass_through,  # type: ignore[arg-type]  # torch types collate_fn per row; _Rows hands over whole batches
        shuffle=True,
        generator=torch.Generator().manual_seed(sample_seed),
    )
    optimizer = _optimizer(model, training)
    criterion = nn.CrossEntropyLoss()
    model.train()
    losses: list[float] = []
    steps = 0
    for _ in range(training.epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            losses.append(float(loss.item()))
            if anchor is not None:
                loss = loss + 0.5 * training.proximal_mu * sum(((p - g) ** 2).sum() for p, g in anchor)
            loss.backward()
            optimizer.step()
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return RoundResult(
        state=get_state(model),
        num_examples=len(yt),
        steps=steps,
        train_loss=float(np.mean(losses)),
    )


@dataclass(frozen=True)
class FineTuned:
    """What :func:`fine_tune` kept: the epoch best on the validation rows (0: none beat the
    model it started from), its weights and its validation accuracy and loss; and those of the
    model it started from."""

    state: dict[str, np.ndarray]
    epoch: int
    val_accuracy: float
    val_loss: float
    start_accuracy: float
    start_loss: float


def _val_score(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with eval_mode(model), torch.no_grad():
        logits = model(X)
    return float((logits.argmax(dim=1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))


def fine_tune(
    model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    proximal_mu: float = 0.0,
) -> FineTuned:
    """Ordinary (non-private) fine-tuning of ``model`` on ``(X, y)`` for up to ``epochs`` epochs
    of shuffled mini-batch SGD, keeping the epoch that is best on ``(X_val, y_val)``: the higher
    validation accuracy, the lower validation loss between equal accuracies. Epoch 0, the model as
    given, is a candidate too, so the result is never worse on the validation rows than the start.

    ``proximal_mu`` adds ``mu/2 * ||w - w_start||^2`` to the loss, a pull towards the model it
    started from (FedProx's term), which keeps a small node's model from straying far on few rows.

    Every epoch is always run (the work, and so the time, does not depend on which one is kept).
    For the node's personal model (:mod:`fedgov.node.personal`), which never leaves the node.
    """
    Xt, yt = as_tensors(X, y)
    Xv, yv = as_tensors(X_val, y_val)
    if len(yt) == 0 or len(yv) == 0:
        raise ModelError("fine-tuning needs at least one training and one validation row")
    with eval_mode(model):
        n_classes = model(Xt[:1]).shape[1]
    check_labels(yt, n_classes)
    check_labels(yv, n_classes)
    start_acc, start_loss = _val_score(model, Xv, yv)
    best = (start_acc, -start_loss)
    best_state, best_epoch, best_acc, best_loss = get_state(model), 0, start_acc, start_loss
    generator = torch.Generator().manual_seed(_seeds(seed)[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    criterion = nn.CrossEntropyLoss()
    anchor = [(p, p.detach().clone()) for p in model.parameters()] if proximal_mu > 0 else []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(yt), generator=generator)
        for start in range(0, len(yt), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = Xt[idx], yt[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            if anchor:
                loss = loss + 0.5 * proximal_mu * sum(((p - p0) ** 2).sum() for p, p0 in anchor)
            loss.backward()
            optimizer.step()
        acc, loss = _val_score(model, Xv, yv)
        if (acc, -loss) > best:
            best, best_state, best_epoch, best_acc, best_loss = (acc, -loss), get_state(model), epoch, acc, loss
    optimizer.zero_grad(set_to_none=True)
    return FineTuned(best_state, best_epoch, best_acc, best_loss, start_acc, start_loss)
