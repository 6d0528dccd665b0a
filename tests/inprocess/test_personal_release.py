"""Personal models (fedgov.node.personal), through fedgov's real ClientApp with all its mods, in
process: every node keeps one, made once from the final model; a simulation reports its exact
accuracy beside local-only; a deployed node sends nothing about it, however a deviating
coordinator asks (baseline, a second evaluation of the final round, a second ``end`` with
another model), and spends nothing on it."""

from __future__ import annotations

import copy
import json
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message

from fedgov import protocol as P
from fedgov.config import load_task
from fedgov.coordinator.run import run_training
from fedgov.node.gate import DECLARATION
from fedgov.node.home import NodeHome
from fedgov.node.personal import PersonalModels
from fedgov.node.refusals import is_allowed, parse_error_reason
from fedgov.node.rounds import model_digest
from fedgov.testing import InProcessGrid, prepare

CITIES = ["GM0363", "GM0599", "GM0344"]
PERSONAL_FIELDS = {"personal-accuracy", "personal-fine-tuned", "test-rows"}


@pytest.fixture(scope="module")
def personal_task(tmp_path_factory: pytest.TempPathFactory, write_federation, write_task, adult_test_csv):  # type: ignore[no-untyped-def]
    """``personal_task(reproducible)``: a 2-round task on three cities with label skew, evaluated at
    the nodes after the final round, with a short fine-tuning (3 epochs) for the personal models."""

    def make(reproducible: bool) -> tuple[Path, Path]:
        tmp = tmp_path_factory.mktemp("personal")
        fed = write_federation(tmp / "fed.toml", name="personal-3", members=CITIES, seed=4, min_rows=300, skew="label", dirichlet_alpha=2.0)
        task = write_task(
            tmp / "task.toml", name="personal", federation=fed,
            training={"rounds": 2, "batch_size": 128, "learning_rate": 0.5, "min_nodes": 2, "seed": 3, "reply_timeout": 5},
            privacy={"target_epsilon": 2.0, "delta": 1e-5, "accountant": "rdp", "reproducible_noise": reproducible},
            evaluation={"centralized": adult_test_csv, "epsilon": 0.3, "at_nodes": "final"}, personal={"epochs": 3},
        )
        return fed, task

    return make


class _Keeping(InProcessGrid):
    """The grid, keeping a copy of every reply as it left its node."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.left: list[tuple[Message, Message]] = []

    def _deliver(self, msg: Message) -> Message | None:
        reply = super()._deliver(msg)
        if reply is not None:
            kept = reply if reply.has_error() else Message(content=copy.deepcopy(reply.content), metadata=copy.deepcopy(reply.metadata))
            self.left.append((msg, kept))
        return reply


def _run(grid: InProcessGrid, task_path: Path, run_dir: Path, run_id: int) -> Any:
    task, contract = load_task(task_path)
    return run_training(
        grid, task, contract, run_dir=run_dir, expected_nodes=len(grid.contexts), task_file=str(task_path),
        federation="personal-3", local_baseline=True, flower_run_id=run_id, connect_timeout=5,
    )


def _only_declared(left: list[tuple[Message, Message]]) -> set[str]:
    """Every reply carries only the fields its kind declares (or a template error); the kinds."""
    from clients.mods import gate_kind

    kinds = set()
    for ins, reply in left:
        kind = gate_kind(ins)
        kinds.add(kind)
        if reply.has_error():
            assert is_allowed(*parse_error_reason(reply.error.reason or "")), reply.error.reason
            continue
        declared = {(r.record, r.field) for r in DECLARATION[kind]}
        for rname, rec in reply.content.items():
            for fname in rec.keys():
                assert (rname, fname) in declared, (kind, rname, fname)
                if kind != P.BASELINE:
                    assert fname not in PERSONAL_FIELDS, (kind, fname)
    return kinds


def _final_model(run_dir: Path) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(run_dir / "model.pt")
    return {k: v.numpy() for k, v in state.items()}


def test_a_simulated_node_keeps_its_personal_model_and_the_report_shows_it(tmp_path: Path, personal_task) -> None:  # type: ignore[no-untyped-def]
    fed, task_path = personal_task(True)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = _Keeping(manifest, len(nodes), run_id=41)
    report = _run(grid, task_path, tmp_path / "run", 41)
    assert report.status == "completed", report.message
    kinds = _only_declared(grid.left)
    assert {P.HELLO, "train", "evaluate", P.BASELINE, P.END} <= kinds
    final = model_digest(_final_model(tmp_path / "run"))
    for n, node in zip(report.nodes, sorted(nodes, key=lambda x: x.code), strict=True):
        assert n.node == node.code
        assert n.personal_accuracy is not None and 0.5 < n.personal_accuracy <= 1.0
        assert n.local_only_accuracy is not None and n.personal_gain == pytest.approx(n.personal_accuracy - n.local_only_accuracy)
        assert n.personal_variant in ("global", "fine-tuned") and n.test_rows == node.test_rows
        home = NodeHome(node.train_path.parent)
        (rec,) = PersonalModels(home.path).records()
        assert rec.global_sha256 == final and rec.task == "personal" and rec.run == "41" and rec.variant == n.personal_variant
        assert stat.S_IMODE(Path(rec.path).stat().st_mode) == 0o600
        # made once (at the final evaluation); the baseline and end carried the same model
        made = [e for e in home.audit.entries() if e.kind == "personal-model"]
        assert len(made) == 1 and made[0].payload["released"] == "nothing: kept at the node"
        assert not [e for e in home.audit.entries() if e.kind == "personal-model-kept"]
    assert report.median_personal_gain() is not None


def test_a_deployed_node_sends_nothing_about_its_personal_model_however_it_is_asked(tmp_path: Path, personal_task) -> None:  # type: ignore[no-untyped-def]
    fed, task_path = personal_task(False)
    _, _, nodes, manifest = prepare(tmp_path / "nodes", fed, task_path)
    grid = _Keeping(manifest, len(nodes), run_id=42)
    for i, node in enumerate(nodes):  # each node as deployed: its own directory, not the simulation's manifest
        grid.contexts[1000 + i].node_config.clear()
        grid.contexts[1000 + i].node_config.update({"node-name": node.code, "node-dir": str(node.train_path.parent)})
    second: list[Message] = []

    def again(msg: Message) -> Any:
        """While the task is open: the final round's evaluation asked twice, the second time with another model."""
        if not msg.metadata.message_type.startswith("evaluate"):
            return None

        def ask_twice(ins: Message, reply: Message) -> Message:
            twice = Message(content=copy.deepcopy(ins.content), metadata=copy.deepcopy(ins.metadata))
            twice.content[P.ARRAYS] = ArrayRecord({k: Array(v.numpy() - 1.0) for k, v in ins.content.array_records[P.ARRAYS].items()})
            second.append(grid.app(twice, grid.contexts[1000]))
            return reply

        return ask_twice

    grid.faults[0] = again
    report = _run(grid, task_path, tmp_path / "run", 42)
    assert report.status == "completed", report.message
    assert len(second) == 1 and parse_error_reason(second[0].error.reason)[0] == "evaluation-repeated"
    for n in report.nodes:  # the baseline was refused: no local-only, no personal figures
        assert n.local_only_accuracy is None and n.personal_accuracy is None and n.personal_variant is None
        assert n.federated_accuracy is not None  # the one accounted release about the model at the node
    home = NodeHome(nodes[0].train_path.parent)
    store = PersonalModels(home.path)
    (rec,) = store.records()
    weights_before = store.weights(rec)
    spends_before = [e for e in home.ledger.events() if e.kind == "spend"]

    # A deviating coordinator asks node 0 again: the baseline (with the final model), the final
    # round's evaluation a second time, and end with another model.
    sent = {m.metadata.message_type + str(m.content.config_records["config"].get(P.KIND, "")): m
            for m in grid.sent if m.metadata.dst_node_id == 1000}
    other = {k: Array(np.asarray(v) + 1.0) for k, v in _final_model(tmp_path / "run").items()}
    asks = [sent["query" + P.BASELINE], sent["evaluate"], sent["query" + P.END]]
    asks[2] = Message(content=copy.deepcopy(asks[2].content), metadata=copy.deepcopy(asks[2].metadata))
    asks[2].content[P.ARRAYS] = ArrayRecord(other)
    replies = []
    for ins in asks:
        again = Message(content=copy.deepcopy(ins.content), metadata=copy.deepcopy(ins.metadata))
        replies.append((ins, grid.app(again, grid.contexts[1000])))
    _only_declared(grid.left + replies)
    baseline, evaluation, end = (r for _, r in replies)
    # during the run the node refused the baseline; after end the task is closed at the node
    during = [r for ins, r in grid.left if ins.content.config_records["config"].get(P.KIND) == P.BASELINE]
    assert len(during) == 3 and all(parse_error_reason(r.error.reason)[0] == "baseline-not-offered" for r in during)
    assert parse_error_reason(baseline.error.reason)[0] == "not-admitted"
    assert parse_error_reason(evaluation.error.reason)[0] == "not-admitted"
    assert dict(end.content[P.METRICS]) == {"ok": 1}
    # the personal model is the one made from the real final model; nothing more was spent
    (after,) = store.records()
    assert after.model_sha256 == rec.model_sha256 and after.global_sha256 == rec.global_sha256
    assert all(np.array_equal(weights_before[k], v) for k, v in store.weights(after).items())
    assert [e for e in home.ledger.events() if e.kind == "spend"] == spends_before
    kept = [e for e in home.audit.entries() if e.kind == "personal-model-kept"]
    assert len(kept) == 1 and kept[0].payload["kept_global_sha256"] == rec.global_sha256
    # what left node 0 in the whole run and after: nothing names its personal model's figures
    left = json.dumps([{k: dict(v) for k, v in r.content.metric_records.items()} for _, r in grid.left + replies if not r.has_error()])
    assert "personal" not in left
