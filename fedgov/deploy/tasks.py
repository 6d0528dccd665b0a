"""``fedgov task list|status|stop``: the runs at a coordinator, joined with fedgov's run directories.

Flower knows each run by its id, status and timings (``flwr ls``, over the Control API on the
coordinator's own host); fedgov knows what a run is for: its task, its run directory, its rounds
and its report. The ServerApp writes the Flower run id into the run's first event
(``events.jsonl``, ``started``) and into ``report.json``, so the two views meet here.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedgov.deploy.superlink import CONNECTION, _json_out, run_flwr
from fedgov.errors import FederationError

__all__ = ["NOT_AT_SUPERLINK", "RunInfo", "list_runs", "run_status", "stop_run", "run_dirs"]


class RunInfo(BaseModel):
    """One run at the coordinator: Flower's view and, where found, fedgov's."""

    model_config = ConfigDict(extra="forbid")

    run_id: int
    status: str
    status_details: str = ""
    fab_hash: str = ""
    elapsed_s: float | None = None
    pending_at: str = ""
    finished_at: str = ""
    run_dir: str | None = None
    task: str | None = None
    rounds_done: int | None = None
    rounds_planned: int | None = None
    report_status: str | None = None
    message: str = ""


def _started_events(events: Path) -> list[dict[str, Any]]:
    """The ``started`` events of a run directory: one, or one more per resume."""
    out: list[dict[str, Any]] = []
    try:
        with events.open("r", encoding="utf-8") as f:
            for line in f:
                if '"started"' not in line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "started":
                    out.append(dict(ev))
    except OSError:
        return []
    return out


def run_dirs(runs_dir: Path) -> dict[int, Path]:
    """Flower run id -> fedgov run directory, for the run directories under ``runs_dir``
    (a resumed run directory holds several Flower runs)."""
    out: dict[int, Path] = {}
    if not runs_dir.is_dir():
        return out
    for d in sorted(runs_dir.iterdir()):
        for ev in _started_events(d / "events.jsonl"):
            if ev.get("flower_run_id") is not None:
                out[int(ev["flower_run_id"])] = d
    return out


def _rounds(run_dir: Path) -> tuple[int | None, int | None, str | None, str, str | None]:
    """(rounds done, planned, report status, message, task) from a run directory."""
    done = None
    try:
        with (run_dir / "events.jsonl").open("r", encoding="utf-8") as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "round" and isinstance(ev.get("round"), int):
                    done = max(done or 0, ev["round"])
    except OSError:
        pass
    try:
        rep = json.loads((run_dir / "report.json").read_text("utf-8"))
    except (OSError, ValueError):
        rep = {}
    return done, rep.get("rounds_planned"), rep.get("status"), str(rep.get("message", "")), rep.get("task")


def _info(row: dict[str, Any], dirs: dict[int, Path]) -> RunInfo:
    rid = int(row["run-id"])
    info = RunInfo(
        run_id=rid,
        status=str(row.get("status", "")),
        status_details="" if row.get("status-details") in (None, "N/A") else str(row["status-details"]),
        fab_hash=str(row.get("fab-hash", "")),
        elapsed_s=float(row["elapsed"]) if isinstance(row.get("elapsed"), int | float) else None,
        pending_at=str(row.get("pending-at", "")),
        finished_at="" if row.get("finished-at") in (None, "N/A") else str(row["finished-at"]),
    )
    d = dirs.get(rid)
    if d is not None:
        done, planned, rstatus, message, task = _rounds(d)
        info = info.model_copy(
            update={"run_dir": str(d), "rounds_done": done, "rounds_planned": planned, "report_status": rstatus,
                    "message": message, "task": task}
        )
    return info


def _runs(coordinator_dir: Path, extra: list[str]) -> list[dict[str, Any]]:
    out = _json_out(run_flwr(coordinator_dir, ["ls", CONNECTION, *extra, "--format", "json"]))
    rows = out.get("runs", []) if isinstance(out, dict) else []
    return [dict(r) for r in rows]


NOT_AT_SUPERLINK = "not-at-superlink"
"""The status of a run that has a run directory but that the SuperLink does not know: it ran
before the coordinator restarted (the SuperLink keeps its runs in memory,
:mod:`fedgov.deploy.linkrun`); its run directory says how it ended."""


def _started_at(run_dir: Path, run_id: int) -> str:
    for ev in _started_events(run_dir / "events.jsonl"):
        if ev.get("flower_run_id") is not None and int(ev["flower_run_id"]) == run_id and isinstance(ev.get("time"), int | float):
            return datetime.fromtimestamp(float(ev["time"]), tz=timezone.utc).isoformat()
    return ""


def _from_dir(run_id: int, run_dir: Path) -> RunInfo:
    """A run the SuperLink does not know, from its run directory alone."""
    done, planned, rstatus, message, task = _rounds(run_dir)
    return RunInfo(
        run_id=run_id, status=NOT_AT_SUPERLINK, status_details="ran before the coordinator restarted; see its run directory",
        pending_at=_started_at(run_dir, run_id), run_dir=str(run_dir), rounds_done=done, rounds_planned=planned,
        report_status=rstatus, message=message, task=task,
    )


def list_runs(coordinator_dir: Path, runs_dir: Path = Path("runs")) -> list[RunInfo]:
    """Every run the coordinator's SuperLink knows, and the runs of ``runs_dir`` it does not
    know (from before a restart: status :data:`NOT_AT_SUPERLINK`), newest first."""
    dirs = run_dirs(runs_dir)
    infos = [_info(r, dirs) for r in _runs(coordinator_dir, [])]
    known = {i.run_id for i in infos}
    infos += [_from_dir(rid, d) for rid, d in dirs.items() if rid not in known]
    return sorted(infos, key=lambda i: _sort_key(i.pending_at), reverse=True)


def _sort_key(pending_at: str) -> float:
    """Seconds since the epoch of Flower's or fedgov's timestamp (0 when there is none)."""
    try:
        return datetime.fromisoformat(pending_at.replace("Z", "+00:00")).timestamp() if pending_at else 0.0
    except ValueError:
        return 0.0


def run_status(coordinator_dir: Path, run_id: int, runs_dir: Path = Path("runs")) -> RunInfo:
    """One run: the SuperLink's view, else (a run from before a restart) its run directory's;
    :class:`FederationError` if neither knows it."""
    try:
        rows = _runs(coordinator_dir, ["--run-id", str(run_id)])
    except FederationError as exc:
        if "not found" not in str(exc).lower():
            raise  # the SuperLink did not answer: not a run it forgot
        rows, why = [], f": {exc}"
    else:
        why = " ('fedgov task list' shows the runs)"
    rows = [r for r in rows if int(r.get("run-id", -1)) == run_id]
    dirs = run_dirs(runs_dir)
    if rows:
        return _info(rows[0], dirs)
    if run_id in dirs:
        return _from_dir(run_id, dirs[run_id])
    raise FederationError(f"run {run_id} is not known at this coordinator{why}")


def stop_run(coordinator_dir: Path, run_id: int) -> RunInfo:
    """Stop a run (``flwr stop``); the ServerApp and the nodes' ClientApps end within seconds."""
    current = run_status(coordinator_dir, run_id, Path("/nonexistent"))
    if current.status.startswith("finished"):
        raise FederationError(f"run {run_id} has already finished ({current.status}); nothing to stop")
    _json_out(run_flwr(coordinator_dir, ["stop", str(run_id), CONNECTION, "--format", "json"]))
    return run_status(coordinator_dir, run_id, Path("/nonexistent"))
