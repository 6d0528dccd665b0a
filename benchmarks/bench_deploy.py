"""Deployment against simulation, measured: time per round, start-up, idle memory.

The demo task (``configs/tasks/adult-income.toml``: logreg, DP-SGD at epsilon 2 per node)
on the same 3 municipalities (the first 3 members of ``demo-12``: Rotterdam, Amsterdam,
Utrecht, Adult split by population), ``--rounds`` rounds (default 3), run twice in one
invocation:

1. in simulation (``fedgov run``: Flower's simulation engine, one process tree);
2. in deployment (``fedgov local-federation up --nodes 3``: a coordinator, its gateway and
   3 SuperNodes as separate processes with TLS and node keys; then ``fedgov task submit``).

Before the deployed run, with the federation idle for ``--idle`` seconds, the resident
memory (RSS, from /proc) of each process tree is read: the coordinator (SuperLink and
gateway, each with its children) and each node (SuperNode with SuperExec).

    .venv/bin/python benchmarks/bench_deploy.py [--rounds 3] [--idle 15]

Prints a table and writes ``benchmarks/results/deploy.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proctree import _tree_rss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEDGOV = [sys.executable, "-m", "fedgov.cli"]
MIB = 1024 * 1024


def _setup(tmp: Path, rounds: int) -> Path:
    fed = (ROOT / "configs" / "federations" / "demo-12.toml").read_text("utf-8")
    head, _, members = fed.partition("[[members]]")
    first3 = "[[members]]" + "[[members]]".join(members.split("[[members]]")[:3])
    head = head.replace('source = "../../data/adult/adult.csv"', f'source = "{ROOT / "data" / "adult" / "adult.csv"}"')
    (tmp / "fed3.toml").write_text(head.replace('name = "demo-12"', 'name = "demo-3"') + first3, encoding="utf-8")
    task = (ROOT / "configs" / "tasks" / "adult-income.toml").read_text("utf-8")
    task = re.sub(r"(?m)^rounds = \d+", f"rounds = {rounds}", task)
    task = re.sub(r'(?m)^federation = ".*"', f'federation = "{tmp / "fed3.toml"}"', task)
    task = re.sub(r'(?m)^contract = ".*"', f'contract = "{ROOT / "configs" / "contracts" / "adult-income.toml"}"', task)
    task = re.sub(r'(?m)^centralized = ".*"', f'centralized = "{ROOT / "data" / "adult" / "adult_test.csv"}"', task)
    path = tmp / "task.toml"
    path.write_text(task, encoding="utf-8")
    return path


def _round_times(run_dir: Path) -> tuple[list[float], float | None]:
    """Seconds of each training round, and seconds from the run's start to round 1's start."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text("utf-8").splitlines() if line.strip()]
    rounds = [e for e in events if e.get("event") == "round" and e.get("round", 0) > 0]
    first = next((e for e in events if e.get("event") == "started"), events[0] if events else None)
    startup = None
    if rounds and first is not None:
        startup = rounds[0]["time"] - rounds[0]["seconds"] - first["time"]
    return [float(e["seconds"]) for e in rounds], startup


def _latest_run(runs: Path) -> Path:
    return max((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with log.open("w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=15.0)
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="fedgov-bench-deploy-") as t:
        tmp = Path(t)
        task = _setup(tmp, args.rounds)

        wall = _run([*FEDGOV, "run", str(task), "--runs-dir", str(tmp / "sim-runs"), "--no-baseline"], tmp / "sim.log")
        sim_rounds, sim_startup = _round_times(_latest_run(tmp / "sim-runs"))
        result["simulation"] = {"wall_s": round(wall, 1), "round_s": [round(x, 1) for x in sim_rounds],
                                "median_round_s": round(statistics.median(sim_rounds), 1),
                                "startup_s": None if sim_startup is None else round(sim_startup, 1)}

        lf = tmp / "lf"
        _run([*FEDGOV, "local-federation", "up", "--dir", str(lf), "--nodes", "3", "--task", str(task)], tmp / "up.log")
        try:
            time.sleep(args.idle)
            state = json.loads((lf / "local-federation.json").read_text("utf-8"))
            coord = _tree_rss(int(state["superlink"])) + _tree_rss(int(state["gateway"]))
            nodes = {code: _tree_rss(int(n["pid"])) for code, n in state["nodes"].items()}
            result["idle_rss_mib"] = {
                "coordinator (SuperLink + gateway)": round(coord / MIB),
                "superlink": round(_tree_rss(int(state["superlink"])) / MIB),
                "gateway": round(_tree_rss(int(state["gateway"])) / MIB),
                "nodes": {c: round(v / MIB) for c, v in nodes.items()},
                "node median": round(statistics.median(nodes.values()) / MIB),
            }
            wall = _run([*FEDGOV, "task", "submit", str(task), "-C", str(lf / "coordinator"), "--runs-dir", str(tmp / "dep-runs")], tmp / "dep.log")
            dep_rounds, dep_startup = _round_times(_latest_run(tmp / "dep-runs"))
            result["deployment"] = {"wall_s": round(wall, 1), "round_s": [round(x, 1) for x in dep_rounds],
                                    "median_round_s": round(statistics.median(dep_rounds), 1),
                                    "startup_s": None if dep_startup is None else round(dep_startup, 1)}
        finally:
            subprocess.run([*FEDGOV, "local-federation", "down", "--dir", str(lf)], check=False, capture_output=True, cwd=ROOT)
    result["ratio_round_deployment_over_simulation"] = round(
        result["deployment"]["median_round_s"] / result["simulation"]["median_round_s"], 1
    )
    out = ROOT / "benchmarks" / "results" / "deploy.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"demo task, 3 nodes, {args.rounds} rounds ({result['machine']})")
    print("| | simulation | deployment |\n|---|---|---|")
    for key, label in (("median_round_s", "median time per round (s)"), ("startup_s", "start to round 1 (s)"), ("wall_s", "wall time (s)")):
        print(f"| {label} | {result['simulation'][key]} | {result['deployment'][key]} |")
    print(f"idle RSS: {json.dumps(result['idle_rss_mib'])}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
