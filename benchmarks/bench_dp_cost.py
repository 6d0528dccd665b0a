"""What DP-SGD costs a node: one local epoch of DP-SGD against one of ordinary training, for
fedgov's tabular models, over Opacus' grad-sample modes and batch sizes.

The node's own code path is timed (``fedgov.node.training.train_dp_round`` with the node's plan,
against ``train_nonprivate_round``) on Adult's training rows (all 32,561 unless ``--rows``),
encoded as the demo task encodes them, with one torch thread (one node's share of a small
server). Each figure is the median of ``--repeats`` interleaved pairs of epochs; each ratio
divides two medians measured in the same invocation, so a noisy machine does not decide it.
``auto`` is fedgov's default choice. The privacy accounting of a round (one epsilon, whatever
the data size) is reported in its own column, not in the epoch.

    .venv/bin/python benchmarks/bench_dp_cost.py [--rows N] [--repeats 7] [--batch 256 1024]

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
MODES = ("auto", "fused", "hooks", "ghost", "functorch", "ew")


def _paired(make: Any, base: Any, dp: Any, repeats: int) -> tuple[float, float, float]:
    """Medians of (non-private epoch, DP epoch, DP accounting) over ``repeats`` interleaved pairs.

    Each repeat times one non-private epoch and then one DP round on fresh models, so a slow
    spell of the machine hits both sides; one warm-up pair comes first. The DP epoch is the
    round's wall time less its privacy accounting (``RoundResult.accounting_seconds``: epsilon
    of the ledger after the round, once per round whatever the data size).
    """
    from fedgov.privacy import accounting

    b_times, d_times, a_times = [], [], []
    for r in range(repeats + 1):
        accounting._epsilon_cached.cache_clear()  # every round's accounting from scratch, as at a node
        m = make()
        t0 = time.perf_counter()
        base(m, r)
        tb = time.perf_counter() - t0
        m = make()
        t0 = time.perf_counter()
        res = dp(m, r)
        td = time.perf_counter() - t0
        if r:
            b_times.append(tb)
            d_times.append(td - res.accounting_seconds)
            a_times.append(res.accounting_seconds)
    return statistics.median(b_times), statistics.median(d_times), statistics.median(a_times)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of :func:`main`'s rows."""
    out = [
        "| model | batch | clipping | non-private epoch (s) | DP-SGD epoch (s) | DP / non-private | accounting per round (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['batch']} | {r['mode']} | - | - | {r['error']} | - |")
        else:
            mode = r["mode"] if r["mode"] != "auto" else f"**auto** ({r['resolved']})"
            out.append(
                f"| {r['model']} | {r['batch']} | {mode} | {r['nonprivate_s']:.3f} | {r['dp_s']:.3f} | "
                f"{r['ratio']:.2f} | {r['accounting_s']:.3f} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=0, help="first N rows of Adult (0: all)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    args = ap.parse_args()

    import torch

    from fedgov.config import load_task
    from fedgov.data import Encoder, read_table, validate_frame
    from fedgov.models import build_model, make_dp_compatible
    from fedgov.privacy import plan_node_dp
    from fedgov.node.training import train_dp_round, train_nonprivate_round

    torch.set_num_threads(1)
    task, contract = load_task(ROOT / "configs" / "tasks" / "adult-income.toml")
    enc = Encoder.from_contract(contract, task.features)
    columns = [*contract.feature_names(task.features), str(contract.target)]
    frame = validate_frame(read_table(ROOT / "data" / "adult" / "adult.csv").iloc[: args.rows or None], contract, file="adult.csv", columns=columns)
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

            for mode in MODES:
                privacy = task.privacy.model_copy(update={"grad_sample_mode": mode})
                try:
                    base, dp, acct = _paired(
                        make,
                        lambda m, r, t=training: train_nonprivate_round(m, X, y, training=t, seed=r),
                        # seed=None: the path a deployed node takes (noise and sampling from the secure generator)
                        lambda m, r, t=training, p=privacy, pl=plan: train_dp_round(m, X, y, training=t, privacy=p, plan=pl, history=[], seed=None),
                        args.repeats,
                    )
                except Exception as exc:  # noqa: BLE001 - a mode Opacus refuses for this model
                    rows.append({"model": model_name, "batch": batch, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                    continue
                from fedgov.node.training import _grad_sample_mode

                rows.append({
                    "model": model_name, "batch": batch, "mode": mode, "resolved": _grad_sample_mode(make(), mode),
                    "nonprivate_s": base, "dp_s": dp, "accounting_s": acct, "ratio": dp / base,
                })
                print(f"{model_name} batch {batch} {mode}: {dp / base:.2f}x", flush=True)
    print(f"\nOne local epoch on {len(y)} Adult rows, 1 torch thread, median of {args.repeats}:\n")
    print(table(rows))
    out = ROOT / "benchmarks" / "results" / "dp_cost.json"
    out.write_text(json.dumps({"command": "benchmarks/bench_dp_cost.py", "rows_used": len(y), "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
