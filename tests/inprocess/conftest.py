"""Fixtures of the in-process tests: a task run on a federation of fedgov's real ClientApps in
this process (:mod:`fedgov.testing`), and the small federation most of them share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message

from fedgov.reports import TrainingReport
from fedgov.testing import InProcessGrid

THREE_CITIES = ["GM0363", "GM0344", "GM0150"]  # Amsterdam, Utrecht, Deventer


@pytest.fixture(scope="session")
def run_task() -> Callable[..., TrainingReport]:
    """``run_task(grid, task_path, run_dir, run_id=, federation=, resume=False)``: the task's
    training run, as the ServerApp runs it, on the in-process ``grid`` (one node per context)."""
    from fedgov.config import load_task
    from fedgov.coordinator.run import run_training

    def run(grid: InProcessGrid, task_path: Path, run_dir: Path, *, run_id: int, federation: str, resume: bool = False) -> TrainingReport:
        task, contract = load_task(task_path)
        return run_training(
            grid, task, contract, run_dir=run_dir, expected_nodes=len(grid.contexts), task_file=str(task_path),
            federation=federation, local_baseline=False, flower_run_id=run_id, connect_timeout=5, resume=resume,
        )

    return run


@pytest.fixture(scope="session")
def three_city_task(
    write_federation: Callable[..., Path], write_task: Callable[..., Path], adult_test_csv: Path
) -> Callable[..., tuple[Path, Path]]:
    """``three_city_task(folder, rounds=3, training={...}, model=...)``: the federation
    ``resume-3`` (Amsterdam, Utrecht, Deventer; Adult split by population) and a logistic
    regression task on it with DP-SGD and reproducible noise; ``training`` adds or replaces keys
    of the task's ``[training]``. Returns the federation's and the task's paths."""

    def make(folder: Path, *, rounds: int = 3, training: Mapping[str, Any] | None = None,
             model: str | Mapping[str, Any] = "logreg") -> tuple[Path, Path]:
        fed = write_federation(folder / "fed.toml", name="resume-3", members=THREE_CITIES, seed=5, min_rows=200)
        task = write_task(
            folder / "task.toml", name="resume", federation=fed, model=model,
            training={"rounds": rounds, "batch_size": 256, "learning_rate": 0.5, "min_nodes": 2, "seed": 1, **(training or {})},
            privacy={"target_epsilon": 2.0, "delta": 1e-5, "reproducible_noise": True},
            evaluation={"centralized": adult_test_csv},
        )
        return fed, task

    return make


@pytest.fixture(scope="session")
def write_overview_query(root: Path, write_file: Callable[[Path, str], Path]) -> Callable[..., Path]:
    """``write_overview_query(path, secure=)``: the repository's ``adult-overview`` statistics
    query (configs/queries), with its contract's absolute path, no federation of its own, and
    ``secure_aggregation`` as asked."""

    def write(path: Path, *, secure: bool) -> Path:
        text = (root / "configs" / "queries" / "adult-overview.toml").read_text()
        text = text.replace('contract = "../contracts/adult-income.toml"', f'contract = "{root / "configs/contracts/adult-income.toml"}"')
        text = text.replace('federation = "../federations/demo-12.toml"\n', "")
        text = text.replace("description =", f"secure_aggregation = {'true' if secure else 'false'}\ndescription =", 1)
        return write_file(path, text)

    return write


def _drop_train_in(*rounds: int) -> Callable[[Message], str | None]:
    """A fault: the node does not answer the training messages of ``rounds`` (it went away)."""

    def fault(msg: Message) -> str | None:
        training = msg.metadata.message_type.startswith("train")
        rnd = msg.content["config"]["server-round"] if training else 0
        return "drop" if training and int(rnd) in rounds else None  # type: ignore[arg-type]  # a config value is a union of scalars

    return fault


@pytest.fixture(scope="session")
def drop_train_in() -> Callable[..., Callable[[Message], str | None]]:
    """``drop_train_in(*rounds)``: a fault for :class:`fedgov.testing.InProcessGrid` (``faults={node: ...}``)
    under which the node does not answer the training messages of those rounds."""
    return _drop_train_in
