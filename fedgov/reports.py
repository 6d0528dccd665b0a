"""Reports a run leaves on disk: ``report.json`` (a pydantic model), a PNG and a summary.

The report answers every municipality's first question: what do we gain by joining? Per
node it sets the accuracy of the federated model on the node's own test split beside the
accuracy of the same model trained with the same DP budget on the node's data alone, and (in a
simulation) beside the node's personal model: the federated model, or it fine-tuned on the
node's own rows, whichever is better on a validation split of its own.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedgov.errors import Problem, ReportError

__all__ = [
    "LearningCheck",
    "check_learning",
    "RoundMetrics",
    "NodeResult",
    "GlobalMetrics",
    "PooledMetrics",
    "POOLED_LABEL",
    "SIMULATED_POOLED_LABEL",
    "TrainingReport",
    "write_json_atomic",
    "load_report",
    "read_report",
    "plot_report",
    "refusal_groups",
    "refusal_lines",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GlobalMetrics(_Model):
    """Metrics of one model on one evaluation set."""

    accuracy: float
    loss: float
    auc: float | None = None
    n: int = 0


POOLED_LABEL = "pooled over the nodes' own test splits (DP counts)"
"""What the pooled figure is, wherever it is shown (report, summary)."""
SIMULATED_POOLED_LABEL = "the final model on the members' pooled test splits (simulation only: exact, read from the split table)"
"""The pooled figure of a simulation whose nodes released none (distributed DP, or no evaluation at
the nodes): the simulation's coordinator reads the test splits it wrote itself, as it does for a
statistics query's true answer. A deployed coordinator has no such figure."""


class PooledMetrics(_Model):
    """The global model's accuracy pooled over the nodes' own test splits: the sum of the correct
    counts the nodes released in their last evaluation over the sum of their totals. Each count
    is a DP release the nodes made anyway (through their release gate and ledger): no privacy
    spent for it. The global figure of a task without a central test set
    (``evaluation.centralized``). In a simulation whose nodes released no evaluation (distributed
    DP), the final model on the pooled test splits the simulation wrote, exact
    (:data:`SIMULATED_POOLED_LABEL`; ``sd`` 0, ``correct`` and ``total`` exact counts)."""

    accuracy: float = Field(description="sum of the nodes' released correct counts / sum of their released totals, in [0, 1]")
    sd: float = Field(default=0.0, description="standard deviation of the pooled accuracy from the nodes' DP noise (0: exact counts)")
    correct: float = Field(description="sum of the released (noisy) correct counts")
    total: float = Field(description="sum of the released (noisy) totals")
    nodes: int = Field(description="how many nodes' evaluations are pooled")
    round: int = Field(description="the round of the evaluation pooled (the last one the nodes evaluated)")
    label: str = POOLED_LABEL
    auc: float | None = Field(
        default=None, description="the AUC (macro one-vs-rest for more than two classes): the simulation's exact figure only",
    )


IMBALANCED_MINORITY = 0.2
"""A binary target whose rarer class is below this share is judged by AUC, not accuracy: always
guessing the majority is then right most of the time whatever the model learned."""

SIGNIFICANCE_SE = 2.0
"""How many standard errors of the test set a model must beat its baseline by to count as learned."""


class LearningCheck(_Model):
    """Did the global model learn anything the test set can tell from guessing?

    ``metric`` is accuracy against the majority rate, or, for a binary target whose rarer class
    is under :data:`IMBALANCED_MINORITY`, ROC AUC against 0.5. ``margin`` is the noise of the
    test set: :data:`SIGNIFICANCE_SE` standard errors of the baseline on ``n`` rows (a
    proportion's ``sqrt(p (1 - p) / n)``; for AUC Hanley and McNeil's standard error at 0.5,
    ``sqrt((n0 + n1 + 1) / (12 n0 n1))``). ``learned`` is ``value - baseline > margin``.
    """

    learned: bool
    metric: Literal["accuracy", "auc"]
    value: float
    baseline: float = Field(description="the majority rate (accuracy) or 0.5 (AUC)")
    margin: float = Field(description="two standard errors of the baseline on the test set's size")
    n: int = Field(description="rows in the test set the figures come from")
    message: str = ""
    advice: list[str] = Field(default_factory=list, description="what to try when the model did not learn")


def check_learning(
    *, accuracy: float, auc: float | None, class_counts: Sequence[int], privacy: bool = True, where: str = "the held-out test set",
) -> LearningCheck | None:
    """Judge a global model's test figures against guessing (see :class:`LearningCheck`).

    ``class_counts``: rows of each class in the test set (the majority rate and the AUC's noise
    come from them). None when there is nothing to judge (an empty test set, or one class only).
    Pure: figures in, verdict out.
    """
    counts = [int(c) for c in class_counts if int(c) > 0]
    n = sum(counts)
    if n == 0 or len(counts) < 2:
        return None
    majority = max(counts) / n
    binary = len(class_counts) == 2 and len(counts) == 2
    imbalanced = binary and min(counts) / n < IMBALANCED_MINORITY
    if imbalanced and auc is not None and math.isfinite(auc):
        n0, n1 = counts
        margin = SIGNIFICANCE_SE * math.sqrt((n0 + n1 + 1) / (12.0 * n0 * n1))
        metric: Literal["accuracy", "auc"] = "auc"
        value, baseline = float(auc), 0.5
    else:
        margin = SIGNIFICANCE_SE * math.sqrt(majority * (1 - majority) / n)
        metric, value, baseline = "accuracy", float(accuracy), majority
    learned = value - baseline > margin
    name = "AUC" if metric == "auc" else "accuracy"
    against = "0.5 (chance)" if metric == "auc" else f"the majority rate {baseline:.4f} (always guessing the most frequent class)"
    if learned:
        message = f"the global model's {name} {value:.4f} beats {against} by more than the test set's noise (±{margin:.4f}, {n} rows)"
        return LearningCheck(learned=True, metric=metric, value=value, baseline=baseline, margin=margin, n=n, message=message)
    message = (
        f"the global model did not learn: its {name} on {where} ({n} rows) is {value:.4f}, not above {against} "
        f"by more than the test set's noise (±{margin:.4f})"
    )
    if metric == "accuracy" and binary and auc is not None and math.isfinite(auc) and auc > 0.5:
        message += f"; its AUC {auc:.4f} shows how well it ranks, but no prediction beats the guess"
    advice = [
        "train longer: more training.rounds or training.local_epochs; or a larger training.learning_rate "
        "(unset, fedgov picks one for the node's size and DP-SGD)"
    ]
    if privacy:
        advice.append(
            "spend more privacy where the nodes' policies allow it (privacy.target_epsilon): DP noise may drown the signal; "
            "a run with privacy.enabled = false tells whether the noise or the model is the limit"
        )
    advice += [
        "check the features: are the columns that carry the signal in the task (features), and do the contract's "
        "min and max fit the data (values outside are clipped, a range far too wide squeezes them together)?",
        "a model with more capacity (model.name = \"mlp\"), or a target with more signal, when the plain model is the limit",
    ]
    return LearningCheck(learned=False, metric=metric, value=value, baseline=baseline, margin=margin, n=n, message=message, advice=advice)


class RoundMetrics(_Model):
    """One round: the global model on the coordinator's held-out set, and what nodes sent."""

    round: int
    accuracy: float | None = None
    loss: float | None = None
    auc: float | None = None
    federated_accuracy: float | None = Field(
        default=None, description="weighted mean of the nodes' accuracies on their own test splits"
    )
    train_loss: float | None = None
    max_epsilon: float | None = None
    nodes_asked: list[str] = Field(default_factory=list, description="the admitted nodes asked to train this round")
    nodes_absent: dict[str, str] = Field(
        default_factory=dict, description="admitted nodes not asked this round, why (offline, not sampled)"
    )
    nodes_trained: list[str] = Field(default_factory=list)
    nodes_evaluated: list[str] = Field(default_factory=list)
    nodes_failed: dict[str, str] = Field(default_factory=dict)
    nodes_rejected: dict[str, str] = Field(
        default_factory=dict, description="updates the coordinator left out (NaN, wrong shape, norm above the bound), why"
    )
    discarded: str | None = Field(default=None, description="why the round's aggregate was discarded (the model did not move)")
    seconds: float | None = None
    bytes_to_nodes: int | None = Field(
        default=None, description="training phase: serialised size of all messages the coordinator sent (instructions, secure-aggregation stages)"
    )
    bytes_from_nodes: int | None = Field(default=None, description="training phase: serialised size of all the nodes' replies")


class NodeResult(_Model):
    """One municipality's view of the run."""

    node: str
    name: str = ""
    status: Literal["accepted", "refused", "failed"]
    refusal_code: str | None = None
    refusal_reason: str = ""
    detail: str = Field(
        default="", description="simulation only: what the simulation's own check of this member's data found "
        "(file, column and kind of problem; never a value); a deployed node's details stay at the node",
    )
    train_rows: int = 0
    test_rows: int = 0
    epsilon: float | None = None
    delta: float | None = None
    per_citizen: str = Field(
        default="",
        description="what the node's epsilon means for one citizen in its data (the unit the guarantee is for); "
        "empty for a node that took no part",
    )
    noise_multiplier: float | None = None
    rounds_trained: int = 0
    federated_accuracy: float | None = None
    federated_auc: float | None = None
    federated_accuracy_sd: float | None = Field(
        default=None, description="standard deviation of the DP noise in federated_accuracy (from the node's noisy counts)",
    )
    evaluation_noise: float | None = Field(default=None, description="z of the node's evaluations (public, from its plan)")
    local_only_accuracy: float | None = None
    local_only_epsilon: float | None = None
    gain: float | None = Field(default=None, description="federated minus local-only accuracy")
    personal_accuracy: float | None = Field(
        default=None,
        description="the node's personal model (the global model, or it fine-tuned on the node's rows, whichever is "
        "better on its validation split) on its test split: a simulation's exact figure, apart from the budget like "
        "local-only; a deployed node keeps its personal model and sends nothing about it",
    )
    personal_variant: Literal["global", "fine-tuned"] | None = None
    personal_gain: float | None = Field(default=None, description="personalised minus local-only accuracy")

    def standard_error(self) -> float | None:
        """The standard error of an accuracy on this node's test split (simulation: its size is known),
        at the local-only accuracy."""
        p = self.local_only_accuracy
        if p is None or self.test_rows <= 0:
            return None
        return math.sqrt(max(p * (1 - p), 0.0) / self.test_rows)

    def worse_off(self) -> bool:
        """Personalised below local-only by more than the test split's standard error."""
        se = self.standard_error()
        return self.personal_gain is not None and se is not None and self.personal_gain < -se


class TrainingReport(_Model):
    """Everything ``fedgov run`` found, in one file (``report.json``)."""

    kind: Literal["training"] = "training"
    fedgov_version: str
    run_id: str
    task: str
    task_file: str
    federation: str = Field(description="the federation's name (its 'name'), or '(deployment)'")
    federation_file: str = Field(default="", description="the federation file (simulation)")
    contract: str
    mode: Literal["simulation", "deployment"] = "simulation"
    flower_run_id: int | None = Field(default=None, description="the run's id at the SuperLink (flwr ls, fedgov task status)")
    status: Literal["completed", "failed", "running"] = "running"
    message: str = ""
    started: datetime
    finished: datetime | None = None
    wall_seconds: float | None = None
    model: str
    model_parameters: int | None = Field(default=None, description="the model's parameter count (times 4: its size in float32 bytes)")
    strategy: str
    server_momentum: float = Field(default=0.0, description="the coordinator's momentum the run used (training.server_momentum, or its automatic value)")
    rounds_planned: int
    privacy: dict[str, float | str | bool | None] = Field(default_factory=dict)
    majority_rate: float | None = Field(default=None, description="accuracy of always predicting the majority class")
    rounds: list[RoundMetrics] = Field(default_factory=list)
    nodes: list[NodeResult] = Field(default_factory=list)
    final: GlobalMetrics | None = None
    pooled: PooledMetrics | None = Field(
        default=None, description="the global model on the nodes' own test splits, pooled (their released counts; in a "
        "simulation whose nodes released none, the final model on the test splits it wrote, exact: see label): "
        "the global figure when the task has no central test set",
    )
    learning: LearningCheck | None = Field(
        default=None, description="whether the global model beats guessing by more than the test set's noise, and what to try"
    )
    artifacts: dict[str, str] = Field(default_factory=dict)

    def accepted(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.status == "accepted"]

    def median_gain(self) -> float | None:
        gains = [n.gain for n in self.nodes if n.gain is not None]
        return statistics.median(gains) if gains else None

    def median_personal_gain(self) -> float | None:
        gains = [n.personal_gain for n in self.nodes if n.personal_gain is not None]
        return statistics.median(gains) if gains else None

    def worse_off(self) -> list[NodeResult]:
        """The nodes whose personal model is below their local-only one by more than the standard
        error of their test split (simulation)."""
        return [n for n in self.nodes if n.worse_off()]

    def max_epsilon(self) -> float | None:
        eps = [n.epsilon for n in self.nodes if n.epsilon is not None]
        return max(eps) if eps else None


def refusal_groups(refusals: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """``(node, reason)`` pairs grouped by reason, the most frequent first: ``[(reason, nodes)]``,
    each group's nodes in order."""
    groups: dict[str, list[str]] = {}
    for node, reason in refusals:
        groups.setdefault(reason, []).append(node)
    return sorted(((reason, sorted(nodes)) for reason, nodes in groups.items()), key=lambda g: (-len(g[1]), g[0]))


def refusal_lines(refusals: Iterable[tuple[str, str]], *, examples: int = 3, limit: int = 6) -> list[str]:
    """A few lines for many refusals: per reason its count and a few of its nodes (the full list
    is the report's ``nodes``)."""
    groups = refusal_groups(refusals)
    lines = []
    for reason, nodes in groups[:limit]:
        more = f" and {len(nodes) - examples} more" if len(nodes) > examples else ""
        lines.append(f"{len(nodes)} node(s): {reason} ({', '.join(nodes[:examples])}{more})")
    if len(groups) > limit:
        lines.append(f"{sum(len(n) for _, n in groups[limit:])} node(s) for {len(groups) - limit} other reason(s)")
    return lines


def write_json_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash leaves no half file."""
    from fedgov.data.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


_TRAINING = "a fedgov training report (the report.json of a run directory)"
_R = TypeVar("_R", bound=BaseModel)


def read_report(path: Path, model: type[_R], what: str) -> _R:
    """Read a report file as ``model`` (``what`` names it in errors: "a fedgov ... report (...)").

    A file that is missing, unreadable, not JSON (cut short by a crash or a full disk) or JSON
    of another shape raises :class:`~fedgov.errors.ReportError`, which names the file and what
    was expected (with every field at fault), so that ``fedgov report`` prints a message, not a
    traceback.
    """
    path = Path(path)
    expected = f"expected {what}"
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file; {expected}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot be read ({exc}); {expected}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}: not JSON, or cut short (line {exc.lineno}, column {exc.colno}: {exc.msg}); {expected}"
        ) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            Problem(str(path), ".".join(str(part) for part in err["loc"]), err["msg"]) for err in exc.errors()
        ]
        raise ReportError(f"{path}: not {what}", problems) from exc


def load_report(path: Path) -> TrainingReport:
    """Read a run's ``report.json`` (:func:`read_report`: a damaged file is a ReportError)."""
    return read_report(Path(path), TrainingReport, _TRAINING)


def plot_report(report: TrainingReport, path: Path) -> Path:
    """Accuracy per round, and each node's gain from federating over training alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    rounds = [r for r in report.rounds if r.accuracy is not None]
    ax1.plot([r.round for r in rounds], [r.accuracy for r in rounds], "o-", label="global model, held-out test set")
    fed = [r for r in report.rounds if r.federated_accuracy is not None]
    if fed:
        ax1.plot([r.round for r in fed], [r.federated_accuracy for r in fed], "s--", label="nodes' own test splits (weighted)")
    if report.majority_rate is not None:
        ax1.axhline(report.majority_rate, color="grey", ls=":", label=f"majority class ({report.majority_rate:.3f})")
    ax1.set_xlabel("round")
    ax1.set_ylabel("accuracy")
    eps = report.privacy.get("target_epsilon")
    ax1.set_title(f"{report.task}: accuracy per round (target epsilon {eps} per node)")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)

    nodes = [n for n in report.nodes if n.gain is not None or n.personal_gain is not None]
    nodes.sort(key=lambda n: n.train_rows, reverse=True)
    personal = any(n.personal_gain is not None for n in nodes)
    width = 0.4 if personal else 0.8
    if nodes:
        labels = [f"{n.name or n.node}\n(~{n.train_rows})" for n in nodes]
        at = [i - width / 2 if personal else i for i in range(len(nodes))]
        gains = [100 * (n.gain or 0.0) for n in nodes]
        colors = ["tab:green" if g >= 0 else "tab:red" for g in gains]
        # the nodes' own accuracies are DP releases: their noise as error bars (1 sd)
        errors = [100 * (n.federated_accuracy_sd or 0.0) for n in nodes]
        ax2.bar(at, gains, width=width, color=colors, yerr=errors, capsize=2, ecolor="dimgray", label="federated (noisy)")
        if personal:
            pgains = [100 * (n.personal_gain or 0.0) for n in nodes]
            ax2.bar([i + width / 2 for i in range(len(nodes))], pgains, width=width, color="tab:blue", label="personalised (exact)")
            ax2.legend(loc="upper right", fontsize=8)
        ax2.set_xticks(range(len(nodes)), labels, rotation=60, ha="right", fontsize=7)
        ax2.axhline(0, color="black", lw=0.8)
    ax2.set_ylabel("gain in accuracy (points)")
    ax2.set_title("gain per node over local-only (same DP budget): federated" + (", personalised" if personal else ""))
    ax2.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
