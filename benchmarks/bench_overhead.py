"""fedgov against bare Flower: the same task, model and data split, time per round; and what a
node sends per round against the model's size in float32.

Runs interleaved so that a slow spell of the machine hits all of them:

- **fedgov**: ``fedgov run TASK --no-baseline`` (the demo task by default), as a user runs it;
- **fedgov, Opacus hooks**: the same, with ``privacy.grad_sample_mode = "hooks"``: the same
  per-sample gradients as the baseline, so the ratio is fedgov's own overhead only;
- **bare Flower**: ``benchmarks/bare_flower`` (a minimal Message-API ServerApp/ClientApp with
  Opacus' DP-SGD and FedAvg, nothing else) on the same nodes' data, encoded by fedgov's encoder
  beforehand, with the same batch size, clip, epsilon, delta, rounds and evaluation. Each node
  reports its epsilon every round with Opacus' PRV accountant, as Flower's Opacus example does;
- **bare Flower, no accounting**: the same without any epsilon (a lower bound for a DP app).

All four run on Flower's simulation engine, started the same way (one SuperLink, one virtual
SuperNode per municipality). Time per round is the median over rounds 2..N (round 1 carries
Ray's start-up) of every repeat; each ratio divides two such medians from this invocation.

Communication: fedgov's report records the serialised size of every message of a round's
training phase (``bytes_from_nodes``, ``bytes_to_nodes``); per node per round they are divided
by the nodes that trained, and set against the model's float32 size (4 bytes a parameter).
For reference, the size of bare Flower's reply (the whole model as float32 arrays, with its
metrics) is computed from the same model.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 10] [--repeats 3]

Prints a markdown table and writes ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BARE = ROOT / "benchmarks" / "bare_flower"


def _task_variant(tmp: Path, name: str, rounds: int, *, model: str | None = None, mode: str | None = None) -> Path:
    """The demo task with absolute paths, ``rounds`` rounds, and optionally another model/mode."""
    text = (ROOT / "configs" / "tasks" / "adult-income.toml").read_text("utf-8")
    text = text.replace("rounds = 10", f"rounds = {rounds}")
    text = text.replace('contract = "../contracts/', f'contract = "{ROOT}/configs/contracts/')
    text = text.replace('federation = "../federations/', f'federation = "{ROOT}/configs/federations/')
    text = text.replace('centralized = "../../data/', f'centralized = "{ROOT}/data/')
    if model:
        text = text.replace('name = "logreg"', f'name = "{model}"')
    if mode:
        text = text.replace("[privacy]\n", f'[privacy]\ngrad_sample_mode = "{mode}"\n')
    path = tmp / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _fedgov(task: Path, runs: Path) -> dict[str, Any]:
    runs.mkdir(parents=True, exist_ok=True)
    before = set(runs.iterdir())
    cmd = [str(Path(sys.executable).parent / "fedgov"), "run", str(task), "--runs-dir", str(runs), "--no-baseline"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fedgov run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (run_dir,) = set(runs.iterdir()) - before
    report: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    return report


def _encode_nodes(task_path: Path, out: Path) -> int:
    """Each node's train and test data, and the central test set, encoded as fedgov encodes them."""
    import numpy as np

    from fedgov.config import load_federation, load_task
    from fedgov.data import Encoder, read_table, validate_frame
    from fedgov.data.partition import materialize

    task, contract = load_task(task_path)
    federation = load_federation(task.federation)
    enc = Encoder.from_contract(contract, task.features)
    columns = [*contract.feature_names(task.features), str(contract.target)]
    nodes = materialize(federation, contract, out / "csv")

    def encode(path: Path) -> tuple[Any, Any]:
        raw = read_table(path)
        return enc.transform(validate_frame(raw[[c for c in raw.columns if c in columns]], contract, file=str(path), columns=columns))

    for i, n in enumerate(nodes):
        (Xtr, ytr), (Xte, yte) = encode(n.train_path), encode(n.test_path)
        np.savez(out / f"node-{i}.npz", X_train=Xtr, y_train=ytr, X_test=Xte, y_test=yte)
    assert task.evaluation.centralized is not None
    Xc, yc = encode(Path(task.evaluation.centralized))
    np.savez(out / "central.npz", X=Xc, y=yc)
    return len(nodes)


def _bare(data_dir: Path, n_nodes: int, run_dir: Path, values: dict[str, Any]) -> dict[str, Any]:
    from fedgov.launch.simulation import SimulationOptions, simulate

    run_dir.mkdir(parents=True)
    out = run_dir / "bare.json"
    simulate(
        run_dir, n_nodes=n_nodes, run_config_values={**values, "data-dir": str(data_dir), "out-file": str(out)},
        options=SimulationOptions(timeout=1800), emit=lambda e: None, app=BARE,
    )
    if not out.is_file():
        raise SystemExit(f"the bare Flower app wrote no results; see {run_dir / 'logs'}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _bare_reply_bytes(model: str, n_features: int) -> int:
    """Serialised size of bare Flower's training reply: the whole model in float32, and metrics."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedgov.config.task import ModelSpec
    from fedgov.coordinator.grid import message_bytes
    from fedgov.models import build_model

    net = build_model(ModelSpec(name=model), n_features=n_features, n_classes=2, seed=0)
    # Flower stamps a message with its task's identity (as in a running ServerApp and ClientApp).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1234567890123456789, 0, 1
    ins = Message(RecordDict({}), dst_node_id=1234567890123456789, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = 1234567890123456789
    reply = Message(
        RecordDict({
            "arrays": ArrayRecord({k: v.detach() for k, v in net.state_dict().items()}),
            "metrics": MetricRecord({"num-examples": 1000, "train-loss": 0.5, "epsilon": 1.9}),
        }),
        reply_to=ins,
    )
    return message_bytes(reply)


def _per_round(seconds: list[float]) -> list[float]:
    return seconds[1:]  # round 1 carries the simulation engine's start-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedgov-overhead-") as tmp_s:
        tmp = Path(tmp_s)
        default = _task_variant(tmp, "default", args.rounds)
        hooks = _task_variant(tmp, "hooks", args.rounds, mode="hooks")
        data = tmp / "encoded"
        data.mkdir()
        n_nodes = _encode_nodes(default, data)
        values = {
            "rounds": args.rounds, "batch-size": 256, "learning-rate": 0.5, "max-grad-norm": 1.0,
            "target-epsilon": 2.0, "delta": 1e-5, "grad-sample-mode": "hooks", "hidden": "", "seed": 7,
        }
        times: dict[str, list[float]] = {"fedgov": [], "fedgov-hooks": [], "bare": [], "bare-no-accounting": []}
        acc: dict[str, list[float]] = {k: [] for k in times}
        reports = []
        for r in range(args.repeats):
            rep = _fedgov(default, tmp / "runs")
            reports.append(rep)
            times["fedgov"] += _per_round([x["seconds"] for x in rep["rounds"] if x["round"] > 0])
            acc["fedgov"].append(rep["final"]["accuracy"])
            rep = _fedgov(hooks, tmp / "runs")
            times["fedgov-hooks"] += _per_round([x["seconds"] for x in rep["rounds"] if x["round"] > 0])
            acc["fedgov-hooks"].append(rep["final"]["accuracy"])
            for name, report_eps in (("bare", True), ("bare-no-accounting", False)):
                bare = _bare(data, n_nodes, tmp / f"{name}-{r}", {**values, "report-epsilon": report_eps})
                times[name] += _per_round(bare["round_seconds"])
                acc[name].append(bare["accuracy"][-1])
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {statistics.median(v):.3f} s/round" for k, v in times.items()), flush=True)
        # Communication, from the same kind of run: the demo (logreg) and the MLP.
        mlp = _fedgov(_task_variant(tmp, "mlp", 3, model="mlp"), tmp / "runs")
        from fedgov.config import load_task
        from fedgov.data import Encoder

        task, contract = load_task(default)
        n_features = Encoder.from_contract(contract, task.features).n_features
    med = {k: statistics.median(v) for k, v in times.items()}
    comms = []
    for name, rep in (("logreg", reports[0]), ("mlp", mlp)):
        trained = [x for x in rep["rounds"] if x["round"] > 0 and x["nodes_trained"]]
        up = statistics.median(x["bytes_from_nodes"] / len(x["nodes_trained"]) for x in trained)
        down = statistics.median(x["bytes_to_nodes"] / len(x["nodes_trained"]) for x in trained)
        model_bytes = 4 * rep["model_parameters"]
        comms.append({
            "model": name, "parameters": rep["model_parameters"], "float32_bytes": model_bytes,
            "up_bytes_per_node_round": up, "up_ratio": up / model_bytes,
            "down_bytes_per_node_round": down, "down_ratio": down / model_bytes,
        })
    for c in comms:
        c["bare_flower_reply_bytes"] = _bare_reply_bytes(c["model"], n_features)
    result = {
        "command": f"benchmarks/bench_overhead.py --rounds {args.rounds} --repeats {args.repeats}",
        "nodes": n_nodes,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "median_round_seconds": med,
        "round_seconds": times,
        "final_accuracy": acc,
        "ratio_fedgov_to_bare": med["fedgov"] / med["bare"],
        "ratio_fedgov_hooks_to_bare": med["fedgov-hooks"] / med["bare"],
        "ratio_fedgov_to_bare_no_accounting": med["fedgov"] / med["bare-no-accounting"],
        "ratio_fedgov_hooks_to_bare_no_accounting": med["fedgov-hooks"] / med["bare-no-accounting"],
        "communication": comms,
    }
    (ROOT / "benchmarks" / "results" / "overhead.json").write_text(json.dumps(result, indent=2))
    print(table(result))


def table(result: dict[str, Any]) -> str:
    med = result["median_round_seconds"]
    acc = result["final_accuracy"]
    lines = [
        f"Demo task, {result['nodes']} municipalities, {result['rounds']} rounds, {result['repeats']} repeats; "
        "median seconds per round after round 1:",
        "",
        "| run | s / round | / bare Flower | / bare Flower without accounting | final accuracy (median) |",
        "|---|---|---|---|---|",
        f"| bare Flower + Opacus (hooks), epsilon every round | {med['bare']:.3f} | 1.00 | "
        f"{med['bare'] / med['bare-no-accounting']:.2f} | {statistics.median(acc['bare']):.4f} |",
        f"| bare Flower + Opacus (hooks), no accounting | {med['bare-no-accounting']:.3f} | "
        f"{med['bare-no-accounting'] / med['bare']:.2f} | 1.00 | {statistics.median(acc['bare-no-accounting']):.4f} |",
        f"| fedgov, Opacus hooks | {med['fedgov-hooks']:.3f} | {result['ratio_fedgov_hooks_to_bare']:.2f} | "
        f"{result['ratio_fedgov_hooks_to_bare_no_accounting']:.2f} | {statistics.median(acc['fedgov-hooks']):.4f} |",
        f"| fedgov, default (fused clipping) | {med['fedgov']:.3f} | {result['ratio_fedgov_to_bare']:.2f} | "
        f"{result['ratio_fedgov_to_bare_no_accounting']:.2f} | {statistics.median(acc['fedgov']):.4f} |",
        "",
        "| model | parameters | float32 size (B) | node -> coordinator (B / node / round) | ratio | coordinator -> node (B) | ratio | bare Flower reply (B) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["communication"]:
        lines.append(
            f"| {c['model']} | {c['parameters']} | {c['float32_bytes']} | {c['up_bytes_per_node_round']:.0f} | {c['up_ratio']:.2f} | "
            f"{c['down_bytes_per_node_round']:.0f} | {c['down_ratio']:.2f} | {c['bare_flower_reply_bytes']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
