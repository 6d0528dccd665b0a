"""What a statistics query leaves on disk: ``query.json``, ``query.csv`` and ``query.png``.

``query.json`` is the whole :class:`QueryReport` (written atomically); ``query.csv`` has one
row per figure (national, per region value, per node), with the true value and the relative
error when a simulation knows them. Its ``estimate``, ``ci_low`` and ``ci_high`` are the
published (post-processed) values, ``raw_estimate``, ``raw_ci_low`` and ``raw_ci_high`` the
unbiased ones before post-processing (:mod:`fedgov.analytics.publish`); numbers are written in
full precision, for machines (tables for people use :func:`~fedgov.analytics.publish.format_number`); ``query.png`` has one panel per measure with the national
estimates (published, post-processed), their 95% intervals and, if known, the true values,
its axes in the tables' number format.
"""

from __future__ import annotations

import csv
import io
import math
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedgov.analytics.combine import Comparison, Figure, QueryResult
from fedgov.analytics.publish import format_number
from fedgov.reports import read_report, write_json_atomic

__all__ = ["QueryNode", "QueryReport", "CSV_COLUMNS", "write_outputs", "write_csv", "plot_query", "load_query_report"]

CSV_COLUMNS = [
    "measure",
    "kind",
    "scope",
    "scope_value",
    "cell",
    "estimate",
    "std_error",
    "ci_low",
    "ci_high",
    "nodes",
    "withheld",
    "incomplete",
    "suppressed",
    "true_value",
    "abs_error",
    "rel_error",
    "raw_estimate",
    "raw_ci_low",
    "raw_ci_high",
]

_MAX_CELLS_PLOTTED = 60


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryNode(BaseModel):
    """One municipality's answer to a query: accepted, or refused with a code and a reason.

    Unknown keys are ignored when reading, so that a node's transport answer (which may carry
    more, such as the release itself) can be stored as it is, less its release.
    """

    model_config = ConfigDict(extra="ignore")

    node: str
    node_name: str = ""
    accepted: bool
    code: str | None = Field(default=None, description="refusal or failure code")
    reason: str = ""
    epsilon: float | None = None
    delta: float | None = None


class QueryReport(_Model):
    """Everything a statistics query found, in one file (``query.json``)."""

    kind: Literal["query"] = "query"
    fedgov_version: str = ""
    run_id: str = ""
    query: str
    query_file: str
    contract: str
    federation: str = Field(default="", description="the federation's name")
    federation_file: str = Field(default="", description="the federation file (simulation)")
    mode: Literal["simulation", "deployment"] = "simulation"
    flower_run_id: int | None = Field(default=None, description="the run's id at the SuperLink")
    status: Literal["completed", "failed", "running"] = "running"
    message: str = ""
    started: datetime
    finished: datetime | None = None
    wall_seconds: float | None = None
    epsilon: float = Field(description="per node, for the whole query")
    delta: float = 0.0
    mechanism: str = "laplace"
    max_rows_per_person: int = 1
    nodes: list[QueryNode] = Field(default_factory=list)
    result: QueryResult | None = None
    truth: QueryResult | None = None
    errors: Comparison | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)

    def accepted(self) -> list[QueryNode]:
        return [n for n in self.nodes if n.accepted]

    def refused(self) -> list[QueryNode]:
        return [n for n in self.nodes if not n.accepted]


def load_query_report(path: Path | str) -> QueryReport:
    """Read a query run's ``query.json``; a missing, damaged or foreign file is a
    :class:`~fedgov.errors.ReportError` naming the file and what was expected."""
    return read_report(Path(path), QueryReport, "a fedgov query report (the query.json of a query run directory)")


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return repr(float(x))


def write_csv(report: QueryReport, path: Path) -> Path:
    """One row per figure of ``report.result`` (atomic)."""
    from fedgov.data.io import atomic_write_bytes

    truth = {f.key: f for f in report.truth.figures} if report.truth else {}
    errors = report.errors.by_key() if report.errors else {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for f in report.result.figures if report.result else []:
        t = truth.get(f.key)
        e = errors.get(f.key)
        w.writerow(
            [
                f.measure, f.kind, f.scope, f.scope_value, f.cell,
                _num(f.estimate), _num(f.std_error), _num(f.ci_low), _num(f.ci_high),
                f.nodes, f.withheld, str(f.incomplete).lower(), str(f.suppressed).lower(),
                _num(t.estimate if t else None), _num(e.abs_error if e else None), _num(e.rel_error if e else None),
                _num(f.raw_estimate), _num(f.raw_ci_low), _num(f.raw_ci_high),
            ]
        )
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
    return path


def plot_query(report: QueryReport, path: Path) -> Path:
    """One panel per measure: national estimates with 95% intervals, true values if known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from fedgov.data.io import atomic_write_bytes

    result = report.result
    measures: list[str] = []
    for f in result.figures if result else []:
        if f.measure not in measures:
            measures.append(f.measure)
    truth = {f.key: f for f in report.truth.figures} if report.truth else {}
    n = max(len(measures), 1)
    fig, axes = plt.subplots(n, 1, figsize=(11, 3.4 * n), constrained_layout=True, squeeze=False)
    if not measures:
        axes[0][0].text(0.5, 0.5, f"{report.query}: no result ({report.status})", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, name in zip((a[0] for a in axes), measures, strict=False):
        assert result is not None
        figs: list[Figure] = result.select(name, "national")
        shown = figs[:_MAX_CELLS_PLOTTED]
        xs = list(range(len(shown)))
        est = [f.estimate if f.estimate is not None else math.nan for f in shown]
        lo = [max(f.estimate - f.ci_low, 0.0) if f.estimate is not None and f.ci_low is not None else 0.0 for f in shown]
        hi = [max(f.ci_high - f.estimate, 0.0) if f.estimate is not None and f.ci_high is not None else 0.0 for f in shown]
        ax.errorbar(xs, est, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label="DP estimate, 95% interval")
        tv = [truth[f.key].estimate if f.key in truth and truth[f.key].estimate is not None else math.nan for f in shown]
        if truth:
            ax.plot(xs, tv, "x", color="tab:red", ms=6, label="true value")
        inc = [i for i, f in enumerate(shown) if f.incomplete]
        if inc:
            ax.plot(inc, [est[i] for i in inc], "s", mfc="none", color="tab:orange", ms=9, label="incomplete (cells withheld)")
        kind = shown[0].kind if shown else ""
        more = f" (first {len(shown)} of {len(figs)} cells)" if len(figs) > len(shown) else ""
        ax.set_title(f"{name} ({kind}), national{more}", fontsize=10)
        if len(shown) <= 40:
            ax.set_xticks(xs, [f.cell or "all" for f in shown], rotation=60, ha="right", fontsize=7)
        else:
            ax.set_xlabel("cell")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_number(v)))  # the tables' number format
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    eps = f"epsilon {report.epsilon:g}" + (f", delta {report.delta:g}" if report.delta else "")
    n_nodes = len(result.nodes) if result is not None else len(report.accepted())
    fig.suptitle(f"{report.query}: {eps} per node, {n_nodes} node(s)", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_outputs(report: QueryReport, run_dir: Path | str) -> dict[str, str]:
    """Write ``query.json``, ``query.csv`` and ``query.png`` into ``run_dir``; return their paths."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": d / "query.json", "csv": d / "query.csv", "png": d / "query.png"}
    write_csv(report, paths["csv"])
    plot_query(report, paths["png"])
    out = {k: str(v) for k, v in paths.items()}
    final = report.model_copy(update={"artifacts": {**report.artifacts, **out}})
    n_figures = sum(len(r.figures) for r in (report.result, report.truth) if r is not None)
    # indented for reading; compact when the figures run into the tens of thousands (342 nodes)
    write_json_atomic(paths["json"], final.model_dump_json(indent=2 if n_figures <= 20_000 else None))
    return out
