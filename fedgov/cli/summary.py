"""What the run commands print: a run's progress as it goes, and the summary of its report.

Shared by ``fedgov run``, ``fedgov query`` and ``fedgov task submit|resume``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedgov.cli.console import console, err_console
from fedgov.errors import ExitCode, FedgovError, ReportError

if TYPE_CHECKING:
    from fedgov.analytics import QueryReport
    from fedgov.reports import TrainingReport

__all__ = ["exit_if_not_learned", "print_learning", "print_query_summary", "print_summary", "run_with_progress"]


def _fmt(v: float | str | bool | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


_FOLD = 10
"""More refused nodes than this are summarised by reason (a few lines), not listed one by one."""

_UNIT = {"distributed": " per citizen", "local": " per record"}
"""What the per-node epsilon column is per (each node's report line says it in words: per_citizen)."""


def print_summary(report: TrainingReport, run_dir: Path) -> None:
    """The terminal summary of a training report."""
    from fedgov.reports import refusal_lines  # lazy: pydantic models (fedgov --help)

    t = Table(title=f"{report.task}: per node (target epsilon {report.privacy.get('target_epsilon')})")
    unit = _UNIT.get(str(report.privacy.get("mode")), "") if report.privacy.get("enabled") else ""
    personal = any(n.personal_accuracy is not None for n in report.nodes)
    cols = ["node", "name", "rows (noisy)", f"epsilon{unit}", "local-only acc.", "federated acc.", "gain"]
    cols += ["personalised acc.", "gain (pers.)"] if personal else []
    for col in (*cols, "status"):
        t.add_column(col, justify="right" if col not in ("node", "name", "status") else "left")
    refused = [n for n in report.nodes if n.status == "refused"]
    fold = len(refused) > _FOLD  # many refusals: by reason under the table, not one row each
    for n in sorted(report.nodes, key=lambda n: -n.train_rows):
        if fold and n.status == "refused":
            continue
        status = n.status if n.status == "accepted" else f"{n.status}: {n.refusal_code or ''} {n.refusal_reason}"
        if n.detail:
            status = escape(f"{status}; {n.detail}")
        row = [
            n.node, escape(n.name), str(n.train_rows) if n.train_rows else "-", _fmt(n.epsilon), _fmt(n.local_only_accuracy),
            _fmt(n.federated_accuracy) + ("" if n.federated_accuracy_sd is None else f" ± {n.federated_accuracy_sd:.3f}"),
            "-" if n.gain is None else f"{100 * n.gain:+.1f} pt",
        ]
        if personal:
            mark = "" if n.personal_variant is None else (" (fine-tuned)" if n.personal_variant == "fine-tuned" else " (global)")
            row += [_fmt(n.personal_accuracy) + mark, "-" if n.personal_gain is None else f"{100 * n.personal_gain:+.1f} pt" + (" [red]![/]" if n.worse_off() else "")]
        t.add_row(*row, status)
    if t.row_count:
        console.print(t)
    if fold:
        console.print(f"{len(refused)} node(s) refused (each one's reason: {run_dir / 'report.json'}, nodes):")
        for line in refusal_lines((n.node, f"{n.refusal_code or '?'}: {n.refusal_reason}") for n in refused):
            console.print(f"  [yellow]refused[/] {escape(line)}", soft_wrap=True)
    meanings = sorted({n.per_citizen for n in report.nodes if n.per_citizen})
    if len(meanings) == 1:
        console.print(f"Per citizen, at every node that took part: {meanings[0]}.")
    for text in meanings if len(meanings) > 1 else []:
        who = ", ".join(n.node for n in report.nodes if n.per_citizen == text)
        console.print(f"Per citizen ({who}): {text}.")
    if report.final is not None:
        console.print(
            f"Global model on the held-out test set ({report.final.n} rows): accuracy [bold]{report.final.accuracy:.4f}[/], "
            f"AUC {_fmt(report.final.auc, '.4f')}, loss {report.final.loss:.4f}; majority class {_fmt(report.majority_rate, '.4f')}"
        )
    elif report.pooled is not None:  # no central test set: the nodes' released counts, pooled
        pl = report.pooled
        console.print(
            f"Global model, {pl.label}: accuracy [bold]{pl.accuracy:.4f}[/]"
            + (f" ± {pl.sd:.4f} (the nodes' DP noise)" if pl.sd > 0 else "")
            + (f", AUC {pl.auc:.4f}" if pl.auc is not None else "")
            + f" ({pl.nodes} nodes, round {pl.round}; no central test set: evaluation.centralized)"
        )
        if pl.sd > 0.05:
            console.print(
                f"  [yellow]The pooled figure is too noisy to tell much[/] (± {pl.sd:.2f}): the nodes' test splits are small "
                "beside the noise on their released counts; more evaluation.epsilon, or a central test set, gives a sharper figure.",
                soft_wrap=True,
            )
        if report.learning is None:
            console.print(
                "Whether it beats guessing cannot be judged here: the coordinator does not know the classes' shares. "
                "A statistics query counting rows by the target gives them (fedgov data draft writes one), or give "
                "the task a central test set.", soft_wrap=True,
            )
    elif report.status == "completed":
        console.print("No global figure: the task has no central test set (evaluation.centralized) and the nodes did not evaluate")
    print_learning(report)
    gain = report.median_gain()
    if report.privacy.get("mode") == "distributed":
        console.print(
            f"Distributed DP: epsilon {_fmt(report.max_epsilon(), '.3f')} per municipality at most (delta "
            f"{report.privacy.get('delta')}), and so for every citizen in it; noise multiplier of the sum "
            f"{_fmt(report.privacy.get('noise_multiplier'), '.2f')}, update clip {report.privacy.get('update_clip')}"
        )
    console.print(
        f"Largest planned epsilon of a node: {_fmt(report.max_epsilon(), '.3f')}; median gain from federating: "
        f"{'-' if gain is None else f'{100 * gain:+.1f} points'}; wall time {_fmt(report.wall_seconds, '.0f')} s"
    )
    if personal:
        pgain = report.median_personal_gain()
        worse = report.worse_off()
        console.print(
            f"Personal models (kept at each node, fedgov node model): median gain over local-only "
            f"{'-' if pgain is None else f'{100 * pgain:+.1f} points'}; "
            + (f"[red]{len(worse)} node(s) worse off[/] than local-only by more than their test split's standard error "
               f"({', '.join(n.name or n.node for n in worse)})" if worse else
               "no node worse off than local-only by more than its test split's standard error")
        )
        console.print(
            "[dim]Local-only and personalised accuracies are a simulation's exact figures, apart from the budget; a deployed "
            "node sends neither (its personal model stays with it).[/]"
        )
    eval_eps = report.privacy.get("evaluation_epsilon")
    if any(n.federated_accuracy is not None for n in report.nodes) and eval_eps:
        console.print(
            f"[dim]Each node's own test accuracy is a DP release (noisy correct and total counts, epsilon {eval_eps} of the "
            "task's): a small node's figure, and so its gain, can be far off; rows are noisy counts too.[/]"
        )
    shown = [f"{label}: {run_dir / name}" for label, name in (("Report", "report.json"), ("Plot", "accuracy.png"), ("Model", "model.pt")) if (run_dir / name).is_file()]
    console.print("   ".join(shown))


def print_learning(report: TrainingReport) -> None:
    """Whether the global model beats guessing by more than its test set's noise; if not, plainly,
    with what to try (``report.learning``, :func:`fedgov.reports.check_learning`)."""
    check = report.learning
    if check is None:
        return
    if check.learned:
        console.print(f"[green]Learned:[/] {escape(check.message)}.")
        return
    console.print(f"[bold red]Not learned:[/] {escape(check.message)}. Try:")
    for tip in check.advice:
        console.print(f"  - {escape(tip)}")


def exit_if_not_learned(report: TrainingReport) -> None:
    """End the command with :attr:`ExitCode.NOT_LEARNED` when a completed run's global model
    does not beat guessing (after the summary has said so)."""
    if report.status == "completed" and report.learning is not None and not report.learning.learned:
        raise typer.Exit(int(ExitCode.NOT_LEARNED))


def _show_event(progress: Progress, bar: TaskID, ev: dict[str, Any]) -> None:
    """One progress event of a run or a query, on the bar or as a line above it."""
    kind = ev.get("event")
    if kind == "run-dir":
        progress.console.print(f"Run directory: {ev['path']}")
    elif kind == "partitioned":
        progress.update(bar, description="starting Flower", info=f"{len(ev['nodes'])} nodes")
    elif kind == "admission":
        refused = ev.get("refused") or {}
        progress.console.print(f"{len(ev['accepted'])} node(s) accepted the task, {len(refused)} refused")
        from fedgov.reports import refusal_lines  # lazy: pydantic models (fedgov --help)

        lines = [f"{node}: {why}" for node, why in refused.items()] if len(refused) <= _FOLD else refusal_lines(refused.items())
        for line in lines:
            progress.console.print(f"  [yellow]refused[/] {escape(line)}", soft_wrap=True)
    elif kind == "resumed":
        progress.console.print(f"Resuming after round {ev['round']} of {ev['rounds']} (ledger key run {ev.get('task_run')})")
    elif kind == "training-start":
        first = int(ev.get("first_round", 1))
        progress.update(bar, description="training", total=int(ev["rounds"]), completed=first - 1, info="")
    elif kind == "round" and ev.get("round", 0) > 0:
        info = f"acc {_fmt(ev.get('accuracy'))}  max eps {_fmt(ev.get('max_epsilon'))}"
        progress.update(bar, completed=ev["round"], info=info)
        progress.console.print(
            f"round {ev['round']:>3}: accuracy {_fmt(ev.get('accuracy'), '.4f')}  AUC {_fmt(ev.get('auc'), '.4f')}  "
            f"nodes' own test acc. {_fmt(ev.get('federated_accuracy'), '.4f')}  max epsilon {_fmt(ev.get('max_epsilon'))}  "
            f"({len(ev.get('nodes_trained', []))} nodes, {_fmt(ev.get('seconds'), '.1f')} s)"
        )
    elif kind == "rejected":
        for node, why in (ev.get("nodes") or {}).items():
            progress.console.print(f"  [yellow]round {ev.get('round')}: update of {node} left out[/]: {why}")
    elif kind == "warning":
        progress.console.print(f"[bold yellow]warning:[/] {escape(str(ev.get('message')))}", soft_wrap=True)
    elif kind == "failed":
        progress.console.print(f"[red]run failed:[/] {ev.get('message')}")
    elif kind == "nodes-connected":
        progress.update(bar, description="waiting for answers", info=f"{ev['count']} nodes")
    elif kind == "answers":
        refused = ev.get("refused") or {}
        progress.console.print(f"{len(ev['accepted'])} node(s) answered the query, {len(refused)} refused")
        for node, why in list(refused.items())[:20]:
            progress.console.print(f"  [yellow]refused[/] {node}: {why}")
    elif kind == "baselines":
        progress.update(bar, description="local-only baselines at the nodes", info=f"{ev['nodes']} nodes")
    elif kind == "done":
        progress.update(bar, description="done", info="")


def run_with_progress(call: Callable[[Callable[[dict[str, Any]], None]], Path]) -> Path:
    """Run ``call(on_event)`` showing its progress events; on failure print what the report says
    (the error itself is :func:`~fedgov.cli.console.run_command`'s to print)."""
    # SIGTERM (a scheduler, `timeout`, `kill`) stops the run as Ctrl-C does: through every
    # finally block, so that Flower's processes and Ray stop with it instead of outliving it.
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=console, transient=False,
        ) as progress:
            bar = progress.add_task("preparing", total=None, info="")
            try:
                return call(lambda ev: _show_event(progress, bar, ev))
            except FedgovError as exc:
                progress.stop()
                _print_failed_run(getattr(exc, "run_dir", None))
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_failed_run(run_dir: Path | None) -> None:
    """What a failed run's directory holds: the summary of its report, when it has one."""
    from fedgov.reports import load_report  # lazy: pydantic models (fedgov --help)

    if run_dir is None:
        return
    try:
        if (run_dir / "report.json").is_file():
            print_summary(load_report(run_dir / "report.json"), run_dir)
        elif (run_dir / "query.json").is_file():
            from fedgov.analytics import load_query_report  # lazy: pandas, numpy

            print_query_summary(load_query_report(run_dir / "query.json"), run_dir)
    except ReportError as exc:  # the run's own error is what matters; its report is a bonus
        err_console.print(f"[bold yellow]warning:[/] no summary: {escape(str(exc))}", highlight=False, soft_wrap=True)


def print_query_summary(report: QueryReport, run_dir: Path, *, max_rows: int = 40) -> None:
    """The national figures of a query, with their 95% intervals (and true values in simulation).

    Every number in the table follows one rule (:func:`~fedgov.analytics.publish.format_number`);
    the figures are the published, post-processed ones (the raw values are in the report).
    """
    from fedgov.analytics.publish import format_interval, format_number, format_percent  # lazy: fedgov --help

    acc, ref = report.accepted(), report.refused()
    console.print(
        f"[bold]{report.query}[/] ({report.mode}): {report.status}; {len(acc)} node(s) answered, {len(ref)} refused; "
        f"epsilon {report.epsilon:g} per node ({report.mechanism}, at most {report.max_rows_per_person} row(s) per person)"
    )
    for n in ref[:20]:
        console.print(f"  [yellow]refused[/] {n.node}: {n.code}: {n.reason}")
    if len(ref) > 20:
        console.print(f"  ... and {len(ref) - 20} more (query.json)")
    if report.message:
        console.print(f"  {report.message}")
    if report.result is None:
        return
    truth = {f.key: f for f in report.truth.figures} if report.truth else {}
    table = Table(title="national figures (95% interval)" + ("; true value from the simulated data" if truth else ""))
    for col in ("measure", "cell", "estimate", "95% interval") + (("true", "error") if truth else ()):
        table.add_column(col, justify="right" if col not in ("measure", "cell") else "left")
    shown = clamped = 0
    for f in report.result.figures:
        if f.scope != "national":
            continue
        shown += 1
        clamped += f.clamped
        if shown > max_rows:
            continue
        est = "suppressed" if f.estimate is None else format_number(f.estimate) + (" (incomplete)" if f.incomplete else "")
        row = [f.measure, f.cell or "-", est, format_interval(f.ci_low, f.ci_high)]
        if truth:
            t = truth.get(f.key)
            tv = None if t is None else t.estimate
            err = "" if tv is None or f.estimate is None else (
                format_percent((f.estimate - tv) / tv, signed=True) if tv else format_number(f.estimate - tv, signed=True)
            )
            row += [format_number(tv), err]
        table.add_row(*row)
    console.print(table)
    if clamped:
        console.print(
            f"{clamped} national figure(s) post-processed into their feasible range (counts at least 0, shares in [0, 1], "
            "intervals holding their estimate; no privacy cost, but a small count's estimate is biased upward): "
            "the raw unbiased values are in query.json and query.csv (raw_estimate, raw_ci_low, raw_ci_high)"
        )
    if shown > max_rows:
        console.print(f"... {shown - max_rows} more national figures, and all regional and per-node ones, in {run_dir / 'query.csv'}")
    console.print(f"report: {run_dir / 'query.json'}, table: {run_dir / 'query.csv'}, chart: {run_dir / 'query.png'}")
