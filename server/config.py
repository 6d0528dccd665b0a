"""The ServerApp's run config, typed: what ``flwr run`` hands it in ``context.run_config``.

The keys and their defaults are in ``pyproject.toml`` (``[tool.flwr.app.config]``); ``fedgov
run``, ``fedgov query`` and ``fedgov task submit`` fill them in (a ``run-config.toml`` in the
run directory). Flower passes them as a flat mapping of strings, numbers and booleans; an empty
string is a path not given. An unknown key or a value of the wrong type stops the ServerApp
with a :class:`~fedgov.errors.ConfigError` that names every bad key at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypedDict

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from fedgov.config import Task
from fedgov.config._base import problems_from_validation
from fedgov.coordinator.run import TrainingOptions
from fedgov.errors import ConfigError, Problem

__all__ = ["QueryArguments", "RunConfig"]

SOURCE = "run config ([tool.flwr.app.config] in pyproject.toml, with flwr run --run-config)"


def _empty_is_none(value: object) -> object:
    return None if value == "" else value


OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_none)]
"""A path in the run config; the empty string (the default in pyproject.toml) is none."""


class QueryArguments(TypedDict):
    """The keyword arguments of :func:`fedgov.coordinator.statistics.run_query` that the run config sets."""

    run_dir: Path
    query_file: str
    expected_nodes: int
    federation: str
    federation_file: str
    mode: Literal["simulation", "deployment"]
    truth_paths: dict[str, list[Path]] | None
    node_wait: float
    flower_run_id: int


class RunConfig(BaseModel):
    """The run config of one run of the ServerApp: a training task, or a statistics query."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=lambda name: name.replace("_", "-"))

    task_path: OptionalPath = Field(default=None, description="the task file (a training run)")
    query_path: OptionalPath = Field(default=None, description="the query file: a statistics query instead of a training task")
    run_dir: OptionalPath = Field(default=None, description="where the report goes (default: runs/flwr-<name>)")
    manifest_path: OptionalPath = Field(default=None, description="simulation: the simulated nodes' manifest")
    federation_path: OptionalPath = Field(default=None, description="simulation: the federation file")
    local_baseline: bool = Field(default=True, description="ask each node for its local-only accuracy at the end")
    mode: Literal["simulation", "deployment"] = "simulation"
    resume: bool = Field(default=False, description="continue the training run in run-dir from its last checkpoint")
    expected_nodes: int = Field(default=1, ge=1, description="a deployed query: how many nodes to wait for")
    node_wait: float = Field(default=120.0, gt=0, description="a deployed query: seconds to wait for them")

    @classmethod
    def from_flower(cls, values: Mapping[str, object]) -> RunConfig:
        """The typed run config from Flower's ``context.run_config``; every problem at once, by key."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            problems = problems_from_validation(exc, SOURCE)
            raise ConfigError(f"Invalid run config of fedgov's ServerApp ({len(problems)} problem(s)):", problems) from exc

    def task_file(self) -> Path:
        """The task of a training run; a ConfigError naming ``task-path`` when there is none."""
        if self.task_path is None:
            raise ConfigError(
                "the run config names no task", [Problem(SOURCE, "task-path", "a task file (or query-path for a statistics query)")]
            )
        return self.task_path

    def federation_name(self) -> str:
        """The federation's own name (its ``name``), or ``(deployment)`` without a federation file."""
        if self.federation_path is None:
            return "(deployment)"
        from fedgov.config import load_federation

        return load_federation(self.federation_path).name

    def training_options(self, task: Task, *, flower_run_id: int) -> TrainingOptions:
        """How to run ``task`` (:func:`fedgov.coordinator.run_training`): simulated nodes from the
        manifest, deployed ones as many as ``training.min_nodes`` asks for."""
        from fedgov.data import read_manifest

        nodes = read_manifest(self.manifest_path) if self.manifest_path is not None else None
        expected = len(nodes) if nodes is not None else task.training.min_nodes
        return TrainingOptions(
            run_dir=self.run_dir or Path("runs") / f"flwr-{task.name}",
            expected_nodes=expected,
            task_file=str(self.task_file()),
            federation=self.federation_name(),
            federation_file=str(self.federation_path) if self.federation_path is not None else "",
            local_baseline=self.local_baseline,
            mode=self.mode,
            connect_timeout=task.training.node_wait,
            reply_timeout=task.training.reply_timeout,
            flower_run_id=flower_run_id,
            resume=self.resume,
            # a simulation's coordinator may read the test splits it wrote (the exact pooled figure)
            simulated_test={n.code: n.test_path for n in nodes} if nodes is not None and self.mode == "simulation" else None,
        )

    def query_arguments(self, query_name: str, *, flower_run_id: int) -> QueryArguments:
        """How to run the query ``query_name`` (:func:`fedgov.coordinator.run_query`). In
        simulation the coordinator may read the simulated nodes' files (the true answer)."""
        from fedgov.data import read_manifest

        assert self.query_path is not None  # only for a query
        truth: dict[str, list[Path]] | None = None
        expected = self.expected_nodes
        if self.manifest_path is not None:
            nodes = read_manifest(self.manifest_path)
            expected = len(nodes)
            truth = {n.code: [n.train_path, n.test_path] for n in nodes}
        return QueryArguments(
            run_dir=self.run_dir or Path("runs") / f"flwr-{query_name}",
            query_file=str(self.query_path),
            expected_nodes=expected,
            federation=self.federation_name(),
            federation_file=str(self.federation_path) if self.federation_path is not None else "",
            mode=self.mode,
            truth_paths=truth,
            node_wait=self.node_wait,
            flower_run_id=flower_run_id,
        )
