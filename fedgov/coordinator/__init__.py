"""The coordinator: what the party that runs the federation does, and nothing a node does.

* :mod:`~fedgov.coordinator.grid`: the seam to the network (Flower's ``Grid``), the bounded
  wait for nodes, ``hello`` and the end-of-task notice, the view with only the admitted nodes;
* :mod:`~fedgov.coordinator.aggregation`: pure functions over records (metric aggregation,
  decoding and screening of updates);
* :mod:`~fedgov.coordinator.recording`: the wrapper that records what the strategy sees, and
  the choice of strategy;
* :mod:`~fedgov.coordinator.secure`: the stages of secure aggregation, and FedAvg under it;
* :mod:`~fedgov.coordinator.evaluation`: the global model on the held-out test set;
* :mod:`~fedgov.coordinator.checkpoint`: what a crashed run resumes from;
* :mod:`~fedgov.coordinator.events`: the run's progress as JSON lines;
* :mod:`~fedgov.coordinator.run`: a training run, step by step (:func:`run_training`);
* :mod:`~fedgov.coordinator.statistics`: a statistics query (:func:`run_query`).

The coordinator imports no node code (``fedgov.node``), no launcher and no Flower glue
(``server``, ``clients``): what it shares with the nodes is in :mod:`fedgov.protocol`,
:mod:`fedgov.privacy` and :mod:`fedgov.models`.

The names below are imported on first use (PEP 562), so that ``import
fedgov.coordinator.events`` (``fedgov run`` follows a run's events) does not load Flower's
server side and PyTorch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedgov._lazy import lazy_exports

if TYPE_CHECKING:
    from fedgov.coordinator.aggregation import (
        aggregate_metrics,
        check_update,
        decode_updates,
        metric_values,
        screen_updates,
        update_norm,
        weighted_nanmean,
    )
    from fedgov.coordinator.checkpoint import Checkpoint, checkpoint_dir, load_checkpoint, save_checkpoint
    from fedgov.coordinator.evaluation import CentralEvaluator
    from fedgov.coordinator.events import EventReader, EventWriter
    from fedgov.coordinator.grid import (
        AdmittedGrid,
        end_task,
        hello,
        message_bytes,
        query_messages,
        task_config,
        wait_for_nodes,
    )
    from fedgov.coordinator.recording import Recorder, Recording, build_strategy
    from fedgov.coordinator.run import TrainingOptions, run_training
    from fedgov.coordinator.secure import SecAggRound, SecureFedAvg, secagg_setup, secagg_stage, secagg_unmask
    from fedgov.coordinator.statistics import regions_of, run_query

__all__ = [
    "AdmittedGrid",
    "CentralEvaluator",
    "Checkpoint",
    "EventReader",
    "EventWriter",
    "Recorder",
    "Recording",
    "SecAggRound",
    "SecureFedAvg",
    "TrainingOptions",
    "aggregate_metrics",
    "build_strategy",
    "check_update",
    "checkpoint_dir",
    "decode_updates",
    "end_task",
    "hello",
    "load_checkpoint",
    "message_bytes",
    "metric_values",
    "query_messages",
    "regions_of",
    "run_query",
    "run_training",
    "save_checkpoint",
    "screen_updates",
    "secagg_setup",
    "secagg_stage",
    "secagg_unmask",
    "task_config",
    "update_norm",
    "wait_for_nodes",
    "weighted_nanmean",
]

# Where each public name lives, by submodule.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "aggregation": ("aggregate_metrics", "check_update", "decode_updates", "metric_values", "screen_updates", "update_norm", "weighted_nanmean",),
    "checkpoint": ("Checkpoint", "checkpoint_dir", "load_checkpoint", "save_checkpoint",),
    "evaluation": ("CentralEvaluator",),
    "events": ("EventReader", "EventWriter",),
    "grid": ("AdmittedGrid", "end_task", "hello", "message_bytes", "query_messages", "task_config", "wait_for_nodes",),
    "recording": ("Recorder", "Recording", "build_strategy",),
    "run": ("TrainingOptions", "run_training",),
    "secure": ("SecAggRound", "SecureFedAvg", "secagg_setup", "secagg_stage", "secagg_unmask",),
    "statistics": ("regions_of", "run_query",),
}

if not TYPE_CHECKING:  # type checkers read the imports above; a __getattr__ would hide typos from them
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
