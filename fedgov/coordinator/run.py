"""The coordinator's side of a training task, on Flower's Message API.

``server/app.py`` is thin glue that calls :func:`run_training`. The coordinator

1. waits, for a bounded time, until the expected nodes are connected;
2. asks every node ``hello`` with the task and its contract; a node answers whether it
   accepts, and if not, why (a machine-readable code and a text). Training goes on with the
   nodes that accepted if at least ``training.min_nodes`` did, and stops with a clear
   message otherwise;
3. runs Flower's FedAvg or FedProx (``flwr.serverapp.strategy``) over the accepted nodes
   only, recording per round what each node sent (epsilon spent, example counts, metrics on
   its own test split) and evaluating the global model on the held-out test set;
4. writes ``report.json`` and the final model into the run directory.

FedAvg: McMahan et al. 2017, arXiv:1602.05629. FedProx: Li et al. 2020, arXiv:1812.06127.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

import fedgov
from fedgov import protocol as P
from fedgov.coordinator.aggregation import check_update
from fedgov.privacy.secagg import RoundKeys, SecAggParams, decode_sum, neighbourhood_size, threshold_for, unmask_sum
from fedgov.errors import SecAggError
from fedgov.transport import is_encoded, local_model
from fedgov.privacy.distributed import DistributedPlan, decode_mean
from fedgov.config import Contract, Task
from fedgov.errors import FederationError
from fedgov.coordinator.events import EventWriter
from fedgov.reports import GlobalMetrics, NodeResult, RoundMetrics, TrainingReport, write_json_atomic

__all__ = ["AdmittedGrid", "run_training", "task_config", "wait_for_nodes"]

log = logging.getLogger(__name__)


class AdmittedGrid(Grid):
    """A view of a Grid that offers only the nodes that accepted the task to the strategy.

    It also bounds Flower's wait for nodes: the strategies' ``sample_nodes`` polls
    ``get_node_ids`` until enough nodes are online and waits forever otherwise. Once fewer
    than ``min_nodes`` admitted nodes have been online for ``patience`` seconds, this view
    raises :class:`~fedgov.errors.FederationError`, and the run stops with that message.
    """

    def __init__(self, grid: Grid, admitted: Iterable[int], *, min_nodes: int = 1, patience: float = 120.0) -> None:
        self._grid = grid
        self.admitted = set(admitted)
        self.min_nodes = min_nodes
        self.patience = patience
        self._short_since: float | None = None
        # Serialised size of every message through this view, by direction (see message_bytes).
        self.bytes_sent = 0
        self.bytes_received = 0

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        ids = [n for n in self._grid.get_node_ids() if n in self.admitted]
        if len(ids) >= self.min_nodes:
            self._short_since = None
            return ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self.patience:
            raise FederationError(
                f"only {len(ids)} of the {len(self.admitted)} admitted nodes are online, the task needs "
                f"{self.min_nodes} (training.min_nodes); waited {self.patience:.0f} s for more"
            )
        return ids

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.bytes_sent += sum(message_bytes(m) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self.bytes_received += sum(message_bytes(m) for m in replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.bytes_sent += sum(message_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.bytes_received += sum(message_bytes(m) for m in replies)
        return replies


def message_bytes(msg: Message) -> int:
    """A message's size on the wire: its protobuf serialisation (content and metadata), as
    Flower sends it over gRPC (without gRPC's and TLS's own framing, a few dozen bytes)."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


def task_config(task: Task, contract: Contract) -> dict[str, str]:
    """What every message to a node carries: the task and its contract, as JSON."""
    return {P.TASK_JSON: task.model_dump_json(), P.CONTRACT_JSON: contract.model_dump_json()}


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """Node ids once ``expected`` are connected, or what is there after ``timeout`` s.

    Flower's own sampling waits forever for missing nodes; fedgov never does.
    """
    deadline = time.monotonic() + timeout
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() >= deadline:
            return ids
        time.sleep(0.5)


def _hello(
    grid: Grid, node_ids: list[int], task: Task, contract: Contract, timeout: float, extra: dict[str, str] | None = None
) -> dict[int, P.NodeHello]:
    content = ConfigRecord({P.KIND: P.HELLO, **task_config(task, contract), **(extra or {})})
    msgs = [
        Message(content=RecordDict({P.CONFIG: content}), message_type=MessageType.QUERY, dst_node_id=nid)
        for nid in node_ids
    ]
    answers: dict[int, P.NodeHello] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            reason = reply.error.reason or "no reason given"
            code = P.RefusalCode.INTERNAL
            if P.RefusalCode.APP_NOT_TRUSTED.value in reason:
                # The node refused the bundle before running any of it (fedgov.deploy.clientapp).
                code = P.RefusalCode.APP_NOT_TRUSTED
                reason = reason[reason.index(P.RefusalCode.APP_NOT_TRUSTED.value):].rstrip("'>")
                reason = reason.removeprefix(f"{P.RefusalCode.APP_NOT_TRUSTED.value}: ")
            answers[nid] = P.NodeHello(node=f"node-{nid}", accepted=False, code=code, reason=reason[:500])
            continue
        try:
            raw = reply.content[P.HELLO][P.NODE_JSON]
            answers[nid] = P.NodeHello.model_validate_json(str(raw))
        except Exception as exc:  # noqa: BLE001 - a malformed answer is a refusal
            answers[nid] = P.NodeHello(
                node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL, reason=f"malformed hello reply: {exc}"[:500]
            )
    for nid in node_ids:
        answers.setdefault(
            nid,
            P.NodeHello(node=f"node-{nid}", accepted=False, code=P.RefusalCode.INTERNAL, reason=f"no answer within {timeout:.0f} s"),
        )
    return answers


def _nanmean_weighted(pairs: list[tuple[float, float]]) -> float | None:
    ok = [(v, w) for v, w in pairs if v is not None and not math.isnan(v) and w > 0]
    total = sum(w for _, w in ok)
    return sum(v * w for v, w in ok) / total if total else None


def _metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric, skipping NaN (an AUC a node could not compute)."""
    sums: dict[str, list[tuple[float, float]]] = {}
    for rd in records:
        mr = next(iter(rd.metric_records.values()))
        w = float(mr[weight_key])  # type: ignore[arg-type]
        for k, v in mr.items():
            if k != weight_key and isinstance(v, (int, float)):
                sums.setdefault(k, []).append((float(v), w))
    out = MetricRecord()
    for k, pairs in sums.items():
        m = _nanmean_weighted(pairs)
        if m is not None:
            out[k] = m
    return out


class _Recorder:
    """What the strategy saw, per round and per node."""

    def __init__(self, names: dict[int, str], events: EventWriter) -> None:
        self.names = names
        self.events = events
        self.rounds: dict[int, RoundMetrics] = {}
        self.node_train: dict[str, dict[str, float]] = {}
        self.node_rounds: dict[str, int] = {}
        self.node_eval: dict[str, dict[str, float]] = {}
        self.round_started: dict[int, float] = {}

    def round(self, r: int) -> RoundMetrics:
        if r not in self.rounds:
            self.rounds[r] = RoundMetrics(round=r)
        return self.rounds[r]

    def name(self, msg: Message) -> str:
        nid = msg.metadata.src_node_id
        return self.names.get(nid, f"node-{nid}")

    def asked(self, r: int, asked: list[int], online: set[int], admitted: set[int]) -> None:
        """Who was asked to train in round ``r``, and why each other admitted node was not."""
        rm = self.round(r)
        rm.nodes_asked = sorted(self.names.get(n, f"node-{n}") for n in asked)
        for n in sorted(admitted - set(asked)):
            why = "not sampled this round (training.fraction_train)" if n in online else "not connected when the round started"
            rm.nodes_absent[self.names.get(n, f"node-{n}")] = why

    def missing(self, r: int, replies: list[Message], timeout: float) -> None:
        """Nodes asked in round ``r`` that did not answer within the bounded wait."""
        rm = self.round(r)
        answered = {self.name(m) for m in replies}
        for node in rm.nodes_asked:
            if node not in answered:
                rm.nodes_failed.setdefault(node, f"no reply within {timeout:.0f} s (training.reply_timeout)")

    def state(self) -> dict[str, Any]:
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
            vals = {k: float(v) for k, v in mr.items() if isinstance(v, (int, float))}
            self.node_train[node] = vals
            self.node_rounds[node] = self.node_rounds.get(node, 0) + 1
            rm.nodes_trained.append(node)
            losses.append((vals.get("train-loss", float("nan")), vals.get("num-examples", 0.0)))
        # Nodes send no training loss or epsilon (their release gate keeps them): None here.
        rm.train_loss = _nanmean_weighted(losses)
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
            vals = {k: float(v) for k, v in mr.items() if isinstance(v, (int, float))}
            if "correct" in vals and "total" in vals:
                # noisy counts (DP at the node): the node's accuracy is their ratio, clamped
                vals["accuracy"] = min(1.0, max(0.0, vals["correct"] / vals["total"])) if vals["total"] > 0 else float("nan")
                correct += vals["correct"]
                total += vals["total"]
            self.node_eval[node] = vals
            rm.nodes_evaluated.append(node)
        # Sum of the nodes' noisy correct counts over the sum of their noisy totals.
        rm.federated_accuracy = min(1.0, max(0.0, correct / total)) if total > 0 else None


def _recording(base: type[FedAvg]) -> Callable[..., FedAvg]:
    """``base`` with its replies recorded before Flower aggregates them (one level deep)."""

    class Recording(base):  # type: ignore[valid-type, misc]
        """Rounds are numbered from ``round_offset + 1`` (a resumed run continues the numbering)."""

        def __init__(
            self, *args: Any, recorder: _Recorder, max_update_norm: float | None = None,
            round_offset: int = 0, reply_timeout: float = 600.0, evaluate_rounds: set[int] | None = None, **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.evaluate_rounds = evaluate_rounds
            self.recorder = recorder
            self.max_update_norm = max_update_norm
            self.round_offset = round_offset
            self.reply_timeout = reply_timeout

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
            r = server_round + self.round_offset
            # The global model of this round: what every update is checked against.
            self.global_arrays = {k: v.numpy() for k, v in arrays.items()}
            online = set(grid.get_node_ids())
            self._traffic_grid = grid
            self._traffic_start = (getattr(grid, "bytes_sent", 0), getattr(grid, "bytes_received", 0))
            msgs = list(super().configure_train(r, arrays, config, grid))
            admitted = getattr(grid, "admitted", online)
            failed = getattr(self, "stage_failures", {})
            self.recorder.asked(r, [m.metadata.dst_node_id for m in msgs] + list(failed), online, set(admitted))
            rm = self.recorder.round(r)
            for nid, why in failed.items():
                rm.nodes_failed[self.recorder.names.get(nid, f"node-{nid}")] = why
            return msgs

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
            r = server_round + self.round_offset
            replies = list(replies)
            if isinstance(self, SecureFedAvg):  # masked vectors: there is no single update to check
                kept, rejected = replies, dict[str, str]()
            else:
                decoded, undecodable = decode_updates(replies, getattr(self, "global_arrays", None), name=self.recorder.name)
                kept, rejected = screen_updates(
                    decoded, getattr(self, "global_arrays", None), max_norm=self.max_update_norm, name=self.recorder.name
                )
                rejected.update(undecodable)
            self.recorder.train(r, kept, rejected=rejected)
            self.recorder.missing(r, replies, self.reply_timeout)
            result = super().aggregate_train(r, kept)
            grid = getattr(self, "_traffic_grid", None)
            if grid is not None and hasattr(grid, "bytes_sent"):  # the training phase's traffic: instructions, replies, secagg stages
                sent0, received0 = self._traffic_start
                rm = self.recorder.round(r)
                rm.bytes_to_nodes = grid.bytes_sent - sent0
                rm.bytes_from_nodes = grid.bytes_received - received0
            why = getattr(self, "discarded", {}).get(r)
            if why:
                self.recorder.round(r).discarded = why
                self.recorder.events.emit("discarded", round=r, reason=why)
            return result

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
            r = server_round + self.round_offset
            # Each evaluation at a node is a DP release the node planned at admission: ask only
            # for those (the final round, or every round); a node refuses any other.
            if self.evaluate_rounds is not None and r not in self.evaluate_rounds:
                return []
            return super().configure_evaluate(r, arrays, config, grid)

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
            replies = list(replies)
            self.recorder.evaluate(server_round + self.round_offset, replies)
            ok = [m for m in replies if not m.has_error()]
            if not ok:
                return None
            return super().aggregate_evaluate(server_round + self.round_offset, ok)


    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


def _items(rec: ConfigRecord, key: str) -> list[Any]:
    """A list value of a record (a single value as a list of one)."""
    v = rec[key]
    return list(v) if isinstance(v, list) else [v]


@dataclass
class SecAggRound:
    """The coordinator's view of one round of secure aggregation after the keys and shares stages."""

    pks: dict[int, tuple[bytes, bytes]]
    survivors: list[int]  # the nodes whose shares went out: they mask against each other
    threshold: int
    routed: dict[int, dict[int, bytes]]  # dst -> src -> ciphertext
    failures: dict[int, str]

    def record_for(self, dst: int, extra: dict[str, Any] | None = None) -> ConfigRecord:
        """What the masked-input message to ``dst`` carries: the round's nodes and its shares."""
        got = {src: ct for src, ct in self.routed.get(dst, {}).items() if src in self.survivors}
        return ConfigRecord({"nodes": [str(n) for n in self.survivors], "src": [str(x) for x in got], "ct": list(got.values()), **(extra or {})})


def secagg_stage(
    grid: Grid, ids: list[int], server_round: int, stage: str, stage_config: dict[str, Any], extra: dict[str, Any],
    timeout: float, failures: dict[int, str],
) -> dict[int, ConfigRecord]:
    """Send one stage of :mod:`fedgov.privacy.secagg` to ``ids``; the answers, and why the others did not answer."""
    content = ConfigRecord({P.KIND: P.SECAGG, P.SECAGG_STAGE: stage, "server-round": server_round, **stage_config, **extra})
    msgs = [Message(content=RecordDict({P.CONFIG: content}), message_type=MessageType.QUERY, dst_node_id=n) for n in ids]
    out: dict[int, ConfigRecord] = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error():
            failures[nid] = f"secure aggregation, stage {stage}: {(reply.error.reason or '')[:200]}"
        elif P.SECAGG in reply.content.config_records:
            out[nid] = reply.content.config_records[P.SECAGG]
    for n in ids:
        if n not in out:
            failures.setdefault(n, f"secure aggregation, stage {stage}: no reply within {timeout:.0f} s")
    return out


def secagg_setup(grid: Grid, ids: list[int], server_round: int, stage_config: dict[str, Any], timeout: float) -> tuple[SecAggRound | None, dict[int, str]]:
    """The keys and shares stages; None when fewer than 2 nodes gave keys or fewer than the
    threshold sent their shares (the round cannot be summed securely)."""
    failures: dict[int, str] = {}
    keys = secagg_stage(grid, ids, server_round, "keys", stage_config, {}, timeout, failures)
    pks = {n: (bytes(r["c-pk"]), bytes(r["s-pk"])) for n, r in keys.items()}  # type: ignore[arg-type]
    if len(pks) < 2:
        return None, failures
    order = sorted(pks)
    # Each node signed its keys with its identity key (fedgov.privacy.roster); the coordinator relays
    # the names and signatures, which every node checks against the roster it pins.
    names = {n: str(keys[n]["name"]) for n in order}
    seeds = Counter(bytes(keys[n]["graph-seed"]) for n in order)  # type: ignore[arg-type]
    seed = seeds.most_common(1)[0][0]  # the same at every node that pins the same roster
    shares = secagg_stage(grid, order, server_round, "shares", stage_config, {
        "nodes": [str(n) for n in order], "c-pks": [pks[n][0] for n in order], "s-pks": [pks[n][1] for n in order],
        "names": [names[n] for n in order], "sigs": [bytes(keys[n]["sig"]) for n in order],  # type: ignore[arg-type]
    }, timeout, failures)
    threshold = threshold_for(neighbourhood_size(len(order)) + 1)  # a group's majority (SecAgg+: each node's neighbours)
    if len(shares) < threshold:
        return None, failures
    routed: dict[int, dict[int, bytes]] = {}
    for src, rec in shares.items():
        for dst, ct in zip(_items(rec, "dst"), _items(rec, "ct"), strict=True):
            routed.setdefault(int(str(dst)), {})[src] = bytes(ct)
    return SecAggRound(pks=RoundKeys(pks, names, seed), survivors=sorted(shares), threshold=threshold, routed=routed,
                       failures=failures), failures


def secagg_unmask(
    grid: Grid, rnd: SecAggRound, masked: dict[int, np.ndarray], server_round: int, stage_config: dict[str, Any], timeout: float
) -> np.ndarray:
    """The unmask stage and the sum of ``masked`` (mod 2^32); :class:`SecAggError` when it cannot be had."""
    if len(masked) < rnd.threshold:
        raise SecAggError(f"only {len(masked)} masked inputs arrived, secure aggregation needs {rnd.threshold}")
    dropped = [n for n in rnd.survivors if n not in masked]
    survivors = [str(n) for n in sorted(masked)]
    # The consistency stage (Bonawitz et al. 2017, §4): each survivor signs the survivor list
    # once; the nodes reveal only for a list signed by at least the threshold of them.
    sigs = secagg_stage(grid, sorted(masked), server_round, "consistency", stage_config, {"survivors": survivors},
                        timeout, rnd.failures)
    if len(sigs) < rnd.threshold:
        raise SecAggError(f"only {len(sigs)} survivors signed the survivor list, secure aggregation needs {rnd.threshold}")
    signers = sorted(sigs)
    recs = secagg_stage(grid, signers, server_round, "unmask", stage_config, {
        "survivors": survivors, "dropped": [str(n) for n in dropped],
        "signers": [str(n) for n in signers], "sigs": [bytes(sigs[n]["sig"]) for n in signers],  # type: ignore[arg-type]
    }, timeout, rnd.failures)
    revealed = {h: {int(str(o)): bytes(sh) for o, sh in zip(_items(rec, "owner"), _items(rec, "share"), strict=True)}
                for h, rec in recs.items()}
    return unmask_sum(masked, revealed, pks=rnd.pks, dropped=dropped, threshold=rnd.threshold)


class SecureFedAvg(FedAvg):
    """FedAvg under secure aggregation (:mod:`fedgov.privacy.secagg`): the coordinator learns only the
    sum of the round's weighted updates and the sum of their weights, and moves the global
    model by their ratio. Each node's weight is ``min(rows, cap) / cap``
    (``training.secure_weight_cap``), so that no row count leaves a node.

    The protocol's stages run inside the round: ``keys`` and ``shares`` before the train
    messages go out (:meth:`configure_train`), ``unmask`` when the masked replies are in
    (:meth:`aggregate_train`). Fewer survivors than the threshold: the round is discarded
    (the global model does not move) and the report says why.
    """

    def __init__(
        self, *args: Any, stage_config: dict[str, str], params: SecAggParams, stage_timeout: float,
        distributed: DistributedPlan | None = None, dropout_tolerance: float = 0.0, **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.stage_config = stage_config
        self.params = params
        self.stage_timeout = stage_timeout
        self.distributed = distributed
        self.dropout_tolerance = dropout_tolerance
        self.min_contributors = 0
        self.stage_failures: dict[int, str] = {}
        self.discarded: dict[int, str] = {}
        self._secagg: SecAggRound | None = None
        self._global: dict[str, np.ndarray] = {}

    def start(self, *, grid: Grid, **kwargs: Any) -> Any:  # type: ignore[override]
        self._grid = grid
        return super().start(grid=grid, **kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Grid) -> Any:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self._secagg, self.stage_failures = secagg_setup(
            grid, [m.metadata.dst_node_id for m in msgs], server_round, self.stage_config, self.stage_timeout
        )
        if self._secagg is None:
            self.discarded[server_round] = "too few nodes completed the secure-aggregation set-up: round discarded"
            return []
        extra: dict[str, Any] = {}
        if self.distributed is not None:
            # Every noise share is sized for the nodes asked less the dropouts the task allows.
            n = len(self._secagg.survivors)
            self.min_contributors = max(1, n - math.floor(self.dropout_tolerance * n))
            extra = {"dd-min": self.min_contributors, "dd-z": self.distributed.noise_multiplier, "dd-scale": self.distributed.scale}
        out = []
        for m in msgs:
            dst = m.metadata.dst_node_id
            if dst not in self._secagg.survivors:
                continue
            # Flower's FedAvg gives every train message the same RecordDict: each node gets its own
            # (same model and config records) with the shares routed to it.
            content = RecordDict({k: v for k, v in m.content.items()})
            content[P.SECAGG] = self._secagg.record_for(dst, extra)
            out.append(Message(content=content, dst_node_id=dst, message_type=m.metadata.message_type, group_id=m.metadata.group_id))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [r for r in replies if not r.has_error() and P.MASKED in next(iter(r.content.array_records.values()), {})]
        rnd = self._secagg
        if rnd is None or not replies:
            if rnd is not None:
                self.discarded[server_round] = "no masked update arrived: round discarded"
            return None, None
        masked = {r.metadata.src_node_id: next(iter(r.content.array_records.values()))[P.MASKED].numpy().astype(np.int64) for r in replies}
        if self.distributed is not None and len(masked) < self.min_contributors:
            # Fewer noise shares than the noise was sized for: the sum would be under-noised.
            self.discarded[server_round] = (
                f"{len(masked)} nodes contributed, the noise shares were sized for at least {self.min_contributors} "
                f"(privacy.dropout_tolerance): round discarded, nothing released"
            )
            return None, None
        try:
            total = secagg_unmask(self._grid, rnd, masked, server_round, self.stage_config, self.stage_timeout)
        except SecAggError as exc:
            self.discarded[server_round] = f"{exc}: round discarded"
            return None, None
        if self.distributed is not None:
            # Under node-side sampling (rate q) the expected number of updates in the sum is q * m.
            mean = decode_mean(total, len(masked), self.distributed) / self.distributed.sample_rate
            new_d: dict[str, np.ndarray] = {}
            at = 0
            for k, g in self._global.items():  # the nodes flatten the update in the global model's order
                new_d[k] = (g.astype(np.float64) + mean[at : at + g.size].reshape(g.shape)).astype(g.dtype)
                at += g.size
            metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
            return ArrayRecord({k: Array(v) for k, v in new_d.items()}), metrics
        sums, weight = decode_sum(total, len(masked), [v.shape for v in self._global.values()], self.params)
        if weight <= 0:
            self.discarded[server_round] = "the nodes' weights sum to 0: round discarded"
            return None, None
        new = {k: (g.astype(np.float64) + s / weight).astype(g.dtype) for (k, g), s in zip(self._global.items(), sums, strict=True)}
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in new.items()}), metrics


def build_strategy(
    task: Task, n_nodes: int, recorder: _Recorder, *, round_offset: int = 0, stage_config: dict[str, str] | None = None,
    distributed: DistributedPlan | None = None,
) -> FedAvg:
    t = task.training
    p = task.privacy
    evals = task.evaluation.node_evaluations(t.rounds, enabled=p.mode == "local") if p.enabled else t.rounds
    fraction_evaluate = t.fraction_evaluate if evals else 0.0
    evaluate_rounds = {t.rounds} if evals == 1 else None
    kwargs: dict[str, Any] = dict(
        round_offset=round_offset,
        reply_timeout=t.reply_timeout,
        fraction_train=t.fraction_train,
        fraction_evaluate=fraction_evaluate,
        evaluate_rounds=evaluate_rounds,
        min_train_nodes=min(t.min_nodes, n_nodes),
        min_evaluate_nodes=min(t.min_nodes, n_nodes) if fraction_evaluate > 0 else 0,
        min_available_nodes=min(t.min_nodes, n_nodes),
        evaluate_metrics_aggr_fn=_metrics_aggr,
        train_metrics_aggr_fn=_metrics_aggr,
        recorder=recorder,
    )
    kwargs["max_update_norm"] = t.max_update_norm
    if t.secure_aggregation:
        if distributed is not None and t.fraction_train < 1:
            # Every node is asked every round: each flips its own secret coin (rate q) for whether
            # its update goes into the sum (clients.mods.secagg_mod), which the coordinator cannot see.
            kwargs["fraction_train"] = 1.0
        return _recording(SecureFedAvg)(
            stage_config=stage_config or {}, params=SecAggParams(clip=t.secure_clip), stage_timeout=t.reply_timeout,
            distributed=distributed, dropout_tolerance=task.privacy.dropout_tolerance, **kwargs,
        )
    if t.aggregation == "median":
        return _recording(FedMedian)(**kwargs)
    if t.aggregation == "trimmed-mean":
        return _recording(FedTrimmedAvg)(beta=t.trim_fraction, **kwargs)
    if t.aggregation == "krum":
        return _recording(Krum)(num_malicious_nodes=t.krum_bad_nodes, **kwargs)
    if t.strategy == "fedprox":
        return _recording(FedProx)(proximal_mu=t.proximal_mu, **kwargs)
    return _recording(FedAvg)(**kwargs)


def decode_updates(
    replies: list[Message], global_arrays: dict[str, np.ndarray] | None, *, name: Callable[[Message], str]
) -> tuple[list[Message], dict[str, str]]:
    """Turn each encoded update (:mod:`fedgov.transport`) back into the node's whole model, in
    place, so that screening and Flower's aggregation see models. A reply whose update does not
    fit the global model is left out with the reason; error replies pass through."""
    out: list[Message] = []
    bad: dict[str, str] = {}
    for m in replies:
        rec = None if m.has_error() else m.content.array_records.get(P.ARRAYS)
        if rec is None or not is_encoded(rec):
            out.append(m)
            continue
        try:
            if global_arrays is None:
                raise ValueError("no global model to add the update to")
            local = local_model(rec, global_arrays)
        except ValueError as exc:
            log.warning("round update of %s left out: %s", name(m), exc)
            bad[name(m)] = f"update could not be read: {exc}"
            continue
        m.content[P.ARRAYS] = ArrayRecord({k: Array(v) for k, v in local.items()})
        out.append(m)
    return out, bad


def screen_updates(
    replies: list[Message],
    global_arrays: dict[str, np.ndarray] | None,
    *,
    max_norm: float | None,
    name: Callable[[Message], str],
) -> tuple[list[Message], dict[str, str]]:
    """Split training replies into those to aggregate and those left out, with the reason
    (:func:`fedgov.coordinator.aggregation.check_update`). Error replies pass through (they are recorded
    as failures and ignored by the strategy)."""
    kept: list[Message] = []
    rejected: dict[str, str] = {}
    for m in replies:
        if m.has_error():
            kept.append(m)
            continue
        try:
            local = {k: v.numpy() for rec in m.content.array_records.values() for k, v in rec.items()}
            why = check_update(local, global_arrays, max_norm=max_norm)
        except Exception as exc:  # noqa: BLE001 - an unreadable update is rejected, not a crash
            why = f"update could not be read ({type(exc).__name__})"
        if why is None:
            kept.append(m)
        else:
            log.warning("round update of %s left out: %s", name(m), why)
            rejected[name(m)] = why
    return kept, rejected


class CentralEvaluator:
    """Evaluates the global model on the coordinator's held-out (public) test set."""

    def __init__(self, task: Task, contract: Contract, recorder: _Recorder, events: EventWriter) -> None:
        from fedgov.data import Encoder, read_table, validate_frame
        from fedgov.models import build_model

        self.recorder = recorder
        self.events = events
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
        if self.y is None or len(self.y) == 0:
            return None
        return float(np.bincount(self.y).max() / len(self.y))

    round_offset: int = 0
    after_round: Callable[[int, ArrayRecord], None] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        from fedgov.models import set_state
        from fedgov.models import evaluate

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


def run_training(
    grid: Grid,
    task: Task,
    contract: Contract,
    *,
    run_dir: Path,
    expected_nodes: int,
    task_file: str,
    federation: str,
    federation_file: str = "",
    mode: str = "simulation",
    connect_timeout: float = 120.0,
    reply_timeout: float = 600.0,
    local_baseline: bool = True,
    flower_run_id: int | None = None,
    resume: bool = False,
    crash_after_round: int | None = None,
) -> TrainingReport:
    """Run a training task over the nodes connected to ``grid``; write and return the report.

    After every round a checkpoint is written to ``run_dir/checkpoint`` (:mod:`fedgov.coordinator.checkpoint`).
    With ``resume``, the run continues from the last checkpoint in ``run_dir``: the nodes are
    asked again (and continue their reservation for the original run), the remaining rounds
    run from the saved model, and the report holds all rounds. ``crash_after_round`` ends the
    process abruptly after that round's checkpoint (fault injection for tests of resume).
    """
    import torch

    from fedgov.protocol import fingerprint
    from fedgov.coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from fedgov.models import build_model, get_state

    run_dir.mkdir(parents=True, exist_ok=True)
    events = EventWriter(run_dir / "events.jsonl")
    ckpt: Checkpoint | None = None
    ckpt_arrays: dict[str, np.ndarray] = {}
    if resume:
        ckpt, ckpt_arrays = load_checkpoint(run_dir)
    report = TrainingReport(
        fedgov_version=fedgov.__version__,
        run_id=run_dir.name,
        task=task.name,
        task_file=task_file,
        federation=federation,
        contract=contract.ref,
        mode=mode,  # type: ignore[arg-type]
        flower_run_id=flower_run_id,
        started=datetime.now(timezone.utc),
        model=task.model.name,
        strategy=task.training.strategy,
        rounds_planned=task.training.rounds,
        privacy={
            "enabled": task.privacy.enabled,
            "target_epsilon": task.privacy.target_epsilon,
            "delta": task.privacy.delta,
            "max_grad_norm": task.privacy.max_grad_norm,
            "accountant": task.privacy.accountant,
            "mode": task.privacy.mode,
            "unit": (
                "municipality (client-level DP-FedAvg: each node's clipped update with a share of distributed "
                "discrete Gaussian noise, summed under secure aggregation); a citizen's records are part of one "
                "municipality's data, so each citizen has at least the same guarantee"
                if task.privacy.mode == "distributed" else "record (sample-level DP-SGD at each node)"
            ),
            "dropout_tolerance": task.privacy.dropout_tolerance if task.privacy.mode == "distributed" else None,
            "secure_aggregation": task.training.secure_aggregation,
            "evaluation_at_nodes": task.evaluation.at_nodes if task.privacy.mode == "local" else "off",
            "evaluation_epsilon": task.evaluation.epsilon if task.privacy.mode == "local" else 0.0,
            "released_by_nodes": (
                "the masked update (secure aggregation)" if task.training.secure_aggregation else "the DP-SGD update"
            ) + ", and noisy correct/total counts for evaluations; no row counts, losses or per-node epsilon (their "
            "release gate keeps them)",
            "local_only_baseline": "simulation only, computed apart from each node's budget (what it would cost: the task's target)",
        },
    )
    report_path = run_dir / "report.json"

    def save() -> None:
        write_json_atomic(report_path, report.model_dump_json(indent=2))

    admitted_ids: list[int] = []
    # Interrupted (SIGTERM, Ctrl-C, the process ending): the nodes are not told the task
    # ended, so that their reservations stay open and the run can be resumed from its checkpoint.
    interrupted = True
    recorder: _Recorder | None = None
    evaluator: CentralEvaluator | None = None
    events.emit("started", task=task.name, mode=mode, flower_run_id=flower_run_id)
    task_run = str(flower_run_id) if flower_run_id is not None else ""
    try:
        extra: dict[str, str] = {}
        if ckpt is not None:
            if ckpt.task_fingerprint != fingerprint(task, contract):
                raise FederationError(
                    f"the checkpoint in {run_dir} is of another version of task {ckpt.task} "
                    f"(fingerprint {ckpt.task_fingerprint}); a changed task cannot be resumed"
                )
            if not ckpt.task_run:
                raise FederationError(f"the checkpoint in {run_dir} names no Flower run; it cannot be resumed")
            task_run = ckpt.task_run
            extra[P.TASK_RUN] = task_run
            events.emit("resumed", round=ckpt.round, rounds=task.training.rounds, task_run=task_run)
        node_ids = wait_for_nodes(grid, expected_nodes, connect_timeout)
        events.emit("nodes-connected", count=len(node_ids), expected=expected_nodes)
        answers = _hello(grid, node_ids, task, contract, timeout=reply_timeout, extra=extra)
        names = {nid: a.node for nid, a in answers.items()}
        for a in sorted(answers.values(), key=lambda a: a.node):
            report.nodes.append(
                NodeResult(
                    node=a.node,
                    name=a.node_name,
                    status="accepted" if a.accepted else "refused",
                    refusal_code=a.code,
                    refusal_reason=a.reason,
                    # the node's planned epsilon (the task's target, which its plan keeps), and its
                    # released row count (Gaussian noise, in its ledger) with the delta and noise
                    # multiplier computed from it
                    epsilon=a.planned_epsilon,
                    train_rows=a.train_rows,
                    delta=a.delta,
                    noise_multiplier=a.noise_multiplier,
                    evaluation_noise=a.evaluation_noise,
                )
            )
        admitted = [nid for nid, a in answers.items() if a.accepted]
        admitted_ids = admitted
        events.emit(
            "admission",
            accepted=sorted(names[n] for n in admitted),
            refused={a.node: f"{a.code or ''}: {a.reason}" for a in answers.values() if not a.accepted},
        )
        if len(admitted) < task.training.min_nodes:
            raise FederationError(
                f"only {len(admitted)} of {len(node_ids)} connected nodes accepted the task; "
                f"it needs at least {task.training.min_nodes} (training.min_nodes). "
                + "; ".join(f"{a.node}: {a.code or '?'} ({a.reason})" for a in answers.values() if not a.accepted)
            )

        recorder = _Recorder(names, events)
        evaluator = CentralEvaluator(task, contract, recorder, events)
        report.majority_rate = evaluator.majority_rate()
        done = 0
        if ckpt is not None:
            done = ckpt.round
            recorder.restore(ckpt.rounds, ckpt.node_train, ckpt.node_rounds, ckpt.node_eval)
            initial_state = ckpt_arrays
        else:
            initial = build_model(task.model, n_features=evaluator.encoder.n_features, n_classes=evaluator.encoder.n_classes, seed=task.training.seed)
            initial_state = get_state(initial)
        report.model_parameters = int(sum(np.asarray(v).size for v in initial_state.values()))
        dplan = None
        if task.privacy.enabled and task.privacy.mode == "distributed":
            from fedgov.privacy.plans import distributed_plan

            dplan = distributed_plan(task, report.model_parameters)
            report.privacy.update({
                "noise_multiplier": dplan.noise_multiplier, "update_clip": dplan.clip, "sample_rate": dplan.sample_rate,
                "planned_epsilon": dplan.planned_epsilon, "delta": dplan.delta,
            })
        strategy = build_strategy(
            task, len(admitted), recorder, round_offset=done, stage_config={**task_config(task, contract), **extra}, distributed=dplan,
        )
        evaluator.round_offset = done
        rec = recorder

        def checkpoint(r: int, arrays: ArrayRecord) -> None:
            report.rounds = [rec.rounds[k] for k in sorted(rec.rounds) if k > 0]
            state = Checkpoint(
                task=task.name, task_file=task_file, task_fingerprint=fingerprint(task, contract),
                federation=federation_file or federation, mode=mode, task_run=task_run, round=r,
                rounds_planned=task.training.rounds, strategy=type(strategy).__name__.removeprefix("Recording"),
                nodes_admitted=sorted(names[n] for n in admitted), nodes=report.nodes, rounds=report.rounds,
                majority_rate=report.majority_rate, model_file="", model_sha256="", **rec.state(),
            )
            save_checkpoint(run_dir, state, {k: v.numpy() for k, v in arrays.items()})
            events.emit("checkpoint", round=r)
            if crash_after_round is not None and r == crash_after_round:
                log.error("fault injection: the coordinator ends abruptly after round %d", r)
                os._exit(86)

        evaluator.after_round = checkpoint
        cfg = ConfigRecord({**task_config(task, contract), **extra, "num-rounds": task.training.rounds})
        events.emit("training-start", nodes=len(admitted), rounds=task.training.rounds, first_round=done + 1)
        result = strategy.start(
            grid=AdmittedGrid(grid, admitted, min_nodes=min(task.training.min_nodes, len(admitted)), patience=connect_timeout),
            initial_arrays=ArrayRecord({k: Array(np.asarray(v)) for k, v in initial_state.items()}),
            num_rounds=task.training.rounds - done,
            timeout=reply_timeout,
            train_config=cfg,
            evaluate_config=ConfigRecord(dict(cfg)),
            evaluate_fn=evaluator,
        )
        _collect(report, recorder, evaluator)
        if local_baseline:
            events.emit("baselines", nodes=len(admitted))
            _baselines(grid, admitted, names, task, contract, report, timeout=reply_timeout, extra=extra)
        final_state = {k: torch.from_numpy(np.array(v.numpy())) for k, v in result.arrays.items()}
        torch.save(final_state, run_dir / "model.pt")
        report.artifacts["model"] = "model.pt"
        report.status = "completed"
        interrupted = False
    except Exception as exc:  # the report must say what happened, whatever it was
        interrupted = False
        log.exception("training task failed")
        if recorder is not None and evaluator is not None and not report.rounds:
            _collect(report, recorder, evaluator)
        report.status = "failed"
        report.message = str(exc)
        events.emit("failed", message=str(exc))
    finally:
        if admitted_ids and not interrupted:
            _end(grid, admitted_ids, task, contract, extra=extra)
        if interrupted:
            done_rounds = max((r.round for r in report.rounds), default=0)
            report.status = "failed"
            report.message = (
                f"the coordinator was interrupted after round {done_rounds}; the nodes keep the task open: continue with "
                f"'fedgov run --resume {run_dir}' (simulation) or 'fedgov task resume {run_dir}' (deployment)"
            )
        report.finished = datetime.now(timezone.utc)
        report.wall_seconds = (report.finished - report.started).total_seconds()
        report.artifacts["events"] = "events.jsonl"
        save()
        events.emit("report", path=str(report_path), status=report.status)
    return report


def _collect(report: TrainingReport, recorder: _Recorder, evaluator: CentralEvaluator) -> None:
    """Copy what the strategy saw (rounds, each node's epsilon and accuracy) into the report;
    also after a failure, so that a stopped run still shows the rounds it completed."""
    report.rounds = [recorder.rounds[r] for r in sorted(recorder.rounds) if r > 0]
    for nr in report.nodes:
        nr.rounds_trained = recorder.node_rounds.get(nr.node, 0)
        ev = recorder.node_eval.get(nr.node)
        if ev:
            nr.federated_accuracy = ev.get("accuracy")
            total = ev.get("total")
            if nr.evaluation_noise is not None and total and total > 0 and nr.federated_accuracy is not None:
                # Var(c~/t~) ~ s^2 (1 + acc^2) / t^2 with s = z sqrt(2) the noise sd on each count
                nr.federated_accuracy_sd = nr.evaluation_noise * math.sqrt(2.0 * (1.0 + nr.federated_accuracy**2)) / total
            auc = ev.get("auc")
            nr.federated_auc = None if auc is None or math.isnan(auc) else auc
        if nr.status == "accepted" and nr.rounds_trained == 0:
            nr.status = "failed"
    last = report.rounds[-1] if report.rounds else None
    if last is not None and last.accuracy is not None:
        report.final = GlobalMetrics(accuracy=last.accuracy, loss=last.loss or 0.0, auc=last.auc, n=0 if evaluator.y is None else len(evaluator.y))


def _end(
    grid: Grid, node_ids: list[int], task: Task, contract: Contract, timeout: float = 60.0, extra: dict[str, str] | None = None
) -> None:
    """Tell the nodes the task has ended, so that they release what they reserved and did not
    spend. Best effort: a node that does not hear it keeps the reservation (never hands back)."""
    content = ConfigRecord({P.KIND: P.END, **task_config(task, contract), **(extra or {})})
    msgs = [Message(content=RecordDict({P.CONFIG: content}), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    try:
        list(grid.send_and_receive(msgs, timeout=timeout))
    except Exception:  # noqa: BLE001
        log.warning("could not tell every node that the task ended", exc_info=True)


def _baselines(
    grid: Grid, admitted: list[int], names: dict[int, str], task: Task, contract: Contract,
    report: TrainingReport, *, timeout: float, extra: dict[str, str] | None = None,
) -> None:
    """Ask each node for its local-only model's accuracy (same model, same DP budget)."""
    content = ConfigRecord({P.KIND: P.BASELINE, **task_config(task, contract), **(extra or {})})
    msgs = [
        Message(content=RecordDict({P.CONFIG: content}), message_type=MessageType.QUERY, dst_node_id=nid)
        for nid in admitted
    ]
    by_node = {n.node: n for n in report.nodes}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        nr = by_node.get(names.get(reply.metadata.src_node_id, ""))
        if nr is None or reply.has_error():
            continue
        mr = next(iter(reply.content.metric_records.values()))
        nr.local_only_accuracy = float(mr["accuracy"])  # type: ignore[arg-type]
        nr.local_only_epsilon = float(mr["epsilon"])  # type: ignore[arg-type]
        if nr.federated_accuracy is not None:
            nr.gain = nr.federated_accuracy - nr.local_only_accuracy
