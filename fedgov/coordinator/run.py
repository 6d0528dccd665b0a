"""The coordinator's side of a training task, on Flower's Message API.

``server/app.py`` is thin glue that calls :func:`run_training`. The coordinator

1. waits, for a bounded time, until the expected nodes are connected
   (:func:`fedgov.coordinator.grid.wait_for_nodes`);
2. asks every node ``hello`` with the task and its contract; a node answers whether it
   accepts, and if not, why (a machine-readable code and a text). Training goes on with the
   nodes that accepted if at least ``training.min_nodes`` did, and stops with a clear
   message otherwise;
3. runs the task's Flower strategy (``flwr.serverapp.strategy``, wrapped by
   :class:`fedgov.coordinator.recording.Recording`) over the accepted nodes only, recording
   per round what each node sent and evaluating the global model on the held-out test set
   (:class:`fedgov.coordinator.evaluation.CentralEvaluator`), with a checkpoint after every
   round (:mod:`fedgov.coordinator.checkpoint`);
4. writes ``report.json`` and the final model into the run directory.

The run is a sequence of steps over one small state object (:class:`_Run`); each step is a
function of its own, in the order :func:`run_training` calls them.

FedAvg: McMahan et al. 2017, arXiv:1602.05629. FedProx: Li et al. 2020, arXiv:1812.06127.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from pydantic import BaseModel, ConfigDict, Field

import fedgov
from fedgov import protocol as P
from fedgov.config import Contract, Task
from fedgov.coordinator.aggregation import metric_values
from fedgov.coordinator.checkpoint import Checkpoint, load_checkpoint, load_momentum, save_checkpoint
from fedgov.coordinator.evaluation import CentralEvaluator
from fedgov.coordinator.events import EventWriter
from fedgov.coordinator.grid import AdmittedGrid, end_task, hello, query_messages, task_config, wait_for_nodes
from fedgov.coordinator.recording import Recorder, build_strategy, momentum_state, restore_momentum
from fedgov.errors import FederationError
from fedgov.privacy.distributed import DistributedPlan
from fedgov.reports import (
    POOLED_LABEL, SIMULATED_POOLED_LABEL, GlobalMetrics, NodeResult, PooledMetrics, TrainingReport, check_learning, refusal_lines, write_json_atomic,
)

__all__ = ["TrainingOptions", "run_training"]

log = logging.getLogger(__name__)


class TrainingOptions(BaseModel):
    """How one training run is run: where it writes, whom it waits for, how long (all keywords)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Path = Field(description="the run directory: report.json, events.jsonl, checkpoint/, model.pt")
    expected_nodes: int = Field(description="how many nodes to wait for before asking hello")
    task_file: str = Field(description="the task file, as the report and the checkpoint name it")
    federation: str = Field(description="the federation's name in the report, or '(deployment)'")
    federation_file: str = Field(default="", description="the federation file (simulation), kept in the checkpoint")
    mode: Literal["simulation", "deployment"] = "simulation"
    connect_timeout: float = Field(default=120.0, description="seconds to wait for nodes (also for missing admitted nodes)")
    reply_timeout: float = Field(default=600.0, description="seconds to wait for the nodes' replies to one message")
    local_baseline: bool = Field(default=True, description="ask each node for its local-only model's accuracy at the end")
    flower_run_id: int | None = Field(default=None, description="the Flower run id: the run part of the nodes' ledger key")
    simulated_test: dict[str, Path] | None = Field(
        default=None,
        description="simulation only: each simulated node's test split, which the simulation wrote; read for the exact "
        "pooled figure (and the learning check) of a run whose nodes released no evaluation",
    )
    resume: bool = Field(default=False, description="continue from the last checkpoint in run_dir")


@dataclass
class _Run:
    """What one training run holds between its steps."""

    grid: Grid
    task: Task
    contract: Contract
    options: TrainingOptions
    report: TrainingReport
    events: EventWriter
    resumed: Checkpoint | None  # the checkpoint a resumed run continues from
    resumed_arrays: dict[str, np.ndarray]
    task_run: str  # the run part of the nodes' ledger key (the original run's, when resumed)
    extra: dict[str, str] = field(default_factory=dict)  # added to every message (a resumed run's ledger key)
    names: dict[int, str] = field(default_factory=dict)  # Flower node id -> the node's name
    admitted: list[int] = field(default_factory=list)
    recorder: Recorder | None = None
    evaluator: CentralEvaluator | None = None
    # Interrupted (SIGTERM, Ctrl-C, the process ending): the nodes are not told the task
    # ended, so that their reservations stay open and the run can be resumed from its checkpoint.
    interrupted: bool = True
    final: ArrayRecord | None = None  # the final global model: sent with baseline and end (personal models)

    @property
    def config(self) -> dict[str, str]:
        """What every message to a node carries: the task, its contract, and :attr:`extra`."""
        return {**task_config(self.task, self.contract), **self.extra}


def run_training(
    grid: Grid, task: Task, contract: Contract, options: TrainingOptions | None = None, /, **fields: Any
) -> TrainingReport:
    """Run a training task over the nodes connected to ``grid``; write and return the report.

    ``options`` (:class:`TrainingOptions`) say where and how; ``fields`` are the same options
    as keywords (``run_training(grid, task, contract, run_dir=..., expected_nodes=...)``),
    validated as strictly. After every round a checkpoint is written to ``run_dir/checkpoint``.
    With ``resume``, the run continues from the last checkpoint in ``run_dir``: the nodes are
    asked again (and continue their reservation for the original run), the remaining rounds
    run from the saved model, and the report holds all rounds.
    """
    if options is not None and fields:
        raise TypeError("run_training takes a TrainingOptions or its fields as keywords, not both")
    run = _start(grid, task, contract, options if options is not None else TrainingOptions.model_validate(fields))
    try:
        _check_resume(run)
        _admit(run)
        recorder, evaluator = _observers(run)
        result = _train(run, recorder, evaluator)
        _complete(run, result, recorder, evaluator)
    except Exception as exc:  # the report must say what happened, whatever it was
        _fail(run, exc)
    finally:
        _close(run)
    return run.report


def _start(grid: Grid, task: Task, contract: Contract, options: TrainingOptions) -> _Run:
    """The run directory, its event log, the checkpoint to resume from, and a new report."""
    options.run_dir.mkdir(parents=True, exist_ok=True)
    events = EventWriter(options.run_dir / "events.jsonl")
    resumed: Checkpoint | None = None
    resumed_arrays: dict[str, np.ndarray] = {}
    if options.resume:
        resumed, resumed_arrays = load_checkpoint(options.run_dir)
    report = TrainingReport(
        fedgov_version=fedgov.__version__,
        run_id=options.run_dir.name,
        task=task.name,
        task_file=options.task_file,
        federation=options.federation,
        federation_file=options.federation_file,
        contract=contract.ref,
        mode=options.mode,
        flower_run_id=options.flower_run_id,
        started=datetime.now(timezone.utc),
        model=task.model.name,
        strategy=task.training.strategy,
        server_momentum=task.server_momentum,
        rounds_planned=task.training.rounds,
        privacy=_privacy_summary(task),
    )
    events.emit("started", task=task.name, mode=options.mode, flower_run_id=options.flower_run_id)
    task_run = str(options.flower_run_id) if options.flower_run_id is not None else ""
    return _Run(grid, task, contract, options, report, events, resumed, resumed_arrays, task_run)


def _privacy_summary(task: Task) -> dict[str, float | str | bool | None]:
    """The report's ``privacy`` section: what protects whom, and what the nodes release."""
    p = task.privacy
    distributed = p.mode == "distributed"
    return {
        "enabled": p.enabled,
        "target_epsilon": p.target_epsilon,
        "delta": p.delta,
        "max_grad_norm": p.max_grad_norm,
        "accountant": p.accountant,
        "mode": p.mode,
        "unit": (
            "municipality (client-level DP-FedAvg: each node's clipped update with a share of distributed "
            "discrete Gaussian noise, summed under secure aggregation); a citizen's records are part of one "
            "municipality's data, so each citizen has at least the same guarantee"
            if distributed else "record (sample-level DP-SGD at each node)"
        ),
        "dropout_tolerance": p.dropout_tolerance if distributed else None,
        "secure_aggregation": task.training.secure_aggregation,
        "evaluation_at_nodes": task.evaluation.at_nodes if p.mode == "local" else "off",
        "evaluation_epsilon": task.evaluation.epsilon if p.mode == "local" else 0.0,
        "released_by_nodes": (
            "the masked update (secure aggregation)" if task.training.secure_aggregation else "the DP-SGD update"
        ) + ", and noisy correct/total counts for evaluations; no row counts, losses or per-node epsilon (their "
        "release gate keeps them)",
        "local_only_baseline": "simulation only, computed apart from each node's budget (what it would cost: the task's target)",
        "personal_models": (
            "each node keeps the final global model or that model fine-tuned on its own rows, whichever is better on a "
            "validation split of its own; it stays at the node (fedgov node model) and a deployed node sends nothing about "
            "it; its accuracy in this report is a simulation's exact figure, apart from the budget like the local-only one"
            if task.personal.enabled else "off"
        ),
    }


def _check_resume(run: _Run) -> None:
    """A resumed run: the checkpoint must be of this task, and the nodes continue its ledger key."""
    ckpt = run.resumed
    if ckpt is None:
        return
    if ckpt.task_fingerprint != P.fingerprint(run.task, run.contract):
        raise FederationError(
            f"the checkpoint in {run.options.run_dir} is of another version of task {ckpt.task} "
            f"(fingerprint {ckpt.task_fingerprint}); a changed task cannot be resumed"
        )
    if not ckpt.task_run:
        raise FederationError(f"the checkpoint in {run.options.run_dir} names no Flower run; it cannot be resumed")
    run.task_run = ckpt.task_run
    run.extra[P.TASK_RUN] = run.task_run
    run.events.emit("resumed", round=ckpt.round, rounds=run.task.training.rounds, task_run=run.task_run)


def _admit(run: _Run) -> None:
    """Wait for the nodes, ask each ``hello``, and record who accepted; stop below ``training.min_nodes``."""
    opts, report = run.options, run.report
    node_ids = wait_for_nodes(run.grid, opts.expected_nodes, opts.connect_timeout)
    run.events.emit("nodes-connected", count=len(node_ids), expected=opts.expected_nodes)
    answers = hello(run.grid, node_ids, run.config, timeout=opts.reply_timeout)
    run.names = {nid: a.node for nid, a in answers.items()}
    report.nodes.extend(_node_result(a, run.task, run.contract) for a in sorted(answers.values(), key=lambda a: a.node))
    run.admitted = [nid for nid, a in answers.items() if a.accepted]
    refused = [a for a in answers.values() if not a.accepted]
    run.events.emit(
        "admission",
        accepted=sorted(run.names[n] for n in run.admitted),
        refused={a.node: f"{a.code or ''}: {a.reason}" for a in refused},
    )
    if len(run.admitted) < run.task.training.min_nodes:
        # A few lines by reason, however many nodes refused; every node's reason is in the report.
        lines = refusal_lines((a.node, f"{a.code or '?'}: {a.reason}") for a in sorted(refused, key=lambda a: a.node))
        raise FederationError(
            f"only {len(run.admitted)} of {len(node_ids)} connected nodes accepted the task; "
            f"it needs at least {run.task.training.min_nodes} (training.min_nodes). Refused:\n"
            + "\n".join(f"  {line}" for line in lines)
            + "\nEvery node's answer is in the report's nodes (report.json)."
        )


def per_citizen(task: Task, contract: Contract, epsilon: float | None, delta: float | None) -> str:
    """What a node's ``epsilon`` means for one citizen in its data, from public facts only: the
    task's privacy mode and the contract's person identifier."""
    if not task.privacy.enabled:
        return "no differential privacy: nothing bounds what the updates reveal about a citizen"
    if epsilon is None:
        return ""
    d = f" (delta {delta:g})" if delta is not None else ""
    if task.privacy.mode == "distributed":
        return (
            f"epsilon {epsilon:.2f}{d} for the municipality's whole data set, so for every citizen in it, "
            "however many of its records are theirs"
        )
    if contract.person_id is None:
        return (
            f"epsilon {epsilon:.2f}{d} per record; the contract names no person identifier, so a record is taken "
            "to be one citizen: epsilon per citizen"
        )
    return (
        f"epsilon {epsilon:.2f}{d} per record; a citizen with k records ({contract.person_id}) has k times "
        "epsilon (group privacy)"
    )


def _node_result(a: P.NodeHello, task: Task, contract: Contract) -> NodeResult:
    return NodeResult(
        node=a.node,
        name=a.node_name,
        status="accepted" if a.accepted else "refused",
        refusal_code=a.code,
        refusal_reason=a.reason,
        # the node's planned epsilon (the task's target, which its plan keeps), and its
        # released row count (Gaussian noise, in its ledger) with the delta and noise
        # multiplier computed from it
        epsilon=a.planned_epsilon,
        per_citizen=per_citizen(task, contract, a.planned_epsilon, a.delta) if a.accepted else "",
        train_rows=a.train_rows,
        delta=a.delta,
        noise_multiplier=a.noise_multiplier,
        evaluation_noise=a.evaluation_noise,
    )


def _observers(run: _Run) -> tuple[Recorder, CentralEvaluator]:
    """The recorder of what the strategy sees, and the evaluator on the held-out set."""
    run.recorder = Recorder(run.names, run.events)
    run.evaluator = CentralEvaluator(run.task, run.contract, run.recorder, run.events)
    run.report.majority_rate = run.evaluator.majority_rate()
    return run.recorder, run.evaluator


def _train(run: _Run, recorder: Recorder, evaluator: CentralEvaluator) -> Result:
    """The rounds still to run, from the initial model or the checkpoint's, through Flower's strategy."""
    task, opts = run.task, run.options
    done, initial = _initial_model(run, recorder, evaluator)
    parameters = int(sum(np.asarray(v).size for v in initial.values()))
    run.report.model_parameters = parameters
    strategy = build_strategy(
        task, len(run.admitted), recorder, round_offset=done, stage_config=run.config, distributed=_distributed(run, parameters),
    )
    evaluator.round_offset = done
    keys = list(initial)
    if run.resumed is not None and (momentum := load_momentum(opts.run_dir)) is not None:
        restore_momentum(strategy.strategy, momentum, keys)  # as an uninterrupted run would have it
    evaluator.after_round = functools.partial(_save_checkpoint, run, recorder, strategy.strategy, keys)
    cfg = ConfigRecord({**run.config, "num-rounds": task.training.rounds})
    run.events.emit("training-start", nodes=len(run.admitted), rounds=task.training.rounds, first_round=done + 1)
    return strategy.start(
        grid=AdmittedGrid(run.grid, run.admitted, min_nodes=min(task.training.min_nodes, len(run.admitted)), patience=opts.connect_timeout),
        initial_arrays=ArrayRecord({k: Array(np.asarray(v)) for k, v in initial.items()}),
        num_rounds=task.training.rounds - done,
        timeout=opts.reply_timeout,
        train_config=cfg,
        evaluate_config=ConfigRecord(dict(cfg)),
        evaluate_fn=evaluator,
    )


def _initial_model(run: _Run, recorder: Recorder, evaluator: CentralEvaluator) -> tuple[int, dict[str, np.ndarray]]:
    """The rounds already done and the model to start from: the checkpoint's (resumed), or a new one."""
    from fedgov.models import build_model, get_state

    ckpt = run.resumed
    if ckpt is not None:
        recorder.restore(ckpt.rounds, ckpt.node_train, ckpt.node_rounds, ckpt.node_eval)
        return ckpt.round, run.resumed_arrays
    enc = evaluator.encoder
    model = build_model(run.task.model, n_features=enc.n_features, n_classes=enc.n_classes, seed=run.task.training.seed)
    return 0, get_state(model)


def _distributed(run: _Run, parameters: int) -> DistributedPlan | None:
    """The task's distributed-DP plan (None unless ``privacy.mode = "distributed"``), also in the report."""
    if not (run.task.privacy.enabled and run.task.privacy.mode == "distributed"):
        return None
    from fedgov.privacy.plans import distributed_plan

    dplan = distributed_plan(run.task, parameters)
    run.report.privacy.update({
        "noise_multiplier": dplan.noise_multiplier, "update_clip": dplan.clip, "sample_rate": dplan.sample_rate,
        "planned_epsilon": dplan.planned_epsilon, "delta": dplan.delta,
    })
    return dplan


def _save_checkpoint(run: _Run, recorder: Recorder, strategy: Strategy, keys: list[str], r: int, arrays: ArrayRecord) -> None:
    """After round ``r``: the rounds so far into the report, and the checkpoint to resume from."""
    task, opts, report = run.task, run.options, run.report
    report.rounds = [recorder.rounds[k] for k in sorted(recorder.rounds) if k > 0]
    state = Checkpoint(
        task=task.name, task_file=opts.task_file, task_fingerprint=P.fingerprint(task, run.contract),
        federation=opts.federation_file or opts.federation, mode=opts.mode, task_run=run.task_run, round=r,
        rounds_planned=task.training.rounds, strategy=type(strategy).__name__,
        nodes_admitted=sorted(run.names[n] for n in run.admitted), nodes=report.nodes, rounds=report.rounds,
        majority_rate=report.majority_rate, model_file="", model_sha256="", **recorder.state(),
    )
    save_checkpoint(opts.run_dir, state, {k: v.numpy() for k, v in arrays.items()}, momentum_state(strategy, keys))
    run.events.emit("checkpoint", round=r)
    _pause_for_crash_test(r)


#: Fault injection for the crash-and-resume tests: with this variable set to a round number, the
#: ServerApp waits after that round's checkpoint (for at most ``_CRASH_TEST_WAIT`` seconds) for
#: the test to kill the coordinator, so the kill falls at a defined point and not, by the speed
#: of the machine, in the middle of the next round's first messages. Unset in any real run.
CRASH_TEST_ENV = "FEDGOV_TEST_PAUSE_AFTER_CHECKPOINT"
_CRASH_TEST_WAIT = 300.0


def _pause_for_crash_test(r: int) -> None:
    if os.environ.get(CRASH_TEST_ENV) != str(r):
        return
    log.warning("%s=%d: the ServerApp waits here to be killed (a test's fault injection)", CRASH_TEST_ENV, r)
    time.sleep(_CRASH_TEST_WAIT)


def _complete(run: _Run, result: Result, recorder: Recorder, evaluator: CentralEvaluator) -> None:
    """The rounds into the report, the local-only baselines, and the final model on disk."""
    import torch

    _collect(run.report, recorder, evaluator)
    run.final = result.arrays
    if run.options.simulated_test and run.report.final is None and (run.report.pooled is None or run.report.learning is None):
        try:
            _simulated_pooled(run, {k: v.numpy() for k, v in result.arrays.items()})
        except Exception:  # noqa: BLE001 - a figure for the summary must not fail a completed run
            log.exception("the simulation's pooled figure could not be computed; the run's model is kept")
    if run.options.local_baseline:
        run.events.emit("baselines", nodes=len(run.admitted))
        _baselines(run)
    final_state = {k: torch.from_numpy(np.array(v.numpy())) for k, v in result.arrays.items()}
    torch.save(final_state, run.options.run_dir / "model.pt")
    run.report.artifacts["model"] = "model.pt"
    run.report.status = "completed"
    run.interrupted = False


def _fail(run: _Run, exc: Exception) -> None:
    """A failed run: what it completed stays in the report, with the error."""
    run.interrupted = False
    log.exception("training task failed")
    if run.recorder is not None and run.evaluator is not None and not run.report.rounds:
        _collect(run.report, run.recorder, run.evaluator)
    run.report.status = "failed"
    run.report.message = str(exc)
    run.events.emit("failed", message=str(exc))


def _close(run: _Run) -> None:
    """Whatever happened: tell the nodes the task ended (unless interrupted) and write the report."""
    report, run_dir = run.report, run.options.run_dir
    if run.admitted and not run.interrupted:
        end_task(run.grid, run.admitted, run.config, arrays=run.final if run.task.personal.enabled else None)
    if run.interrupted:
        done_rounds = max((r.round for r in report.rounds), default=0)
        report.status = "failed"
        report.message = (
            f"the coordinator was interrupted after round {done_rounds}; the nodes keep the task open: continue with "
            f"'fedgov run --resume {run_dir}' (simulation) or 'fedgov task resume {run_dir}' (deployment)"
        )
    report.finished = datetime.now(timezone.utc)
    report.wall_seconds = (report.finished - report.started).total_seconds()
    report.artifacts["events"] = "events.jsonl"
    report_path = run_dir / "report.json"
    write_json_atomic(report_path, report.model_dump_json(indent=2))
    run.events.emit("report", path=str(report_path), status=report.status)


def _collect(report: TrainingReport, recorder: Recorder, evaluator: CentralEvaluator) -> None:
    """Copy what the strategy saw (rounds, each node's epsilon and accuracy) into the report;
    also after a failure, so that a stopped run still shows the rounds it completed."""
    report.rounds = [recorder.rounds[r] for r in sorted(recorder.rounds) if r > 0]
    for nr in report.nodes:
        nr.rounds_trained = recorder.node_rounds.get(nr.node, 0)
        ev = recorder.node_eval.get(nr.node)
        if ev:
            nr.federated_accuracy = ev.get("accuracy")
            total = ev.get("total")
            if nr.evaluation_noise is not None and total and total > 0 and nr.federated_accuracy is not None:
                # Var(c~/t~) ~ s^2 (1 + acc^2) / t^2 with s = z sqrt(2) the noise sd on each count
                nr.federated_accuracy_sd = nr.evaluation_noise * math.sqrt(2.0 * (1.0 + nr.federated_accuracy**2)) / total
            auc = ev.get("auc")
            nr.federated_auc = None if auc is None or math.isnan(auc) else auc
        if nr.status == "accepted" and nr.rounds_trained == 0:
            nr.status = "failed"
    report.pooled = pooled(report, recorder)
    last = report.rounds[-1] if report.rounds else None
    if last is not None and last.accuracy is not None:
        report.final = GlobalMetrics(accuracy=last.accuracy, loss=last.loss or 0.0, auc=last.auc, n=0 if evaluator.y is None else len(evaluator.y))
        if evaluator.y is not None:
            report.learning = check_learning(
                accuracy=last.accuracy, auc=last.auc, privacy=bool(report.privacy.get("enabled")),
                class_counts=np.bincount(evaluator.y, minlength=evaluator.encoder.n_classes).tolist(),
            )


def _simulated_pooled(run: _Run, final: dict[str, np.ndarray]) -> None:
    """A simulation without a central test set: the final model on the pooled test splits of the
    nodes that trained, exact (:data:`SIMULATED_POOLED_LABEL`). It becomes the report's pooled
    figure where the nodes released none (distributed DP, no evaluation at the nodes), and the
    learning check's ground where there was none. A test split that does not conform to the
    contract (a member that refused ``data-invalid``) is left out."""
    from fedgov.data import Encoder, read_table, validate_frame
    from fedgov.errors import FedgovError
    from fedgov.models import build_model, evaluate, set_state

    assert run.options.simulated_test is not None
    trained = [n.node for n in run.report.nodes if n.rounds_trained > 0]
    encoder = Encoder.from_contract(run.contract, run.task.features)
    columns = [*run.contract.feature_names(run.task.features), str(run.contract.target)]
    xs, ys = [], []
    for code in trained:
        path = run.options.simulated_test.get(code)
        if path is None:
            continue
        try:
            raw = read_table(path)
            frame = validate_frame(raw[[c for c in raw.columns if c in columns]], run.contract, file=str(path), columns=columns)
        except (FedgovError, OSError):  # DataValidationError and DataFileError are FedgovErrors
            continue
        X, y = encoder.transform(frame)
        if len(y):
            xs.append(X)
            ys.append(y)
    if not ys:
        return
    X, y = np.concatenate(xs), np.concatenate(ys)
    model = build_model(run.task.model, n_features=encoder.n_features, n_classes=encoder.n_classes, seed=run.task.training.seed)
    set_state(model, final)
    m = evaluate(model, X, y)
    last = run.report.rounds[-1].round if run.report.rounds else 0
    if run.report.pooled is None:
        run.report.pooled = PooledMetrics(
            accuracy=float(m.accuracy), sd=0.0, correct=float(round(m.accuracy * len(y))), total=float(len(y)), nodes=len(ys),
            round=last, label=SIMULATED_POOLED_LABEL, auc=m.auc,
        )
    if run.report.learning is None:
        run.report.learning = check_learning(
            accuracy=float(m.accuracy), auc=m.auc, privacy=bool(run.report.privacy.get("enabled")),
            class_counts=np.bincount(y, minlength=encoder.n_classes).tolist(),
            where="the members' pooled test splits (simulation, exact)",
        )


def pooled(report: TrainingReport, recorder: Recorder) -> PooledMetrics | None:
    """The nodes' last evaluation pooled: the sum of the correct counts they released over the
    sum of their totals (noisy under DP: released through their gate, no privacy spent here)."""
    last = next((r for r in reversed(report.rounds) if r.nodes_evaluated), None)
    if last is None:
        return None
    counts = [recorder.node_eval.get(n, {}) for n in last.nodes_evaluated]
    counts = [c for c in counts if "correct" in c and "total" in c and math.isfinite(c["correct"] + c["total"])]
    correct, total = sum(c["correct"] for c in counts), sum(c["total"] for c in counts)
    if not counts or total <= 0:
        return None
    label = POOLED_LABEL if report.privacy.get("enabled") else POOLED_LABEL.replace("(DP counts)", "(exact counts: no DP)")
    # the noise of the pooled ratio: each node's two counts carry Gaussian noise of sd z sqrt(2)
    # (its evaluation_noise z, public in its plan); Var(C~/T~) ~ (Var C + acc^2 Var T) / T^2
    noise = {n.node: n.evaluation_noise for n in report.nodes}
    pooled_nodes = [n for n in last.nodes_evaluated if n in recorder.node_eval]
    var = sum(2.0 * (noise.get(n) or 0.0) ** 2 for n in pooled_nodes)
    acc = correct / total
    sd = math.sqrt(var * (1.0 + acc**2)) / total if var > 0 else 0.0
    return PooledMetrics(
        accuracy=min(1.0, max(0.0, acc)), sd=sd, correct=correct, total=total, nodes=len(counts), round=last.round, label=label,
    )


def _baselines(run: _Run) -> None:
    """Ask each node for its local-only model's accuracy (same model, same DP budget)."""
    by_node = {n.node: n for n in run.report.nodes}
    msgs = query_messages(run.admitted, P.BASELINE, run.config, run.final if run.task.personal.enabled else None)
    for reply in run.grid.send_and_receive(msgs, timeout=run.options.reply_timeout):
        nr = by_node.get(run.names.get(reply.metadata.src_node_id, ""))
        if nr is None or reply.has_error():
            continue
        values = metric_values(next(iter(reply.content.metric_records.values())))
        nr.local_only_accuracy = values["accuracy"]
        nr.local_only_epsilon = values["epsilon"]
        if nr.federated_accuracy is not None:
            nr.gain = nr.federated_accuracy - nr.local_only_accuracy
        if "personal-accuracy" in values:  # simulation only: exact, apart from the budget
            nr.personal_accuracy = values["personal-accuracy"]
            nr.personal_variant = "fine-tuned" if values.get("personal-fine-tuned") == 1.0 else "global"
            nr.personal_gain = nr.personal_accuracy - nr.local_only_accuracy
            nr.test_rows = int(values.get("test-rows", 0))
