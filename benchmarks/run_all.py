"""``make bench``: every benchmark of issue "scale and speed", then one table of their figures.

Runs, each in its own process and one after the other (two at once would share the cores):

1. ``bench_dp_cost.py``: one node's local epoch, DP-SGD against non-private (medians of 7 pairs);
2. ``bench_overhead.py``: fedgov against a bare Flower app, time per round (3 repeats); and
   bytes sent per node per round against the model's float32 size;
3. ``bench_scale.py``: the benchmark table, local DP-SGD and distributed DP at 12 and at 342
   municipalities with the shipped tasks' rounds (3 repeats; about 8 minutes a repeat);
4. ``bench_query.py``: a statistics query over 342 municipalities, end to end (3 repeats).

Then writes ``benchmarks/results/summary.json`` and ``benchmarks/results/summary.md`` (the
markdown table the README's performance section shows), with the machine it ran on.

    .venv/bin/python benchmarks/run_all.py [--quick]

``--quick`` makes one repeat of everything, and the scale table at 12 municipalities only (a smoke
run of the suite; its figures are not medians, and the 342-municipality targets are left unmeasured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_s = f"{mem / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        mem_s = "RAM unknown"
    import flwr
    import opacus
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_s}, {platform.system()} {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, flwr {flwr.__version__ if hasattr(flwr, '__version__') else '?'}, opacus {opacus.__version__}"
    )


def _run(script: str, *args: str) -> float:
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


_MODES = {"local": "local DP-SGD", "distributed": "distributed DP"}


def _scale_rows(sc: dict[str, Any], row: Callable[..., None]) -> None:
    """The benchmark table (scale.json): per (scale, mode) its time, memory, accuracy and epsilon;
    the issue's targets on 342 municipalities with distributed DP."""
    if "rows" not in sc:
        row("scale", "scale.json is of the format before the local/distributed table: rerun benchmarks/bench_scale.py", "-", "", None, "scale.json")
        return
    for r in sc["rows"]:
        head = f"{r['scale']} municipalities, {_MODES.get(r['mode'], r['mode'])} ({Path(r['task']).stem}"
        targets = r["scale"] == 342 and r["mode"] == "distributed"
        if "error" in r:
            first = r["error"].splitlines()[0] if r["error"] else "?"
            row("scale", f"{head}): failed", first[:100], "completes" if targets else "", False if targets else None, "scale.json")
            continue
        head += f", {r['rounds']} rounds)"
        wall, after, peak = r["wall_seconds"], r["median_round_seconds_after_start"], r["peak_tree_rss_mib"]
        per_round = f"{after:.1f} s" if after is not None else f"{r['round_1_seconds']:.1f} s (round 1)"
        acc, maj, eps = r["final_accuracy"], r["majority_rate"], r["epsilon_per_municipality"]
        acc_s = "-" if acc is None else f"{acc:.4f} (majority class {maj:.4f})"
        eps_s = "-" if eps is None else f"{eps:.2f} {r['epsilon_unit']}"
        if not targets:
            row("scale", f"{head}: wall time / time per round after start-up / peak memory, whole process tree",
                f"{wall:.0f} s / {per_round} / {peak / 1024:.2f} GiB", "", None, "scale.json")
            row("scale", f"{head}: municipalities trained / accuracy / epsilon per municipality",
                f"{r['nodes_trained']} of {r['nodes']} / {acc_s} / {eps_s}", "", None, "scale.json")
            continue
        row("scale", f"{head}: municipalities trained", f"{r['nodes_trained']} of {r['nodes']}", ">= 320 of 342",
            r["nodes_trained"] >= 320, "scale.json")
        row("scale", f"{head}: accuracy", acc_s, ">= 0.83", acc is not None and acc >= 0.83, "scale.json")
        row("scale", f"{head}: epsilon per municipality", eps_s, "<= 1", eps is not None and eps <= 1.0, "scale.json")
        row("scale", f"{head}: wall time", f"{wall:.0f} s", "< 300 s", wall < 300, "scale.json")
        row("scale", f"{head}: time per round after start-up", per_round, "", None, "scale.json")
        row("scale", f"{head}: peak memory, whole process tree", f"{peak / 1024:.2f} GiB", "< 4 GiB", peak < 4096, "scale.json")
    if not any(r["scale"] == 342 and r["mode"] == "distributed" for r in sc["rows"]):
        row("scale", "342 municipalities, distributed DP: not measured (scale.json has no such row)", "-",
            ">= 320 of 342 trained, accuracy >= 0.83, epsilon <= 1, wall < 300 s, peak < 4 GiB", None, "scale.json")


def summary(machine: str, command: str) -> dict[str, Any]:
    """The headline figures of the four result files, with their targets."""
    dp = json.loads((RESULTS / "dp_cost.json").read_text())
    ov = json.loads((RESULTS / "overhead.json").read_text())
    sc = json.loads((RESULTS / "scale.json").read_text())
    qu = json.loads((RESULTS / "query.json").read_text())
    rows: list[dict[str, Any]] = []

    def row(area: str, figure: str, value: str, target: str, met: bool | None, source: str) -> None:
        rows.append({"area": area, "figure": figure, "value": value, "target": target, "met": met, "source": source})

    _scale_rows(sc, row)
    for r in dp["rows"]:
        if r.get("mode") == "auto" and "ratio" in r:
            target = "<= 1.5" if r["model"] == "mlp" else ""
            met = r["ratio"] <= 1.5 if r["model"] == "mlp" else None
            row("DP cost", f"{r['model']}, batch {r['batch']}: DP-SGD epoch / non-private (default: {r['resolved']})",
                f"{r['ratio']:.2f}x", target, met, "dp_cost.json")
    ghost = [r for r in dp["rows"] if r.get("mode") == "ghost" and r["model"] == "mlp" and "ratio" in r]
    for r in ghost:
        row("DP cost", f"mlp, batch {r['batch']}: Opacus ghost clipping, for comparison", f"{r['ratio']:.2f}x", "", None, "dp_cost.json")
    row("overhead", "fedgov / bare Flower, time per round, same Opacus clipping (hooks)",
        f"{ov['ratio_fedgov_hooks_to_bare']:.2f}x", "<= 1.10", ov["ratio_fedgov_hooks_to_bare"] <= 1.10, "overhead.json")
    row("overhead", "fedgov default / bare Flower + Opacus, time per round",
        f"{ov['ratio_fedgov_to_bare']:.2f}x", "<= 1.10", ov["ratio_fedgov_to_bare"] <= 1.10, "overhead.json")
    row("overhead", "fedgov default / bare Flower + Opacus without any accounting, time per round",
        f"{ov['ratio_fedgov_to_bare_no_accounting']:.2f}x", "<= 1.10", ov["ratio_fedgov_to_bare_no_accounting"] <= 1.10, "overhead.json")
    for c in ov["communication"]:
        row("communication", f"{c['model']} ({c['parameters']} parameters): node -> coordinator per round / float32 model",
            f"{c['up_ratio']:.2f}x ({c['up_bytes_per_node_round']:.0f} B)", "<= 1", c["up_ratio"] <= 1.0, "overhead.json")
        row("communication", f"{c['model']}: coordinator -> node per round / float32 model",
            f"{c['down_ratio']:.2f}x ({c['down_bytes_per_node_round']:.0f} B)", "", None, "overhead.json")
    sim = qu.get("simulation_342")
    if sim:
        row("statistics", "wmo-monitor query over 342 municipalities, end to end", f"{sim['wall_s']:.0f} s", "", None, "query.json")
    return {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "command": command,
        "rows": rows,
    }


def markdown(s: dict[str, Any]) -> str:
    out = [
        f"Measured {s['generated']} on {s['machine']}, with `{s['command']}`. Each figure is a median over repeated runs;",
        "each ratio divides two medians taken in the same invocation.",
        "",
        "| area | figure | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['area']} | {r['figure']} | {r['value']} | {r['target']} | {met} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one repeat of everything (a smoke run)")
    ap.add_argument("--summary-only", action="store_true", help="rebuild the table from the existing results")
    args = ap.parse_args()
    command = "make bench" + (" (--quick)" if args.quick else "")
    if args.summary_only:
        command = "benchmarks/run_all.py --summary-only (from the result files each benchmark wrote; see their `command`)"
    if not args.summary_only:
        r = "1" if args.quick else None
        seconds = {
            "dp_cost": _run("bench_dp_cost.py", "--repeats", r or "7"),
            "overhead": _run("bench_overhead.py", "--repeats", r or "3"),
            "scale": _run("bench_scale.py", "--repeats", r or "3", *(["--scales", "12"] if args.quick else [])),
            "query": _run("bench_query.py", "--repeats", r or "5", "--sim-repeats", r or "3"),
        }
        print("\nseconds per benchmark: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    s = summary(_machine(), command)
    (RESULTS / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(markdown(s))
    print("\n" + markdown(s))
    print(f"wrote {RESULTS / 'summary.json'} and {RESULTS / 'summary.md'}")


if __name__ == "__main__":
    main()
