"""fedgov task list|status|stop: Flower's runs joined with fedgov's run directories (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedgov.deploy import tasks
from fedgov.errors import FederationError


def _flwr_rows(*rows: dict) -> str:  # type: ignore[type-arg]
    return "Using SuperLink: fedgov\n" + json.dumps({"success": True, "runs": list(rows)})


def _row(rid: int, status: str, pending: str) -> dict:  # type: ignore[type-arg]
    return {"run-id": str(rid), "status": status, "status-details": "N/A", "fab-hash": "ab" * 32,
            "elapsed": 12.5, "pending-at": pending, "finished-at": "N/A"}


def _run_dir(runs: Path, name: str, rid: int, rounds: list[int], planned: int, status: str) -> Path:
    d = runs / name
    d.mkdir(parents=True)
    lines = [{"event": "started", "flower_run_id": rid, "task": "demo"}]
    lines += [{"event": "round", "round": r, "seconds": 1.0} for r in [0, *rounds]]
    (d / "events.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (d / "report.json").write_text(json.dumps({"rounds_planned": planned, "status": status, "message": "", "task": "demo"}))
    return d


def test_list_joins_flower_runs_with_run_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    d1 = _run_dir(runs, "a", 11, [1, 2], 2, "completed")
    (runs / "junk").mkdir()  # not a run directory: ignored
    (runs / "broken").mkdir()
    (runs / "broken" / "events.jsonl").write_text("{not json\n")
    calls: list[list[str]] = []

    def fake(directory: Path, args: list[str], **kw: object) -> str:
        calls.append(args)
        return _flwr_rows(_row(11, "finished:completed", "2026-11-28 10:00:00Z"), _row(12, "running", "2026-11-28 11:00:00Z"))

    monkeypatch.setattr(tasks, "run_flwr", fake)
    infos = tasks.list_runs(tmp_path / "coord", runs)
    assert [i.run_id for i in infos] == [12, 11]  # newest first
    done = infos[1]
    assert done.run_dir == str(d1) and (done.rounds_done, done.rounds_planned) == (2, 2) and done.task == "demo"
    assert infos[0].run_dir is None and infos[0].status == "running"
    assert calls == [["ls", "fedgov", "--format", "json"]]


def test_status_of_an_unknown_run_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        tasks, "run_flwr",
        lambda d, a, **kw: json.dumps({"success": False, "error-message": "[code: 16] Run ID not found."}),
    )
    with pytest.raises(FederationError, match="run 99 is not known"):
        tasks.run_status(tmp_path, 99, tmp_path)


def test_stop_refuses_a_finished_run_and_stops_a_running_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"status": "finished:completed"}
    seen: list[list[str]] = []

    def fake(directory: Path, args: list[str], **kw: object) -> str:
        seen.append(args)
        if args[0] == "stop":
            state["status"] = "finished:stopped"
            return json.dumps({"success": True})
        return _flwr_rows(_row(5, state["status"], "x"))

    monkeypatch.setattr(tasks, "run_flwr", fake)
    with pytest.raises(FederationError, match="already finished"):
        tasks.stop_run(tmp_path, 5)
    assert not [a for a in seen if a[0] == "stop"]
    state["status"] = "running"
    assert tasks.stop_run(tmp_path, 5).status == "finished:stopped"
    assert ["stop", "5", "fedgov", "--format", "json"] in seen


def test_runs_from_before_a_coordinator_restart_come_from_their_run_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SuperLink keeps its runs in memory: after a restart it knows only the new ones. The
    list still shows the older runs, from their run directories, newest first with the others."""
    runs = tmp_path / "runs"
    old = _run_dir(runs, "old", 7, [1, 2, 3], 3, "completed")
    events = old / "events.jsonl"
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    lines[0]["time"] = 1795000000.0  # 2026-11-18, before the SuperLink's run below
    events.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    _run_dir(runs, "new", 8, [1], 1, "completed")

    def fake(directory: Path, args: list[str], **kw: object) -> str:
        if "--run-id" in args and args[args.index("--run-id") + 1] != "8":
            return json.dumps({"success": False, "error-message": "[code: 16] Run ID not found."})
        return _flwr_rows(_row(8, "finished:completed", "2026-11-28 10:00:00Z"))

    monkeypatch.setattr(tasks, "run_flwr", fake)
    infos = tasks.list_runs(tmp_path / "coord", runs)
    assert [i.run_id for i in infos] == [8, 7]
    before = infos[1]
    assert before.status == tasks.NOT_AT_SUPERLINK and before.run_dir == str(old)
    assert (before.rounds_done, before.rounds_planned, before.report_status) == (3, 3, "completed")
    assert before.pending_at.startswith("2026-11-18")
    assert tasks.run_status(tmp_path / "coord", 7, runs).run_dir == str(old)
    with pytest.raises(FederationError, match="run 9 is not known"):
        tasks.run_status(tmp_path / "coord", 9, runs)
    with pytest.raises(FederationError, match="run 7 is not known"):
        tasks.stop_run(tmp_path / "coord", 7)  # nothing to stop: Flower has no such run

    # a SuperLink that does not answer is not a SuperLink that forgot the run
    def down(directory: Path, args: list[str], **kw: object) -> str:
        raise FederationError("flwr ls failed: connection refused")

    monkeypatch.setattr(tasks, "run_flwr", down)
    with pytest.raises(FederationError, match="connection refused"):
        tasks.run_status(tmp_path / "coord", 7, runs)
