"""Deployment against simulation, measured: time per round, start-up, wall, idle memory.

The demo task (``configs/tasks/adult-income.toml``: logreg, DP-SGD at epsilon 2 per node)
on the first ``--nodes`` members of ``demo-12`` (default 3: Rotterdam, Amsterdam, Utrecht,
Adult split by population), ``--rounds`` rounds (default 5), in one invocation:

1. in simulation (``fedgov run``: Flower's simulation engine, one process tree);
2. deployed with ``--runtime cold`` (``fedgov local-federation up``: a coordinator, its
   gateway and the nodes as separate processes with TLS and node keys; every message in a
   fresh ClientApp process, as Flower runs it; fedgov's shorter waits at the coordinator apply);
3. deployed with the warm node runtime (the default: one long-lived worker per node), the
   SuperLink's state in memory with the admitted nodes in ``nodes.json`` (the default,
   :mod:`fedgov.deploy.linkrun`); with ``--with-database`` also before it, the warm runtime
   with the SuperLink's state in Flower's SQLite database (``--superlink-state database``).

Before each deployed run, with the federation idle for ``--idle`` seconds, the resident
memory (RSS, from /proc) of each process tree is read: the coordinator (SuperLink and
gateway, each with its children) and each node (its launcher with SuperNode, SuperExec and
worker); after the run it is read again (the node idle after a task).

``--distributed`` adds a run of the distributed-DP task (secure aggregation, discrete
Gaussian noise on the sum; ``configs/tasks/adult-income-distributed.toml`` on the same
members) on the warm deployment, and reports its time per round.

    .venv/bin/python benchmarks/bench_deploy.py [--nodes 3] [--rounds 5] [--idle 15] [--distributed] [--skip-cold]
        [--with-database]

Prints a table and writes ``benchmarks/results/deploy[-N].json``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _setup(tmp: Path, rounds: int, nodes: int = 3, source: str = "adult-income.toml", name: str = "task.toml") -> Path:
    fed = (ROOT / "configs" / "federations" / "demo-12.toml").read_text("utf-8")
    head, _, members = fed.partition("[[members]]")
    first = "[[members]]" + "[[members]]".join(members.split("[[members]]")[:nodes])
    head = head.replace('source = "../../data/adult/adult.csv"', f'source = "{ROOT / "data" / "adult" / "adult.csv"}"')
    fed_path = tmp / f"fed{nodes}.toml"
    fed_path.write_text(head.replace('name = "demo-12"', f'name = "demo-{nodes}"') + first, encoding="utf-8")
    task = (ROOT / "configs" / "tasks" / source).read_text("utf-8")
    task = re.sub(r"(?m)^rounds = \d+", f"rounds = {rounds}", task)
    task = re.sub(r'(?m)^federation = ".*"', f'federation = "{fed_path}"', task)
    task = re.sub(r'(?m)^contract = ".*"', f'contract = "{ROOT / "configs" / "contracts" / "adult-income.toml"}"', task)
    task = re.sub(r'(?m)^centralized = ".*"', f'centralized = "{ROOT / "data" / "adult" / "adult_test.csv"}"', task)
    path = tmp / name
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


def _idle_rss(lf: Path) -> dict[str, Any]:
    state = json.loads((lf / "local-federation.json").read_text("utf-8"))
    coord = _tree_rss(int(state["superlink"])) + _tree_rss(int(state["gateway"]))
    nodes = {code: _tree_rss(int(n["pid"])) for code, n in state["nodes"].items()}
    return {
        "coordinator (SuperLink + gateway)": round(coord / MIB),
        "node median": round(statistics.median(nodes.values()) / MIB),
        "node max": round(max(nodes.values()) / MIB),
    }


def _summary(run_dir: Path, wall: float) -> dict[str, Any]:
    rounds, startup = _round_times(run_dir)
    report = json.loads((run_dir / "report.json").read_text("utf-8"))
    final = (report.get("final") or {}).get("accuracy")
    eps = [n.get("epsilon") for n in report.get("nodes", []) if n.get("epsilon") is not None]
    return {"wall_s": round(wall, 1), "round_s": [round(x, 2) for x in rounds],
            "median_round_s": round(statistics.median(rounds), 2) if rounds else None,
            "startup_s": None if startup is None else round(startup, 1),
            "accuracy": None if final is None else round(float(final), 4),
            "epsilon_max": round(max(eps), 3) if eps else None, "status": report.get("status")}


_CLASSES = (
    ("fedgov.deploy.worker", "node: warm workers"),
    ("fedgov.deploy.noderun", "node: SuperNodes"),
    ("flower-superexec", "SuperExec (nodes' and coordinator's)"),
    ("relay.py", "node: relays / cold ClientApps"),
    ("fedgov.deploy.clientapp", "node: relays / cold ClientApps"),
    ("flwr-clientapp", "node: relays / cold ClientApps"),
    ("flower-superlink", "coordinator: SuperLink"),
    ("fedgov.deploy.linkrun", "coordinator: SuperLink"),
    ("fedgov.deploy.gateway", "coordinator: gateway"),
    ("flwr-serverapp", "coordinator: ServerApp"),
)


def _cpu_by_class(under: str) -> dict[str, float]:
    """CPU seconds (user + system, each process's own) so far of the live processes started for
    ``under``, by kind; processes that ended are not counted (see ``_cpu_run``)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if under not in cmd and under.encode() not in env:
            continue
        kind = next((label for key, label in _CLASSES if key in cmd), None)
        if kind is None:
            continue
        f = stat[stat.rfind(")") + 2 :].split()
        out[kind] = out.get(kind, 0.0) + (int(f[11]) + int(f[12])) / tick  # its own, not its reaped children's
    return out


def _cpu_run(cmd: list[str], log: Path, under: str) -> tuple[float, dict[str, float]]:
    """Run ``cmd``; its wall time and the CPU seconds the federation's processes spent meanwhile
    (sampled every 0.2 s, so that short-lived processes such as the ServerApp are counted, up to
    their last 0.2 s; a cold ClientApp that lives less than that is missed)."""
    import threading

    seen: dict[str, float] = {}
    base = _cpu_by_class(under)
    stop = threading.Event()

    def sample() -> None:
        peak: dict[str, float] = {}
        while not stop.is_set():
            for k, v in _cpu_by_class(under).items():
                peak[k] = max(peak.get(k, 0.0), v)
            seen.update(peak)
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    wall = _run(cmd, log)
    stop.set()
    t.join()
    return wall, {k: round(v - base.get(k, 0.0), 1) for k, v in sorted(seen.items(), key=lambda kv: -kv[1])}


def _deployed(tmp: Path, label: str, task: Path, nodes: int, runtime: str, idle: float, extra: list[Path],
              superlink_state: str = "memory") -> dict[str, Any]:
    lf = tmp / f"lf-{label}"
    t0 = time.monotonic()
    _run([*FEDGOV, "local-federation", "up", "--dir", str(lf), "--nodes", str(nodes), "--task", str(task), "--runtime", runtime,
          "--superlink-state", superlink_state], tmp / f"up-{label}.log")
    out: dict[str, Any] = {"up_s": round(time.monotonic() - t0, 1)}
    try:
        time.sleep(idle)
        out["idle_rss_mib_before"] = _idle_rss(lf)
        for i, t in enumerate([task, *extra]):
            runs = tmp / f"runs-{label}-{i}"
            wall, cpu = _cpu_run([*FEDGOV, "task", "submit", str(t), "-C", str(lf / "coordinator"), "--runs-dir", str(runs)],
                                 tmp / f"dep-{label}-{i}.log", str(lf))
            out["run" if i == 0 else f"extra{i}"] = {**_summary(_latest_run(runs), wall), "cpu_s": cpu}
        time.sleep(idle)
        out["idle_rss_mib_after"] = _idle_rss(lf)
    finally:
        subprocess.run([*FEDGOV, "local-federation", "down", "--dir", str(lf)], check=False, capture_output=True, cwd=ROOT)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--idle", type=float, default=15.0)
    ap.add_argument("--distributed", action="store_true", help="also a distributed-DP task under secure aggregation (warm)")
    ap.add_argument("--skip-cold", action="store_true", help="leave out the deployment with a fresh process per message")
    ap.add_argument("--with-database", action="store_true",
                    help="also the warm runtime with the SuperLink's state in Flower's SQLite database (superlink_state = database)")
    args = ap.parse_args()
    result: dict[str, Any] = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
                              "nodes": args.nodes, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="fedgov-bench-deploy-") as t:
        tmp = Path(t)
        task = _setup(tmp, args.rounds, args.nodes)
        extra = [_setup(tmp, 2, args.nodes, "adult-income-distributed.toml", "distributed.toml")] if args.distributed else []
        wall = _run([*FEDGOV, "run", str(task), "--runs-dir", str(tmp / "sim-runs"), "--no-baseline"], tmp / "sim.log")
        result["simulation"] = _summary(_latest_run(tmp / "sim-runs"), wall)
        if not args.skip_cold:
            result["cold"] = _deployed(tmp, "cold", task, args.nodes, "cold", args.idle, [])
        if args.with_database:
            result["warm-database"] = _deployed(tmp, "warm-database", task, args.nodes, "warm", args.idle, [], "database")
        result["warm"] = _deployed(tmp, "warm", task, args.nodes, "warm", args.idle, extra)
    sim = result["simulation"]["median_round_s"]
    for mode in ("cold", "warm-database", "warm"):
        if mode in result:
            result[f"ratio_round_{mode}_over_simulation"] = round(result[mode]["run"]["median_round_s"] / sim, 2)
    out = ROOT / "benchmarks" / "results" / ("deploy.json" if args.nodes == 3 else f"deploy-{args.nodes}.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    modes = [m for m in ("cold", "warm-database", "warm") if m in result]
    print(f"demo task, {args.nodes} nodes, {args.rounds} rounds ({result['machine']})")
    print("| | simulation | " + " | ".join(f"deployed, {m} runtime" for m in modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for key, label in (("median_round_s", "median time per round (s)"), ("startup_s", "start of run to round 1 (s)"),
                       ("wall_s", "wall time of the run (s)"), ("accuracy", "final accuracy"), ("epsilon_max", "largest epsilon of a node")):
        print(f"| {label} | {result['simulation'][key]} | " + " | ".join(str(result[m]["run"][key]) for m in modes) + " |")
    print("| ratio per round to simulation | 1 | " + " | ".join(str(result[f"ratio_round_{m}_over_simulation"]) for m in modes) + " |")
    for which in ("before", "after"):
        print(f"| idle RSS, node median (MiB), {which} the run | - | "
              + " | ".join(str(result[m][f"idle_rss_mib_{which}"]["node median"]) for m in modes) + " |")
    print("| idle RSS, coordinator (MiB) | - | " + " | ".join(str(result[m]["idle_rss_mib_before"]["coordinator (SuperLink + gateway)"]) for m in modes) + " |")
    print("| federation up (s) | - | " + " | ".join(str(result[m]["up_s"]) for m in modes) + " |")
    for m in modes:
        print(f"CPU seconds during the {m} run, by process kind: {json.dumps(result[m]['run']['cpu_s'])}")
    if args.distributed:
        d = result["warm"]["extra1"]
        print(f"distributed DP under secure aggregation, {args.nodes} nodes, warm: rounds {d['round_s']} s "
              f"(median {d['median_round_s']} s), wall {d['wall_s']} s, accuracy {d['accuracy']}, status {d['status']}")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
