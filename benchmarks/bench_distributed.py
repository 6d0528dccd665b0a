"""Local DP-SGD against distributed DP (DP-FedAvg with noise shares under secure aggregation):
test accuracy against epsilon per municipality, at 12 and at 342 municipalities.

Each run is the demo task's data and model (Adult, logistic regression) on a federation split
by population: ``configs/federations/demo-12.toml`` or ``nl-342.toml``, through fedgov's
coordinator (``run_training``) and fedgov's ClientApp with all its mods (admission, ledger,
audit, secure aggregation), in one process (``fedgov/testing.py``: the transport is the
only part of a real run left out; ``benchmarks/bench_scale.py`` runs the shipped 342-node
distributed task through Flower's simulation). Every node's policy is the simulation
default with ``min_rows = 10`` (the default 50 would leave 198 of the 342 out of local DP-SGD;
distributed DP needs no minimum: ``limits.min_rows_distributed`` is 1, so every node takes part).

- **local**: DP-SGD at every node (``privacy.mode = "local"``), epsilon per node and record,
  delta min(1e-5, 0.1/rows);
- **distributed**: ``privacy.mode = "distributed"``, secure aggregation (SecAgg+ above 40
  nodes), each node's update clipped to ``--clip``, noise shares sized for 90% of the round's
  nodes (``dropout_tolerance = 0.1``); epsilon per municipality (and so per citizen), delta 1e-5.

Both modes: ``--rounds`` rounds, every node each round; distributed: 10 local epochs of batch 32
at learning rate 0.5 (the node's whole update is what is clipped and noised, so it may be a long
walk); local: the demo's 1 epoch of batch 256 at 0.5 (each DP-SGD step costs privacy). Accuracy is the final global
model's on Adult's held-out test set (16,281 rows); the report's largest epsilon spent by a node
is given with it.

    .venv/bin/python benchmarks/bench_distributed.py [--epsilons 1 2 4] [--scales 12 342] [--rounds 5] [--clip 4]

Prints a markdown table and writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

FEDERATIONS = {12: ROOT / "configs" / "federations" / "demo-12.toml", 342: ROOT / "configs" / "federations" / "nl-342.toml"}


def _task(tmp: Path, mode: str, eps: float, rounds: int, clip: float) -> Path:
    if mode == "distributed":
        training = "local_epochs = 10\nbatch_size = 32\nlearning_rate = 0.5\nsecure_aggregation = true\nreply_timeout = 60"
        privacy = f'mode = "distributed"\ndelta = 1e-5\nupdate_clip = {clip}\ndropout_tolerance = 0.1'
    else:
        training = "local_epochs = 1\nbatch_size = 256\nlearning_rate = 0.5\nreply_timeout = 60"
        privacy = 'mode = "local"'
    path = tmp / f"{mode}-{eps}.toml"
    path.write_text(
        f"""
name = "adult-{mode}"
contract = "{ROOT}/configs/contracts/adult-income.toml"
[model]
name = "logreg"
[training]
rounds = {rounds}
min_nodes = 2
seed = 7
fraction_evaluate = 0.0
{training}
[privacy]
target_epsilon = {eps}
accountant = "prv"
{privacy}
[evaluation]
centralized = "{ROOT}/data/adult/adult_test.csv"
""",
        encoding="utf-8",
    )
    return path


def run(scale: int, mode: str, eps: float, rounds: int, clip: float) -> dict[str, Any]:
    from fedgov.testing import InProcessGrid, prepare

    from fedgov.config import load_task
    from fedgov.coordinator.run import run_training

    with tempfile.TemporaryDirectory(prefix="fedgov-dd-") as tmp_s:
        tmp = Path(tmp_s)
        task_path = _task(tmp, mode, eps, rounds, clip)
        _, _, nodes, manifest = prepare(tmp / "nodes", FEDERATIONS[scale], task_path, node_budget=max(10.0, 2 * eps))
        for n in nodes:  # the benchmark's one policy change: min_rows 10 instead of 50
            pol = n.train_path.parent / "policy.toml"
            pol.write_text(re.sub(r"(?m)^min_rows = \d+", "min_rows = 10", pol.read_text("utf-8")), encoding="utf-8")
        task, contract = load_task(task_path)
        grid = InProcessGrid(manifest, len(nodes), run_id=900 + scale)
        t0 = time.time()
        report = run_training(
            grid, task, contract, run_dir=tmp / "run", expected_nodes=len(nodes), task_file=str(task_path),
            federation=f"{scale}", local_baseline=False, flower_run_id=900 + scale, connect_timeout=60,
        )
        wall = time.time() - t0
    if report.status != "completed":
        return {"scale": scale, "mode": mode, "epsilon": eps, "error": report.message[:300]}
    accepted = report.accepted()
    eps_spent = [n.epsilon for n in accepted if n.epsilon is not None]
    return {
        "scale": scale, "mode": mode, "epsilon": eps, "rounds": rounds,
        "accuracy": report.final.accuracy if report.final else None,
        "auc": report.final.auc if report.final else None,
        "majority_rate": report.majority_rate,
        "max_epsilon_spent": max(eps_spent) if eps_spent else None,
        "delta": report.privacy.get("delta") if mode == "distributed" else max((n.delta or 0) for n in accepted),
        "nodes": len(report.nodes), "nodes_trained": len(accepted),
        "refused": sorted({str(n.refusal_code) for n in report.nodes if n.status != "accepted"}),
        "rounds_discarded": sum(1 for r in report.rounds if r.discarded),
        "noise_multiplier": report.privacy.get("noise_multiplier") if mode == "distributed" else None,
        "wall_seconds": round(wall, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| municipalities | epsilon per municipality (target) | local DP-SGD: accuracy | distributed DP: accuracy | distributed: noise multiplier z | nodes trained (local / distributed) |",
        "|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["scale"], r["epsilon"]) for r in rows})
    for scale, eps in keys:
        loc = next((r for r in rows if r["scale"] == scale and r["epsilon"] == eps and r["mode"] == "local"), {})
        dis = next((r for r in rows if r["scale"] == scale and r["epsilon"] == eps and r["mode"] == "distributed"), {})

        def acc(r: dict[str, Any]) -> str:
            if not r:
                return "-"
            if "error" in r:
                return f"failed: {r['error'][:60]}"
            return f"{r['accuracy']:.4f} (eps spent {r['max_epsilon_spent']:.2f})"

        z = f"{dis['noise_multiplier']:.2f}" if dis.get("noise_multiplier") else "-"
        out.append(f"| {scale} | {eps} | {acc(loc)} | {acc(dis)} | {z} | {loc.get('nodes_trained', '-')} / {dis.get('nodes_trained', '-')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--scales", type=int, nargs="+", default=[12, 342])
    ap.add_argument("--modes", nargs="+", default=["local", "distributed"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clip", type=float, default=4.0)
    ap.add_argument("--out", default="", help="results file name under benchmarks/results/ (default distributed.json)")
    ap.add_argument("--merge", nargs="+", default=[], help="only combine these result files into distributed.json")
    args = ap.parse_args()
    if args.merge:
        merged = [json.loads((ROOT / "benchmarks" / "results" / f).read_text()) for f in args.merge]
        rows_all = [r for m in merged for r in m["rows"]]
        (ROOT / "benchmarks" / "results" / "distributed.json").write_text(json.dumps({
            "commands": [m["command"] for m in merged], "rows": rows_all,
        }, indent=2) + "\n")
        print(table(rows_all))
        return
    import logging
    import warnings

    import torch

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)  # one core per run: two runs can share a 2-core machine
    rows = []
    for scale in args.scales:
        for eps in args.epsilons:
            for mode in args.modes:
                r = run(scale, mode, eps, args.rounds, args.clip)
                rows.append(r)
                print(json.dumps(r), flush=True)
    out = ROOT / "benchmarks" / "results" / (args.out or "distributed.json")
    out.write_text(json.dumps({
        "command": "benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]), "rows": rows,
    }, indent=2) + "\n")
    print("\n" + table(rows))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
