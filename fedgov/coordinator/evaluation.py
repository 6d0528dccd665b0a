"""The global model on the coordinator's own held-out test set, after every round.

The held-out set (``evaluation.centralized``) is public data of the coordinator, never a
node's. Flower calls the evaluator as the strategy's ``evaluate_fn`` before the first round
and after every round; fedgov also saves its checkpoint from there (``after_round``), since
Flower has no other per-round hook.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedgov.config import Contract, Task
from fedgov.coordinator.events import EventWriter
from fedgov.coordinator.recording import Recorder

__all__ = ["CentralEvaluator"]


class CentralEvaluator:
    """Evaluates the global model on the coordinator's held-out (public) test set.

    ``round_offset`` shifts Flower's round numbers (a resumed run continues the numbering);
    ``after_round`` is called with each completed round and its global model.
    """

    def __init__(self, task: Task, contract: Contract, recorder: Recorder, events: EventWriter) -> None:
        from fedgov.data import Encoder, read_table, validate_frame
        from fedgov.models import build_model

        self.recorder = recorder
        self.events = events
        self.round_offset = 0
        self.after_round: Callable[[int, ArrayRecord], None] | None = None
        self.encoder = Encoder.from_contract(contract, task.features)
        self.model = build_model(task.model, n_features=self.encoder.n_features, n_classes=self.encoder.n_classes, seed=task.training.seed)
        self.X: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.t0 = time.time()
        path = task.evaluation.centralized
        if path is not None:
            # The held-out set is the coordinator's public data; only the task's columns count.
            columns = [*contract.feature_names(task.features), str(contract.target)]
            raw = read_table(path)
            frame = validate_frame(raw[[c for c in raw.columns if c in columns]], contract, file=str(path), columns=columns)
            self.X, self.y = self.encoder.transform(frame)

    def majority_rate(self) -> float | None:
        """The share of the held-out set's most frequent class: the accuracy of always guessing it."""
        if self.y is None or len(self.y) == 0:
            return None
        return float(np.bincount(self.y).max() / len(self.y))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        from fedgov.models import evaluate, set_state

        if server_round == 0 and self.round_offset > 0:
            return None  # a resumed run: the model it starts from was evaluated before the crash
        server_round += self.round_offset
        rm = self.recorder.round(server_round)
        rm.seconds = time.time() - self.t0
        self.t0 = time.time()
        out: MetricRecord | None = None
        if self.X is not None and self.y is not None:
            set_state(self.model, {k: v.numpy() for k, v in arrays.items()})
            m = evaluate(self.model, self.X, self.y)
            rm.accuracy, rm.loss, rm.auc = m.accuracy, m.loss, m.auc
            out = MetricRecord({"accuracy": m.accuracy, "loss": m.loss})
            if m.auc is not None:
                out["auc"] = m.auc
        self.events.emit("round", **rm.model_dump(mode="json"))
        if server_round > 0 and self.after_round is not None:
            self.after_round(server_round, arrays)
        return out
