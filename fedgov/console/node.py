"""The node console (``fedgov node console``): a municipality's node, for its operator and privacy officer.

Pages, all read from the node directory through fedgov's own classes (the policy, the
ledger, the audit log, the node state), every time a page is asked for:

``/``           the node at a glance: paused or not, the budget of each data set, what waits
                for approval, the latest audit entries;
``/budget``     per data set: the composed spend against the naive sum and the budget, open
                reservations, and the composed epsilon over time (chart and table);
``/ledger``     the privacy ledger's events, filterable by task;
``/audit``      the audit log, filterable by task and kind;
``/approvals``  the tasks and queries waiting for a decision, with what each would spend and
                send; approve or reject them here (``POST /approvals/approve|reject``);
``/tasks``      every task the node has seen; ``/tasks/<id>``: what left the node for it, every
                message kind and field, with the protection the release gate declares for it;
``/policy``     the policy in readable form, its contracts and their SHA-256.

Pause and resume are forms on every page (``POST /pause``, ``POST /resume``). The hash chain
of the audit log is verified for every page and its state shown at the top.

Decisions go through :class:`~fedgov.node.home.NodeHome`'s ``approve``, ``reject``, ``pause``
and ``resume``: the same node-state change and the same audit entry as ``fedgov node approve``
etc., with ``by`` the console user (``console:<secret id>[:name]``).

No record value is ever shown: the node's files hold none (the audit log and the approval queue
hold what was decided, spent and sent; data checks hold file digests).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from fedgov.console.charts import Series, line_chart
from fedgov.console.security import Guard
from fedgov.console.web import console_app, form, local_path, render, session_of
from fedgov.errors import FedgovError, PrivacyError
from fedgov.node.audit import AuditEntry, AuditVerification
from fedgov.node.budget import Budget, LedgerEvent, Mechanism, compose
from fedgov.node.gate import DECLARATION, ERROR_KIND
from fedgov.node.home import NodeHome, budget_of

__all__ = ["BudgetPoint", "ReleaseRow", "budget_series", "describe_mechanism", "node_console", "releases_of"]

NAV = (
    ("/", "Overview"),
    ("/budget", "Budget"),
    ("/approvals", "Approvals"),
    ("/tasks", "Tasks"),
    ("/ledger", "Ledger"),
    ("/audit", "Audit log"),
    ("/policy", "Policy"),
)


# --------------------------------------------------------------------------- pure views


@dataclass(frozen=True)
class BudgetPoint:
    """The committed (composed) epsilon of a data set right after one ledger event."""

    time: datetime
    event_id: int
    task_id: str
    what: str  # reserve, release
    composed: float | None  # None: the (epsilon, delta) mechanisms leave no delta (PrivacyError)
    naive: float


class _Fold:
    __slots__ = ("closed", "reserved", "spends")

    def __init__(self) -> None:
        self.reserved: Mechanism | None = None
        self.spends: list[Mechanism] = []
        self.closed = False

    def committed(self) -> list[Mechanism]:
        """As the ledger counts a task: its whole reservation while open, its spends once closed."""
        if self.closed:
            return list(self.spends)
        return [self.reserved] if self.reserved is not None else []


def _safe_compose(mechanisms: Sequence[Mechanism], delta: float) -> float | None:
    try:
        return compose(mechanisms, delta=delta)
    except PrivacyError:
        return None


def budget_series(events: Sequence[LedgerEvent], budget: Budget, *, now: datetime, limit: int = 40) -> list[BudgetPoint]:
    """The committed epsilon of one data set after each event that changes it, in the budget
    period of ``now`` (the ledger's own rules: a task belongs to the period of its reservation;
    an open task counts its whole reservation, a closed one its spends, all composed at the
    budget's delta). Spends of an open task change nothing, so only reservations and releases
    are points. The last ``limit`` points (each composition is exact, PRV, and costs time)."""
    reserved_at = {e.task_id: e.time for e in events if e.kind == "reserve"}
    if budget.period == "year":
        counted = {t for t, at in reserved_at.items() if at.year == now.year}
    else:
        counted = set(reserved_at)
    tasks: dict[str, _Fold] = {}
    states: list[tuple[LedgerEvent, list[list[Mechanism]]]] = []
    for e in sorted(events, key=lambda e: e.id):
        if e.task_id not in counted:
            continue
        t = tasks.setdefault(e.task_id, _Fold())
        if e.kind == "reserve":
            t.reserved = e.mechanism
        elif e.kind == "spend" and e.mechanism is not None:
            t.spends.append(e.mechanism)
        else:
            t.closed = True
        if e.kind in ("reserve", "release"):
            states.append((e, [f.committed() for f in tasks.values()]))
    out = []
    for e, per_task in states[-limit:]:
        composed = _safe_compose([m for ms in per_task for m in ms], budget.delta)
        naive = sum(_safe_compose(ms, budget.delta) or 0.0 for ms in per_task)
        out.append(BudgetPoint(time=e.time, event_id=e.id, task_id=e.task_id, what=e.kind, composed=composed, naive=naive))
    return out


def describe_mechanism(m: Mechanism | None, delta: float | None = None) -> str:
    """A mechanism in words: its kind, and its epsilon (alone, at ``delta`` for DP-SGD)."""
    if m is None:
        return "-"
    if m.kind == "dpsgd":
        steps = sum(s for _, _, s in m.history)
        text = f"DP-SGD, {steps} step(s), noise " + ", ".join(f"{z:.3g}" for z in sorted({z for z, _, _ in m.history}))
        if delta is not None:
            eps = _safe_compose([m], delta)
            text += f"; epsilon {eps:.3f} alone" if eps is not None else ""
        return text
    return f"{m.kind}, epsilon {m.epsilon:g}" + (f", delta {m.delta:g}" if m.delta else "")


@dataclass(frozen=True)
class ReleaseRow:
    """One field that left the node in replies of one kind (from the audit log's ``sent`` entries)."""

    kind: str
    section: str  # array, metric, config, error
    name: str
    times: int
    shape: str  # shapes of an array, sizes of a config value; metrics: their last value
    protection: str  # what the release gate declares for it; "" when undeclared


_SECTIONS = {"arrays": "array", "metrics": "metric", "config": "config"}


def _declared(kind: str, section: str, name: str) -> str:
    kinds = [k for k in DECLARATION if k == kind or (kind == "secagg" and k.startswith("secagg-"))]
    if section == "error":
        kinds = [ERROR_KIND]
    for k in kinds:
        for r in DECLARATION[k]:
            if r.kind == section and (r.field == name or section == "error"):
                return r.protection
    return ""


def _size(value: Any) -> str:
    if isinstance(value, str) and value.endswith((" chars", " bytes")) and len(value) < 40:
        return value
    if isinstance(value, str):
        return f"{len(value)} chars"
    return type(value).__name__


def releases_of(entries: Sequence[AuditEntry]) -> list[ReleaseRow]:
    """Every field that left the node, per message kind, from the ``sent`` entries of ``entries``
    (the audit log records each reply's fields with their shapes and sizes, never rows)."""
    rows: dict[tuple[str, str, str], tuple[int, list[str], str]] = {}

    def add(kind: str, section: str, name: str, shape: str) -> None:
        times, shapes, _ = rows.get((kind, section, name), (0, [], ""))
        if shape not in shapes:
            shapes = [*shapes, shape]
        rows[(kind, section, name)] = (times + 1, shapes, _declared(kind, section, name))

    for e in entries:
        if e.kind != "sent":
            continue
        kind = str(e.payload.get("kind", "?"))
        err = e.payload.get("error")
        if isinstance(err, dict):
            add(kind, "error", f"code {err.get('code')}", "reason: " + _size(str(err.get("reason", ""))))
            continue
        for key, section in _SECTIONS.items():
            values = e.payload.get(key)
            if not isinstance(values, dict):
                continue
            for name, value in values.items():
                if section == "array":
                    add(kind, section, name, "shape " + "×".join(str(d) for d in value) if isinstance(value, list) else str(value))
                elif section == "metric":
                    add(kind, section, name, "a number")
                else:
                    add(kind, section, name, _size(value))
    return [ReleaseRow(kind=k, section=s, name=n, times=t, shape="; ".join(sh[:4]) + (" …" if len(sh) > 4 else ""), protection=p)
            for (k, s, n), (t, sh, p) in rows.items()]


def _details(payload: dict[str, Any], limit: int = 400) -> str:
    """An audit payload in one line, as ``fedgov node audit show`` prints it."""
    text = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in payload.items() if k != "config")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- the console


class _NodeConsole:
    def __init__(self, home: NodeHome) -> None:
        self.home = home
        self._verified: tuple[tuple[int, int, int], AuditVerification] | None = None
        self._lock = threading.Lock()

    # ---- what every page shows

    def verification(self) -> AuditVerification:
        """The audit log's hash chain, verified again whenever its files changed."""
        key_parts = []
        for suffix in ("", "-wal", ".head"):
            try:
                st = (self.home.path / f"{NodeHome.AUDIT}{suffix}").stat()
                key_parts.append(st.st_mtime_ns ^ st.st_size)
            except OSError:
                key_parts.append(-1)
        key = (key_parts[0], key_parts[1], key_parts[2])
        with self._lock:
            if self._verified is not None and self._verified[0] == key:
                return self._verified[1]
        v = self.home.audit.verify()
        with self._lock:
            self._verified = (key, v)
        return v

    def chrome(self) -> dict[str, Any]:
        try:
            node = self.home.policy().node
        except FedgovError:
            node = self.home.path.name
        try:
            paused, reason = self.home.state.paused()
        except FedgovError:
            paused, reason = False, ""
        try:
            verification: AuditVerification | None = self.verification()
            audit_error = ""
        except FedgovError as exc:
            verification, audit_error = None, str(exc)
        pending = len(self.home.state.pending())
        return {
            "node": node, "node_dir": str(self.home.path), "paused": paused, "pause_reason": reason,
            "verification": verification, "audit_error": audit_error, "pending_count": pending,
        }

    # ---- pages

    def budgets(self) -> list[dict[str, Any]]:
        policy = self.home.policy()
        out = []
        for ds in policy.datasets:
            budget = budget_of(ds)
            status = self.home.ledger.status(ds.name, budget)
            events = self.home.ledger.events(ds.name)
            reservations = {e.task_id: e for e in events if e.kind == "reserve"}
            open_rows = [
                {"task_id": t, "time": reservations[t].time if t in reservations else None,
                 "what": describe_mechanism(reservations[t].mechanism if t in reservations else None, budget.delta),
                 "note": reservations[t].note if t in reservations else ""}
                for t in status.open_tasks
            ]
            out.append({"ds": ds, "status": status, "budget": budget, "open": open_rows,
                        "used": min(max(status.epsilon_committed / budget.epsilon, 0.0), 1.0)})
        return out

    def series(self, dataset: str, budget: Budget) -> list[BudgetPoint]:
        return budget_series(self.home.ledger.events(dataset), budget, now=datetime.now(UTC))

    async def overview(self, request: Request) -> Response:
        def build() -> dict[str, Any]:
            entries = self.home.audit.entries()
            return {"budgets": self.budgets(), "pending": self.home.state.pending(),
                    "recent": [(e, _details(e.payload, 160)) for e in entries[-8:][::-1]]}
        return render(request, "node/overview.html", await run_in_threadpool(build))

    async def budget(self, request: Request) -> Response:
        def build() -> dict[str, Any]:
            rows = self.budgets()
            for row in rows:
                points = self.series(row["ds"].name, row["budget"])
                row["points"] = points
                t0 = points[0].time.timestamp() if points else 0.0
                span = (points[-1].time.timestamp() - t0) if points else 0.0

                def fmt(x: float, t0: float = t0, span: float = span) -> str:
                    when = datetime.fromtimestamp(t0 + x, UTC)
                    return when.strftime("%H:%M:%S" if span < 86400 else "%m-%d %H:%M")

                xs = [p.time.timestamp() - t0 for p in points]
                labels = [f"{p.what} {p.task_id}, {p.time:%Y-%m-%d %H:%M:%S}" for p in points]
                row["chart"] = line_chart(
                    [Series("composed (what counts)", [(x, p.composed) for x, p in zip(xs, points, strict=True)], labels),
                     Series("naive sum of tasks", [(x, p.naive) for x, p in zip(xs, points, strict=True)], labels)],
                    title=f"Committed epsilon of data set {row['ds'].name} over time",
                    x_label="time (UTC)", y_label="epsilon", x_format=fmt, step=True, y_min=0.0,
                    hlines=[(row["budget"].epsilon, f"budget {row['budget'].epsilon:g}")],
                )
            return {"budgets": rows}
        return render(request, "node/budget.html", await run_in_threadpool(build))

    async def ledger(self, request: Request) -> Response:
        task = request.query_params.get("task") or None

        def build() -> dict[str, Any]:
            events = self.home.ledger.events()
            tasks = sorted({e.task_id for e in events})
            try:
                deltas = {ds.name: ds.budget.delta for ds in self.home.policy().datasets}
            except FedgovError:
                deltas = {}
            shown = [e for e in events if task is None or e.task_id == task]
            rows = [(e, describe_mechanism(e.mechanism, deltas.get(e.dataset))) for e in shown]
            return {"events": rows, "tasks": tasks, "task": task or "", "total": len(events)}
        return render(request, "node/ledger.html", await run_in_threadpool(build))

    async def audit(self, request: Request) -> Response:
        task = request.query_params.get("task") or None
        kind = request.query_params.get("kind") or None

        def build() -> dict[str, Any]:
            entries = self.home.audit.entries()
            tasks = sorted({e.task_id for e in entries if e.task_id})
            kinds = sorted({e.kind for e in entries})
            shown = [e for e in entries if (task is None or e.task_id == task) and (kind is None or e.kind == kind)]
            return {"entries": [(e, _details(e.payload)) for e in shown[::-1]], "tasks": tasks, "kinds": kinds,
                    "task": task or "", "kind": kind or "", "total": len(entries)}
        return render(request, "node/audit.html", await run_in_threadpool(build))

    async def approvals(self, request: Request) -> Response:
        def build() -> dict[str, Any]:
            everything = self.home.state.tasks()
            return {"pending": [t for t in everything if t.status == "pending"],
                    "decided": [t for t in everything if t.status != "pending"][::-1],
                    "done": request.query_params.get("done", ""), "done_task": request.query_params.get("task", "")}
        return render(request, "node/approvals.html", await run_in_threadpool(build))

    async def decide(self, request: Request) -> Response:
        fields = await form(request)
        who = session_of(request).who
        task_id = fields.get("task_id", "").strip()
        if not task_id:
            raise HTTPException(400, "which task? (no task_id in the form)")
        verb = request.path_params["verb"]
        if verb == "approve":
            await run_in_threadpool(self.home.approve, task_id, by=who)
            done = "approved"
        elif verb == "reject":
            reason = fields.get("reason", "").strip()[:500]
            await run_in_threadpool(self.home.reject, task_id, reason, by=who)
            done = "rejected"
        else:
            raise HTTPException(404, "no such action")
        return RedirectResponse(f"/approvals?done={done}&task={quote(task_id, safe='')}", status_code=303)

    async def pause(self, request: Request) -> Response:
        fields = await form(request)
        who = session_of(request).who
        if request.url.path == "/pause":
            await run_in_threadpool(self.home.pause, fields.get("reason", "").strip()[:500], by=who)
        else:
            await run_in_threadpool(self.home.resume, by=who)
        return RedirectResponse(local_path(fields.get("back")), status_code=303)

    async def tasks(self, request: Request) -> Response:
        def build() -> dict[str, Any]:
            events = self.home.ledger.events()
            entries = self.home.audit.entries()
            ids: dict[str, dict[str, Any]] = {}
            for e in entries:
                if e.task_id:
                    row = ids.setdefault(e.task_id, {"first": e.time, "sent": 0, "received": 0, "state": "-", "decision": ""})
                    if e.kind == "sent":
                        row["sent"] += 1
                    elif e.kind == "received":
                        row["received"] += 1
                    elif e.kind == "decision":
                        row["decision"] = "accepted" if e.payload.get("accepted") else f"refused ({e.payload.get('code')})"
            for ev in events:
                ids.setdefault(ev.task_id, {"first": ev.time, "sent": 0, "received": 0, "state": "-", "decision": ""})
            for tid, row in ids.items():
                row["state"] = self.home.ledger.task_state(tid)
            return {"tasks": sorted(ids.items(), key=lambda kv: kv[1]["first"], reverse=True)}
        return render(request, "node/tasks.html", await run_in_threadpool(build))

    async def task(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]

        def build() -> dict[str, Any]:
            entries = self.home.audit.entries(task_id=task_id)
            events = [e for e in self.home.ledger.events() if e.task_id == task_id]
            if not entries and not events:
                raise HTTPException(404, f"the node has no record of task {task_id}")
            try:
                deltas = {ds.name: ds.budget.delta for ds in self.home.policy().datasets}
            except FedgovError:
                deltas = {}
            blocked = [e for e in entries if e.kind == "blocked"]
            return {
                "task_id": task_id, "releases": releases_of(entries), "blocked": blocked,
                "events": [(e, describe_mechanism(e.mechanism, deltas.get(e.dataset))) for e in events],
                "entries": [(e, _details(e.payload, 200)) for e in entries if e.kind not in ("sent", "received")],
                "approval": self.home.state.get(task_id),
            }
        return render(request, "node/task.html", await run_in_threadpool(build))

    async def policy(self, request: Request) -> Response:
        def build() -> dict[str, Any]:
            from fedgov.node.contracts import held_contracts
            from fedgov.node.policy import file_sha256

            ctx: dict[str, Any] = {"policy_path": str(self.home.policy_path), "policy_error": ""}
            try:
                ctx["policy_sha256"] = file_sha256(self.home.policy_path)
                policy = self.home.policy()
            except FedgovError as exc:
                ctx["policy_error"] = str(exc)
                return ctx
            except OSError as exc:
                ctx["policy_error"] = f"{self.home.policy_path}: {exc}"
                return ctx
            ctx["policy"] = policy
            ctx["sections"] = _sections(policy)
            datasets = []
            checks = self.home.state.data_checks()
            for ds in policy.datasets:
                contracts = []
                held = held_contracts(ds)
                for version, pin in ds.contract_files.items():
                    try:
                        actual = file_sha256(pin.path)
                    except OSError:
                        actual = ""
                    contracts.append({"version": version, "pin": pin, "actual": actual, "contract": held.get(version)})
                datasets.append({"ds": ds, "contracts": contracts, "checks": [c for c in checks if c.dataset == ds.name][-3:]})
            ctx["datasets"] = datasets
            return ctx
        return render(request, "node/policy.html", await run_in_threadpool(build))


def _sections(policy: Any) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """The policy's settings by section: (name, [(setting, value, what it means)])."""
    from pydantic import BaseModel

    def rows(model: BaseModel, skip: Sequence[str] = ()) -> list[tuple[str, str, str]]:
        out = []
        for name, info in type(model).model_fields.items():
            if name in skip:
                continue
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                continue
            text = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
            out.append((name, text, info.description or ""))
        return out

    sections = [("node", rows(policy, skip=("datasets",))), ("accept", rows(policy.accept)), ("limits", rows(policy.limits))]
    if policy.secure_aggregation is not None:
        sections.append(("secure_aggregation", rows(policy.secure_aggregation)))
    for ds in policy.datasets:
        sections.append((f"data set {ds.name}", rows(ds, skip=("contract_files", "budget")) + [
            (f"budget.{k}", v, d) for k, v, d in rows(ds.budget)]))
    return sections


def node_console(home: NodeHome, guard: Guard, *, allowed_hosts: Sequence[str] | None = None) -> Starlette:
    """The node console's application for the node directory ``home``."""
    c = _NodeConsole(home)
    routes = [
        Route("/", c.overview),
        Route("/budget", c.budget),
        Route("/ledger", c.ledger),
        Route("/audit", c.audit),
        Route("/approvals", c.approvals),
        Route("/approvals/{verb}", c.decide, methods=["POST"]),
        Route("/pause", c.pause, methods=["POST"]),
        Route("/resume", c.pause, methods=["POST"]),
        Route("/tasks", c.tasks),
        Route("/tasks/{task_id}", c.task),
        Route("/policy", c.policy),
    ]
    return console_app(title="fedgov node console", guard=guard, routes=routes, nav=NAV, chrome=c.chrome,
                       allowed_hosts=allowed_hosts, holder="node")
