"""What the strategy saw, per round and per node: a recorder, and a strategy wrapper that feeds it.

:class:`Recording` wraps the task's Flower strategy the way Flower's own DP wrappers do
(``flwr/serverapp/strategy/dp_fixed_clipping.py``): it holds the strategy in
``self.strategy`` and delegates to it. Around each call it

* numbers rounds from ``round_offset + 1`` (a resumed run continues the numbering);
* records who was asked, who answered, who was left out and why (:class:`Recorder`);
* turns encoded updates back into models and screens them before the strategy aggregates
  (:func:`fedgov.coordinator.aggregation.decode_updates`, :func:`~fedgov.coordinator.aggregation.screen_updates`);
* asks nodes to evaluate only in the rounds they planned a release for.

:func:`build_strategy` picks the strategy the task names and wraps it. FedAvg: McMahan et al.
2017, arXiv:1602.05629. FedProx: Li et al. 2020, arXiv:1812.06127. FedMedian and
FedTrimmedAvg: Yin et al. 2018, arXiv:1803.01498. Krum: Blanchard et al. 2017, NeurIPS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from fedgov.config import Task
from fedgov.coordinator.aggregation import aggregate_metrics, decode_updates, metric_values, screen_updates, weighted_nanmean
from fedgov.coordinator.events import EventWriter
from fedgov.coordinator.grid import AdmittedGrid
from fedgov.coordinator.secure import SecureFedAvg
from fedgov.privacy.distributed import DistributedPlan
from fedgov.privacy.secagg import SecAggParams
from fedgov.reports import RoundMetrics

__all__ = ["Recorder", "Recording", "build_strategy"]


class Recorder:
    """What the strategy saw, per round and per node."""

    def __init__(self, names: dict[int, str], events: EventWriter) -> None:
        self.names = names
        self.events = events
        self.rounds: dict[int, RoundMetrics] = {}
        self.node_train: dict[str, dict[str, float]] = {}
        self.node_rounds: dict[str, int] = {}
        self.node_eval: dict[str, dict[str, float]] = {}

    def round(self, r: int) -> RoundMetrics:
        if r not in self.rounds:
            self.rounds[r] = RoundMetrics(round=r)
        return self.rounds[r]

    def node_name(self, nid: int) -> str:
        return self.names.get(nid, f"node-{nid}")

    def name(self, msg: Message) -> str:
        return self.node_name(msg.metadata.src_node_id)

    def asked(self, r: int, asked: list[int], online: set[int], admitted: set[int]) -> None:
        """Who was asked to train in round ``r``, and why each other admitted node was not."""
        rm = self.round(r)
        rm.nodes_asked = sorted(self.node_name(n) for n in asked)
        for n in sorted(admitted - set(asked)):
            why = "not sampled this round (training.fraction_train)" if n in online else "not connected when the round started"
            rm.nodes_absent[self.node_name(n)] = why

    def missing(self, r: int, replies: list[Message], timeout: float) -> None:
        """Nodes asked in round ``r`` that did not answer within the bounded wait."""
        rm = self.round(r)
        answered = {self.name(m) for m in replies}
        for node in rm.nodes_asked:
            if node not in answered:
                rm.nodes_failed.setdefault(node, f"no reply within {timeout:.0f} s (training.reply_timeout)")

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the nodes (:class:`fedgov.coordinator.checkpoint.Checkpoint`)."""
        return {"node_train": self.node_train, "node_rounds": self.node_rounds, "node_eval": self.node_eval}

    def restore(
        self, rounds: list[RoundMetrics], node_train: dict[str, dict[str, float | None]], node_rounds: dict[str, int],
        node_eval: dict[str, dict[str, float | None]],
    ) -> None:
        def nan(d: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
            return {n: {k: float("nan") if v is None else float(v) for k, v in m.items()} for n, m in d.items()}

        self.rounds = {rm.round: rm for rm in rounds}
        self.node_train, self.node_rounds, self.node_eval = nan(node_train), dict(node_rounds), nan(node_eval)

    def train(self, r: int, replies: list[Message], *, rejected: dict[str, str] | None = None) -> None:
        rm = self.round(r)
        rm.nodes_rejected.update(rejected or {})
        if rejected:
            self.events.emit("rejected", round=r, nodes=rejected)
        losses: list[tuple[float, float]] = []
        for m in replies:
            node = self.name(m)
            if m.has_error():
                rm.nodes_failed[node] = (m.error.reason or "error without a reason")[:300]
                continue
            mr = next(iter(m.content.metric_records.values()), None)
            if mr is None:
                rm.nodes_failed[node] = "reply without metrics"
                continue
            vals = metric_values(mr)
            self.node_train[node] = vals
            self.node_rounds[node] = self.node_rounds.get(node, 0) + 1
            rm.nodes_trained.append(node)
            losses.append((vals.get("train-loss", float("nan")), vals.get("num-examples", 0.0)))
        # Nodes send no training loss or epsilon (their release gate keeps them): None here.
        rm.train_loss = weighted_nanmean(losses)
        eps = [v["epsilon"] for v in self.node_train.values() if "epsilon" in v]
        rm.max_epsilon = max(eps) if eps else None

    def evaluate(self, r: int, replies: list[Message]) -> None:
        rm = self.round(r)
        correct = total = 0.0
        for m in replies:
            node = self.name(m)
            if m.has_error():
                rm.nodes_failed.setdefault(node, (m.error.reason or "error without a reason")[:300])
                continue
            mr = next(iter(m.content.metric_records.values()), None)
            if mr is None:
                continue
            vals = metric_values(mr)
            if "correct" in vals and "total" in vals:
                # noisy counts (DP at the node): the node's accuracy is their ratio, clamped
                vals["accuracy"] = min(1.0, max(0.0, vals["correct"] / vals["total"])) if vals["total"] > 0 else float("nan")
                correct += vals["correct"]
                total += vals["total"]
            self.node_eval[node] = vals
            rm.nodes_evaluated.append(node)
        # Sum of the nodes' noisy correct counts over the sum of their noisy totals.
        rm.federated_accuracy = min(1.0, max(0.0, correct / total)) if total > 0 else None


class Recording(Strategy):
    """``strategy`` with every reply recorded (and every update screened) before it aggregates.

    Rounds are numbered from ``round_offset + 1``: the wrapped strategy sees the run's round
    numbers, also in a resumed run. ``evaluate_rounds`` (None: every round) are the rounds in
    which the nodes are asked to evaluate.
    """

    def __init__(
        self, strategy: Strategy, recorder: Recorder, *, round_offset: int = 0, reply_timeout: float = 600.0,
        max_update_norm: float | None = None, evaluate_rounds: set[int] | None = None,
    ) -> None:
        self.strategy = strategy
        self.recorder = recorder
        self.round_offset = round_offset
        self.reply_timeout = reply_timeout
        self.max_update_norm = max_update_norm
        self.evaluate_rounds = evaluate_rounds
        # The global model of the round being trained: what every update is checked against.
        self.global_arrays: dict[str, np.ndarray] | None = None
        # The grid of the round being trained and its byte counts when the round started.
        self._traffic: tuple[AdmittedGrid, int, int] | None = None

    @property
    def secure(self) -> SecureFedAvg | None:
        """The wrapped strategy when it runs under secure aggregation."""
        return self.strategy if isinstance(self.strategy, SecureFedAvg) else None

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        r = server_round + self.round_offset
        self.global_arrays = {k: v.numpy() for k, v in arrays.items()}
        online = set(grid.get_node_ids())
        self._traffic = (grid, grid.bytes_sent, grid.bytes_received) if isinstance(grid, AdmittedGrid) else None
        msgs = list(self.strategy.configure_train(r, arrays, config, grid))
        admitted = grid.admitted if isinstance(grid, AdmittedGrid) else online
        failed = self.secure.stage_failures if self.secure is not None else {}
        self.recorder.asked(r, [m.metadata.dst_node_id for m in msgs] + list(failed), online, set(admitted))
        rm = self.recorder.round(r)
        for nid, why in failed.items():
            rm.nodes_failed[self.recorder.node_name(nid)] = why
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        r = server_round + self.round_offset
        replies = list(replies)
        kept, rejected = self._screen(replies)
        self.recorder.train(r, kept, rejected=rejected)
        self.recorder.missing(r, replies, self.reply_timeout)
        result = self.strategy.aggregate_train(r, kept)
        rm = self.recorder.round(r)
        if self._traffic is not None:  # the training phase's traffic: instructions, replies, secagg stages
            grid, sent0, received0 = self._traffic
            rm.bytes_to_nodes = grid.bytes_sent - sent0
            rm.bytes_from_nodes = grid.bytes_received - received0
        why = self.secure.discarded.get(r) if self.secure is not None else None
        if why:
            rm.discarded = why
            self.recorder.events.emit("discarded", round=r, reason=why)
        return result

    def _screen(self, replies: list[Message]) -> tuple[list[Message], dict[str, str]]:
        """The replies to aggregate, and the nodes whose update was left out with the reason."""
        if self.secure is not None:  # masked vectors: there is no single update to check
            return replies, {}
        decoded, undecodable = decode_updates(replies, self.global_arrays, name=self.recorder.name)
        kept, rejected = screen_updates(decoded, self.global_arrays, max_norm=self.max_update_norm, name=self.recorder.name)
        rejected.update(undecodable)
        return kept, rejected

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        r = server_round + self.round_offset
        # Each evaluation at a node is a DP release the node planned at admission: ask only
        # for those (the final round, or every round); a node refuses any other.
        if self.evaluate_rounds is not None and r not in self.evaluate_rounds:
            return []
        return self.strategy.configure_evaluate(r, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = server_round + self.round_offset
        replies = list(replies)
        self.recorder.evaluate(r, replies)
        ok = [m for m in replies if not m.has_error()]
        if not ok:
            return None
        return self.strategy.aggregate_evaluate(r, ok)


def momentum_state(strategy: Strategy, keys: list[str]) -> dict[str, np.ndarray] | None:
    """The coordinator's momentum, by the model's array names ``keys`` (a checkpoint keeps it):
    :class:`SecureFedAvg`'s velocity, or Flower's FedAvgM ``momentum_vector`` (its sign: old
    minus new); None when the strategy has none (yet)."""
    if isinstance(strategy, SecureFedAvg):
        return None if strategy._velocity is None else dict(strategy._velocity)
    vector = getattr(strategy, "momentum_vector", None) if isinstance(strategy, FedAvgM) else None
    if vector is None:
        return None
    return {k: np.asarray(v) for k, v in zip(keys, vector, strict=True)}


def restore_momentum(strategy: Strategy, momentum: dict[str, np.ndarray], keys: list[str]) -> None:
    """Give a resumed run's strategy the momentum :func:`momentum_state` saved."""
    if isinstance(strategy, SecureFedAvg):
        strategy._velocity = {k: np.asarray(momentum[k], dtype=np.float64) for k in keys}
    elif isinstance(strategy, FedAvgM):
        strategy.momentum_vector = [np.asarray(momentum[k]) for k in keys]


def build_strategy(
    task: Task, n_nodes: int, recorder: Recorder, *, round_offset: int = 0, stage_config: dict[str, str] | None = None,
    distributed: DistributedPlan | None = None,
) -> Recording:
    """The strategy the task names (``training.aggregation``, ``training.strategy``,
    ``training.secure_aggregation``) for ``n_nodes`` admitted nodes, wrapped in :class:`Recording`."""
    t = task.training
    p = task.privacy
    evals = task.evaluation.node_evaluations(t.rounds, enabled=p.mode == "local") if p.enabled else t.rounds
    fraction_evaluate = t.fraction_evaluate if evals else 0.0
    fedavg: dict[str, Any] = dict(
        fraction_train=t.fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min(t.min_nodes, n_nodes),
        min_evaluate_nodes=min(t.min_nodes, n_nodes) if fraction_evaluate > 0 else 0,
        min_available_nodes=min(t.min_nodes, n_nodes),
        evaluate_metrics_aggr_fn=aggregate_metrics,
        train_metrics_aggr_fn=aggregate_metrics,
    )
    strategy: FedAvg
    if t.secure_aggregation:
        if distributed is not None and t.fraction_train < 1:
            # Every node is asked every round: each flips its own secret coin (rate q) for whether
            # its update goes into the sum (fedgov.node.secure, called by the secagg mod), which the coordinator cannot see.
            fedavg["fraction_train"] = 1.0
        strategy = SecureFedAvg(
            stage_config=stage_config or {}, params=SecAggParams(clip=t.secure_clip), stage_timeout=t.reply_timeout,
            distributed=distributed, dropout_tolerance=p.dropout_tolerance, server_momentum=task.server_momentum, **fedavg,
        )
    elif t.aggregation == "median":
        strategy = FedMedian(**fedavg)
    elif t.aggregation == "trimmed-mean":
        strategy = FedTrimmedAvg(beta=t.trim_fraction, **fedavg)
    elif t.aggregation == "krum":
        strategy = Krum(num_malicious_nodes=t.krum_bad_nodes, **fedavg)
    elif t.strategy == "fedprox":
        strategy = FedProx(proximal_mu=t.proximal_mu, **fedavg)
    elif task.server_momentum > 0:
        strategy = FedAvgM(server_momentum=task.server_momentum, **fedavg)
    else:
        strategy = FedAvg(**fedavg)
    return Recording(
        strategy, recorder, round_offset=round_offset, reply_timeout=t.reply_timeout, max_update_norm=t.max_update_norm,
        evaluate_rounds={t.rounds} if evals == 1 else None,
    )
