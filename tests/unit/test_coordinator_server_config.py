"""The ServerApp's typed run config (``server/config.py``) and the training run's options: a bad
key or value is a ConfigError that names it, and the production config holds no test hook."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedgov.config import load_task
from fedgov.coordinator import TrainingOptions, run_training
from fedgov.errors import ConfigError
from server.config import RunConfig


def _flower_defaults(root: Path) -> dict[str, object]:
    with (root / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def test_the_apps_own_config_parses_and_holds_no_fault_injection(root: Path) -> None:
    defaults = _flower_defaults(root)
    config = RunConfig.from_flower(defaults)
    assert config.task_path == Path("configs/tasks/adult-income.toml")
    assert config.query_path is None and config.run_dir is None and config.manifest_path is None
    assert config.mode == "simulation" and config.local_baseline and not config.resume
    assert not [k for k in defaults if "crash" in k]


def test_every_bad_key_and_value_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as ei:
        RunConfig.from_flower({"task-path": "t.toml", "mode": "production", "expected-nodes": "many", "crash-after-round": 1})
    where = {p.location for p in ei.value.problems}
    assert where == {"mode", "expected-nodes", "crash-after-round"}
    text = str(ei.value)
    assert "'production'" in text and "unknown field" in text


def test_a_training_run_needs_a_task() -> None:
    with pytest.raises(ConfigError) as ei:
        RunConfig.from_flower({"task-path": ""}).task_file()
    assert [p.location for p in ei.value.problems] == ["task-path"]


def test_training_options_follow_the_run_config(demo_task_path: Path, tmp_path: Path) -> None:
    task, _ = load_task(demo_task_path)
    deployed = RunConfig.from_flower({"task-path": str(demo_task_path), "mode": "deployment", "local-baseline": False})
    opts = deployed.training_options(task, flower_run_id=7)
    assert opts.run_dir == Path("runs") / f"flwr-{task.name}" and opts.mode == "deployment"
    assert opts.federation == "(deployment)" and opts.federation_file == ""
    assert opts.expected_nodes == task.training.min_nodes and not opts.local_baseline and opts.flower_run_id == 7
    assert opts.connect_timeout == task.training.node_wait and opts.reply_timeout == task.training.reply_timeout
    # the report names the federation by its own name, not its file's (the file is kept apart)
    fed_file = tmp_path / "cities.toml"
    fed_file.write_text(
        (demo_task_path.parents[1] / "federations" / "demo-12.toml").read_text().replace('name = "demo-12"', 'name = "cities-12"')
        .replace('source = "../../data/adult/adult.csv"', f'source = "{demo_task_path.parents[2] / "data/adult/adult.csv"}"')
    )
    simulated = RunConfig.from_flower({
        "task-path": str(demo_task_path), "federation-path": str(fed_file), "run-dir": str(tmp_path), "resume": True,
    })
    opts = simulated.training_options(task, flower_run_id=8)
    assert opts.federation == "cities-12" and opts.federation_file == str(fed_file)
    assert opts.run_dir == tmp_path and opts.resume


def test_query_arguments_follow_the_run_config() -> None:
    args = RunConfig.from_flower({"query-path": "/q/overview.toml", "expected-nodes": 4, "node-wait": 30}).query_arguments(
        "overview", flower_run_id=9,
    )
    assert args == {
        "run_dir": Path("runs") / "flwr-overview", "query_file": "/q/overview.toml", "expected_nodes": 4,
        "federation": "(deployment)", "federation_file": "", "mode": "simulation", "truth_paths": None, "node_wait": 30.0, "flower_run_id": 9,
    }


def test_training_options_are_strict(demo_task_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="crash_after_round"):
        TrainingOptions(run_dir=tmp_path, expected_nodes=1, task_file="t", federation="f", crash_after_round=1)  # type: ignore[call-arg]
    task, contract = load_task(demo_task_path)
    # the keywords are the options' fields, checked before anything runs
    with pytest.raises(ValidationError, match="crash_after_round"):
        run_training(object(), task, contract, run_dir=tmp_path / "r", expected_nodes=1, task_file="t", federation="f", crash_after_round=1)  # type: ignore[arg-type]
    assert not (tmp_path / "r").exists()
    with pytest.raises(TypeError, match="not both"):
        run_training(object(), task, contract, TrainingOptions(run_dir=tmp_path, expected_nodes=1, task_file="t", federation="f"), resume=True)  # type: ignore[arg-type]
