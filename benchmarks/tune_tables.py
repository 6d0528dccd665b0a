"""Choosing a public table's distributed-DP settings: the final model over many noise draws, in seconds.

A replay of a distributed-DP run on the node directories ``fedgov run`` made (``RUN/state/nodes``):
each organisation's local round with fedgov's own training (``fedgov.node.rounds.prepare``,
``fedgov.node.training.train_nonprivate_round``, the task's automatic settings for the node's
size), its update clipped to the task's ``update_clip``, the sum given Gaussian noise of the
task's plan (``fedgov.privacy.plans.distributed_plan``: what the discrete noise shares add up
to, inflated for the dropouts the shares are sized for), divided by the number of organisations,
then the coordinator's momentum (FedAvgM) and the global model moved. The final model is scored
on the organisations' pooled test splits: accuracy, or ROC AUC with ``--metric auc``. Unlike a
real run, local training here uses the same seeds for every noise draw, so what differs between
draws is the noise alone.

    .venv/bin/python benchmarks/tune_tables.py --task configs/tasks/egsingle.toml \\
        --nodes-dir RUN/state/nodes --metric auc --config 4,5,0 --config 4,5,0.9 [--seeds 6] [--no-dp]

A config is ``rounds,clip,momentum[,learning_rate[,local_epochs]]``. Prints, per config, the noise
multiplier and the final figure of every draw, and writes ``benchmarks/results/tune_tables.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def replay(datas: list[Any], task: Any, config: list[str], seed: int, score: Any, no_dp: bool) -> tuple[float, float]:
    from fedgov.node.rounds import _model
    from fedgov.node.training import train_nonprivate_round
    from fedgov.privacy.plans import distributed_plan

    rounds, clip, momentum = int(config[0]), float(config[1]), float(config[2])
    training: dict[str, Any] = {"rounds": rounds}
    if len(config) > 3:
        training["learning_rate"] = float(config[3])
    if len(config) > 4:
        training["local_epochs"] = int(config[4])
    t = task.model_copy(update={"training": task.training.model_copy(update=training),
                                "privacy": task.privacy.model_copy(update={"update_clip": clip})})
    model = _model(t, datas[0], None)
    keys = list(model.state_dict())
    dim = sum(v.numel() for v in model.state_dict().values())
    plan = distributed_plan(t, dim)
    n = len(datas)
    inflate = math.sqrt(n / max(1, n - math.floor(t.privacy.dropout_tolerance * n)))
    sd = 0.0 if no_dp else inflate * plan.noise_multiplier * plan.sensitivity * plan.scale
    rng = np.random.default_rng(seed)
    glob = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    velocity: np.ndarray | None = None
    for r in range(rounds):
        total = np.zeros(dim)
        for i, d in enumerate(datas):
            spec = t.training.resolved(len(d.y_train), dp_sgd=False)
            out = train_nonprivate_round(_model(t, d, glob), d.X_train, d.y_train, training=spec, seed=t.training.seed * 100_000 + r * 1000 + i)
            u = np.concatenate([(out.state[k] - glob[k]).ravel() for k in keys]).astype(np.float64)
            total += u * min(1.0, clip / max(float(np.linalg.norm(u)), 1e-12))
        total += rng.normal(0.0, sd, size=dim)
        mean = total / n
        velocity = mean if velocity is None else momentum * velocity + mean
        at = 0
        for k in keys:
            g = glob[k]
            glob[k] = (g + velocity[at : at + g.size].reshape(g.shape)).astype(g.dtype)
            at += g.size
    return plan.noise_multiplier, score(_model(t, datas[0], glob))


def load_nodes(task_path: Path, nodes_dir: Path) -> tuple[Any, Any, list[Any]]:
    """Quiet, one-threaded torch, and the task, its contract and every node directory's prepared
    data (``fedgov.node.rounds.prepare`` on its ``train.csv`` and ``test.csv``), in name order."""
    import torch

    from fedgov.config import load_task
    from fedgov.node.rounds import prepare

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    task, contract = load_task(task_path)
    datas = [prepare(task, contract, d / "train.csv", d / "test.csv") for d in sorted(nodes_dir.iterdir()) if (d / "train.csv").is_file()]
    return task, contract, datas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", type=Path, required=True)
    ap.add_argument("--nodes-dir", type=Path, required=True, help="a run's state/nodes directory (fedgov run made it)")
    ap.add_argument("--metric", choices=["accuracy", "auc"], default="accuracy")
    ap.add_argument("--config", action="append", required=True, help="rounds,clip,momentum[,learning_rate[,local_epochs]]")
    ap.add_argument("--seeds", type=int, default=6, help="noise draws per config")
    ap.add_argument("--no-dp", action="store_true", help="no noise: what the training reaches without DP")
    args = ap.parse_args()
    import torch
    from sklearn.metrics import roc_auc_score

    task, contract, datas = load_nodes(args.task, args.nodes_dir)
    X = torch.tensor(np.concatenate([d.X_test for d in datas]), dtype=torch.float32)
    y = np.concatenate([d.y_test for d in datas])

    def score(model: Any) -> float:
        with torch.no_grad():
            p = torch.softmax(model(X), 1).numpy()
        return float(roc_auc_score(y, p[:, 1])) if args.metric == "auc" else float((p.argmax(1) == y).mean())

    print(f"{len(datas)} organisations, {len(y)} test rows, {args.metric}{' (no DP)' if args.no_dp else ''}", flush=True)
    rows = []
    for text in args.config:
        t0 = time.time()
        draws = [replay(datas, task, text.split(","), seed, score, args.no_dp) for seed in range(args.seeds)]
        finals = [round(v, 4) for _, v in draws]
        row = {"config": text, "noise_multiplier": round(draws[0][0], 3), "finals": finals, "min": min(finals),
               "median": float(np.median(finals)), "max": max(finals), "seconds": round(time.time() - t0)}
        rows.append(row)
        print(f"{text}: z {row['noise_multiplier']:.2f}, min {row['min']:.4f} median {row['median']:.4f} max {row['max']:.4f} {finals}", flush=True)
    out = ROOT / "benchmarks" / "results" / "tune_tables.json"
    out.write_text(json.dumps({"command": "benchmarks/tune_tables.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
