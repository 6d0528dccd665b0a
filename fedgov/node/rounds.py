"""The municipal node's side of a training task: data, admission, DP-SGD, evaluation.

``clients/app.py`` is thin glue that calls these functions from Flower's ClientApp
handlers. What a node does, per message:

* ``hello``: load its data set, validate it against the task's contract, plan its DP-SGD
  (the noise multiplier that keeps the whole task within its target epsilon) and answer
  whether it accepts. A refusal carries a code and a text, never a data value: the details
  of a validation failure stay at the node (its log and, when it has one, a file in its
  node directory).
* *train*: DP-SGD on its training split, with one accountant for the whole task whose
  history travels in the node's Flower state from round to round (never a fresh one per
  round, which would under-report epsilon), and a hard cap: a round that would take the
  node beyond its target is refused.
* *evaluate*: accuracy, loss and AUC of the global model on its own test split.

Validated and encoded data are cached per process (keyed by each file's SHA-256), so a node
does not re-read and re-validate its export every round; in a deployment that process is the
node's warm worker (:mod:`fedgov.deploy.worker`), which lives across messages, tasks and runs.
A SQL data set (the policy's ``[datasets.sql]``) is queried once per message and keyed by the
SHA-256 of its rows (:func:`fedgov.node.contracts.one_read`): unchanged rows hit the same cache.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from collections.abc import Callable
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from fedgov import protocol as P
from fedgov.privacy.plans import distributed_plan, node_evaluations, node_plan, task_delta
from fedgov.config import Contract, Task
from fedgov.errors import DataFileError, DataValidationError, ModelError, PrivacyError
from fedgov.errors import BudgetExceeded
from fedgov.node.policy import MIN_ROWS_LOCAL
from fedgov.node.refusals import Refusal, refusal_text

if TYPE_CHECKING:
    import pandas as pd

    from fedgov.config.datasource import DataSource

__all__ = [
    "PreparedData",
    "prepare",
    "hello",
    "DPState",
    "train",
    "evaluate_global",
    "local_only_baseline",
    "baseline",
    "Baseline",
    "ROW_COUNT_NOISE",
    "ROWS_NOTE",
    "public_row_count",
    "released_row_count",
    "describe_error",
    "model_dimension",
    "SentUpdates",
    "model_digest",
]

log = logging.getLogger(__name__)

MIN_TRAIN_ROWS = MIN_ROWS_LOCAL
"""The floor of ``limits.min_rows`` under local DP-SGD (:data:`fedgov.node.policy.MIN_ROWS_LOCAL`):
also without a policy (unit tests), a node trains with local DP-SGD on no fewer rows."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class PreparedData:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_features: int
    n_classes: int


_CACHE: OrderedDict[tuple[Any, ...], PreparedData] = OrderedDict()
_CACHE_BYTES = 512 * 2**20
"""The prepared data kept in one process, at most (least recently used first out): a warm
node worker holds its own node's; a simulation's worker holds the data of every virtual node
it serves (all 342 municipalities' Adult split: about 20 MiB)."""


def _file_key(path: DataSource | None) -> tuple[str, str] | None:
    """A file's identity for the caches: its path and the SHA-256 of its bytes (computed again
    only when its size or modification time changed), so that data is read again only when
    its content changed; a query's: its text and database, and the SHA-256 of its rows as this
    message read them (:func:`fedgov.node.contracts.one_read`)."""
    if path is None:
        return None
    from fedgov.config.datasource import source_id
    from fedgov.node.contracts import file_digest

    return (source_id(path), file_digest(path))


def prepare(task: Task, contract: Contract, train_path: DataSource, test_path: DataSource | None) -> PreparedData:
    """Read, validate and encode a node's data; cached while the files (or the query's rows)
    are unchanged.

    When a node directory is being served (:func:`fedgov.node.contracts.serving`), its
    recorded data check for the current files is looked up first (and made when the files
    changed): data that does not conform is not read here at all."""
    from fedgov.node.contracts import one_read

    with one_read():
        return _prepare(task, contract, train_path, test_path)


def _prepare(task: Task, contract: Contract, train_path: DataSource, test_path: DataSource | None) -> PreparedData:
    from fedgov.data import Encoder, train_test_split
    from fedgov.node.contracts import conforming_frame, require_conforming, source_exists, validated_frame

    if not source_exists(train_path):
        raise DataFileError(f"data file not found: {train_path}")
    if test_path is not None and not source_exists(test_path):
        raise DataFileError(f"test data file not found: {test_path}")
    require_conforming(contract, train_path)
    key = (_file_key(train_path), _file_key(test_path), contract.model_dump_json(), tuple(task.features or ()), task.training.seed)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    encoder = Encoder.from_contract(contract, task.features)
    columns = [*contract.feature_names(task.features), str(contract.target)]
    def validated(path: DataSource) -> pd.DataFrame:
        checked = conforming_frame(path, contract)  # this message's data check validated it all
        if checked is not None:
            return checked[list(dict.fromkeys(columns))]
        return validated_frame(path, contract, columns=columns)

    train_df = validated(train_path)
    if test_path is not None:
        test_df = validated(test_path)
    else:
        train_df, test_df = train_test_split(train_df, 0.2, task.training.seed)
    X_train, y_train = encoder.transform(train_df)
    X_test, y_test = encoder.transform(test_df)
    data = PreparedData(X_train, y_train, X_test, y_test, encoder.n_features, encoder.n_classes)
    _CACHE[key] = data
    while len(_CACHE) > 1 and sum(_nbytes(d) for d in _CACHE.values()) > _CACHE_BYTES:
        _CACHE.popitem(last=False)
    return data


def _one_read(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with each SQL query read at most once (:func:`fedgov.node.contracts.one_read`):
    a hello's data check, row count and plan, or a baseline's rounds, all see one snapshot."""

    @functools.wraps(fn)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        from fedgov.node.contracts import one_read

        with one_read():
            return fn(*args, **kwargs)

    return wrapped


def _nbytes(d: PreparedData) -> int:
    return d.X_train.nbytes + d.y_train.nbytes + d.X_test.nbytes + d.y_test.nbytes


def _seed(task: Task, node: str, server_round: int, salt: int = 0) -> int:
    return (task.training.seed * 1_000_003 + zlib.crc32(node.encode()) + 7919 * server_round + salt) % (2**31 - 1)


def model_dimension(task: Task, n_features: int, n_classes: int) -> int:
    """Numbers in the task's model (the length of an update)."""
    from fedgov.models import build_model

    model = build_model(task.model, n_features=n_features, n_classes=n_classes, seed=0)
    return int(sum(p.numel() for p in model.state_dict().values()))


@_one_read
def hello(
    task: Task,
    contract: Contract,
    *,
    node: str,
    node_name: str,
    train_path: DataSource,
    test_path: DataSource | None,
    workdir: Path | None = None,
    release_rows: Callable[[int], int] | None = None,
    min_rows: int = 0,
    min_rows_setting: str = "limits.min_rows",
) -> tuple[P.NodeHello, DPState]:
    """Check that this node can take part in ``task``; answer with acceptance or a refusal.

    Also returns the node's fresh accountant for the task, with the DP plan fixed now.

    The true row count meets only fixed thresholds that the coordinator cannot move: the
    policy's ``min_rows`` for the task's privacy mode (:func:`fedgov.node.policy.min_rows_for`,
    ``min_rows_setting`` names it), and under local DP-SGD at least :data:`MIN_TRAIN_ROWS` (one
    bit, the same for every task of a mode). The refusal names the setting and the minimum.
    Distributed DP needs no floor: the guarantee is per node and the noise is on the sum.
    Every decision that depends on the size through the task's parameters (whether the privacy
    target can be met, the DP-SGD plan, delta, the noise minimum, the FedAvg weight) is taken
    on the node's *released* row count, ``release_rows(n)``: the true count with Gaussian noise,
    released once per version of the data set through the ledger (:func:`released_row_count`).
    So the answers to any number of hellos, whatever their parameters, say nothing about the
    data beyond that one noisy count and that one bit. Without ``release_rows`` (unit tests)
    the true count is used.
    """
    from fedgov.models import build_model, make_dp_compatible

    def refuse(code: P.RefusalCode, reason: str) -> tuple[P.NodeHello, DPState]:
        log.warning("node %s refuses task %s: %s", node, task.name, code.value)
        return P.NodeHello(node=node, node_name=node_name, accepted=False, code=code, reason=reason), DPState(history=[])

    try:
        data = prepare(task, contract, train_path, test_path)
    except DataFileError:
        return refuse(P.RefusalCode.DATA_MISSING, refusal_text("data-missing", contract=contract.ref))
    except DataValidationError as exc:
        # The problems name rows and found values: they stay at the node, in a report only its
        # user can read; the coordinator and the log learn only that the data does not conform.
        if workdir is not None and exc.problems:
            from fedgov.node.contracts import append_private

            append_private(workdir, f"validation-{task.name}.txt", str(exc) + "\n")
        return refuse(P.RefusalCode.DATA_INVALID, refusal_text("data-invalid", contract=contract.ref))
    distributed = task.privacy.enabled and task.privacy.mode == "distributed"
    floor = max(1, min_rows) if distributed else max(MIN_TRAIN_ROWS, min_rows)
    if len(data.y_train) < floor:  # a fixed threshold: one bit, no budget spent
        return refuse(P.RefusalCode.TOO_FEW_ROWS, refusal_text("too-few-rows", setting=min_rows_setting, limit=floor))
    try:
        n = public_row_count(release_rows(len(data.y_train))) if release_rows is not None else len(data.y_train)
    except BudgetExceeded:
        return refuse(P.RefusalCode.BUDGET_EXHAUSTED, refusal_text("budget-exhausted", setting="datasets.budget"))
    try:
        make_dp_compatible(build_model(task.model, n_features=data.n_features, n_classes=data.n_classes, seed=task.training.seed))
    except ModelError:
        return refuse(P.RefusalCode.MODEL_REJECTED, refusal_text("model-rejected", value=task.model.name))
    sigma = planned = z_eval = None
    delta = task_delta(task, n)
    dp = DPState(history=[], rows=n)
    if task.privacy.enabled:
        try:
            if task.privacy.mode == "distributed":
                plan = distributed_plan(task, model_dimension(task, data.n_features, data.n_classes))
                dp.plan_json = plan.model_dump_json()
            else:
                plan = dp.plan(task, n)
        except PrivacyError:
            return refuse(P.RefusalCode.PRIVACY_UNREACHABLE, refusal_text("privacy-unreachable"))
        sigma, planned = plan.noise_multiplier, plan.planned_epsilon
        z_eval = getattr(plan, "evaluation_noise", None)
    else:
        log.warning("node %s: task %s trains WITHOUT differential privacy (privacy.enabled = false)", node, task.name)
    hello_answer = P.NodeHello(
        node=node,
        node_name=node_name,
        accepted=True,
        train_rows=n,  # the released (noisy) count
        test_rows=0,  # not released: evaluations send noisy counts of their own
        delta=delta,
        noise_multiplier=sigma,
        planned_epsilon=planned,
        evaluation_noise=z_eval,
    )
    return hello_answer, dp


ROW_COUNT_NOISE = 20.0
"""Standard deviation of the Gaussian noise on a data set's released training row count
(sensitivity 1: one record more or less). Its ledger entry is ``(20, 1, 1)``: alone about
epsilon 0.17 at delta 1e-5 (PRV); composed with the demo task's DP-SGD by the accountant it adds 0.011."""

ROWS_NOTE = "released-train-rows="


def public_row_count(released: int) -> int:
    """The row count a node works with and reports: its released (noisy) count, at least 2 (the
    plan's Poisson sampling needs two batches' worth). The clamp is public, a function of the
    release alone, so the reply that carries it releases nothing more."""
    return max(2, int(released))


def _file_sha256(path: DataSource) -> str:
    from fedgov.node.contracts import file_digest

    return file_digest(path)


def released_row_count(home: Any, contract: Contract, train_path: DataSource, n: int) -> int:
    """The node's released training row count for the data set serving ``contract``: ``n``
    plus Gaussian noise (standard deviation :data:`ROW_COUNT_NOISE`, the secure generator),
    rounded and at least 0. Released once per version of the data file (its SHA-256; of a SQL
    data set, the SHA-256 of the query's rows, whatever their order): the
    ledger records the release (a reservation, its spend with the value in the note, and its
    close, under the key ``rows-<data set>-<sha>``) before the value is used, and every later
    hello reads it back from the ledger, so repeating hellos cannot average the noise away.
    :class:`~fedgov.node.ledger.BudgetExceeded` when the budget cannot pay for it."""
    from fedgov.privacy.events import Mechanism
    from fedgov.node.home import budget_of
    from fedgov.privacy.rng import SecureRNG

    ds = home.policy().dataset_for(contract)
    if ds is None:
        raise DataFileError(f"the node's policy serves no data set under {contract.ref}")
    key = f"rows-{ds.name}-{_file_sha256(train_path)[:16]}"
    for ev in home.ledger.events(ds.name):
        if ev.task_id == key and ev.kind == "spend" and ev.note.startswith(ROWS_NOTE):
            return int(ev.note[len(ROWS_NOTE):])
    value = max(0, int(round(n + ROW_COUNT_NOISE * float(SecureRNG.fresh().standard_normal(1, np.float64)[0]))))
    mechanism = Mechanism.dpsgd([(ROW_COUNT_NOISE, 1.0, 1)])
    home.ledger.reserve(dataset=ds.name, task_id=key, mechanism=mechanism, budget=budget_of(ds))
    home.ledger.spend(dataset=ds.name, task_id=key, mechanism=mechanism, round=0, note=f"{ROWS_NOTE}{value}")
    home.ledger.release(dataset=ds.name, task_id=key, note="row count released")
    if home.path.is_dir():
        home.audit.append("release", task_id=key, payload={"dataset": ds.name, "released_train_rows": value,
                                                          "mechanism": [ROW_COUNT_NOISE, 1.0, 1]})
    return value


@dataclass
class DPState:
    """The node's accountant for one task, as plain data: the plan fixed at admission and
    the DP-SGD steps taken so far (Opacus' accountant history)."""

    history: list[tuple[float, float, int]]
    epsilon: float = 0.0
    plan_json: str | None = None
    rows: int | None = None  # the released (noisy) training row count, fixed at hello

    def to_json(self) -> str:
        import json

        return json.dumps({"history": self.history, "epsilon": self.epsilon, "plan": self.plan_json, "rows": self.rows})

    @classmethod
    def from_json(cls, text: str | None) -> DPState:
        import json

        if not text:
            return cls(history=[])
        raw = json.loads(text)
        return cls(
            history=[(float(s), float(q), int(k)) for s, q, k in raw["history"]],
            epsilon=float(raw["epsilon"]),
            plan_json=raw.get("plan"),
            rows=None if raw.get("rows") is None else int(raw["rows"]),
        )

    def fixed_plan(self, task: Task) -> Any:
        """The plan fixed at admission (hello), as it is: never recalibrated."""
        from fedgov.privacy import DPPlan

        if not self.plan_json:
            raise PrivacyError("no DP plan at this node for this task: the node did not admit it (hello)")
        if task.privacy.mode == "distributed":
            from fedgov.privacy.distributed import DistributedPlan

            return DistributedPlan.model_validate_json(self.plan_json)
        return DPPlan.model_validate_json(self.plan_json)

    def plan(self, task: Task, rows: int) -> Any:
        """The plan fixed at admission, or (first use in this process) a fresh calibration.

        Distributed mode: the :class:`~fedgov.privacy.distributed.DistributedPlan` fixed at hello."""
        from fedgov.privacy import DPPlan

        if task.privacy.mode == "distributed":
            from fedgov.privacy.distributed import DistributedPlan

            if not self.plan_json:
                raise PrivacyError("no distributed-DP plan: the node did not admit this task (hello)")
            return DistributedPlan.model_validate_json(self.plan_json)
        if self.plan_json:
            plan = DPPlan.model_validate_json(self.plan_json)
            if (plan.rows == rows and plan.rounds == task.training.rounds and plan.target_epsilon == task.privacy.target_epsilon
                    and plan.evaluations == node_evaluations(task)):
                return plan
        plan = node_plan(task, rows)
        self.plan_json = plan.model_dump_json()
        return plan


def _model(task: Task, data: PreparedData, state: dict[str, np.ndarray] | None) -> Any:
    from fedgov.models import build_model, make_dp_compatible, set_state

    model = make_dp_compatible(build_model(task.model, n_features=data.n_features, n_classes=data.n_classes, seed=task.training.seed))
    if state is not None:
        set_state(model, state)
    return model


@_one_read
def train(
    task: Task,
    contract: Contract,
    *,
    node: str,
    train_path: DataSource,
    test_path: DataSource | None,
    state: dict[str, np.ndarray],
    server_round: int,
    dp: DPState,
) -> tuple[dict[str, np.ndarray], dict[str, float], DPState]:
    """One round of local training from the global ``state``; returns state, metrics, accountant."""
    from fedgov.node.training import train_dp_round, train_nonprivate_round

    data = prepare(task, contract, train_path, test_path)
    model = _model(task, data, state)
    # Noise and sampling come from the OS's entropy: a seed the coordinator knows would let it
    # regenerate and subtract the noise. Only an explicit reproducible_noise derives them.
    seed = _seed(task, node, server_round) if task.privacy.reproducible_noise else None
    if task.privacy.reproducible_noise:
        log.warning("node %s: reproducible_noise is on: DP noise is derived from the task seed (simulation only)", node)
    # the released row count fixed at hello: plan, delta and the FedAvg weight depend on it only
    n = dp.rows if dp.rows is not None else len(data.y_train)
    delta = task_delta(task, n)
    global_state = state if task.training.strategy == "fedprox" else None
    if task.privacy.enabled and task.privacy.mode == "distributed":
        # Local training without noise: the update is clipped and noised as a whole, in the
        # secure-aggregation mod (fedgov.node.secure.mask_update), before it is masked and sent.
        from fedgov.privacy import epsilon_from_history, merge_history

        plan = dp.plan(task, n)
        res = train_nonprivate_round(model, data.X_train, data.y_train, training=task.training, seed=seed, global_state=global_state)
        history = merge_history(list(dp.history) + [plan.round_entry()])
        eps = epsilon_from_history(history=history, delta=plan.delta, accountant=plan.accountant)
        if eps > plan.target_epsilon:
            raise PrivacyError(f"refusing to train: this round would take epsilon to {eps:.3f}, beyond the target {plan.target_epsilon}")
        dp = DPState(history=list(history), epsilon=eps, plan_json=dp.plan_json, rows=dp.rows)
        sigma, q = plan.noise_multiplier, plan.sample_rate
        steps = 1  # one release of the update per round
    elif task.privacy.enabled:
        plan = dp.plan(task, n)
        res = train_dp_round(
            model, data.X_train, data.y_train,
            training=task.training, privacy=task.privacy, plan=plan,
            history=dp.history, seed=seed, global_state=global_state,
        )
        dp = DPState(history=list(res.history), epsilon=float(res.epsilon or 0.0), plan_json=dp.plan_json, rows=dp.rows)
        sigma, q = plan.noise_multiplier, plan.sample_rate
        steps = res.steps
    else:
        res = train_nonprivate_round(model, data.X_train, data.y_train, training=task.training, seed=seed, global_state=global_state)
        sigma, q = 0.0, 0.0
        steps = res.steps
    metrics = {
        "num-examples": float(n),
        "train-loss": float(res.train_loss),
        "epsilon": float(dp.epsilon) if task.privacy.enabled else float("inf"),
        "delta": float(delta),
        "noise-multiplier": float(sigma),
        "sample-rate": float(q),
        "steps": float(steps),
    }
    return res.state, metrics, dp


@_one_read
def evaluate_global(
    task: Task, contract: Contract, *, train_path: DataSource, test_path: DataSource | None, state: dict[str, np.ndarray],
    evaluation_noise: float | None,
) -> dict[str, float]:
    """The global model on this node's own test split, as it may leave the node: the correct
    and total counts, each with Gaussian noise of standard deviation ``evaluation_noise *
    sqrt(2)`` (the counts' L2 sensitivity to one record is sqrt(2)) drawn from a
    cryptographically secure generator. The spend, ``(evaluation_noise, 1, 1)``, is recorded in
    the ledger before this runs (``clients.mods.budget_mod``). Exact counts only for a task
    without DP (which the node's policy must allow). Accuracy is their ratio, at the coordinator."""
    from fedgov.models import evaluate

    data = prepare(task, contract, train_path, test_path)
    m = evaluate(_model(task, data, state), data.X_test, data.y_test)
    total = float(len(data.y_test))
    correct = float(round(m.accuracy * total))
    if evaluation_noise is not None:
        from fedgov.privacy.rng import SecureRNG

        noise = SecureRNG.fresh().standard_normal(2, np.float64) * (evaluation_noise * math.sqrt(2.0))
        correct, total = correct + float(noise[0]), total + float(noise[1])
    elif task.privacy.enabled:
        raise PrivacyError("no evaluation noise planned at this node for a task with DP")
    return {"num-examples": 1.0, "correct": correct, "total": total}


@dataclass(frozen=True)
class Baseline:
    accuracy: float
    epsilon: float


@_one_read
def local_only_baseline(
    task: Task, contract: Contract, train_path: DataSource, test_path: DataSource | None, *, node: str, plan_json: str | None = None,
    rows: int | None = None,
) -> Baseline:
    """The same model trained on this node's data alone, with the same DP guarantee and rounds.

    It answers "what do we gain by joining?" in a simulation (a deployed node refuses to
    compute it). It is computed apart from the node's budget, and the report labels it so:
    ``epsilon`` is what it would cost, not a spend in the ledger. Under distributed DP each
    round's update is clipped to ``update_clip`` and gets the whole noise of the sum
    (standard deviation ``z * sensitivity * scale`` per coordinate, from the secure generator),
    as a municipality alone would need for the same guarantee.
    """
    from fedgov.models import get_state
    from fedgov.models import evaluate

    data = prepare(task, contract, train_path, test_path)
    model_state = get_state(_model(task, data, None))
    dp = DPState(history=[], plan_json=plan_json, rows=rows)
    distributed = task.privacy.enabled and task.privacy.mode == "distributed"
    for r in range(1, task.training.rounds + 1):
        before = model_state
        model_state, _, dp = train(
            task, contract, node=node, train_path=train_path, test_path=test_path,
            state=model_state, server_round=r, dp=dp,
        )
        if distributed:
            model_state = _noised_alone(before, model_state, dp.plan(task, 0))
    m = evaluate(_model(task, data, model_state), data.X_test, data.y_test)
    return Baseline(accuracy=float(m.accuracy), epsilon=dp.epsilon if task.privacy.enabled else float("inf"))


def baseline(
    task: Task, contract: Contract, train_path: DataSource, test_path: DataSource | None, *, node: str, simulated: bool, dp: DPState
) -> Refusal | Baseline:
    """The local-only baseline a simulation's report compares with (:func:`local_only_baseline`),
    from the plan and released row count fixed at hello (``dp``): its accuracy and, as its
    epsilon, the task's own target (what it would cost: it is computed apart from the node's
    budget). A deployed node refuses it (``baseline-not-offered``): it would be a second
    release of the node's data."""
    if not simulated:
        return Refusal("baseline-not-offered")
    base = local_only_baseline(task, contract, train_path, test_path, node=node, plan_json=dp.plan_json, rows=dp.rows)
    return Baseline(accuracy=base.accuracy, epsilon=task.privacy.target_epsilon if task.privacy.enabled else float("inf"))


def _noised_alone(before: dict[str, np.ndarray], after: dict[str, np.ndarray], plan: Any) -> dict[str, np.ndarray]:
    """One round of a lone municipality under distributed DP: the update clipped to the plan's
    ``clip`` and noised with the standard deviation the round's sum gets."""
    from fedgov.privacy.rng import SecureRNG

    keys = list(before)
    update = np.concatenate([(after[k].astype(np.float64) - before[k].astype(np.float64)).ravel() for k in keys])
    norm = float(np.linalg.norm(update))
    if norm > plan.clip:
        update *= plan.clip / norm
    # the sum's noise in model units: z times the integer vector's L2 sensitivity, times the scale
    update += SecureRNG.fresh().standard_normal(update.size, np.float64) * (plan.noise_multiplier * plan.sensitivity * plan.scale)
    out: dict[str, np.ndarray] = {}
    at = 0
    for k in keys:
        size = before[k].size
        out[k] = (before[k].astype(np.float64) + update[at : at + size].reshape(before[k].shape)).astype(before[k].dtype)
        at += size
    return out


def describe_error(exc: BaseException, *, contract: str | None = None) -> str:
    """The text for an error that goes back to the coordinator: a fixed template
    (:mod:`fedgov.node.refusals`), never the exception's own text, which may hold data values."""
    if contract is not None and isinstance(exc, DataValidationError):
        return refusal_text("data-invalid", contract=contract)
    if contract is not None and isinstance(exc, DataFileError):
        return refusal_text("data-missing", contract=contract)
    return refusal_text("internal-error")


def model_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of a model's arrays (names, shapes, dtypes and bytes, in order)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in arrays.items():
        a = np.ascontiguousarray(v)
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class SentUpdates:
    """The last update a node sent for each task, kept in its node directory (``sent/``).

    When a coordinator crashes after a node trained a round but before it saved that round,
    the resumed coordinator asks for the same round again, from the same global model. The
    node then sends the same update again instead of training (and spending) a second time:
    it already left the node, so resending it releases nothing new. Kept until the task ends.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def _path(self, task_id: str) -> Path:
        import hashlib

        return self.dir / (hashlib.sha256(task_id.encode()).hexdigest() + ".npz")

    def save(self, task_id: str, server_round: int, global_digest: str, arrays: dict[str, np.ndarray], metrics: dict[str, float]) -> None:
        import io
        import json

        from fedgov.data.io import atomic_write_bytes

        self.dir.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"task_id": task_id, "round": server_round, "global": global_digest, "metrics": metrics, "keys": list(arrays)})
        buf = io.BytesIO()
        named: dict[str, Any] = {f"a{i}": np.asarray(v) for i, v in enumerate(arrays.values())}
        np.savez(buf, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **named)
        atomic_write_bytes(self._path(task_id), buf.getvalue())

    def load(self, task_id: str, server_round: int, global_digest: str) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
        """The update sent for ``server_round`` from the model ``global_digest``, if it was the last."""
        import json

        path = self._path(task_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["__meta__"].tobytes().decode())
                if meta["task_id"] != task_id or meta["round"] != server_round or meta["global"] != global_digest:
                    return None
                arrays = {k: z[f"a{i}"] for i, k in enumerate(meta["keys"])}
        except Exception:  # noqa: BLE001 - a damaged copy is no copy: the node trains again
            log.warning("node: the copy of the last sent update is unreadable; ignoring it", exc_info=True)
            return None
        return arrays, {k: float(v) for k, v in meta["metrics"].items()}

    def drop(self, task_id: str) -> None:
        self._path(task_id).unlink(missing_ok=True)
