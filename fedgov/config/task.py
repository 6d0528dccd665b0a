"""Task files: what a data scientist asks the federation to learn, and under which guarantee."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from fedgov.config._base import ConfigPath, StrictModel, load_referenced, problems_from_validation, validate_file
from fedgov.config.contract import ColumnType, Contract, load_contract
from fedgov.errors import ConfigError, Problem

__all__ = [
    "ModelSpec",
    "TrainingSpec",
    "PrivacySpec",
    "EvaluationSpec",
    "PersonalSpec",
    "Task",
    "load_task",
    "MODEL_NAMES",
]

MODEL_NAMES = ("logreg", "mlp")
"""Names in the model registry (``fedgov.models``); kept here so configs load without torch."""


class ModelSpec(StrictModel):
    """Which model from the registry, and its shape."""

    name: Literal["logreg", "mlp"] = "logreg"
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    activation: Literal["relu", "tanh"] = "relu"

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if any(h < 1 for h in self.hidden):
            raise ValueError("every hidden layer needs at least 1 unit")
        return self


AUTO_BATCH_SIZE = 256
"""The automatic batch size of a large node (training.batch_size unset)."""
AUTO_MIN_BATCH = 16
"""The automatic batch size never goes below this (a small node's quarter of its rows may)."""
AUTO_MIN_STEPS = 10
"""Automatic local epochs under local DP-SGD: enough for at least this many steps a round (a small
node makes few per epoch; every step spends privacy)."""
AUTO_MIN_STEPS_FREE = 100
"""Automatic local epochs where local steps spend no privacy (distributed DP adds its noise once to
the round's sum; no DP at all): enough for at least this many steps a round. Small organisations
under-train otherwise (benchmarks/bench_utility.py: Chem97 0.258 at 10 steps, 0.33 at about 100)."""
AUTO_MAX_EPOCHS = 20
"""Automatic local epochs: at most this many."""
AUTO_DP_LEARNING_RATE = 4.0
"""The automatic learning rate of local DP-SGD with sgd. A step moves by at most learning_rate times
max_grad_norm (every per-record gradient is clipped to it), so DP-SGD needs a larger rate than plain
training: measured with benchmarks/bench_utility.py (README "Utility under DP")."""
AUTO_LEARNING_RATE = 2.0
"""The automatic learning rate without local DP-SGD (no privacy, or distributed DP), sgd: features are
scaled by the contract's bounds into [-1, 1], so a logistic regression needs a large rate to move
within a few hundred steps (Chem97, guPrenat: rate 2 against 0.5; benchmarks/bench_utility.py)."""
AUTO_ADAM_LEARNING_RATE = 0.05
"""The automatic learning rate with optimizer = "adam"."""
AUTO_SERVER_MOMENTUM_DISTRIBUTED = 0.9
"""The coordinator's automatic momentum (training.server_momentum unset) under distributed DP: its few
rounds move a clipped update each, and momentum lets them add up; post-processing of the noisy
sum, so no privacy cost. Measured with fedgov's automatic local work (benchmarks/tune_tables.py,
README "Utility under DP"): Chem97, egsingle and guPrenat gain with it. A task with much more local
work per round (nl-342-distributed: 20 epochs) measured slightly worse and sets 0. 0 under local
DP-SGD and without DP, where it measured no better on the Adult demo."""


class TrainingSpec(StrictModel):
    """Rounds, local optimisation and the Flower strategy."""

    rounds: int = Field(default=10, ge=1, le=10_000)
    local_epochs: int | None = Field(
        default=None, ge=1, le=1000,
        description="local epochs per round; None (auto): each node takes enough epochs for at least "
        "AUTO_MIN_STEPS steps a round under local DP-SGD (from its released row count), AUTO_MIN_STEPS_FREE "
        "where local steps spend no privacy (distributed DP, no DP), at most AUTO_MAX_EPOCHS",
    )
    batch_size: int | None = Field(
        default=None, ge=1,
        description="batch size (the expected Poisson batch under DP-SGD); None (auto): AUTO_BATCH_SIZE, "
        "at most a quarter of the node's (released) rows, at least AUTO_MIN_BATCH",
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=100,
        description="None (auto): AUTO_DP_LEARNING_RATE for DP-SGD with sgd (its clipped, noised steps need a "
        "larger rate), AUTO_LEARNING_RATE otherwise; adam: AUTO_ADAM_LEARNING_RATE",
    )
    momentum: float = Field(default=0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0)
    fraction_train: float = Field(default=1.0, gt=0, le=1)
    fraction_evaluate: float = Field(default=1.0, ge=0, le=1)
    min_nodes: int = Field(default=2, ge=1)
    aggregation: Literal["mean", "median", "trimmed-mean", "krum"] = Field(
        default="mean",
        description=(
            "how the coordinator combines the nodes' models: mean (FedAvg/FedProx, weighted by examples), "
            "or robust to a few bad nodes: median (FedMedian), trimmed-mean (FedTrimmedAvg), krum (Krum)"
        ),
    )
    server_momentum: float | None = Field(
        default=None, ge=0, lt=1,
        description="the coordinator's momentum on the averaged update (FedAvgM, Hsu et al. 2019, arXiv:1909.06335): "
        "post-processing of what the nodes sent, so no privacy cost; aggregation = mean and strategy = fedavg only. "
        "Unset: 0.9 under distributed DP (AUTO_SERVER_MOMENTUM_DISTRIBUTED; its few clipped rounds move too little "
        "without it), 0 otherwise (under local DP-SGD it measured no better on the Adult demo)",
    )
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5, description="trimmed-mean: share cut at each end")
    krum_bad_nodes: int = Field(default=1, ge=0, description="krum: how many nodes may be malicious")
    update_encoding: Literal["float16-delta", "float32-delta"] = Field(
        default="float16-delta",
        description="how a node sends its update: the difference to the global model in float16 (half the "
        "model's float32 size; the rounding, 0.05% at most, is far below the DP noise) or in float32",
    )
    max_update_norm: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="leave out an update (local minus global model) longer than this in L2 norm; None: no bound",
    )
    secure_aggregation: bool = Field(
        default=False,
        description=(
            "sum the nodes' updates under secure aggregation (SecAgg on Flower's primitives): the coordinator "
            "sees only the sum of the round, never one node's update; needs aggregation = mean and no max_update_norm"
        ),
    )
    secure_weight_cap: int = Field(
        default=100_000, ge=1,
        description=(
            "secure aggregation: a node's weight is min(rows, cap) / cap, summed under the masks with its update "
            "(so no row count is sent with the update); a cap above every node's rows gives FedAvg's weights"
        ),
    )
    secure_clip: float = Field(
        default=8.0, gt=0, le=1e6, allow_inf_nan=False,
        description="secure aggregation: each coordinate of a weighted update is clipped to [-clip, clip] before quantisation",
    )
    node_wait: float = Field(
        default=120.0, gt=0, le=86_400,
        description="seconds to wait for nodes to connect, and for enough to be back when fewer than min_nodes are online",
    )
    reply_timeout: float = Field(
        default=600.0, gt=0, le=86_400, description="seconds to wait for the nodes' replies in each phase of a round"
    )
    seed: int = 0

    def resolved(self, rows: int, *, dp_sgd: bool) -> TrainingSpec:
        """This spec with every automatic setting (None) made concrete for a node of ``rows`` rows.

        ``rows`` must be a value the node may use openly: under local DP-SGD its *released* (noisy)
        row count, which its plan already depends on; ``dp_sgd``: whether the node trains with
        local DP-SGD. The same inputs give the same spec at the node, in its plan and in its
        training. Explicit settings are kept as they are.
        """
        batch = self.batch_size
        if batch is None:
            batch = max(AUTO_MIN_BATCH, min(AUTO_BATCH_SIZE, rows // 4))
        epochs = self.local_epochs
        if epochs is None:
            steps_per_epoch = max(2, math.ceil(rows / batch)) if dp_sgd else max(1, math.ceil(rows / batch))
            min_steps = AUTO_MIN_STEPS if dp_sgd else AUTO_MIN_STEPS_FREE
            epochs = min(AUTO_MAX_EPOCHS, max(1, math.ceil(min_steps / steps_per_epoch)))
        lr = self.learning_rate
        if lr is None:
            if self.optimizer == "adam":
                lr = AUTO_ADAM_LEARNING_RATE
            else:
                lr = AUTO_DP_LEARNING_RATE if dp_sgd else AUTO_LEARNING_RATE
        return self.model_copy(update={"batch_size": batch, "local_epochs": epochs, "learning_rate": lr})

    @property
    def lr(self) -> float:
        """The learning rate of a :meth:`resolved` spec."""
        if self.learning_rate is None:
            raise ValueError("the learning rate is automatic: resolve the training spec for the node first (resolved)")
        return self.learning_rate

    @property
    def epochs(self) -> int:
        """The local epochs of a :meth:`resolved` spec."""
        if self.local_epochs is None:
            raise ValueError("the local epochs are automatic: resolve the training spec for the node first (resolved)")
        return self.local_epochs

    @property
    def batch(self) -> int:
        """The batch size of a :meth:`resolved` spec."""
        if self.batch_size is None:
            raise ValueError("the batch size is automatic: resolve the training spec for the node first (resolved)")
        return self.batch_size

    @model_validator(mode="after")
    def _check(self) -> TrainingSpec:
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ValueError("strategy 'fedprox' needs proximal_mu > 0")
        if self.secure_aggregation and self.aggregation != "mean":
            raise ValueError(
                f"aggregation '{self.aggregation}' must see every node's update; under secure_aggregation the "
                "coordinator sees only their sum: use aggregation = \"mean\""
            )
        if self.server_momentum and (self.aggregation != "mean" or self.strategy != "fedavg"):
            raise ValueError(
                "server_momentum applies to FedAvg's mean: strategy = \"fedavg\", aggregation = \"mean\" "
                "(with or without secure_aggregation)"
            )
        if self.secure_aggregation and self.max_update_norm is not None:
            raise ValueError(
                "max_update_norm checks each node's update, which secure_aggregation hides; under secure aggregation "
                "every coordinate is bounded by secure_clip instead"
            )
        return self


class PrivacySpec(StrictModel):
    """The DP guarantee for the whole task (all rounds together): ``local`` DP-SGD at each node
    (record level), or ``distributed`` DP-FedAvg with noise shares under secure aggregation
    (municipality level, :mod:`fedgov.privacy.distributed`)."""

    enabled: bool = True
    mode: Literal["local", "distributed"] = Field(
        default="local",
        description="local: DP-SGD at every node, each with its own noise (record-level guarantee); "
        "distributed: each node clips its whole update and adds a share of discrete Gaussian noise, summed "
        "under secure aggregation (guarantee per municipality, and so per citizen; needs "
        "training.secure_aggregation = true)",
    )
    update_clip: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="distributed: L2 bound on a node's model update"
    )
    dropout_tolerance: float = Field(
        default=0.1, ge=0, lt=1,
        description="distributed: share of a round's nodes that may drop; every node's noise share is sized for "
        "the rest, and a round with more dropouts is discarded",
    )
    target_epsilon: float = Field(default=2.0, gt=0, le=100)
    delta: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="None: min(1e-5, 0.1 / rows) per node, well under 1/n of every node",
    )
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: Literal["auto", "fused", "hooks", "ghost", "functorch", "ew"] = Field(
        default="auto",
        description="how per-sample gradients are clipped; auto: fedgov's fused clipping for a stack of "
        "Linear layers (logreg, mlp), else Opacus' ghost clipping (several layers) or hooks (one); "
        "fused is the fastest for both tabular models (benchmarks/bench_dp_cost.py). hooks, ghost, "
        "functorch, ew: Opacus' own modes, same arithmetic",
    )
    reproducible_noise: bool = Field(
        default=False,
        description="derive sampling and noise from training.seed (tests and simulations only: "
        "whoever knows the seed can subtract the noise); default: fresh OS entropy at every node",
    )
    margin: float = Field(
        default=0.98,
        gt=0.5,
        le=1.0,
        description="calibrate sigma to margin * target_epsilon, for the accountant's numerical error",
    )

    def delta_for(self, rows: int) -> float:
        """The delta a node with ``rows`` training rows uses."""
        if self.delta is not None:
            return self.delta
        return min(1e-5, 0.1 / max(rows, 1))


class EvaluationSpec(StrictModel):
    """How the task is evaluated: on centralized data held by the coordinator (public, held
    out), and at the nodes on their own test splits, released only with DP.

    An evaluation at a node releases its correct and total counts on its test split, each with
    Gaussian noise through the node's ledger (an entry ``(z, 1, 1)`` per evaluation, the counts'
    L2 sensitivity being sqrt(2)). The task's ``privacy.target_epsilon`` covers training and
    these evaluations together: the node calibrates its DP-SGD noise for what the evaluations
    leave."""

    centralized: ConfigPath | None = None
    at_nodes: Literal["final", "every-round", "off"] = Field(
        default="final",
        description="evaluate the global model at the nodes after the final round only, after every round, or "
        "never (each evaluation is a DP release charged to the node's budget)",
    )
    epsilon: float = Field(
        default=0.2, ge=0, le=10, allow_inf_nan=False,
        description="the part of privacy.target_epsilon spent on the evaluations at a node, all together; "
        "0 turns evaluation at the nodes off",
    )

    def node_evaluations(self, rounds: int, *, enabled: bool = True) -> int:
        """How many evaluations a node plans for a task of ``rounds`` rounds."""
        if not enabled or self.at_nodes == "off" or self.epsilon <= 0:
            return 0
        return 1 if self.at_nodes == "final" else rounds


class PersonalSpec(StrictModel):
    """Each node's personal model (:mod:`fedgov.node.personal`): the final global model, or that
    model fine-tuned on the node's own training rows, whichever is better on a validation split
    carved from those rows. It stays at the node (``fedgov node model``); the fine-tuning spends
    no budget because nothing of it leaves a deployed node."""

    enabled: bool = Field(default=True, description="build and keep a personal model at every node after the final round")
    validation_fraction: float = Field(
        default=0.3, gt=0, lt=1, description="share of the node's training rows held out to choose between the two variants"
    )
    epochs: int = Field(default=30, ge=1, le=200, description="fine-tuning epochs at most; the best epoch on the validation split is kept")
    learning_rate: float = Field(default=0.1, gt=0, le=10)
    batch_size: int = Field(default=64, ge=1)
    proximal_mu: float = Field(
        default=0.0, ge=0, le=1000, allow_inf_nan=False,
        description="pull towards the global model while fine-tuning (mu/2 * ||w - w_global||^2, as FedProx)",
    )


class Task(StrictModel):
    """A training task."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: Literal["training"] = "training"
    description: str = ""
    contract: ConfigPath
    federation: ConfigPath | None = None
    features: list[str] | None = None
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    privacy: PrivacySpec = PrivacySpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    personal: PersonalSpec = PersonalSpec()

    @model_validator(mode="after")
    def _check_mode(self) -> Task:
        if self.privacy.enabled and self.privacy.mode == "distributed" and not self.training.secure_aggregation:
            raise ValueError(
                "privacy.mode = \"distributed\" adds each node's noise share to a sum that only secure aggregation "
                "keeps from the coordinator: set training.secure_aggregation = true"
            )
        return self

    @property
    def server_momentum(self) -> float:
        """``training.server_momentum``, or its automatic value: :data:`AUTO_SERVER_MOMENTUM_DISTRIBUTED`
        under distributed DP with FedAvg's mean, 0 otherwise."""
        t = self.training
        if t.server_momentum is not None:
            return t.server_momentum
        distributed = self.privacy.enabled and self.privacy.mode == "distributed"
        return AUTO_SERVER_MOMENTUM_DISTRIBUTED if distributed and t.aggregation == "mean" and t.strategy == "fedavg" else 0.0


def _check_against_contract(task: Task, contract: Contract, file: str) -> list[Problem]:
    problems = []
    names = contract.names()
    if contract.target is None:
        problems.append(Problem(file, "contract", f"contract {contract.ref} names no target column"))
    for i, f in enumerate(task.features or []):
        if f not in names:
            problems.append(Problem(file, f"features[{i}]", f"'{f}' is not a column of {contract.ref}"))
        elif f == contract.target:
            problems.append(Problem(file, f"features[{i}]", f"'{f}' is the target; it cannot be a feature"))
        elif f == contract.person_id:
            problems.append(Problem(file, f"features[{i}]", f"'{f}' is the person id; it cannot be a feature"))
        elif contract.column(f).type == ColumnType.STRING:
            problems.append(Problem(file, f"features[{i}]", f"'{f}' is free text; only numeric, boolean and categorical columns can be features"))
    return problems


def load_task(path: Path | str) -> tuple[Task, Contract]:
    """Load a task file and the contract it names, checking the two against each other."""
    p = Path(path)
    try:
        task = validate_file(Task, p, "task")
    except ConfigError:
        raise
    except ValidationError as exc:  # pragma: no cover - validate_file converts these
        raise ConfigError(f"Invalid task file {p}", problems_from_validation(exc, str(p))) from exc
    contract = load_referenced(load_contract, task.contract, by=p, field="contract")
    problems = _check_against_contract(task, contract, str(p))
    if problems:
        raise ConfigError(f"Task {p} does not fit contract {contract.ref}:", problems)
    return task, contract
