"""Choosing a distributed-DP task's settings: final accuracy over noise draws, in seconds.

Distributed DP's accuracy depends on the rounds, the update clip and the local work, and from
one run to the next on the noise. A whole run through Flower and secure aggregation takes
minutes at 342 municipalities; this script replays the same learning: each municipality's
local round with fedgov's own training (``fedgov.node.rounds.prepare`` and
``fedgov.node.training.train_nonprivate_round``, on the node directories ``fedgov run`` made),
its update clipped to ``clip``, the sum given Gaussian noise of the plan's standard deviation
(``z * sensitivity * scale`` of ``fedgov.privacy.distributed.plan_distributed``: what the
discrete noise shares add up to), divided by the number of municipalities, and the global model
moved by it; then the accuracy on Adult's held-out test set after every round. Secure
aggregation changes nothing in this arithmetic (it sums exactly), so what differs from a real
run is the noise's draw and the batches' order.

    .venv/bin/python benchmarks/tune_distributed.py --nodes-dir RUN/state/nodes \\
        --config 5,2,10,0.5,32 --config 3,4,10,0.5,32 [--seeds 0 1 2 3] [--epsilon 1]

A config is ``rounds,clip,local_epochs,learning_rate,batch_size``. Prints, per config, the
noise multiplier and each seed's accuracy after every round, and writes
``benchmarks/results/tune_distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(datas: list[Any], test: tuple[np.ndarray, np.ndarray], task: Any, config: tuple[int, float, int, float, int],
        seed: int, epsilon: float) -> tuple[float, list[float]]:
    import torch

    from fedgov.node.rounds import _model
    from fedgov.node.training import train_nonprivate_round
    from fedgov.privacy.distributed import plan_distributed

    rounds, clip, epochs, lr, batch = config
    training = task.training.model_copy(update={"local_epochs": epochs, "learning_rate": lr, "batch_size": batch, "rounds": rounds})
    t = task.model_copy(update={"training": training})
    model = _model(t, datas[0], None)
    keys = list(model.state_dict())
    dimension = sum(v.numel() for v in model.state_dict().values())
    plan = plan_distributed(dimension=dimension, clip=clip, rounds=rounds, sample_rate=1.0, target_epsilon=epsilon,
                            delta=task.privacy.delta, accountant=task.privacy.accountant)
    rng = np.random.default_rng(seed)
    glob = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    X, y = torch.tensor(test[0], dtype=torch.float32), test[1]
    accuracy = []
    for r in range(rounds):
        total = np.zeros(dimension)
        for i, d in enumerate(datas):
            out = train_nonprivate_round(_model(t, d, glob), d.X_train, d.y_train, training=training, seed=seed * 100_000 + r * 1000 + i)
            u = np.concatenate([(out.state[k] - glob[k]).ravel() for k in keys]).astype(np.float64)
            total += u * min(1.0, clip / max(float(np.linalg.norm(u)), 1e-12))
        # the shares are sized for the round less the dropouts allowed (privacy.dropout_tolerance):
        # all of them contributing add that much more variance
        inflate = math.sqrt(len(datas) / max(1, len(datas) - math.floor(task.privacy.dropout_tolerance * len(datas))))
        total += rng.normal(0.0, inflate * plan.noise_multiplier * plan.sensitivity * plan.scale, size=dimension)
        mean, at = total / len(datas), 0
        for k in keys:
            g = glob[k]
            glob[k] = (g + mean[at : at + g.size].reshape(g.shape)).astype(g.dtype)
            at += g.size
        with torch.no_grad():
            accuracy.append(round(float((_model(t, datas[0], glob)(X).argmax(1).numpy() == y).mean()), 4))
    return plan.noise_multiplier, accuracy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes-dir", type=Path, required=True, help="a run's state/nodes directory (fedgov run made it)")
    ap.add_argument("--task", type=Path, default=ROOT / "configs" / "tasks" / "nl-342-distributed.toml")
    ap.add_argument("--config", action="append", required=True, help="rounds,clip,local_epochs,learning_rate,batch_size")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--epsilon", type=float, default=1.0)
    args = ap.parse_args()
    from fedgov.node.rounds import prepare
    from tune_tables import load_nodes  # benchmarks/: the same node data, the same quiet set-up

    task, contract, datas = load_nodes(args.task, args.nodes_dir)
    held = prepare(task, contract, ROOT / "data" / "adult" / "adult_test.csv", None)
    test = (np.concatenate([held.X_train, held.X_test]), np.concatenate([held.y_train, held.y_test]))
    print(f"{len(datas)} municipalities, {len(test[1])} test rows, epsilon {args.epsilon} per municipality", flush=True)
    rows = []
    for text in args.config:
        r, c, e, lr, b = text.split(",")
        config = (int(r), float(c), int(e), float(lr), int(b))
        t0 = time.time()
        runs = [run(datas, test, task, config, seed, args.epsilon) for seed in args.seeds]
        finals = [acc[-1] for _, acc in runs]
        row = {"rounds": config[0], "clip": config[1], "local_epochs": config[2], "learning_rate": config[3], "batch_size": config[4],
               "noise_multiplier": round(runs[0][0], 3), "seeds": args.seeds, "accuracy_by_round": [acc for _, acc in runs],
               "final_min": min(finals), "final_median": float(np.median(finals)), "final_max": max(finals), "seconds": round(time.time() - t0)}
        rows.append(row)
        print(f"rounds {config[0]} clip {config[1]} epochs {config[2]} lr {config[3]} batch {config[4]}: z {row['noise_multiplier']:.2f}, "
              f"final accuracy min {row['final_min']:.4f} median {row['final_median']:.4f} max {row['final_max']:.4f} "
              f"over {len(finals)} seeds", flush=True)
    out = ROOT / "benchmarks" / "results" / "tune_distributed.json"
    out.write_text(json.dumps({"command": "benchmarks/tune_distributed.py " + " ".join(sys.argv[1:]), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
