"""Secure aggregation (``fedgov.secagg``), measured at the protocol level (Flower's transport left
out): what one round costs each node and the coordinator, and what a node sends, for n nodes
and the models fedgov trains.

For each n: every node runs the keys, shares, mask and reveal steps (timed per node, median
over the nodes); the coordinator unmasks the sum with ``--drop`` nodes dropped after the
shares stage (timed). Bytes per node: public keys, encrypted shares sent, masked vector (as
sent: uint32), against the model's size in float32. The sum is checked against the plain sum.

    .venv/bin/python benchmarks/bench_secagg.py [--nodes 12 100 342] [--drop 1]

Up to 40 nodes every node shares with every other (SecAgg); above, with its neighbours in a
random regular graph only (SecAgg+, ``fedgov.secagg.neighbourhood_size``).

Prints a markdown table and writes ``benchmarks/results/secagg.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def model_sizes() -> dict[str, int]:
    """Parameters of the demo task's models on Adult (the demo task's contract and encoder)."""
    from fedgov.config import load_task
    from fedgov.data import Encoder
    from fedgov.models import build_model, get_state

    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    enc = Encoder.from_contract(contract, task.features)
    out = {}
    for name, spec in (("logreg", task.model), ("mlp 64-64", task.model.model_copy(update={"name": "mlp"}))):
        model = build_model(spec, n_features=enc.n_features, n_classes=enc.n_classes, seed=0)
        out[f"{name} (Adult)"] = sum(int(np.asarray(v).size) for v in get_state(model).values())
    return out


def one(n: int, size: int, drop: int) -> dict[str, Any]:
    from fedgov.secagg import NodeSecAgg, SecAggParams, decode_sum, encode_update, neighbourhood_size, threshold_for, unmask_sum

    p = SecAggParams()
    ids = list(range(1, n + 1))
    t: dict[str, list[float]] = {"keys": [], "shares": [], "mask": [], "reveal": []}
    states, pks = {}, {}
    for i in ids:
        t0 = time.perf_counter()
        states[i], c, s = NodeSecAgg.keys(i, 1)
        t["keys"].append(time.perf_counter() - t0)
        pks[i] = (c, s)
    cts = {}
    for i in ids:
        t0 = time.perf_counter()
        cts[i] = states[i].shares(pks, p)
        t["shares"].append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    ups = {i: [rng.normal(size=size) * 0.05] for i in ids}
    dropped = ids[:drop]
    masked = {}
    for i in ids:
        t0 = time.perf_counter()
        states[i].receive({src: cts[src][i] for src in ids if i in cts[src]})  # what the coordinator routes to i
        if i not in dropped:
            masked[i] = states[i].mask(encode_update(ups[i], 1.0, p), ids)
        t["mask"].append(time.perf_counter() - t0)
    survivors = sorted(masked)
    revealed = {}
    for i in survivors:
        t0 = time.perf_counter()
        revealed[i] = states[i].reveal(survivors, dropped)
        t["reveal"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    total = unmask_sum(masked, revealed, pks=pks, dropped=dropped, threshold=threshold_for(neighbourhood_size(n) + 1))
    unmask_s = time.perf_counter() - t0
    (s,), w = decode_sum(total, len(survivors), [(size,)], p)
    err = float(np.abs(s - sum(ups[i][0] for i in survivors)).max())
    sent_bytes = {
        "keys": len(pks[1][0]) + len(pks[1][1]),
        "shares": sum(len(c) for c in cts[1].values()),
        "masked": 4 * (size + 1),
        "reveal": sum(len(x) for x in revealed[survivors[0]].values()),
    }
    return {
        "nodes": n, "params": size, "dropped": drop, "neighbours": neighbourhood_size(n),
        "node_seconds": {k: statistics.median(v) for k, v in t.items()},
        "coordinator_unmask_s": unmask_s,
        "bytes_per_node": sent_bytes,
        "model_float32_bytes": 4 * size,
        "bytes_ratio": sum(sent_bytes.values()) / (4 * size),
        "max_abs_error": err,
        "weight_sum": w,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[12, 100, 342])
    ap.add_argument("--drop", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for name, size in model_sizes().items():
        for n in args.nodes:
            r = one(n, size, args.drop)
            r["model"] = name
            rows.append(r)
            print(f"done: {name}, {n} nodes", flush=True)
    print("\n| model | nodes | neighbours | node: keys / shares / mask / reveal (s) | coordinator unmask (s) | bytes sent per node | / model float32 | max error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ns = r["node_seconds"]
        print(
            f"| {r['model']} | {r['nodes']} | {r['neighbours']} | {ns['keys']:.3f} / {ns['shares']:.3f} / {ns['mask']:.3f} / {ns['reveal']:.4f} | "
            f"{r['coordinator_unmask_s']:.2f} | {sum(r['bytes_per_node'].values()):,} | {r['bytes_ratio']:.2f} | {r['max_abs_error']:.1e} |"
        )
    out = ROOT / "benchmarks" / "results" / "secagg.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "benchmarks/bench_secagg.py", "rows": rows}, indent=2), encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
