"""Models for tabular data, the checks that make them trainable with DP-SGD, and weight exchange.

A node and the coordinator must build *the same* network from the task's :class:`ModelSpec`,
so models come from a small registry keyed by name (``"logreg"``, ``"mlp"``), not from code
shipped with the task. Weights travel as plain ``dict[str, numpy.ndarray]`` (what a Flower
``ArrayRecord`` holds), checked name by name and shape by shape when they are loaded.

DP-SGD (Abadi et al. 2016, arXiv:1607.00133) needs a per-sample gradient for every trainable
layer, so a model is passed through :func:`make_dp_compatible` before training: Opacus'
``ModuleValidator`` rejects layers that mix samples (BatchNorm's batch statistics would leak
other records into each gradient) and replaces the ones it can (BatchNorm -> GroupNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedgov.config.task import ModelSpec
from fedgov.errors import ModelError

__all__ = [
    "ModelBuilder",
    "ModelRegistry",
    "REGISTRY",
    "register_model",
    "available_models",
    "build_model",
    "make_dp_compatible",
    "dp_problems",
    "get_state",
    "set_state",
    "EvalMetrics",
    "as_tensors",
    "check_labels",
    "eval_mode",
    "evaluate",
]


class ModelBuilder(Protocol):
    """Builds an untrained network: ``n_features`` inputs, ``n_classes`` logits out."""

    def __call__(self, spec: ModelSpec, *, n_features: int, n_classes: int) -> nn.Module: ...


class ModelRegistry:
    """Model builders by name. fedgov uses :data:`REGISTRY`; tests may make their own."""

    def __init__(self) -> None:
        self._builders: dict[str, ModelBuilder] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[ModelBuilder], ModelBuilder]:
        """Decorator: register ``builder`` under ``name`` (a second one needs ``replace=True``)."""

        def decorator(builder: ModelBuilder) -> ModelBuilder:
            if name in self._builders and not replace:
                raise ModelError(f"a model named '{name}' is already registered")
            self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def build(
        self,
        name: str,
        spec: ModelSpec,
        *,
        n_features: int,
        n_classes: int,
        seed: int | None = None,
    ) -> nn.Module:
        """Build model ``name``; with ``seed``, its initial weights depend on the seed only.

        The seed is applied inside :func:`torch.random.fork_rng`, so the caller's global
        random state is left as it was.
        """
        if name not in self._builders:
            raise ModelError(f"unknown model '{name}'; available: {', '.join(self.names())}")
        if n_features < 1:
            raise ModelError(f"a model needs at least 1 input feature, got n_features={n_features}")
        if n_classes < 2:
            raise ModelError(f"a classifier needs at least 2 classes, got n_classes={n_classes}")
        builder = self._builders[name]
        if seed is None:
            model = builder(spec, n_features=n_features, n_classes=n_classes)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = builder(spec, n_features=n_features, n_classes=n_classes)
        return model.float().train()


REGISTRY = ModelRegistry()
"""The registry :func:`build_model` reads."""


def register_model(name: str, *, replace: bool = False) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: add a builder to :data:`REGISTRY` under ``name``."""
    return REGISTRY.register(name, replace=replace)


def available_models() -> list[str]:
    """Names in :data:`REGISTRY`, sorted."""
    return REGISTRY.names()


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


@register_model("logreg")
def _logreg(spec: ModelSpec, *, n_features: int, n_classes: int) -> nn.Module:
    """Multinomial logistic regression: one Linear layer to ``n_classes`` logits."""
    return nn.Sequential(nn.Linear(n_features, n_classes))


@register_model("mlp")
def _mlp(spec: ModelSpec, *, n_features: int, n_classes: int) -> nn.Module:
    """Fully connected network: ``spec.hidden`` widths, ``spec.activation`` between layers."""
    layers: list[nn.Module] = []
    width = n_features
    for h in spec.hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[spec.activation]()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def build_model(spec: ModelSpec, *, n_features: int, n_classes: int, seed: int | None = None) -> nn.Module:
    """Build ``spec.name`` from :data:`REGISTRY` (in training mode, float32).

    The same ``seed`` gives identical initial weights, in any process.
    """
    return REGISTRY.build(spec.name, spec, n_features=n_features, n_classes=n_classes, seed=seed)


def dp_problems(model: nn.Module) -> list[str]:
    """Every reason Opacus would refuse ``model``, as text.

    Two checks: ``ModuleValidator.validate`` (the registered per-layer validators: BatchNorm,
    InstanceNorm with running stats, LSTM, ...; also training mode) and
    ``GradSampleModule.validate``, which rejects trainable layers holding buffers. The second is
    not part of the first and would otherwise only surface inside ``make_private``.
    """
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    errors: list[Exception] = list(ModuleValidator.validate(model, strict=False))
    errors += list(GradSampleModule.validate(model, strict=False))
    return [f"{type(e).__name__}: {e}" for e in errors]


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Return ``model`` if Opacus accepts it, else a fixed copy, else raise :class:`ModelError`.

    ``ModuleValidator.fix`` works on a copy (it replaces BatchNorm by GroupNorm, LSTM by DPLSTM,
    ...); the copy is validated again and every remaining problem is listed in the error.
    """
    from opacus.validators import ModuleValidator

    if not dp_problems(model):
        return model
    fixed: nn.Module = ModuleValidator.fix(model)  # Opacus is untyped
    remaining = dp_problems(fixed)
    if remaining:
        raise ModelError(
            "Opacus cannot train this model with DP-SGD, even after ModuleValidator.fix:\n"
            + "\n".join(f"  - {p}" for p in remaining)
        )
    return fixed


_OPACUS_PREFIX = "_module."


def _plain_name(name: str) -> str:
    """A state-dict key without Opacus' ``_module.`` wrapper prefixes."""
    while name.startswith(_OPACUS_PREFIX):
        name = name[len(_OPACUS_PREFIX) :]
    return name


def get_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as ``name -> numpy array`` (copies), in the plain model's names.

    Works on a plain model and on one wrapped by Opacus (its ``_module.`` prefix is stripped).
    """
    return {_plain_name(k): v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load ``state`` (as from :func:`get_state`) into ``model``, in place.

    Names and shapes must match exactly; every mismatch is named in the :class:`ModelError`.
    """
    own = model.state_dict()
    plain_to_key = {_plain_name(k): k for k in own}
    problems: list[str] = []
    missing = sorted(set(plain_to_key) - set(state))
    unexpected = sorted(set(state) - set(plain_to_key))
    if missing:
        problems.append(f"missing parameters: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected parameters: {', '.join(unexpected)}")
    new: dict[str, torch.Tensor] = {}
    for name, key in plain_to_key.items():
        if name not in state:
            continue
        value = np.asarray(state[name])
        expected = tuple(own[key].shape)
        if tuple(value.shape) != expected:
            problems.append(f"parameter '{name}' has shape {tuple(value.shape)}, the model expects {expected}")
            continue
        new[key] = torch.as_tensor(value, dtype=own[key].dtype)
    if problems:
        raise ModelError("cannot load weights into the model:\n" + "\n".join(f"  - {p}" for p in problems))
    model.load_state_dict(new, strict=True)


# --------------------------------------------------------------------------- evaluation
# Shared by the node (its DP evaluation) and the coordinator (central evaluation on public rows).


@dataclass(frozen=True)
class EvalMetrics:
    """Metrics of a model on labelled rows. ``auc`` is None when only one class is present."""

    accuracy: float
    loss: float
    auc: float | None
    n: int

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Numbers only (as a Flower ``MetricRecord`` wants): a missing AUC is left out."""
        out = {f"{prefix}accuracy": self.accuracy, f"{prefix}loss": self.loss, f"{prefix}n": float(self.n)}
        if self.auc is not None:
            out[f"{prefix}auc"] = self.auc
        return out



def as_tensors(X: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim != 2:
        raise ModelError(f"X must be a 2-d array (rows, features), got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ModelError(f"y must have one label per row of X: X has {X.shape[0]} rows, y has shape {y.shape}")
    return torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)



def check_labels(y: torch.Tensor, n_classes: int) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ModelError(
            f"labels must be in 0..{n_classes - 1} for a model with {n_classes} outputs, "
            f"found {int(y.min())}..{int(y.max())}"
        )



@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)



def _macro_ovr_auc(y: np.ndarray, proba: np.ndarray) -> float | None:
    """ROC AUC: binary on class 1's probability; else the mean one-vs-rest AUC over the classes
    present in ``y`` (scikit-learn's ``multi_class="ovr", average="macro"``, restricted to
    present classes so an absent class does not make it fail). None with fewer than 2 classes.
    """
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return None
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(np.mean([roc_auc_score(y == c, proba[:, c]) for c in present]))



def evaluate(model: nn.Module, X: np.ndarray, y: np.ndarray, *, batch_size: int = 4096) -> EvalMetrics:
    """Accuracy, mean cross-entropy and ROC AUC of ``model`` on ``(X, y)``.

    The model is put in eval mode for the pass and returned to the mode it was in.
    """
    Xt, yt = as_tensors(X, y)
    n = len(yt)
    if n == 0:
        raise ModelError("cannot evaluate on 0 rows")
    logits_parts = []
    with eval_mode(model):
        for start in range(0, n, batch_size):
            logits_parts.append(model(Xt[start : start + batch_size]))
    logits = torch.cat(logits_parts)
    check_labels(yt, logits.shape[1])
    loss = float(nn.functional.cross_entropy(logits, yt, reduction="mean"))
    accuracy = float((logits.argmax(dim=1) == yt).float().mean())
    proba = torch.softmax(logits, dim=1).numpy().astype(np.float64)
    return EvalMetrics(accuracy=accuracy, loss=loss, auc=_macro_ovr_auc(yt.numpy(), proba), n=n)
