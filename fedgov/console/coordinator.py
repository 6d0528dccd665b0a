"""The coordinator console (``fedgov coordinator console``, ``fedgov console --runs-dir``).

Pages, read from the run directories (``report.json`` of a training run, ``query.json`` and its
figures of a statistics query, as ``fedgov run``, ``fedgov query`` and ``fedgov task submit``
write them) and, with a coordinator directory, from the running SuperLink (``flwr ls``,
``flwr supernode list``, through :mod:`fedgov.deploy`):

``/``                     the runs, newest first, with their status; the nodes online;
``/runs/<name>``          a training run: accuracy per round (chart and table), the per-node
                          table (epsilon, local-only, federated, personalised where the report
                          has it, refusals with their reasons), and who took part in each round
                          and why the others did not; or a statistics query: its national,
                          provincial and municipal figures with their 95% intervals, filterable
                          by measure and scope, and the nodes' answers;
``/runs/<name>/figures.csv``  the figures shown, as CSV.

The coordinator holds no record, so there is none to show: a run's report holds aggregates, and
each node's figures are the noisy ones it released.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedgov.analytics.combine import Figure
from fedgov.analytics.report import QueryReport
from fedgov.console.charts import Bar, Series, errorbar_chart, line_chart
from fedgov.console.security import Guard
from fedgov.console.web import console_app, render
from fedgov.errors import FedgovError
from fedgov.reports import TrainingReport

__all__ = ["FIGURE_COLUMNS", "RunEntry", "coordinator_console", "figures_csv", "participation", "scan_runs", "select_figures"]

T = TypeVar("T")

NAV = (("/", "Runs"),)
FIGURE_COLUMNS = ["measure", "kind", "scope", "scope_value", "cell", "estimate", "std_error", "ci_low", "ci_high",
                  "nodes", "withheld", "incomplete", "suppressed"]
MAX_BARS = 60


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunEntry:
    """One run directory: a training report, a query report, or why neither could be read."""

    name: str
    path: Path
    kind: str  # training, query, unreadable
    training: TrainingReport | None = None
    query: QueryReport | None = None
    raw_nodes: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def started(self) -> str:
        r = self.training or self.query
        return r.started.isoformat() if r is not None else ""

    @property
    def status(self) -> str:
        r = self.training or self.query
        return r.status if r is not None else "unreadable"


def _read(path: Path) -> RunEntry:
    from fedgov.analytics.report import load_query_report
    from fedgov.reports import load_report

    name = path.name
    try:
        if (path / "report.json").is_file():
            try:
                raw = json.loads((path / "report.json").read_text("utf-8")).get("nodes", [])
            except (OSError, ValueError, AttributeError):
                raw = []
            raw_nodes = [n for n in raw if isinstance(n, dict)]
            try:
                report = load_report(path / "report.json")
            except FedgovError:
                report = _lenient(path / "report.json")  # a newer fedgov's report: per-node fields this one does not know
            return RunEntry(name, path, "training", training=report, raw_nodes=raw_nodes)
        return RunEntry(name, path, "query", query=load_query_report(path / "query.json"))
    except FedgovError as exc:
        return RunEntry(name, path, "unreadable", error=str(exc))
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return RunEntry(name, path, "unreadable", error=f"{path}: {str(exc).splitlines()[0]}")


def _lenient(path: Path) -> TrainingReport:
    """A training report whose nodes carry fields this fedgov does not know (such as a newer
    fedgov's personalised accuracy), read without them; else the error ``load_report`` gives."""
    from fedgov.reports import NodeResult, load_report

    try:
        data = json.loads(path.read_text("utf-8"))
        data["nodes"] = [{k: v for k, v in n.items() if k in NodeResult.model_fields} for n in data["nodes"]]
        return TrainingReport.model_validate(data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return load_report(path)  # raises the clear error


def scan_runs(runs_dir: Path) -> list[RunEntry]:
    """Every run directory under ``runs_dir`` (one holding ``report.json`` or ``query.json``), newest first."""
    if not runs_dir.is_dir():
        return []
    found = [d for d in runs_dir.iterdir() if d.is_dir() and ((d / "report.json").is_file() or (d / "query.json").is_file())]
    entries = [_read(d) for d in found]
    return sorted(entries, key=lambda e: (e.started, e.name), reverse=True)


def personalised(raw: dict[str, Any]) -> float | None:
    """A node's personalised accuracy where the report has one (reports from fedgov versions
    with personal models); None otherwise."""
    for key in ("personalised_accuracy", "personalized_accuracy", "personal_accuracy"):
        v = raw.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


@dataclass(frozen=True)
class Cell:
    """One node in one round: what it did, and why not if it did not."""

    state: str  # trained, absent, failed, rejected, refused, no-reply, -
    text: str


def participation(report: TrainingReport) -> tuple[list[int], list[tuple[str, str, list[Cell]]]]:
    """Rounds, and per node (code, name, one cell per round): who took part and why others did not."""
    rounds = [r for r in report.rounds if r.round > 0]
    names = {n.node: n.name for n in report.nodes}
    refused = {n.node: n for n in report.nodes if n.status != "accepted"}
    codes = list(names)
    for r in rounds:
        for c in [*r.nodes_asked, *r.nodes_absent, *r.nodes_trained, *r.nodes_failed, *r.nodes_rejected]:
            if c not in names:
                names[c] = ""
                codes.append(c)
    out = []
    for code in codes:
        cells = []
        for r in rounds:
            if code in r.nodes_rejected:
                cells.append(Cell("rejected", f"update left out: {r.nodes_rejected[code]}"))
            elif code in r.nodes_trained:
                cells.append(Cell("trained", "trained" + (", evaluated" if code in r.nodes_evaluated else "")))
            elif code in r.nodes_failed:
                cells.append(Cell("failed", f"failed: {r.nodes_failed[code]}"))
            elif code in r.nodes_absent:
                cells.append(Cell("absent", f"not asked: {r.nodes_absent[code]}"))
            elif code in r.nodes_asked:
                cells.append(Cell("no-reply", "asked, no update"))
            elif code in refused:
                n = refused[code]
                cells.append(Cell("refused", f"{n.status}: {n.refusal_code or ''}".rstrip(": ")))
            else:
                cells.append(Cell("-", "-"))
        out.append((code, names.get(code, ""), cells))
    return [r.round for r in rounds], out


def _scopes(result: Any) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The scope choices of a query's figures: (group label, group value, [(value, label)])."""
    regions = sorted({f.scope_value for f in result.figures if f.scope == "region"})
    nodes = sorted({f.scope_value for f in result.figures if f.scope == "node"})
    groups = [("National", "national", [("national", "national")])]
    if regions:
        groups.append(("Regions", "region", [("region", "every region"), *[(f"region:{v}", v.replace("=", ": ")) for v in regions]]))
    if nodes:
        groups.append(("Municipalities", "node", [("node", "every municipality"), *[(f"node:{v}", v) for v in nodes]]))
    return groups


def select_figures(figures: Sequence[Figure], *, measure: str = "", scope: str = "national") -> list[Figure]:
    """The figures of ``measure`` ("" for all) in ``scope``: ``national``, ``region`` or ``node``
    (all of that scope), or ``region:<col=value>`` / ``node:<code>`` (one)."""
    kind, _, value = scope.partition(":")
    if kind not in ("national", "region", "node"):
        kind, value = "national", ""
    return [f for f in figures
            if (not measure or f.measure == measure) and f.scope == kind and (not value or f.scope_value == value)]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one starting as a formula would (= + - @, a
    tab or a carriage return) gets a leading apostrophe (OWASP's CSV injection advice). The
    text may come from a node or a registry (a region's name, a cell's value)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def figures_csv(figures: Sequence[Figure]) -> str:
    """The figures as CSV (the columns of the run's own ``query.csv`` up to ``suppressed``);
    text that a spreadsheet would run as a formula is kept as text (:func:`_text_cell`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIGURE_COLUMNS)
    for f in figures:
        w.writerow([*(_text_cell(t) for t in (f.measure, f.kind, f.scope, f.scope_value, f.cell)),
                    "" if f.estimate is None else repr(f.estimate), "" if f.std_error is None else repr(f.std_error),
                    "" if f.ci_low is None else repr(f.ci_low), "" if f.ci_high is None else repr(f.ci_high),
                    f.nodes, f.withheld, str(f.incomplete).lower(), str(f.suppressed).lower()])
    return buf.getvalue()


# --------------------------------------------------------------------------- the console


class _Cached:
    """A slow call (the SuperLink, over ``flwr``), remembered for ``ttl`` seconds."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._values: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, call: Callable[[], T]) -> T:
        with self._lock:
            hit = self._values.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]  # type: ignore[no-any-return]  # what call() returned for this key
        value = call()
        with self._lock:
            self._values[key] = (time.monotonic(), value)
        return value


class _CoordinatorConsole:
    def __init__(self, runs_dir: Path, coordinator_dir: Path | None) -> None:
        self.runs_dir = runs_dir
        self.coordinator_dir = coordinator_dir
        self.cache = _Cached()

    def chrome(self) -> dict[str, Any]:
        return {"runs_dir": str(self.runs_dir), "coordinator_dir": str(self.coordinator_dir or "")}

    def _flower(self) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        """Flower's view (run directory name -> its run at the SuperLink, nodes) of the running
        coordinator, or why there is none; remembered for a few seconds, answer or not."""
        if self.coordinator_dir is None:
            return {}, [], ""
        base = self.coordinator_dir

        def ask() -> tuple[dict[str, Any], list[dict[str, Any]], str]:
            from fedgov.deploy.superlink import nodes
            from fedgov.deploy.tasks import list_runs

            try:
                infos = list_runs(base, self.runs_dir)
                online = nodes(base)
            except FedgovError as exc:
                first = " ".join(str(exc).split())[:300]
                return {}, [], f"the coordinator's SuperLink does not answer ({first}); is it running ('fedgov coordinator start')?"
            return {Path(i.run_dir).name: i.model_dump() for i in infos if i.run_dir}, [dict(n) for n in online], ""

        return self.cache.get("flower", ask)

    async def runs(self, request: Request) -> Response:
        def build() -> dict[str, Any]:
            entries = scan_runs(self.runs_dir)
            flower, online, problem = self._flower()
            return {"runs": entries, "flower": flower, "online": online, "problem": problem,
                    "with_coordinator": self.coordinator_dir is not None}
        return render(request, "coordinator/runs.html", await run_in_threadpool(build))

    def _entry(self, name: str) -> RunEntry:
        path = self.runs_dir / name
        if "/" in name or name.startswith(".") or not path.is_dir():
            raise HTTPException(404, f"no run directory {name} in {self.runs_dir}")
        if not ((path / "report.json").is_file() or (path / "query.json").is_file()):
            raise HTTPException(404, f"{path} holds no report.json or query.json")
        return _read(path)

    async def run(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = await run_in_threadpool(self._entry, name)
        if entry.training is not None:
            return render(request, "coordinator/training.html", _training_context(entry))
        if entry.query is not None:
            measure = request.query_params.get("measure", "")
            scope = request.query_params.get("scope", "national")
            return render(request, "coordinator/query.html", _query_context(entry, entry.query, measure, scope))
        return render(request, "error.html", {"status": 409, "message": entry.error}, status=409)

    async def csv(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = await run_in_threadpool(self._entry, name)
        if entry.query is None or entry.query.result is None:
            raise HTTPException(404, f"run {name} has no statistics figures")
        measure = request.query_params.get("measure", "")
        scope = request.query_params.get("scope", "national")
        body = figures_csv(select_figures(entry.query.result.figures, measure=measure, scope=scope))
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{name}-{measure or 'all'}-{scope}")
        return Response(body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{slug}.csv"'})


def _training_context(entry: RunEntry) -> dict[str, Any]:
    report = entry.training
    assert report is not None
    rounds = [r for r in report.rounds if r.round > 0]
    series = [
        Series("global model, held-out test set", [(r.round, r.accuracy) for r in rounds]),
        Series("nodes' own test splits (weighted, noisy)", [(r.round, r.federated_accuracy) for r in rounds]),
    ]
    hlines = [(report.majority_rate, f"majority class {report.majority_rate:.3f}")] if report.majority_rate is not None else []
    last = max(report.rounds_planned, max((r.round for r in rounds), default=1), 1)
    chart = line_chart(
        series, title=f"Accuracy per round, {report.task}", x_label="round", y_label="accuracy", hlines=hlines,
        x_format=lambda x: f"{x:g}", x_range=(1, last) if last > 1 else (0, 2),
        x_ticks=list(range(1, last + 1)) if last <= 20 else None, y_min=0.5, y_max=1.0,
    )
    raw = {str(n.get("node")): n for n in entry.raw_nodes}
    personal = {n.node: personalised(raw.get(n.node, {})) for n in report.nodes}
    round_ids, matrix = participation(report)
    return {
        "entry": entry, "report": report, "rounds": rounds, "chart": chart, "personal": personal,
        "has_personal": any(v is not None for v in personal.values()),
        "round_ids": round_ids, "matrix": matrix,
        "done": max((r.round for r in rounds), default=0),
    }


def _cell_label(cell: str) -> str:
    """A cell for a chart's axis: its values ("01 · 18-64"), a bin ("[0, 10)") or a quantile ("q=0.5")."""
    if not cell:
        return "all"
    parts = []
    for part in cell.split(";"):
        key, _, value = part.partition("=")
        parts.append(part if key == "q" else value)
    return " · ".join(parts)


def _where(scope: str, value: str) -> str:
    if scope == "national":
        return "national"
    return value.replace("=", ": ") if scope == "region" else f"municipality {value}"


def _query_context(entry: RunEntry, report: QueryReport, measure: str, scope: str) -> dict[str, Any]:
    result = report.result
    figures = select_figures(result.figures, measure=measure, scope=scope) if result is not None else []
    measures = list(dict.fromkeys(f.measure for f in result.figures)) if result is not None else []
    charts = []
    for m in [x for x in measures if not measure or x == measure]:
        groups = list(dict.fromkeys((f.scope, f.scope_value) for f in figures if f.measure == m))
        one_cell = len(groups) > 1 and all(len({f.cell for f in figures if f.measure == m and (f.scope, f.scope_value) == g}) == 1 for g in groups)
        # a measure of one cell (a mean, a share) in several places: one chart, the places side by side
        for group in ([None] if one_cell else groups):
            figs = [f for f in figures if f.measure == m and (group is None or (f.scope, f.scope_value) == group)]
            bars = [
                Bar(label=_where(f.scope, f.scope_value) if group is None else _cell_label(f.cell),
                    estimate=f.estimate, low=f.ci_low, high=f.ci_high,
                    note="suppressed (small cell)" if f.suppressed else ("incomplete: cells withheld" if f.incomplete else ""))
                for f in figs[:MAX_BARS]
            ]
            more = f" (first {MAX_BARS} of {len(figs)})" if len(figs) > MAX_BARS else ""
            where = _where(*group) if group is not None else {"region": "every region", "node": "every municipality"}.get(scope, scope)
            charts.append({
                "measure": m, "kind": figs[0].kind, "where": where, "figures": figs,
                "svg": errorbar_chart(bars, title=f"{m} ({figs[0].kind}), {where}{more}", y_label=m),
            })
    return {
        "entry": entry, "report": report, "result": result, "measures": measures, "measure": measure,
        "scope": scope, "scopes": _scopes(result) if result is not None else [], "charts": charts,
        "figures": figures,
    }


def coordinator_console(
    runs_dir: Path, guard: Guard, *, coordinator_dir: Path | None = None, allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The coordinator console for the run directories under ``runs_dir``; with ``coordinator_dir``
    also Flower's view of the runs and the nodes online, from the coordinator's SuperLink."""
    c = _CoordinatorConsole(runs_dir.resolve(), coordinator_dir.resolve() if coordinator_dir else None)
    routes = [
        Route("/", c.runs),
        Route("/runs/{name}", c.run),
        Route("/runs/{name}/figures.csv", c.csv),
    ]
    title = "fedgov coordinator console" if coordinator_dir else "fedgov runs console"
    return console_app(title=title, guard=guard, routes=routes, nav=NAV, chrome=c.chrome, allowed_hosts=allowed_hosts,
                       holder="coordinator" if coordinator_dir else "coordinator's run directory")
