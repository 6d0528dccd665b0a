"""The demo task on all 342 municipalities, in simulation: wall time, time per round after
start-up, peak memory of the whole process tree, accuracy and epsilon.

The demo task (``configs/tasks/adult-income.toml``) with ``--rounds`` rounds on
``configs/federations/nl-342.toml`` (Adult split by population over all 342 municipalities),
run with ``fedgov run --no-baseline`` as a user runs it.

    .venv/bin/python benchmarks/bench_scale.py [--rounds 5]

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proctree import PeakTreeMemory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--federation", type=Path, default=ROOT / "configs" / "federations" / "nl-342.toml")
    args = ap.parse_args()
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
    per_round = [r["seconds"] for r in rounds[1:]]  # round 1 carries Ray's start-up
    accepted = [n for n in report["nodes"] if n["status"] == "accepted"]
    result = {
        "command": "benchmarks/bench_scale.py --rounds %d" % args.rounds,
        "federation": str(args.federation.relative_to(ROOT)),
        "nodes": len(report["nodes"]),
        "nodes_trained": len(accepted),
        "refused": {c: sum(1 for n in report["nodes"] if n["refusal_code"] == c) for c in {n["refusal_code"] for n in report["nodes"] if n["refusal_code"]}},
        "rounds": len(rounds),
        "wall_seconds": round(wall, 1),
        "round_1_seconds": round(rounds[0]["seconds"], 1),
        "median_round_seconds_after_start": round(statistics.median(per_round), 1) if per_round else None,
        "peak_tree_rss_mib": round(mem.peak / 2**20),
        "final_accuracy": report["final"]["accuracy"] if report["final"] else None,
        "majority_rate": report["majority_rate"],
        "max_epsilon": max((n["epsilon"] for n in accepted if n["epsilon"] is not None), default=None),
    }
    out_path = ROOT / "benchmarks" / "results" / "scale.json"
    out_path.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:34} {v}")


if __name__ == "__main__":
    main()
