"""Federated DP statistics, measured: what an epsilon buys, and a query over all 342 municipalities.

1. **Epsilon against error** (library level, Flower's transport left out): the synthetic iWmo
   data of all 342 municipalities (``fedgov.data.iwmo``, seed 2026); each municipality releases
   the count of its clients per Wmo product category (18 cells, one row per person, OpenDP
   discrete Laplace) at epsilon e for the whole query; the coordinator adds them up. For each e:
   the relative error of the national count per category (median and largest over the 18), and
   of each municipality's own counts (mean over all municipality x category cells with a true
   count of at least 10; the median would be 0 at larger epsilons, where most discrete
   Laplace draws are 0), each the median over ``--repeats`` runs.
2. **A query over 342 municipalities in simulation**, end to end: ``fedgov query
   configs/queries/wmo-monitor.toml`` (5 measures, real SuperLink and Ray, 342 virtual nodes,
   each with its policy, ledger and audit log): wall time, and the time from the nodes'
   connection to the report.

    .venv/bin/python benchmarks/bench_query.py [--repeats 5] [--no-simulation] [--sim-repeats 3]

Prints markdown tables and writes ``benchmarks/results/query.json``.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EPSILONS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def epsilon_table(repeats: int) -> list[dict[str, Any]]:
    import pandas as pd

    from fedgov.analytics import combine, load_query, local_release, true_result
    from fedgov.data import iwmo

    frame = iwmo.generate(2026)
    frame = frame.astype({c: object for c in frame.columns if str(frame[c].dtype) == "category"})
    nodes: dict[str, pd.DataFrame] = {c: p.reset_index(drop=True) for c, p in frame.groupby("municipality", sort=False, observed=True)}
    rows = []
    with tempfile.TemporaryDirectory() as t:
        for eps in EPSILONS:
            q = Path(t) / f"q{eps}.toml"
            q.write_text(
                f'name = "eps"\ncontract = "{ROOT / "configs" / "contracts" / "iwmo-wmo.toml"}"\n'
                f"[privacy]\nepsilon = {eps}\nmax_rows_per_person = 1\n"
                '[[measures]]\nname = "c"\nkind = "count"\nby = ["product_category"]\n',
                encoding="utf-8",
            )
            query, contract = load_query(q)
            truth = true_result(nodes, query, contract)
            true_nat = truth.national("c")
            true_node = {(f.scope_value, f.cell): f.estimate for f in truth.select("c", "node")}
            nat_med, nat_max, node_med, secs = [], [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                rel = {code: local_release(f, query, contract, min_cohort=2) for code, f in nodes.items()}
                res = combine(rel, query, contract)
                secs.append(time.perf_counter() - t0)
                errs = [abs((f.estimate or 0) - (true_nat[c].estimate or 0)) / (true_nat[c].estimate or 1) for c, f in res.national("c").items()]
                nat_med.append(statistics.median(errs))
                nat_max.append(max(errs))
                per = []
                for code, r in rel.items():
                    part = r.part("c", "counts")
                    for cell, v in zip(part.cells, part.values, strict=True):
                        tv = true_node.get((code, cell))
                        if v is not None and tv is not None and tv >= 10:
                            per.append(abs(v - tv) / tv)
                node_med.append(statistics.fmean(per))
            rows.append({
                "epsilon": eps,
                "national_median_rel_error": statistics.median(nat_med),
                "national_max_rel_error": statistics.median(nat_max),
                "municipality_mean_rel_error": statistics.median(node_med),
                "seconds_342_releases_and_combine": statistics.median(secs),
            })
            print(f"epsilon {eps}: national median {rows[-1]['national_median_rel_error']:.4%}, "
                  f"max {rows[-1]['national_max_rel_error']:.4%}, per municipality {rows[-1]['municipality_mean_rel_error']:.2%}",
                  flush=True)
    return rows


def simulation_342() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedgov-bench-query-") as t:
        runs = Path(t) / "runs"
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "fedgov.cli", "query", str(ROOT / "configs" / "queries" / "wmo-monitor.toml"), "--runs-dir", str(runs)],
            check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        wall = time.monotonic() - t0
        run_dir = next(runs.iterdir())
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text("utf-8").splitlines() if line.strip()]
        report = json.loads((run_dir / "query.json").read_text("utf-8"))
        t_conn = next(e["time"] for e in events if e["event"] == "nodes-connected")
        t_rep = next(e["time"] for e in events if e["event"] == "report")
        refused: dict[str, int] = {}
        for n in report["nodes"]:
            if not n["accepted"]:
                refused[str(n["code"])] = refused.get(str(n["code"]), 0) + 1
        return {
            "refusal_codes": refused,
            "wall_s": round(wall, 1),
            "nodes_connected_to_report_s": round(t_rep - t_conn, 1),
            "nodes_answered": sum(1 for n in report["nodes"] if n["accepted"]),
            "nodes_refused": sum(1 for n in report["nodes"] if not n["accepted"]),
            "figures": len(report["result"]["figures"]) if report.get("result") else 0,
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-simulation", action="store_true")
    ap.add_argument("--sim-repeats", type=int, default=1, help="runs of the 342-municipality query (median)")
    args = ap.parse_args()
    import os
    import platform

    out: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "repeats": args.repeats}
    out["epsilon_vs_error"] = epsilon_table(args.repeats)
    path = ROOT / "benchmarks" / "results" / "query.json"
    if not args.no_simulation:
        sims = [simulation_342() for _ in range(args.sim_repeats)]
        out["simulation_342"] = {
            **sims[0],
            "wall_s": round(statistics.median(s["wall_s"] for s in sims), 1),
            "nodes_connected_to_report_s": round(statistics.median(s["nodes_connected_to_report_s"] for s in sims), 1),
            "repeats": len(sims),
            "wall_s_each": [s["wall_s"] for s in sims],
        }
    elif path.is_file() and "simulation_342" in json.loads(path.read_text("utf-8")):
        out["simulation_342"] = json.loads(path.read_text("utf-8"))["simulation_342"]  # kept from the last full run
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print("\n| epsilon per municipality | national count per category: median rel. error | largest | a municipality's own count: mean rel. error |")
    print("|---|---|---|---|")
    for r in out["epsilon_vs_error"]:
        print(f"| {r['epsilon']} | {r['national_median_rel_error']:.3%} | {r['national_max_rel_error']:.3%} | {r['municipality_mean_rel_error']:.2%} |")
    if "simulation_342" in out:
        s = out["simulation_342"]
        print(f"\nwmo-monitor over 342 municipalities in simulation: {s['wall_s']} s wall, {s['nodes_connected_to_report_s']} s from "
              f"connection to report; {s['nodes_answered']} answered, {s['nodes_refused']} refused {s.get('refusal_codes', {})}; "
              f"{s['figures']} figures")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
