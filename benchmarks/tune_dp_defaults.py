"""Choosing the defaults for DP training: FedAvg in one process with fedgov's own node training.

Each node's rows come from the federation's split (``materialize``, as a simulation writes them);
every round each node runs :func:`fedgov.node.training.train_dp_round` from the global model on
its own plan (:func:`fedgov.privacy.plans.node_plan`, on its true row count here), and the
coordinator averages the models weighted by rows, optionally with server momentum (FedAvgM).
No Flower, no Ray, no ledger: seconds per setting instead of minutes, for comparing settings,
not for reporting (``benchmarks/bench_utility.py`` runs ``fedgov run``). Nodes under ``--min-rows``
training rows are left out, as the default node policy refuses them.

    .venv/bin/python benchmarks/tune_dp_defaults.py configs/tasks/chem97.toml --epsilon 2 \\
        --set learning_rate=8 --set rounds=20 [--server avgm --beta 0.9] [--seed 0]

Prints the accuracy and AUC of the final model on the task's held-out set, or on the members'
pooled test splits when the task has none.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    from fedgov.config import load_federation, load_task
    from fedgov.data import Encoder, materialize, read_table, validate_frame
    from fedgov.models import build_model, evaluate, get_state, make_dp_compatible, set_state
    from fedgov.node.training import train_dp_round
    from fedgov.privacy.plans import node_plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("task", type=Path)
    ap.add_argument("--epsilon", type=float, default=None, help="privacy.target_epsilon (default: the task's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a [training] setting")
    ap.add_argument("--server", choices=["avg", "avgm"], default="avg")
    ap.add_argument("--beta", type=float, default=0.9, help="server momentum (avgm)")
    ap.add_argument("--min-rows", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0, help="the DP noise's seed (reproducible noise: tuning only)")
    args = ap.parse_args()

    task, contract = load_task(args.task)
    updates = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    privacy = task.privacy if args.epsilon is None else task.privacy.model_copy(update={"target_epsilon": args.epsilon})
    task = task.model_copy(update={"training": task.training.model_copy(update=updates), "privacy": privacy})
    assert task.federation is not None
    enc = Encoder.from_contract(contract, task.features)

    def encode(path: Path) -> tuple[np.ndarray, np.ndarray]:
        raw = read_table(path)
        return enc.transform(validate_frame(raw[[c for c in raw.columns if c in enc.columns]], contract, file=str(path), columns=enc.columns))

    with tempfile.TemporaryDirectory() as tmp:
        nodes = materialize(load_federation(task.federation), contract, Path(tmp))
        data = [(n.code, encode(n.train_path), encode(n.test_path)) for n in nodes]
    held_out = encode(task.evaluation.centralized) if task.evaluation.centralized else (
        np.concatenate([te[0] for _, _, te in data]), np.concatenate([te[1] for _, _, te in data]))
    kept = [d for d in data if len(d[1][1]) >= args.min_rows]
    t0 = time.time()
    model = make_dp_compatible(build_model(task.model, n_features=enc.n_features, n_classes=enc.n_classes, seed=task.training.seed))
    g = get_state(model)
    momentum = {k: np.zeros_like(v) for k, v in g.items()}
    plans = {c: node_plan(task, len(tr[1])) for c, tr, _ in kept}
    history: dict[str, list[tuple[float, float, int]]] = {c: [] for c, _, _ in kept}
    for r in range(1, task.training.rounds + 1):
        states, weights = [], []
        for c, (X, y), _ in kept:
            set_state(model, g)
            res = train_dp_round(
                model, X, y, training=task.training, privacy=task.privacy, plan=plans[c], history=history[c],
                seed=args.seed * 1_000_003 + 7919 * r + zlib.crc32(c.encode()),
            )
            history[c] = res.history
            states.append(res.state)
            weights.append(len(y))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        delta = {k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)) - g[k] for k in g}
        if args.server == "avgm":
            momentum = {k: args.beta * momentum[k] + delta[k] for k in g}
            delta = momentum
        g = {k: (g[k] + delta[k]).astype(g[k].dtype) for k in g}
    set_state(model, g)
    m = evaluate(model, *held_out)
    print(
        f"{args.task} epsilon {task.privacy.target_epsilon} {updates or 'defaults'} server {args.server}: "
        f"accuracy {m.accuracy:.4f}, AUC {m.auc if m.auc is None else round(m.auc, 4)} "
        f"({len(kept)} of {len(data)} nodes, {time.time() - t0:.0f} s)"
    )


if __name__ == "__main__":
    main()
