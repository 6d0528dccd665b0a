"""What DP-SGD costs a node: one local epoch of DP-SGD against one of ordinary training, for
fedgov's tabular models, over Opacus' grad-sample modes and batch sizes.

The node's own code path is timed (``fedgov.training.train_dp_round`` with the node's plan,
against ``train_nonprivate_round``) on the first ``--rows`` rows of Adult, encoded as the demo
task encodes them, with one torch thread (one node's share of a small server). Each figure is
the median of ``--repeats`` epochs; each ratio divides two medians measured in the same
invocation, so a noisy machine does not decide it. ``auto`` is fedgov's default choice.

    .venv/bin/python benchmarks/bench_dp_cost.py [--rows 20000] [--repeats 5] [--batch 256 1024]

Prints a markdown table and writes ``benchmarks/results/dp_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("auto", "hooks", "ghost", "functorch", "ew")


def _median_seconds(make: Any, fn: Any, repeats: int) -> float:
    """Median wall time of ``fn(model, r)`` on a fresh model, after one warm-up call."""
    times = []
    for r in range(repeats + 1):
        m = make()
        t0 = time.perf_counter()
        fn(m, r)
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    args = ap.parse_args()

    import torch

    from fedgov.config import load_task
    from fedgov.data import Encoder, read_table, validate_frame
    from fedgov.models import build_model, make_dp_compatible
    from fedgov.privacy import plan_node_dp
    from fedgov.training import train_dp_round, train_nonprivate_round

    torch.set_num_threads(1)
    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    enc = Encoder.from_contract(contract, task.features)
    columns = [*contract.feature_names(task.features), str(contract.target)]
    frame = validate_frame(read_table(ROOT / "data" / "adult" / "adult.csv").iloc[: args.rows], contract, file="adult.csv", columns=columns)
    X, y = enc.transform(frame)
    rows: list[dict[str, Any]] = []
    for model_name in ("logreg", "mlp"):
        spec = task.model.model_copy(update={"name": model_name})
        for batch in args.batch:
            training = task.training.model_copy(update={"batch_size": batch, "rounds": 1, "local_epochs": 1})
            plan = plan_node_dp(
                rows=len(y), batch_size=batch, local_epochs=1, rounds=1, target_epsilon=2.0, delta=1e-5,
                accountant="prv", margin=0.98,
            )

            def make(spec: Any = spec) -> Any:
                return make_dp_compatible(build_model(spec, n_features=enc.n_features, n_classes=enc.n_classes, seed=0))

            base = _median_seconds(make, lambda m, r, t=training: train_nonprivate_round(m, X, y, training=t, seed=r), args.repeats)
            for mode in MODES:
                privacy = task.privacy.model_copy(update={"grad_sample_mode": mode}).resolved(model_name)
                try:
                    dp = _median_seconds(
                        make,
                        lambda m, r, t=training, p=privacy, pl=plan: train_dp_round(m, X, y, training=t, privacy=p, plan=pl, history=[], seed=r),
                        args.repeats,
                    )
                except Exception as exc:  # noqa: BLE001 - a mode Opacus refuses for this model
                    rows.append({"model": model_name, "batch": batch, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                    continue
                rows.append({
                    "model": model_name, "batch": batch, "mode": mode, "resolved": privacy.grad_sample_mode,
                    "nonprivate_s": base, "dp_s": dp, "ratio": dp / base,
                })
                print(f"{model_name} batch {batch} {mode}: {dp / base:.2f}x", flush=True)
    print(f"\nOne local epoch on {len(y)} Adult rows, 1 torch thread, median of {args.repeats}:\n")
    print("| model | batch | grad-sample mode | non-private (s) | DP-SGD (s) | DP / non-private |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['mode']} | - | - | {r['error']} |")
        else:
            mode = r["mode"] if r["mode"] != "auto" else f"auto ({r['resolved']})"
            print(f"| {r['model']} | {r['batch']} | {mode} | {r['nonprivate_s']:.3f} | {r['dp_s']:.3f} | {r['ratio']:.2f} |")
    out = ROOT / "benchmarks" / "results" / "dp_cost.json"
    out.write_text(json.dumps({"command": "benchmarks/bench_dp_cost.py", "rows_used": len(y), "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
