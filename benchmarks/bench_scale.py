"""The benchmark table: local DP-SGD and distributed DP side by side, at 12 and at 342
municipalities, in simulation: accuracy, epsilon per municipality, wall time, time per round
after start-up, peak memory of the whole process tree.

One invocation runs, one after the other (``--scales`` and ``--modes`` choose among them):

- 12, local: ``configs/tasks/adult-income.toml`` (DP-SGD at every node) on ``configs/federations/demo-12.toml``;
- 12, distributed: ``configs/tasks/nl-342-distributed.toml`` (DP-FedAvg, noise shares under
  secure aggregation) on ``demo-12.toml``;
- 342, local: ``adult-income.toml`` on ``configs/federations/nl-342.toml`` (Adult split by
  population over all 342 municipalities);
- 342, distributed: ``nl-342-distributed.toml`` on its own federation, ``nl-342.toml``.

Each is ``fedgov run TASK -f FEDERATION --no-baseline``, as a user runs it, with the task's own
rounds (the figures are those of the shipped tasks) unless ``--rounds`` overrides them (in a
temporary copy of the task with absolute paths). Epsilon per municipality is the largest a
node that trained spent: per record for local DP-SGD, per municipality and so per citizen for
distributed DP.

    .venv/bin/python benchmarks/bench_scale.py [--scales 12 342] [--modes local distributed] [--repeats 1] [--rounds N] [--out scale.json]

Wall time, time per round and peak memory are medians over the repeats. Roughly 8 minutes a
repeat on 2 cores (12 local 1 min, 12 distributed 1 min, 342 local 2.5 min, 342 distributed
3.5 min). A run that fails is recorded with its error (the end of its output), and the next runs.

Prints a markdown table (a row as each (scale, mode) finishes) and writes
``benchmarks/results/scale.json`` (or ``--out``, a file name under ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proctree import PeakTreeMemory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"local": ROOT / "configs" / "tasks" / "adult-income.toml", "distributed": ROOT / "configs" / "tasks" / "nl-342-distributed.toml"}
FEDERATIONS = {12: ROOT / "configs" / "federations" / "demo-12.toml", 342: ROOT / "configs" / "federations" / "nl-342.toml"}
UNITS = {"distributed": "per citizen (municipality-level)", "local": "per record"}
MODE_NAMES = {"local": "local DP-SGD", "distributed": "distributed DP"}


def _rel(p: Path | str, tmp: Path) -> str:
    """A path as the command line shows it: relative to the repository, or under $TMP."""
    p = Path(p)
    if p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    if p.is_relative_to(tmp):
        return f"$TMP/{p.relative_to(tmp)}"
    return str(p)


def _task_copy(task: Path, rounds: int, tmp: Path) -> Path:
    """A copy of ``task`` with ``rounds`` rounds, its relative paths made absolute."""
    text = task.read_text("utf-8")
    text, n = re.subn(r"(?m)^rounds = \d+", f"rounds = {rounds}", text)
    if n != 1:
        raise SystemExit(f"{task}: no single 'rounds = N' line to override")
    text = re.sub(r'"(\.\.?/[^"]*)"', lambda m: '"' + str((task.parent / m.group(1)).resolve()) + '"', text)
    out = tmp / task.name
    out.write_text(text, encoding="utf-8")
    return out


def _one(scale: int, mode: str, rounds: int | None, timeout: float) -> dict[str, Any]:
    """One ``fedgov run`` of the mode's task on the scale's federation: its figures, or its error."""
    with tempfile.TemporaryDirectory(prefix="fedgov-scale-") as tmp_s:
        tmp = Path(tmp_s)
        task = TASKS[mode] if rounds is None else _task_copy(TASKS[mode], rounds, tmp)
        runs = tmp / "runs"
        cmd = [str(Path(sys.executable).parent / "fedgov"), "run", str(task), "-f", str(FEDERATIONS[scale]), "--runs-dir", str(runs), "--no-baseline"]
        shown = " ".join(["fedgov", "run", _rel(task, tmp), "-f", _rel(FEDERATIONS[scale], tmp), "--runs-dir", _rel(runs, tmp), "--no-baseline"])
        t0 = time.time()
        # its own process group, so that a run past the timeout is stopped with all it started
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
        with PeakTreeMemory(proc.pid) as mem:
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                out += f"\n(stopped after {timeout:.0f} s)"
        wall = time.time() - t0
        reports = sorted(runs.glob("*/report.json")) if runs.is_dir() else []
        report = json.loads(reports[0].read_text()) if reports else None
    base = {"command": shown, "wall_seconds": wall, "peak_tree_rss_mib": mem.peak / 2**20}
    if proc.returncode != 0 or report is None or report["status"] != "completed":
        why = f"exit {proc.returncode}" + (f", report status {report['status']}: {report['message']}" if report else ", no report")
        tail = "\n".join(out.strip().splitlines()[-15:])
        return {**base, "error": f"{why}\n{tail}"[-3000:]}
    rounds_done = [r for r in report["rounds"] if r["round"] > 0]
    trained = [n for n in report["nodes"] if n["status"] == "accepted" and n["rounds_trained"] > 0]
    privacy = report["privacy"]
    codes = sorted({n["refusal_code"] or "?" for n in report["nodes"] if n["status"] == "refused"})
    return {
        **base,
        "nodes": len(report["nodes"]),
        "nodes_trained": len(trained),
        "refused": {c: sum(1 for n in report["nodes"] if n["status"] == "refused" and (n["refusal_code"] or "?") == c) for c in codes},
        "nodes_failed": sum(1 for n in report["nodes"] if n["status"] == "failed"),
        "rounds": len(rounds_done),
        "round_1_seconds": rounds_done[0]["seconds"] if rounds_done else None,
        "round_seconds_after_start": [r["seconds"] for r in rounds_done[1:] if r["seconds"] is not None],  # round 1 carries Ray's start-up
        "final_accuracy": report["final"]["accuracy"] if report["final"] else None,
        "auc": report["final"]["auc"] if report["final"] else None,
        "majority_rate": report["majority_rate"],
        "privacy_mode": privacy.get("mode") if privacy.get("enabled") else None,
        "target_epsilon": privacy.get("target_epsilon"),
        "epsilon_per_municipality": max((n["epsilon"] for n in trained if n["epsilon"] is not None), default=None),
        "delta": max((n["delta"] for n in trained if n["delta"] is not None), default=privacy.get("delta")),
        "noise_multiplier": privacy.get("noise_multiplier"),
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def measure(scale: int, mode: str, rounds: int | None, repeats: int, timeout: float) -> dict[str, Any]:
    """``repeats`` runs of one (scale, mode): one row, the medians of the runs that completed."""
    runs = []
    for i in range(repeats):
        r = _one(scale, mode, rounds, timeout)
        runs.append(r)
        status = "failed" if "error" in r else f"{r['nodes_trained']}/{r['nodes']} trained"
        print(f"  {scale} {mode}, run {i + 1}/{repeats}: {r['wall_seconds']:.1f} s wall, {r['peak_tree_rss_mib']:.0f} MiB peak, {status}", flush=True)
    ok = [r for r in runs if "error" not in r]
    row: dict[str, Any] = {
        "scale": scale,
        "mode": mode,
        "task": str(TASKS[mode].relative_to(ROOT)),
        "federation": str(FEDERATIONS[scale].relative_to(ROOT)),
        "rounds_override": rounds,
        "repeats": repeats,
        "command": runs[0]["command"],
    }
    if not ok:
        return {**row, "error": runs[-1]["error"], "wall_seconds_each": [round(r["wall_seconds"], 1) for r in runs]}
    first = ok[0]
    row.update({
        "rounds": first["rounds"],
        "nodes": first["nodes"],
        "nodes_trained": first["nodes_trained"],
        "refused": first["refused"],
        "nodes_failed": first["nodes_failed"],
        "final_accuracy": first["final_accuracy"],
        "auc": first["auc"],
        "majority_rate": first["majority_rate"],
        "target_epsilon": first["target_epsilon"],
        "epsilon_per_municipality": max((r["epsilon_per_municipality"] for r in ok if r["epsilon_per_municipality"] is not None), default=None),
        "epsilon_unit": UNITS.get(str(first["privacy_mode"]), "no differential privacy"),
        "delta": first["delta"],
        "noise_multiplier": first["noise_multiplier"],
        "wall_seconds": round(statistics.median(r["wall_seconds"] for r in ok), 1),
        "round_1_seconds": _round(_median([r["round_1_seconds"] for r in ok if r["round_1_seconds"] is not None])),
        "median_round_seconds_after_start": _round(_median([s for r in ok for s in r["round_seconds_after_start"]])),
        "peak_tree_rss_mib": round(statistics.median(r["peak_tree_rss_mib"] for r in ok)),
        "peak_tree_rss_mib_max": round(max(r["peak_tree_rss_mib"] for r in ok)),
        "wall_seconds_each": [round(r["wall_seconds"], 1) for r in runs],
    })
    if len(ok) < len(runs):
        row["failed_repeats"] = len(runs) - len(ok)
        row["last_error"] = next(r["error"] for r in reversed(runs) if "error" in r)
    return row


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


HEADER = [
    "| municipalities | mode | nodes trained | accuracy (majority) | epsilon per municipality | wall | per round | peak memory |",
    "|---|---|---|---|---|---|---|---|",
]


def table_row(r: dict[str, Any]) -> str:
    name = MODE_NAMES.get(r["mode"], r["mode"])
    if "error" in r:
        first = r["error"].splitlines()[0] if r["error"] else "?"
        return f"| {r['scale']} | {name} | failed: {first[:80]} | - | - | {r['wall_seconds_each'][-1]:.0f} s | - | - |"
    acc = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f} ({r['majority_rate']:.4f})"
    eps = "-" if r["epsilon_per_municipality"] is None else f"{r['epsilon_per_municipality']:.2f} {r['epsilon_unit']}"
    after, first_s = r["median_round_seconds_after_start"], r["round_1_seconds"]
    per_round = f"{after:.1f} s (round 1: {first_s:.1f} s)" if after is not None else ("-" if first_s is None else f"round 1: {first_s:.1f} s")
    return (
        f"| {r['scale']} | {name}, {r['rounds']} round{'s' * (r['rounds'] != 1)} | {r['nodes_trained']} of {r['nodes']} | {acc} | {eps} | "
        f"{r['wall_seconds']:.0f} s | {per_round} | {r['peak_tree_rss_mib'] / 1024:.2f} GiB |"
    )


def _machine() -> str:
    cpu = "unknown CPU"
    mem = ""
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        kib = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[12, 342], choices=sorted(FEDERATIONS))
    ap.add_argument("--modes", nargs="+", default=["local", "distributed"], choices=sorted(TASKS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="override every task's rounds (default: each task's own)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take before it is stopped and recorded as failed")
    ap.add_argument("--out", default="scale.json", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    command = "benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
    machine = _machine()
    print(f"{command.strip()}\non {machine}, load average {os.getloadavg()[0]:.2f}\n", flush=True)
    print("\n".join(HEADER), flush=True)
    rows = []
    for scale in args.scales:
        for mode in args.modes:
            rows.append(measure(scale, mode, args.rounds, args.repeats, args.timeout))
            print(table_row(rows[-1]), flush=True)
    out_path = ROOT / "benchmarks" / "results" / args.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"command": command.strip(), "machine": machine, "rows": rows}, indent=2) + "\n")
    print("\n" + "\n".join([*HEADER, *(table_row(r) for r in rows)]))
    for r in rows:
        if "error" in r:
            print(f"\n{r['scale']} {r['mode']} failed: {r['command']}\n{r['error']}")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
