"""Where a round's CPU goes at national scale: a profile of fedgov's own code, nodes and
coordinator, for a distributed-DP round under secure aggregation.

The task ``configs/tasks/nl-342-distributed.toml`` (or ``--task``) on its federation, run in one
process through fedgov's coordinator (``run_training``) and fedgov's ClientApp with all its mods
(``fedgov.testing.InProcessGrid``: Flower's transport is the only part of a run left out, so
what is measured is fedgov's per-message work at the node and the coordinator's stages), under
``cProfile``. ``--nodes N`` keeps the federation's first N members.

    .venv/bin/python benchmarks/profile_scale.py [--rounds 1] [--nodes 342] [--top 30] [--out NAME]

Prints the wall time of each phase (admission, each round), the share of CPU time by part of
the code (node mods, secure aggregation at the node, training, ledger and audit writes,
coordinator stages, unmasking) and the top functions by own time; writes the table to
``benchmarks/results/profile-<NAME>.txt`` (default ``profile-342.txt``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Parts of the code, by the file a function lies in and, where a file serves both sides, its
# name (first match wins), for the summary.
PARTS = [
    ("coordinator: unmasking", r"fedgov/privacy/shamir\.py", r"combine|lagrange|_tables|_gf_inv|share_index|_unpad"),
    ("coordinator: unmasking", r"fedgov/privacy/secagg\.py", r"unmask_sum|_prg_sum"),
    ("node: secure aggregation (keys, shares, masks)", r"fedgov/node/secure\.py|fedgov/privacy/secagg\.py|fedgov/privacy/shamir\.py|fedgov/privacy/roster\.py|Crypto/|flwr/common/secure_aggregation|flwr/supercore/primitives|cryptography/", None),
    ("node: distributed DP noise", r"fedgov/privacy/distributed\.py|fedgov/privacy/rng\.py", None),
    ("node: ledger, audit log, node state (SQLite)", r"fedgov/node/(ledger|audit|state|_sqlite|budget|spend)\.py|sqlite3|contextlib", None),
    ("node: training (torch)", r"torch/|fedgov/node/training\.py|fedgov/models\.py|opacus/", None),
    ("node: data read and checks", r"fedgov/data/|pandas/|pyarrow/", None),
    ("node: policy, admission, contracts, gate", r"fedgov/node/(policy|admission|contracts|gate|home|rounds|context|refusals)\.py|clients/", None),
    ("coordinator: stages, strategy, recording, evaluation", r"fedgov/coordinator/|flwr/serverapp/", None),
    ("messages and records (Flower, pydantic, json)", r"flwr/|pydantic|json/|copy\.py", None),
    ("threads (Flower's thread pools: waits)", r"concurrent/|threading\.py", None),
]


def _task_text(task: Path, rounds: int) -> str:
    text = task.read_text("utf-8")
    text = re.sub(r"(?m)^rounds = \d+", f"rounds = {rounds}", text)
    for key in ("contract", "federation", "centralized"):
        text = re.sub(rf'(?m)^{key} = "(\.\./[^"]+)"', lambda m: f'{m.group(0).split("=")[0]}= "{(task.parent / m.group(1)).resolve()}"', text)
    return text


def _federation(src: Path, nodes: int, out: Path) -> Path:
    text = src.read_text("utf-8")
    head, *members = text.split("[[members]]")
    text = head + "".join("[[members]]" + m for m in members[:nodes])
    text = re.sub(r'(?m)^source = "(\.\./[^"]+)"', lambda m: f'source = "{(src.parent / m.group(1)).resolve()}"', text)
    out.write_text(text, encoding="utf-8")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", type=Path, default=ROOT / "configs" / "tasks" / "nl-342-distributed.toml")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=342)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="342")
    ap.add_argument("--dump", type=Path, default=None, help="also save the raw profile (pstats) here")
    ap.add_argument("--policy-min-rows", type=int, default=None, help="set every node policy's limits.min_rows (the profile of an older fedgov)")
    args = ap.parse_args()

    import torch

    from fedgov.config import load_task
    from fedgov.coordinator.run import run_training
    from fedgov.testing import InProcessGrid, prepare

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedgov-profile-") as tmp_s:
        tmp = Path(tmp_s)
        task_path = tmp / "task.toml"
        task_path.write_text(_task_text(args.task, args.rounds), encoding="utf-8")
        task, contract = load_task(task_path)
        fed = _federation(Path(str(task.federation)), args.nodes, tmp / "federation.toml")
        t0 = time.time()
        _, _, nodes, manifest = prepare(tmp / "nodes", fed, task_path)
        setup = time.time() - t0
        if args.policy_min_rows is not None:
            for n in nodes:
                pol = n.train_path.parent / "policy.toml"
                pol.write_text(re.sub(r"(?m)^min_rows = \d+", f"min_rows = {args.policy_min_rows}", pol.read_text("utf-8")), encoding="utf-8")
        grid = InProcessGrid(manifest, len(nodes), run_id=342)
        prof = cProfile.Profile()
        t0 = time.time()
        prof.enable()
        report = run_training(
            grid, task, contract, run_dir=tmp / "run", expected_nodes=len(nodes), task_file=str(task_path),
            federation=fed.stem, local_baseline=False, flower_run_id=342, connect_timeout=60,
        )
        prof.disable()
        wall = time.time() - t0
        events = [json.loads(line) for line in (tmp / "run" / "events.jsonl").read_text().splitlines()]
    out = io.StringIO()
    accepted = report.accepted()
    print(f"# profile: {len(nodes)} nodes, {args.rounds} round(s) of {args.task.name} in process", file=out)
    print(f"command: benchmarks/profile_scale.py {' '.join(sys.argv[1:])}", file=out)
    print(f"status {report.status}; {len(accepted)} nodes took part; accuracy "
          f"{report.final.accuracy if report.final else float('nan'):.4f}", file=out)
    print(f"node directories: {setup:.1f} s; the run: {wall:.1f} s wall", file=out)
    for r in report.rounds:
        print(f"  round {r.round}: {r.seconds:.1f} s, accuracy {r.accuracy if r.accuracy is not None else float('nan'):.4f}", file=out)
    if args.dump is not None:
        prof.dump_stats(str(args.dump))
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    parts: dict[str, float] = {name: 0.0 for name, _, _ in PARTS}
    parts["other"] = 0.0

    def part_of(file: str, fn: str) -> str:
        return next((name for name, pattern, fns in PARTS if re.search(pattern, file) and (fns is None or re.search(fns, fn))), "other")

    for (file, _line, fn), (_cc, _nc, tt, _ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if file == "~" and callers:
            # a built-in (a lock, a SQLite call, a signature check): its time goes to the part
            # of the code that called it, edge by edge
            for (cfile, _cl, cfn), edge in callers.items():
                parts[part_of(cfile, cfn)] += edge[2]
        else:
            parts[part_of(file, fn)] += tt
    print(f"\nCPU time profiled: {total:.1f} s; by part (own time of the functions in each part):", file=out)
    for name, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {t:7.1f} s  {100 * t / total:5.1f}%  {name}", file=out)
    print(f"\ntop {args.top} functions by own time:", file=out)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]  # type: ignore[attr-defined]
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows:
        where = re.sub(r".*site-packages/", "", file).replace(str(ROOT) + "/", "")
        print(f"  {tt:7.2f} s own {ct:7.2f} s cum {nc:9d} calls  {fn} ({where}:{line})", file=out)
    del events
    text = out.getvalue()
    print(text)
    dest = ROOT / "benchmarks" / "results" / f"profile-{args.out}.txt"
    dest.write_text(text, encoding="utf-8")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
