"""Does the model learn under DP? fedgov's defaults against a plain model, on tables fedgov has never seen.

For each public table with a natural organisation column (``data/chem97``, ``data/egsingle``,
``data/guprenat``, ``data/benefits``, ``data/vietnam``; their READMEs give source and licence),
on the same split:

- **majority**: always guessing the most frequent class of the pooled test splits (AUC 0.5 for
  the imbalanced target);
- **plain LR**: a non-private, centralized logistic regression (scikit-learn, lbfgs) on the pooled
  training splits of every member, evaluated on their pooled test splits, with fedgov's own
  contract-driven encoding;
- **fedgov defaults**: ``fedgov run configs/tasks/<table>.toml`` (logistic regression, distributed
  DP under secure aggregation as ``fedgov data draft`` chooses for small organisations, epsilon 2
  per organisation, every training setting left to its default), its final model (``model.pt``)
  evaluated on the same pooled test splits;
- **fedgov with personalisation**: the nodes' personalised models, when the run report has them
  (see :func:`personalised`), pooled over the nodes' test splits; ``n/a`` otherwise.

The metric is accuracy, or ROC AUC where the target is imbalanced (egsingle: 5% retained). The
target: fedgov's gain over the majority rate (over 0.5 for AUC) at least 80% of plain LR's. Then the
demo, Adult over 12 municipalities (``configs/tasks/adult-income.toml``) at epsilon 1 per node
(a copy of the task with ``target_epsilon = 1.0``), on Adult's own test set; target accuracy 0.835.
Last, :data:`VARIANTS`: a table with one setting changed from the defaults (egsingle without the
coordinator's automatic momentum, ``training.server_momentum = 0``), labelled as such.

    .venv/bin/python benchmarks/bench_utility.py [--tables chem97 egsingle benefits adult] [--runs-dir DIR] [--repeat N]

A run whose model learned nothing exits with 21 (NOT_LEARNED) and is still measured. Prints a
table, and writes ``benchmarks/results/utility.json`` and ``benchmarks/results/utility.md``.
Seeds are fixed (the tasks' ``training.seed``, the federations' ``seed``); DP noise is drawn from
the OS's entropy, as a deployed node does, so figures move a little from run to run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TABLES: dict[str, tuple[str, str]] = {
    # name: (task file, metric)
    "chem97": ("configs/tasks/chem97.toml", "accuracy"),
    "egsingle": ("configs/tasks/egsingle.toml", "auc"),
    "guprenat": ("configs/tasks/guprenat.toml", "accuracy"),
    "benefits": ("configs/tasks/benefits.toml", "accuracy"),
    "vietnam": ("configs/tasks/vietnam.toml", "accuracy"),
}
VARIANTS: dict[str, tuple[str, str]] = {
    # name: (table, a [training] line added to a copy of its task): not defaults, shown apart
    "egsingle-no-momentum": ("egsingle", "server_momentum = 0.0"),
}
DEMO_TASK = "configs/tasks/adult-income.toml"
DEMO_EPSILON = 1.0
SHARE_TARGET = 0.8
DEMO_TARGET = 0.835
OK_EXITS = (0, 21)  # 21: completed, the model did not learn (ExitCode.NOT_LEARNED)


def _encode(task_path: Path, frames: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    from fedgov.config import load_task
    from fedgov.data import Encoder, read_table, validate_frame

    task, contract = load_task(task_path)
    enc = Encoder.from_contract(contract, task.features)
    cols = enc.columns
    xs, ys = [], []
    for p in frames:
        raw = read_table(p)
        X, y = enc.transform(validate_frame(raw[[c for c in raw.columns if c in cols]], contract, file=str(p), columns=cols))
        xs.append(X)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _score(metric: str, y: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if metric == "auc":
        return float(roc_auc_score(y, proba[:, 1]))
    return float(np.mean(proba.argmax(axis=1) == y))


def plain_lr(metric: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Non-private centralized logistic regression on the pooled training rows."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=5000).fit(*train)
    proba = np.zeros((len(test[1]), int(max(train[1].max(), test[1].max())) + 1))
    proba[:, model.classes_] = model.predict_proba(test[0])
    return _score(metric, test[1], proba)


def model_score(task_path: Path, model_file: Path, metric: str, test: tuple[np.ndarray, np.ndarray]) -> float:
    """The run's final model (``model.pt``) on ``test``."""
    import torch

    from fedgov.config import load_task
    from fedgov.models import build_model, set_state

    task, _ = load_task(task_path)
    state = {k: v.numpy() for k, v in torch.load(model_file, weights_only=True).items()}
    n_classes = int(state[[k for k in state if k.endswith("weight")][-1]].shape[0])
    model = build_model(task.model, n_features=test[0].shape[1], n_classes=n_classes, seed=0)
    set_state(model, state)
    with torch.no_grad():
        proba = torch.softmax(model.eval()(torch.as_tensor(test[0])), dim=1).numpy()
    return _score(metric, test[1], proba)


PERSONAL_KEYS = ("personalised_accuracy", "personal_accuracy", "personalized_accuracy")


def personalised(report: dict[str, Any], test_rows: dict[str, int]) -> float | None:
    """Hook for the personal models: the nodes' personalised accuracies (a node field named in
    :data:`PERSONAL_KEYS`), weighted by each node's test rows; None when the report has none."""
    pairs = []
    for n in report.get("nodes", []):
        value = next((n[k] for k in PERSONAL_KEYS if n.get(k) is not None), None)
        if value is not None and test_rows.get(n["node"]):
            pairs.append((float(value), test_rows[n["node"]]))
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def fedgov_run(task: Path, runs: Path, extra: list[str]) -> tuple[Path, dict[str, Any], float, int]:
    """``fedgov run TASK --runs-dir RUNS``: the run directory, its report, wall seconds, exit code."""
    cmd = [sys.executable, "-m", "fedgov.cli", "run", str(task), "--runs-dir", str(runs), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    reports = sorted(runs.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if proc.returncode not in OK_EXITS or not reports:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return reports[-1].parent, json.loads(reports[-1].read_text()), wall, proc.returncode


def share(value: float, plain: float, base: float) -> float | None:
    """fedgov's gain over the base as a share of plain LR's gain (None when plain gains nothing)."""
    return (value - base) / (plain - base) if plain > base else None


def _task_copy(src: Path, tmp: Path, name: str, training_line: str) -> Path:
    """A copy of ``src`` with ``training_line`` in its ``[training]`` table, its relative paths made absolute."""
    text = src.read_text("utf-8")
    if "\n[training]\n" not in text:
        raise SystemExit(f"{src}: no [training] table to add '{training_line}' to")
    text = text.replace("\n[training]\n", f"\n[training]\n{training_line}\n", 1)
    text = re.sub(r'"(\.\.?/[^"]*)"', lambda m: '"' + str((src.parent / m.group(1)).resolve()) + '"', text)
    out = tmp / f"{name}.toml"
    out.write_text(text, encoding="utf-8")
    return out


def table(name: str, runs: Path, extra: list[str], tmp: Path) -> dict[str, Any]:
    base_name, line = VARIANTS.get(name, (name, ""))
    task_rel, metric = TABLES[base_name]
    task = _task_copy(ROOT / task_rel, tmp, name, line) if line else ROOT / task_rel
    if line:
        task_rel = f"{task_rel} with {line}"
    run_dir, report, wall, code = fedgov_run(task, runs / name, extra)
    nodes = json.loads((run_dir / "manifest.json").read_text())
    train = _encode(task, [Path(n["train_path"]) for n in nodes])
    test = _encode(task, [Path(n["test_path"]) for n in nodes])
    counts = np.bincount(test[1])
    majority = float(counts.max() / counts.sum())
    base = 0.5 if metric == "auc" else majority
    plain = plain_lr(metric, train, test)
    fed = model_score(task, run_dir / "model.pt", metric, test)
    pers = personalised(report, {n["code"]: int(n["test_rows"]) for n in nodes})
    s = share(fed, plain, base)
    trained = sum(1 for n in report["nodes"] if n["status"] == "accepted" and n["rounds_trained"] > 0)
    return {
        "table": name if not line else f"{base_name} ({line})", "task": task_rel, "metric": metric, "test_rows": int(len(test[1])), "train_rows": int(len(train[1])),
        "classes": int(len(counts)), "majority": round(majority, 4), "baseline": round(base, 4), "plain_lr": round(plain, 4),
        "fedgov_defaults": round(fed, 4), "fedgov_personalised": None if pers is None else round(pers, 4),
        "share_of_plain_gain": None if s is None else round(s, 3),
        "meets_target": None if s is None else bool(s >= SHARE_TARGET),
        "nodes": len(report["nodes"]), "nodes_trained": trained, "target_epsilon": report["privacy"].get("target_epsilon"),
        "max_epsilon": max((n["epsilon"] for n in report["nodes"] if n["epsilon"] is not None), default=None),
        "learning": report.get("learning"), "exit_code": code, "wall_seconds": round(wall, 1), "run_dir": str(run_dir),
        "command": f"fedgov run {task_rel if not line else f'<copy of {TABLES[base_name][0]} with {line}>'} --runs-dir {runs / name} "
        f"{' '.join(extra)}".strip(),
    }


def demo(runs: Path, extra: list[str], tmp: Path) -> dict[str, Any]:
    """Adult over 12 municipalities at epsilon 1 per node, on Adult's own test set."""
    src = ROOT / DEMO_TASK
    text = src.read_text("utf-8")
    text, n = re.subn(r"(?m)^target_epsilon = .*$", f"target_epsilon = {DEMO_EPSILON}", text)
    if n != 1:
        raise SystemExit(f"{src}: no single 'target_epsilon = ...' line to override")
    text = re.sub(r'"(\.\.?/[^"]*)"', lambda m: '"' + str((src.parent / m.group(1)).resolve()) + '"', text)
    task = tmp / "adult-income-eps1.toml"
    task.write_text(text, encoding="utf-8")
    run_dir, report, wall, code = fedgov_run(task, runs / "adult", extra)
    from fedgov.config import load_federation, load_task

    t, _ = load_task(task)
    assert t.federation is not None and t.evaluation.centralized is not None
    train = _encode(task, [load_federation(t.federation).source])  # type: ignore[list-item]
    test = _encode(task, [t.evaluation.centralized])
    nodes = json.loads((run_dir / "manifest.json").read_text())
    pers = personalised(report, {n["code"]: int(n["test_rows"]) for n in nodes})
    acc = report["final"]["accuracy"]
    majority = report["majority_rate"]
    plain = plain_lr("accuracy", train, test)
    s = share(acc, plain, majority)
    return {
        "table": "adult (demo-12)", "task": DEMO_TASK + f" with target_epsilon = {DEMO_EPSILON}", "metric": "accuracy",
        "test_rows": int(len(test[1])), "train_rows": int(len(train[1])), "classes": 2, "majority": round(majority, 4),
        "baseline": round(majority, 4), "plain_lr": round(plain, 4), "fedgov_defaults": round(acc, 4),
        "fedgov_personalised": None if pers is None else round(pers, 4), "share_of_plain_gain": None if s is None else round(s, 3),
        "meets_target": bool(acc >= DEMO_TARGET), "target": f"accuracy >= {DEMO_TARGET}",
        "nodes": len(report["nodes"]), "nodes_trained": sum(1 for n in report["nodes"] if n["rounds_trained"] > 0),
        "target_epsilon": report["privacy"].get("target_epsilon"),
        "max_epsilon": max((n["epsilon"] for n in report["nodes"] if n["epsilon"] is not None), default=None),
        "learning": report.get("learning"), "exit_code": code, "wall_seconds": round(wall, 1), "run_dir": str(run_dir),
        "command": f"fedgov run <copy of {DEMO_TASK} with target_epsilon = {DEMO_EPSILON}> --runs-dir {runs / 'adult'} {' '.join(extra)}".strip(),
    }


HEADER = [
    "| table | metric | majority / chance | plain LR | fedgov defaults | share of plain's gain | fedgov with personalisation | nodes trained | epsilon per node |",
    "|---|---|---|---|---|---|---|---|---|",
]


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one table (``--repeat``): the median run's record, with every run's figure
    (``repeats``), shares and how many met the target."""
    ordered = sorted(runs, key=lambda r: r["fedgov_defaults"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["repeats"] = [r["fedgov_defaults"] for r in runs]
    out["repeat_shares"] = [r["share_of_plain_gain"] for r in runs]
    out["repeats_met"] = sum(1 for r in runs if r["meets_target"])
    return out


def row(r: dict[str, Any]) -> str:
    s = "-" if r["share_of_plain_gain"] is None else f"{100 * r['share_of_plain_gain']:.0f}%"
    ok = {True: " (met)", False: " (missed)", None: ""}[r["meets_target"]]
    if len(r.get("repeats", [])) > 1:
        n = len(r["repeats"])
        shares = [x for x in r["repeat_shares"] if x is not None]
        low = f", lowest {100 * min(shares):.0f}%" if shares else ""
        s, ok = f"median {s}{low}", f" (met in {r['repeats_met']} of {n} runs)" if r["meets_target"] is not None else ""
    if r["table"].startswith("adult"):
        s, ok = f"{s}; target acc. {DEMO_TARGET}", ok
    pers = "n/a" if r["fedgov_personalised"] is None else f"{r['fedgov_personalised']:.4f}"
    fed = f"{r['fedgov_defaults']:.4f}"
    if len(r.get("repeats", [])) > 1:
        fed = f"{fed} (runs: {', '.join(f'{v:.4f}' for v in r['repeats'])})"
    if r["fedgov_personalised"] is not None and r["metric"] == "auc":  # the nodes report accuracy, not AUC
        pers = f"accuracy {pers} (majority {r['majority']:.4f})"
    return (
        f"| {r['table']} | {r['metric']} | {r['baseline']:.4f} | {r['plain_lr']:.4f} | {fed} | {s}{ok} | {pers} | "
        f"{r['nodes_trained']} of {r['nodes']} | {r['target_epsilon']} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", nargs="+", default=[*TABLES, "adult", *VARIANTS], choices=[*TABLES, "adult", *VARIANTS])
    ap.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temporary directory)")
    ap.add_argument("--fedgov-args", default="--no-baseline", help="extra arguments of every fedgov run")
    ap.add_argument("--out", default="utility", help="file name (no suffix) under benchmarks/results/")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each table (fresh DP noise each): the median run is shown, with every run's figure")
    args = ap.parse_args()
    extra = args.fedgov_args.split()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedgov-utility-") as tmp_s:
        tmp = Path(tmp_s)
        runs = args.runs_dir.resolve() if args.runs_dir else tmp / "runs"
        print("\n".join(HEADER), flush=True)
        for name in args.tables:
            r = combine([demo(runs, extra, tmp) if name == "adult" else table(name, runs, extra, tmp) for _ in range(max(1, args.repeat))])
            results.append(r)
            print(row(r), flush=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.out}.md").write_text("\n".join(HEADER + [row(r) for r in results]) + "\n")


if __name__ == "__main__":
    main()
