"""The demo task on all 342 municipalities, in simulation: wall time, time per round after
start-up, peak memory of the whole process tree, accuracy and epsilon.

The demo task (``configs/tasks/adult-income.toml``) with ``--rounds`` rounds on
``configs/federations/nl-342.toml`` (Adult split by population over all 342 municipalities),
run with ``fedgov run --no-baseline`` as a user runs it.

    .venv/bin/python benchmarks/bench_scale.py [--rounds 5] [--repeats 3]

Wall time, time per round and peak memory are medians over the repeats.

Prints the figures and writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
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


def _one(args: argparse.Namespace) -> dict[str, Any]:
    """One run of the demo task on the federation: its figures."""
    with tempfile.TemporaryDirectory(prefix="fedgov-scale-") as tmp:
        task = Path(tmp) / "task.toml"
        text = (ROOT / "configs" / "tasks" / "adult-income.toml").read_text("utf-8")
        text = text.replace("rounds = 10", f"rounds = {args.rounds}")
        text = text.replace('contract = "../contracts/', f'contract = "{ROOT}/configs/contracts/')
        text = text.replace('federation = "../federations/', f'federation = "{ROOT}/configs/federations/')
        text = text.replace('centralized = "../../data/', f'centralized = "{ROOT}/data/')
        task.write_text(text, encoding="utf-8")
        runs = Path(tmp) / "runs"
        cmd = [str(Path(sys.executable).parent / "fedgov"), "run", str(task), "-f", str(args.federation), "--runs-dir", str(runs), "--no-baseline"]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        with PeakTreeMemory(proc.pid) as mem:
            out, _ = proc.communicate()
        wall = time.time() - t0
        if proc.returncode != 0:
            print(out[-3000:])
            raise SystemExit(f"fedgov run failed with exit {proc.returncode}")
        run_dir = next(runs.iterdir())
        report = json.loads((run_dir / "report.json").read_text())
    rounds = [r for r in report["rounds"] if r["round"] > 0]
    accepted = [n for n in report["nodes"] if n["status"] == "accepted"]
    return {
        "nodes": len(report["nodes"]),
        "nodes_trained": len(accepted),
        "refused": {c: sum(1 for n in report["nodes"] if n["refusal_code"] == c) for c in {n["refusal_code"] for n in report["nodes"] if n["refusal_code"]}},
        "rounds": len(rounds),
        "wall_seconds": wall,
        "round_1_seconds": rounds[0]["seconds"],
        "round_seconds_after_start": [r["seconds"] for r in rounds[1:]],  # round 1 carries Ray's start-up
        "peak_tree_rss_mib": mem.peak / 2**20,
        "final_accuracy": report["final"]["accuracy"] if report["final"] else None,
        "majority_rate": report["majority_rate"],
        "max_epsilon": max((n["epsilon"] for n in accepted if n["epsilon"] is not None), default=None),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--federation", type=Path, default=ROOT / "configs" / "federations" / "nl-342.toml")
    args = ap.parse_args()
    runs = []
    for i in range(args.repeats):
        runs.append(_one(args))
        print(f"run {i + 1}: {runs[-1]['wall_seconds']:.1f} s wall, {runs[-1]['peak_tree_rss_mib']:.0f} MiB peak", flush=True)
    first = runs[0]
    result = {
        "command": f"benchmarks/bench_scale.py --rounds {args.rounds} --repeats {args.repeats}",
        "federation": str(args.federation.relative_to(ROOT)),
        "repeats": args.repeats,
        "nodes": first["nodes"],
        "nodes_trained": first["nodes_trained"],
        "refused": first["refused"],
        "rounds": first["rounds"],
        "wall_seconds": round(statistics.median(r["wall_seconds"] for r in runs), 1),
        "round_1_seconds": round(statistics.median(r["round_1_seconds"] for r in runs), 1),
        "median_round_seconds_after_start": round(statistics.median(s for r in runs for s in r["round_seconds_after_start"]), 1),
        "peak_tree_rss_mib": round(statistics.median(r["peak_tree_rss_mib"] for r in runs)),
        "peak_tree_rss_mib_max": round(max(r["peak_tree_rss_mib"] for r in runs)),
        "final_accuracy": first["final_accuracy"],
        "majority_rate": first["majority_rate"],
        "max_epsilon": max((r["max_epsilon"] for r in runs if r["max_epsilon"] is not None), default=None),
        "wall_seconds_each": [round(r["wall_seconds"], 1) for r in runs],
    }
    out_path = ROOT / "benchmarks" / "results" / "scale.json"
    out_path.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:34} {v}")


if __name__ == "__main__":
    main()
