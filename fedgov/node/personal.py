"""A node's personal model: no municipality worse off for joining.

After the final round each node keeps a model of its own: the final global model, or that model
fine-tuned on the node's own training rows, whichever is better on a validation split carved
from those rows (deterministic per node and task; the test split is never touched, so that the
final figures stay honest). It is stored in the node directory (``models/``, mode 0600, with its
provenance) and listed by ``fedgov node model``.

What it costs and what it releases:

* The fine-tuning is ordinary SGD, without differential privacy, on the node's own rows, at the
  node. It spends no budget because nothing about the model leaves a deployed node: not the
  model, not which variant was chosen, not its accuracy. A figure about a model fitted without
  DP would not be covered by count-level noise: the Gaussian noise on evaluation counts protects
  the *test* records, while the personal model depends on the *training* records with no bound
  on one record's influence. So a deployed node sends nothing about it (the coordinator's
  ``baseline`` message, the only one that could carry it, is refused; the gate declares no
  other field for it), and the municipality's staff read it locally.
* In a simulation only (``fedgov run``), the node reports the personal model's exact accuracy
  on its test split with the local-only baseline (gate rule ``simulated``: computed apart from
  the budget and labelled so in the report, as the local-only figure it is compared with).
* It is built once per task (the first final global model the node sees: the final round's
  evaluation, the simulation's baseline or the task's ``end``); a later message with another
  model changes nothing (a coordinator cannot swap it). Every epoch of the fine-tuning always
  runs, whichever variant is kept, so the time a reply takes does not depend on the choice.

This module keeps the math free of files: :func:`validation_split` and :func:`personalise` are
pure; :class:`PersonalModels` is the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedgov.config import Contract, Task
from fedgov.config.datasource import DataSource
from fedgov.errors import FedgovError

__all__ = [
    "MIN_VALIDATION_ROWS",
    "PersonalModel",
    "PersonalModels",
    "PersonalRecord",
    "ensure_personal",
    "personal_test_accuracy",
    "personalise",
    "validation_split",
]

log = logging.getLogger(__name__)

MIN_VALIDATION_ROWS = 5
"""Below this many validation rows (or as many fitting rows) the node keeps the global model."""


def validation_split(n: int, *, node: str, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) row indices of a node's ``n`` training rows: a permutation seeded by the
    task's seed and the node's code, so the same node gets the same split of the same data
    every time. Either part may be empty when ``n`` is small."""
    rng = np.random.default_rng([int(seed) % (2**32), zlib.crc32(node.encode()), 0x9E50])
    perm = rng.permutation(n)
    n_val = int(round(fraction * n))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass(frozen=True)
class PersonalModel:
    """The personal model and why: ``variant`` is ``global`` or ``fine-tuned``."""

    state: dict[str, np.ndarray]
    variant: Literal["global", "fine-tuned"]
    epochs: int
    val_rows: int
    fit_rows: int
    val_accuracy_global: float | None
    val_accuracy: float | None
    reason: str


def personalise(
    task: Task, global_state: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, *, node: str, n_features: int, n_classes: int,
) -> PersonalModel:
    """The personal model from the final ``global_state`` and the node's training rows ``(X, y)``."""
    from fedgov.models import build_model, make_dp_compatible, set_state
    from fedgov.node.training import fine_tune

    spec = task.personal
    fit, val = validation_split(len(y), node=node, seed=task.training.seed, fraction=spec.validation_fraction)
    if len(val) < MIN_VALIDATION_ROWS or len(fit) < MIN_VALIDATION_ROWS:
        return PersonalModel(
            dict(global_state), "global", 0, len(val), len(fit), None, None,
            f"too few training rows to hold out {MIN_VALIDATION_ROWS} for validation: the global model is kept",
        )
    model = make_dp_compatible(build_model(task.model, n_features=n_features, n_classes=n_classes, seed=task.training.seed))
    set_state(model, global_state)
    seed = (task.training.seed * 1_000_003 + zlib.crc32(node.encode()) + 0x5EED) % (2**31 - 1)
    res = fine_tune(
        model, X[fit], y[fit], X[val], y[val],
        epochs=spec.epochs, learning_rate=spec.learning_rate, batch_size=spec.batch_size, seed=seed, proximal_mu=spec.proximal_mu,
    )
    if res.epoch == 0:
        return PersonalModel(
            dict(global_state), "global", 0, len(val), len(fit), res.start_accuracy, res.start_accuracy,
            "fine-tuning did not beat the global model on the validation split",
        )
    return PersonalModel(
        res.state, "fine-tuned", res.epoch, len(val), len(fit), res.start_accuracy, res.val_accuracy,
        f"fine-tuned for {res.epoch} epoch(s) on the fitting rows: better than the global model on the validation split",
    )


class PersonalRecord(BaseModel):
    """A personal model's provenance, kept beside its weights (``models/<key>.json``)."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="the file name's stem: a hash of the task id")
    task: str
    task_id: str = Field(description="the ledger's key of the task's run: name, fingerprint, Flower run")
    run: str = Field(description="the Flower run the task was admitted in")
    contract: str
    dataset: str
    model: str = Field(description="the task's model (fedgov.models)")
    variant: Literal["global", "fine-tuned"]
    epochs: int
    reason: str
    val_rows: int
    fit_rows: int
    val_accuracy_global: float | None = Field(description="the global model on the validation split (node-local only)")
    val_accuracy: float | None = Field(description="the personal model on the validation split (node-local only)")
    global_sha256: str = Field(description="SHA-256 of the final global model it was made from")
    model_sha256: str = Field(description="SHA-256 of the personal model's weights")
    data_sha256: str = Field(description="SHA-256 of the training file it was fitted on")
    created: datetime
    fedgov_version: str
    path: str = Field(default="", description="the weights' file (filled in when read)")


class PersonalModels:
    """The personal models kept in a node directory (``models/``): one per task run, each an
    ``.npz`` of its weights and a ``.json`` of its provenance, both mode 0600 (the model was
    fitted without DP on the node's rows: it is as confidential as they are)."""

    DIR = "models"

    def __init__(self, home_path: Path) -> None:
        self.dir = Path(home_path) / self.DIR

    @staticmethod
    def key(task_id: str) -> str:
        return hashlib.sha256(task_id.encode()).hexdigest()[:24]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.dir / f"{key}.npz", self.dir / f"{key}.json"

    def get(self, task_id: str) -> PersonalRecord | None:
        return self._read(self.key(task_id))

    def _read(self, key: str) -> PersonalRecord | None:
        weights, meta = self._paths(key)
        if not meta.is_file() or not weights.is_file():
            return None
        try:
            rec = PersonalRecord.model_validate_json(meta.read_text("utf-8"))
        except ValueError:
            log.warning("node: the personal model record %s is unreadable; ignoring it", meta)
            return None
        rec.path = str(weights)
        return rec

    def records(self) -> list[PersonalRecord]:
        """Every personal model kept, newest first."""
        if not self.dir.is_dir():
            return []
        found = [self._read(p.stem) for p in self.dir.glob("*.json")]
        return sorted((r for r in found if r is not None), key=lambda r: r.created, reverse=True)

    def find(self, ref: str) -> PersonalRecord:
        """The record whose key, task id or task name is ``ref`` (a task name: its newest run);
        :class:`FedgovError` naming the choices when there is none, or several keys match."""
        recs = self.records()
        exact = [r for r in recs if ref in (r.key, r.task_id)]
        if exact:
            return exact[0]
        by_name = [r for r in recs if r.task == ref]
        if by_name:
            return by_name[0]
        prefix = [r for r in recs if r.key.startswith(ref)]
        if len(prefix) == 1:
            return prefix[0]
        known = ", ".join(f"{r.key} ({r.task})" for r in recs[:10]) or "none"
        raise FedgovError(f"no personal model '{ref}' in {self.dir}; give a key, task id or task name (kept: {known})")

    def weights(self, rec: PersonalRecord) -> dict[str, np.ndarray]:
        weights, _ = self._paths(rec.key)
        with np.load(weights, allow_pickle=False) as z:
            names = json.loads(z["__names__"].tobytes().decode())
            return {k: z[f"a{i}"] for i, k in enumerate(names)}

    def save(
        self, *, task: Task, contract: Contract, task_id: str, dataset: str, data_sha256: str, global_sha256: str,
        personal: PersonalModel,
    ) -> PersonalRecord:
        from fedgov import __version__
        from fedgov.data.io import atomic_write_bytes
        from fedgov.node.rounds import model_digest

        key = self.key(task_id)
        run = task_id.rsplit("-", 1)[-1]
        rec = PersonalRecord(
            key=key, task=task.name, task_id=task_id, run=run, contract=contract.ref, dataset=dataset, model=task.model.name,
            variant=personal.variant, epochs=personal.epochs, reason=personal.reason, val_rows=personal.val_rows,
            fit_rows=personal.fit_rows, val_accuracy_global=personal.val_accuracy_global, val_accuracy=personal.val_accuracy,
            global_sha256=global_sha256, model_sha256=model_digest(personal.state), data_sha256=data_sha256,
            created=datetime.now(timezone.utc), fedgov_version=__version__,
        )
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        weights, meta = self._paths(key)
        buf = io.BytesIO()
        arrays: dict[str, Any] = {f"a{i}": np.asarray(v) for i, v in enumerate(personal.state.values())}
        np.savez(buf, __names__=np.frombuffer(json.dumps(list(personal.state)).encode(), dtype=np.uint8), **arrays)
        atomic_write_bytes(weights, buf.getvalue())  # a temporary file of mode 0600, renamed
        atomic_write_bytes(meta, rec.model_dump_json(indent=2, exclude={"path"}).encode())
        rec.path = str(weights)
        return rec


def ensure_personal(
    home: Any, task: Task, contract: Contract, *, node: str, task_id: str, train_path: DataSource, test_path: DataSource | None,
    global_state: dict[str, np.ndarray],
) -> PersonalRecord | None:
    """Build and keep this node's personal model for ``task_id`` from the final ``global_state``,
    once: when one is kept already it is returned as it is (another global model changes
    nothing: the audit log says so). None when the task asks for none or the node has no
    directory to keep it in. Nothing here is sent anywhere."""
    from fedgov.node.contracts import file_digest
    from fedgov.node.rounds import model_digest, prepare

    if not task.personal.enabled or not home.path.is_dir():
        return None
    store = PersonalModels(home.path)
    digest = model_digest(global_state)
    kept = store.get(task_id)
    if kept is not None:
        if kept.global_sha256 != digest:
            log.warning("node %s: a second final model for task %s; the personal model made from the first is kept", node, task.name)
            home.audit.append("personal-model-kept", task_id=task_id, payload={"offered_global_sha256": digest,
                                                                               "kept_global_sha256": kept.global_sha256})
        return kept
    data = prepare(task, contract, train_path, test_path)
    personal = personalise(task, global_state, data.X_train, data.y_train, node=node, n_features=data.n_features, n_classes=data.n_classes)
    ds = home.policy().dataset_for(contract) if home.exists() else None
    rec = store.save(
        task=task, contract=contract, task_id=task_id, dataset=ds.name if ds is not None else contract.name,
        data_sha256=file_digest(train_path), global_sha256=digest, personal=personal,
    )
    # the audit log is the node's own: the choice and the validation figures stay at the node
    home.audit.append("personal-model", task_id=task_id, payload={
        "key": rec.key, "variant": rec.variant, "epochs": rec.epochs, "global_sha256": digest, "model_sha256": rec.model_sha256,
        "released": "nothing: kept at the node",
    })
    return rec


def personal_test_accuracy(
    home: Any, task: Task, contract: Contract, *, task_id: str, train_path: DataSource, test_path: DataSource | None,
) -> tuple[float, float, int] | None:
    """(personal model's accuracy, 1.0 if fine-tuned else 0.0, test rows) on the node's test
    split, exact: for a simulation's report only (:func:`fedgov.node.rounds.baseline`)."""
    from fedgov.models import build_model, evaluate, make_dp_compatible, set_state
    from fedgov.node.rounds import prepare

    store = PersonalModels(home.path)
    rec = store.get(task_id)
    if rec is None:
        return None
    data = prepare(task, contract, train_path, test_path)
    model = make_dp_compatible(build_model(task.model, n_features=data.n_features, n_classes=data.n_classes, seed=task.training.seed))
    set_state(model, store.weights(rec))
    acc = evaluate(model, data.X_test, data.y_test).accuracy
    return float(acc), 1.0 if rec.variant == "fine-tuned" else 0.0, len(data.y_test)
