"""Benchmark of the privacy-budget ledger (a script, not a test).

(a) The composed epsilon a data set has committed after 1..5 identical demo-like DP-SGD tasks
    (sigma 1.38, q 1/34, 340 steps each, delta 1e-5), next to naive summation of each task's
    epsilon, and the RDP bound of the same composition.
(b) Reservations per second with 4 processes, each with its own ``PrivacyLedger`` on the same
    file, all reserving small tasks against a large budget; median of 3 runs. Two kinds:
    ``laplace`` (basic composition: measures SQLite, locking and bookkeeping) and ``dpsgd``
    (every reservation composes a longer history: measures the accountant).
(c) How long one DP-SGD reservation holds the write lock, far from the budget's edge (the
    cheap RDP pre-check decides) and at the edge (PRV is evaluated under the lock).

Usage: ``python benchmarks/bench_ledger.py [--runs 3] [--laplace-per-proc 150] [--dpsgd-per-proc 15]``.
Prints a table and writes ``benchmarks/results/ledger.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import fedgov.node.ledger as ledger_module
from fedgov.node.ledger import Budget, Mechanism, PrivacyLedger, compose
from fedgov.errors import BudgetExceeded
from fedgov.privacy.accounting import epsilon_from_history

SIGMA, Q, STEPS, DELTA = 1.38, 1 / 34, 340, 1e-5
PROCESSES = 4
RESULTS = Path(__file__).resolve().parent / "results" / "ledger.json"


def bench_composition(tasks: int = 5) -> list[dict[str, float]]:
    demo = Mechanism.dpsgd([(SIGMA, Q, STEPS)])
    budget = Budget(epsilon=1e6, delta=DELTA, period="forever")
    rows = []
    compose([Mechanism.dpsgd([(SIGMA, Q, 1)])], delta=DELTA)  # import Opacus before timing
    with tempfile.TemporaryDirectory() as d:
        ledger = PrivacyLedger(Path(d) / "ledger.db")
        for n in range(1, tasks + 1):
            t0 = time.perf_counter()
            status = ledger.reserve(dataset="adult", task_id=f"task-{n}", mechanism=demo, budget=budget)
            seconds = time.perf_counter() - t0
            rdp = epsilon_from_history(history=[(SIGMA, Q, n * STEPS)], delta=DELTA, accountant="rdp")
            rows.append(
                {
                    "tasks": n,
                    "epsilon_ledger_prv": round(status.epsilon_committed, 4),
                    "epsilon_naive_sum": round(status.epsilon_naive, 4),
                    "epsilon_rdp": round(rdp, 4),
                    "saving_vs_naive": round(1 - status.epsilon_committed / status.epsilon_naive, 4),
                    "reserve_seconds": round(seconds, 3),
                }
            )
    assert abs(rows[-1]["epsilon_ledger_prv"] - compose([demo] * tasks, delta=DELTA)) < 1e-3
    return rows


def _worker(path: str, kind: str, proc: int, count: int, barrier: mp.synchronize.Barrier, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    ledger = PrivacyLedger(Path(path))
    mech = Mechanism(kind="laplace", epsilon=0.001) if kind == "laplace" else Mechanism.dpsgd([(SIGMA, Q, 34)])
    budget = Budget(epsilon=1e4, delta=DELTA, period="forever")
    compose([mech], delta=DELTA)  # import Opacus before the clock starts
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(count):
        ledger.reserve(dataset="d", task_id=f"p{proc}-{i}", mechanism=mech, budget=budget)
    queue.put(time.perf_counter() - t0)


def bench_throughput(kind: str, per_proc: int, runs: int) -> dict[str, object]:
    ctx = mp.get_context("spawn")  # separate processes, as separate node processes would be
    rates = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ledger.db"
            PrivacyLedger(path)
            barrier, queue = ctx.Barrier(PROCESSES + 1), ctx.Queue()
            procs = [
                ctx.Process(target=_worker, args=(str(path), kind, p, per_proc, barrier, queue))
                for p in range(PROCESSES)
            ]
            for p in procs:
                p.start()
            barrier.wait()
            t0 = time.perf_counter()
            for _ in procs:
                queue.get()
            wall = time.perf_counter() - t0
            for p in procs:
                p.join()
                assert p.exitcode == 0
            reserved = len(PrivacyLedger(path).events())
            assert reserved == PROCESSES * per_proc
            rates.append(reserved / wall)
    return {
        "mechanism": kind,
        "processes": PROCESSES,
        "reservations_per_run": PROCESSES * per_proc,
        "runs_per_second": [round(r, 2) for r in rates],
        "median_per_second": round(statistics.median(rates), 2),
    }


def bench_lock_hold(tasks: int = 40) -> dict[str, float]:
    """Time inside ``BEGIN IMMEDIATE ... COMMIT`` (the serialized part), one process."""
    held: list[float] = []
    original = PrivacyLedger._transaction

    @contextlib.contextmanager
    def timed(self: PrivacyLedger):  # type: ignore[no-untyped-def]
        with original(self) as con:
            t0 = time.perf_counter()
            yield con
        held.append(time.perf_counter() - t0)

    ledger_module.PrivacyLedger._transaction = timed  # type: ignore[method-assign]
    try:
        mech = Mechanism.dpsgd([(SIGMA, Q, 34)])
        big = Budget(epsilon=1e4, delta=DELTA, period="forever")
        whole = []
        with tempfile.TemporaryDirectory() as d:
            ledger = PrivacyLedger(Path(d) / "ledger.db")
            compose([mech], delta=DELTA)
            for i in range(tasks):
                t0 = time.perf_counter()
                ledger.reserve(dataset="d", task_id=f"t{i}", mechanism=mech, budget=big)
                whole.append(time.perf_counter() - t0)
            far = statistics.median(held)
            committed = ledger.status("d", big).epsilon_committed
            edge = Budget(epsilon=committed + 0.01, delta=DELTA, period="forever")
            with contextlib.suppress(BudgetExceeded):
                ledger.reserve(dataset="d", task_id="edge", mechanism=mech, budget=edge)
            at_edge = held[-1]
    finally:
        ledger_module.PrivacyLedger._transaction = original  # type: ignore[method-assign]
    return {
        "dpsgd_tasks_before": tasks,
        "steps_composed": tasks * 34,
        "lock_seconds_far_from_edge_median": round(far, 4),
        "reserve_seconds_far_from_edge_median": round(statistics.median(whole), 4),
        "lock_seconds_at_edge": round(at_edge, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--laplace-per-proc", type=int, default=150)
    ap.add_argument("--dpsgd-per-proc", type=int, default=15)
    args = ap.parse_args()

    comp = bench_composition()
    print(f"(a) demo tasks (sigma {SIGMA}, q 1/34, {STEPS} steps), delta {DELTA:g}")
    print(f"{'tasks':>5} {'ledger PRV':>11} {'naive sum':>10} {'RDP':>8} {'saving':>7}")
    for r in comp:
        print(
            f"{r['tasks']:>5} {r['epsilon_ledger_prv']:>11.3f} {r['epsilon_naive_sum']:>10.3f} "
            f"{r['epsilon_rdp']:>8.3f} {100 * r['saving_vs_naive']:>6.1f}%"
        )
    thr = [
        bench_throughput("laplace", args.laplace_per_proc, args.runs),
        bench_throughput("dpsgd", args.dpsgd_per_proc, args.runs),
    ]
    print(f"(b) reservations per second, {PROCESSES} processes, median of {args.runs} runs")
    for t in thr:
        print(f"  {t['mechanism']:>8}: {t['median_per_second']:8.2f}/s  (runs: {t['runs_per_second']}, "
              f"{t['reservations_per_run']} reservations each)")

    lock = bench_lock_hold()
    print(
        f"(c) write lock held per DP-SGD reservation ({lock['steps_composed']} steps composed): "
        f"{lock['lock_seconds_far_from_edge_median']:.3f} s far from the edge "
        f"(whole call {lock['reserve_seconds_far_from_edge_median']:.3f} s), "
        f"{lock['lock_seconds_at_edge']:.3f} s at the edge"
    )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "composition": comp,
                "throughput": thr,
                "lock_hold": lock,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version,
                    "platform": platform.platform(),
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
