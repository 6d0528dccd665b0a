"""Coordinator crash and resume: checkpoints after every round, the same result as an
uninterrupted run, and no node's ledger charged twice.

Fast in-process federations (``fedgov/testing.py``: fedgov's coordinator against fedgov's
ClientApp with all its mods); the real-process paths are ``test_simulation_e2e`` (``fedgov run
--resume``) and ``test_deploy_e2e`` (``fedgov task resume`` after ``fedgov task stop``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedgov.node.admission import EVALUATION_NOTE
from fedgov.coordinator.checkpoint import load_checkpoint
from fedgov.errors import ConfigError
from fedgov.node.home import NodeHome

from fedgov.testing import CoordinatorCrash, InProcessGrid, prepare


FED = "resume-3"  # the federation of the three_city_task fixture
CRASH_RUN = 11  # the Flower run id of the interrupted run: its ledger key is task_id_of(..., CRASH_RUN)


def _ledger(node_dir: Path, task_path: Path) -> list[tuple[str, int | None, str]]:
    """The interrupted task's ledger events: (kind, round, note). The node directories also hold the
    uninterrupted run (another run id) and the node's row-count release (``rows-...``, see
    :func:`_row_releases`)."""
    from fedgov.protocol import task_id_of
    from fedgov.config import load_task

    tid = task_id_of(*load_task(task_path), CRASH_RUN)
    return [(e.kind, e.round, e.note) for e in NodeHome(node_dir).ledger.events() if e.task_id == tid]


def _row_releases(node_dir: Path) -> list[tuple[str, int | None]]:
    """The ledger events of the node's noisy row-count release (once per version of its data file)."""
    return [(e.kind, e.round) for e in NodeHome(node_dir).ledger.events() if e.task_id.startswith("rows-")]


@pytest.fixture(scope="module")
def clean_and_resumed(tmp_path_factory: pytest.TempPathFactory, three_city_task, run_task) -> dict:  # type: ignore[type-arg]
    tmp = tmp_path_factory.mktemp("resume")
    fed, task_path = three_city_task(tmp)
    out = {"task": task_path}
    # Both runs use the SAME node directories (state_dir): a node releases its noisy row count
    # once per data file and FedAvg weighs by it, so only nodes that released the same counts
    # give the same model. The uninterrupted run has its own run id (its own ledger key).
    state = tmp / "state"
    # an uninterrupted run
    _, _, nodes, manifest = prepare(tmp / "clean", fed, task_path, state_dir=state)
    out["clean"] = run_task(InProcessGrid(manifest, len(nodes), run_id=10), task_path, tmp / "clean" / "run", run_id=10, federation=FED)
    # the same task; the coordinator dies after the nodes trained round 3, before it saved it
    _, _, nodes, manifest = prepare(tmp / "crash", fed, task_path, state_dir=state)
    grid = InProcessGrid(manifest, len(nodes), run_id=CRASH_RUN)
    grid.crash_after_train_round = 3
    with pytest.raises(CoordinatorCrash):
        run_task(grid, task_path, tmp / "crash" / "run", run_id=CRASH_RUN, federation=FED)
    out["after_crash"] = {n.code: _ledger(n.train_path.parent, task_path) for n in nodes}
    out["checkpoint_round"] = load_checkpoint(tmp / "crash" / "run")[0].round
    out["report_after_crash"] = json.loads((tmp / "crash" / "run" / "report.json").read_text())
    # a new coordinator process (a new Flower run) resumes from the checkpoint
    out["resumed"] = run_task(
        InProcessGrid(manifest, len(nodes), run_id=12), task_path, tmp / "crash" / "run", run_id=12, federation=FED, resume=True
    )
    out["nodes"] = nodes
    out["run_dir"] = tmp / "crash" / "run"
    out["manifest"] = manifest
    return out


def test_resumed_run_matches_the_uninterrupted_run(clean_and_resumed: dict) -> None:  # type: ignore[type-arg]
    clean, resumed = clean_and_resumed["clean"], clean_and_resumed["resumed"]
    assert clean_and_resumed["checkpoint_round"] == 2
    interrupted = clean_and_resumed["report_after_crash"]
    assert interrupted["status"] == "failed" and "interrupted after round 2" in interrupted["message"]
    assert "fedgov run --resume" in interrupted["message"]
    assert clean.status == resumed.status == "completed", resumed.message
    assert [r.round for r in resumed.rounds] == [1, 2, 3]
    # equal up to float32 summation order (torch's threads): 1e-5 relative
    for a, b in zip(clean.rounds, resumed.rounds, strict=True):
        assert (a.max_epsilon, sorted(a.nodes_trained)) == (b.max_epsilon, sorted(b.nodes_trained))
        assert (b.accuracy, b.loss, b.auc) == pytest.approx((a.accuracy, a.loss, a.auc), rel=1e-5)
    assert clean.final is not None and resumed.final is not None
    assert resumed.final.accuracy == pytest.approx(clean.final.accuracy, rel=1e-5)
    by_node = {n.node: n for n in clean.nodes}
    for n in resumed.nodes:
        assert n.status == "accepted" and n.rounds_trained == 3
        assert n.epsilon == by_node[n.node].epsilon and 0 < n.epsilon <= 2.0  # type: ignore[operator]


def test_no_ledger_is_charged_twice(clean_and_resumed: dict) -> None:  # type: ignore[type-arg]
    for code, before in clean_and_resumed["after_crash"].items():
        # the crash left round 3 spent and the reservation open (nobody said "end")
        assert [(k, r) for k, r, _ in before] == [("reserve", None), ("spend", 1), ("spend", 2), ("spend", 3)], code
        assert EVALUATION_NOTE not in {note for _, _, note in before}  # it died before the final evaluation
    for n in clean_and_resumed["nodes"]:
        home = NodeHome(n.train_path.parent)
        # resumed: no second reservation, round 3 answered from the copy of the sent update (no
        # second spend for it); then the planned final evaluation, charged once, and the release
        after = _ledger(n.train_path.parent, clean_and_resumed["task"])
        assert [(k, r) for k, r, note in after if note != EVALUATION_NOTE] == [
            ("reserve", None), ("spend", 1), ("spend", 2), ("spend", 3), ("release", None)
        ]
        assert [(k, r) for k, r, note in after if note == EVALUATION_NOTE] == [("spend", 3)]
        # the row count was released once (the first run's hello); every later hello read it back
        assert _row_releases(n.train_path.parent) == [("reserve", None), ("spend", 0), ("release", None)]
        kinds = [e.kind for e in home.audit.entries()]
        assert kinds.count("resume") == 1 and kinds.count("resent") == 1
        assert home.audit.verify().ok
        assert not any((n.train_path.parent / "sent").iterdir())  # the copy is gone with the task


def test_a_finished_task_cannot_be_resumed(clean_and_resumed: dict, tmp_path: Path, run_task) -> None:  # type: ignore[type-arg]
    run_dir = clean_and_resumed["run_dir"]
    ckpt = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    ckpt["round"] = 1  # pretend only round 1 was saved: the nodes have closed the task since
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps(ckpt))
    try:
        grid = InProcessGrid(clean_and_resumed["manifest"], 3, run_id=13)
        report = run_task(grid, clean_and_resumed["task"], run_dir, run_id=13, federation=FED, resume=True)
    finally:
        ckpt["round"] = 3
        (run_dir / "checkpoint" / "state.json").write_text(json.dumps(ckpt))
    assert report.status == "failed"
    assert {n.refusal_code for n in report.nodes} == {"task-ended"}


def test_a_changed_task_is_not_resumed(tmp_path: Path, three_city_task, run_task) -> None:
    fed, task_path = three_city_task(tmp_path, rounds=2)
    _, _, nodes, manifest = prepare(tmp_path / "n", fed, task_path)
    grid = InProcessGrid(manifest, len(nodes), run_id=21)
    grid.crash_after_train_round = 2
    with pytest.raises(CoordinatorCrash):
        run_task(grid, task_path, tmp_path / "run", run_id=21, federation=FED)
    task_path.write_text(task_path.read_text().replace("learning_rate = 0.5", "learning_rate = 0.4"))
    report = run_task(InProcessGrid(manifest, len(nodes), run_id=22), task_path, tmp_path / "run", run_id=22, federation=FED, resume=True)
    assert report.status == "failed" and "another version of task resume" in report.message


def test_damaged_or_missing_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / "state.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="damaged checkpoint") as ei:
        load_checkpoint(tmp_path)
    assert str(d / "state.json") in str(ei.value)


def test_checkpoint_model_tampering_is_detected(clean_and_resumed: dict) -> None:  # type: ignore[type-arg]
    run_dir = clean_and_resumed["run_dir"]
    state, arrays = load_checkpoint(run_dir)
    model = run_dir / "checkpoint" / state.model_file
    original = model.read_bytes()
    try:
        model.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(ConfigError, match="damaged"):
            load_checkpoint(run_dir)
    finally:
        model.write_bytes(original)
    assert set(arrays) == set(load_checkpoint(run_dir)[1])


def test_a_resumed_run_keeps_the_coordinators_momentum(tmp_path: Path, three_city_task, run_task) -> None:
    """With server momentum (FedAvgM) the momentum is strategy state besides the model: the
    checkpoint keeps it, and the resumed run ends where the uninterrupted one does."""
    from fedgov.coordinator.checkpoint import load_momentum

    fed, task_path = three_city_task(tmp_path, training={"server_momentum": 0.9})
    state = tmp_path / "state"
    _, _, nodes, manifest = prepare(tmp_path / "clean", fed, task_path, state_dir=state)
    clean = run_task(InProcessGrid(manifest, len(nodes), run_id=20), task_path, tmp_path / "clean" / "run", run_id=20, federation=FED)
    _, _, nodes, manifest = prepare(tmp_path / "crash", fed, task_path, state_dir=state)
    grid = InProcessGrid(manifest, len(nodes), run_id=21)
    grid.crash_after_train_round = 3
    with pytest.raises(CoordinatorCrash):
        run_task(grid, task_path, tmp_path / "crash" / "run", run_id=21, federation=FED)
    saved = load_momentum(tmp_path / "crash" / "run")
    assert saved is not None and set(saved) == set(load_checkpoint(tmp_path / "crash" / "run")[1])
    resumed = run_task(
        InProcessGrid(manifest, len(nodes), run_id=22), task_path, tmp_path / "crash" / "run", run_id=22, federation=FED, resume=True
    )
    assert clean.status == resumed.status == "completed", resumed.message
    assert clean.final is not None and resumed.final is not None
    for a, b in zip(clean.rounds, resumed.rounds, strict=True):
        assert (b.accuracy, b.loss) == pytest.approx((a.accuracy, a.loss), rel=1e-5)
