"""The demo, measured: wall time, peak memory of the process tree, accuracy, epsilon, gain.

Also trains the same model without DP on all training rows at one place (the non-private
centralized baseline), with the same contract-driven preprocessing, and evaluates it on the
same held-out test set.

    .venv/bin/python benchmarks/bench_demo.py [--task configs/tasks/adult-income.toml]

Prints a table and writes benchmarks/results/demo.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proctree import PeakTreeMemory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def centralized_nonprivate(task_path: Path, epochs: int = 20) -> float:
    import numpy as np

    from fedgov.config import TrainingSpec, load_task
    from fedgov.data import Encoder, read_table, validate_frame
    from fedgov.models import build_model
    from fedgov.models import evaluate
    from fedgov.node.training import train_nonprivate_round

    task, contract = load_task(task_path)
    enc = Encoder.from_contract(contract, task.features)
    cols = enc.columns

    def load(p: Path) -> tuple[np.ndarray, np.ndarray]:
        raw = read_table(p)
        return enc.transform(validate_frame(raw[[c for c in raw.columns if c in cols]], contract, file=str(p), columns=cols))

    from fedgov.config import load_federation

    fed = load_federation(task.federation)
    X, y = load(fed.source)
    Xt, yt = load(task.evaluation.centralized)
    model = build_model(task.model, n_features=enc.n_features, n_classes=enc.n_classes, seed=0)
    training = TrainingSpec(local_epochs=epochs, batch_size=256, learning_rate=task.training.learning_rate or 0.5)
    train_nonprivate_round(model, X, y, training=training, seed=0)
    return evaluate(model, Xt, yt).accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", type=Path, default=ROOT / "configs" / "tasks" / "adult-income.toml")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    args = ap.parse_args()

    fedgov_bin = Path(sys.executable).parent / "fedgov"
    t0 = time.time()
    proc = subprocess.Popen([str(fedgov_bin), "run", str(args.task), "--runs-dir", str(args.runs_dir)], stdout=subprocess.PIPE, text=True)
    with PeakTreeMemory(proc.pid) as mem:
        out, _ = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        print(out)
        raise SystemExit(f"fedgov run failed with exit {proc.returncode}")
    run_dir = sorted(args.runs_dir.iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    report = json.loads((run_dir / "report.json").read_text())
    nodes = report["nodes"]
    gains = [n["gain"] for n in nodes if n["gain"] is not None]
    central = centralized_nonprivate(args.task)
    result = {
        "task": str(args.task.relative_to(ROOT)),
        "wall_seconds": round(wall, 1),
        "peak_tree_rss_mib": round(mem.peak / 2**20),
        "final_accuracy": report["final"]["accuracy"],
        "final_auc": report["final"]["auc"],
        "majority_rate": report["majority_rate"],
        "max_epsilon": max(n["epsilon"] for n in nodes if n["epsilon"] is not None),
        "epsilon_per_node": {n["node"]: round(n["epsilon"], 4) for n in nodes if n["epsilon"] is not None},
        "delta_per_node": sorted({n["delta"] for n in nodes}),
        "median_gain_points": round(100 * statistics.median(gains), 2) if gains else None,
        "centralized_nonprivate_accuracy": round(central, 4),
        "run_dir": str(run_dir),
    }
    out_path = ROOT / "benchmarks" / "results" / "demo.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:34} {v}")


if __name__ == "__main__":
    main()
