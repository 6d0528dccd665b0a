"""The coordinator's checkpoint: what it needs to continue a training run after a crash.

After every completed round the coordinator writes, into ``<run dir>/checkpoint/``:

* ``model-<round>.npz``: the global model after that round (float arrays, exactly), and the
  coordinator's momentum (FedAvgM's velocity, arrays named ``momentum/<name>``) when it has one;
* ``state.json`` (a :class:`Checkpoint`): the round, the task's fingerprint, the ledger key the
  nodes reserved under (``task_run``), the nodes admitted, the rounds recorded so far and each
  node's accounting view (the epsilon it reported, the rounds it trained), and the SHA-256 of
  the model file.

Both are written through a temporary file and renamed, the model first; ``state.json`` names
the model file of its round, so a crash at any moment leaves the previous checkpoint whole.

Flower has no resume (``Strategy.start`` has no start round): fedgov saves from the
strategy's ``evaluate_fn``, which Flower calls after every round, and on resume runs the
remaining rounds with the round numbers offset (:class:`fedgov.coordinator.recording.Recording`). The strategies
fedgov offers (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum) keep no state between rounds
besides the global model; with ``server_momentum`` (FedAvgM, and secure aggregation's own) the
momentum is the rest, saved beside the model and restored on resume
(:func:`fedgov.coordinator.recording.momentum_state`).

No node's ledger is charged twice: a node resumes the reservation it made for the run
(``task_run``) instead of reserving anew, its accountant continues from the spends in its own
ledger, and a round it already trained is answered from its own copy of that update, without
a second spend (:mod:`fedgov.node`).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedgov.errors import ConfigError, Problem
from fedgov.reports import NodeResult, RoundMetrics, write_json_atomic

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "load_momentum", "checkpoint_dir", "MOMENTUM_PREFIX"]

MOMENTUM_PREFIX = "momentum/"
"""Names of the momentum's arrays in a checkpoint's model file."""

FORMAT = 1


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FORMAT
    task: str
    task_file: str
    task_fingerprint: str
    federation: str = Field(description="the federation file (simulation), or '(deployment)'")
    mode: str
    task_run: str = Field(description="the ledger key's run part: the Flower run id of the run the nodes admitted")
    round: int = Field(ge=0, description="the last completed round")
    rounds_planned: int
    strategy: str
    nodes_admitted: list[str]
    nodes: list[NodeResult]
    rounds: list[RoundMetrics]
    # A metric a node could not compute (NaN) is stored as null.
    node_train: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    node_rounds: dict[str, int] = Field(default_factory=dict)
    node_eval: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    majority_rate: float | None = None
    model_file: str
    model_sha256: str


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoint"


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]  # numpy's stub: a **dict might hold allow_pickle (a bool)
    return buf.getvalue()


def save_checkpoint(
    run_dir: Path, state: Checkpoint, arrays: dict[str, np.ndarray], momentum: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the model (and the coordinator's momentum, if any), then the state that names it;
    remove older model files."""
    from fedgov.data.io import atomic_write_bytes

    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    data = _npz_bytes({**arrays, **{MOMENTUM_PREFIX + k: v for k, v in (momentum or {}).items()}})
    model_file = f"model-{state.round}.npz"
    atomic_write_bytes(d / model_file, data)
    state = state.model_copy(update={"model_file": model_file, "model_sha256": hashlib.sha256(data).hexdigest()})
    write_json_atomic(d / "state.json", state.model_dump_json(indent=2))
    for old in d.glob("model-*.npz"):
        if old.name != model_file:
            old.unlink(missing_ok=True)
    return d / "state.json"


def load_checkpoint(run_dir: Path) -> tuple[Checkpoint, dict[str, np.ndarray]]:
    """The last checkpoint of ``run_dir`` and its model; a clear error if there is none or it
    is damaged (it is never half-used)."""
    state, arrays = _load(run_dir)
    return state, {k: v for k, v in arrays.items() if not k.startswith(MOMENTUM_PREFIX)}


def load_momentum(run_dir: Path) -> dict[str, np.ndarray] | None:
    """The coordinator's momentum saved with the last checkpoint of ``run_dir``; None without one."""
    _, arrays = _load(run_dir)
    momentum = {k[len(MOMENTUM_PREFIX):]: v for k, v in arrays.items() if k.startswith(MOMENTUM_PREFIX)}
    return momentum or None


def _load(run_dir: Path) -> tuple[Checkpoint, dict[str, np.ndarray]]:
    d = checkpoint_dir(run_dir)
    path = d / "state.json"
    if not path.is_file():
        raise ConfigError(
            f"no checkpoint in {run_dir}",
            [Problem(str(path), "", "a run directory whose coordinator completed at least one round (fedgov writes checkpoint/state.json after each round)")],
        )
    try:
        state = Checkpoint.model_validate(json.loads(path.read_text("utf-8")))
    except Exception as exc:  # noqa: BLE001 - any damage: say where
        raise ConfigError(f"damaged checkpoint {path}", [Problem(str(path), "", f"a fedgov checkpoint ({type(exc).__name__}: {str(exc)[:300]})")]) from None
    if state.format != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {state.format}", [Problem(str(path), "format", f"format {FORMAT}")])
    model_path = d / state.model_file
    try:
        data = model_path.read_bytes()
    except OSError:
        raise ConfigError(f"checkpoint model missing: {model_path}", [Problem(str(model_path), "", "the model file state.json names")]) from None
    if hashlib.sha256(data).hexdigest() != state.model_sha256:
        raise ConfigError(f"checkpoint model damaged: {model_path}", [Problem(str(model_path), "model_sha256", f"SHA-256 {state.model_sha256}")])
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return state, arrays
