"""The coordinator's side of secure aggregation: the protocol's stages, and FedAvg under it.

The protocol is :mod:`fedgov.privacy.secagg` (SecAgg+: Bonawitz et al. 2017,
arXiv:1611.04482; Bell et al. 2020, arXiv:2005.11273). The coordinator only relays: it asks
every node for its keys (``keys``), routes the encrypted shares between them (``shares``),
collects the masked inputs (with the train or statistics message), has the survivors sign the
survivor list (``consistency``) and asks them for the shares that remove the masks
(``unmask``). It learns the sum of the inputs, never one of them.

:func:`secagg_setup` and :func:`secagg_unmask` are shared by training (:class:`SecureFedAvg`)
and statistics queries (:mod:`fedgov.coordinator.statistics`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedgov import protocol as P
from fedgov.errors import SecAggError
from fedgov.privacy.distributed import DistributedPlan, decode_mean
from fedgov.privacy.secagg import RoundKeys, SecAggParams, decode_sum, neighbourhood_size, threshold_for, unmask_sum

__all__ = ["SecAggRound", "SecureFedAvg", "secagg_setup", "secagg_stage", "secagg_unmask"]


def _items(rec: ConfigRecord, key: str) -> list[Any]:
    """A list value of a record (a single value as a list of one)."""
    v = rec[key]
    return list(v) if isinstance(v, list) else [v]


def _bytes(rec: ConfigRecord, key: str) -> bytes:
    """A bytes value of a node's record (keys, signatures); a TypeError for anything else."""
    v = rec[key]
    if not isinstance(v, bytes):
        raise TypeError(f"secure aggregation: '{key}' is {type(v).__name__}, not bytes")
    return v


@dataclass
class SecAggRound:
    """The coordinator's view of one round of secure aggregation after the keys and shares stages."""

    pks: RoundKeys  # node id -> (c, s) public keys, with the roster names and the graph seed
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
    pks = {n: (_bytes(r, "c-pk"), _bytes(r, "s-pk")) for n, r in keys.items()}
    if len(pks) < 2:
        return None, failures
    order = sorted(pks)
    # Each node signed its keys with its identity key (fedgov.privacy.roster); the coordinator relays
    # the names and signatures, which every node checks against the roster it pins.
    names = {n: str(keys[n]["name"]) for n in order}
    seeds = Counter(_bytes(keys[n], "graph-seed") for n in order)
    seed = seeds.most_common(1)[0][0]  # the same at every node that pins the same roster
    shares = secagg_stage(grid, order, server_round, "shares", stage_config, {
        "nodes": [str(n) for n in order], "c-pks": [pks[n][0] for n in order], "s-pks": [pks[n][1] for n in order],
        "names": [names[n] for n in order], "sigs": [_bytes(keys[n], "sig") for n in order],
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
        "signers": [str(n) for n in signers], "sigs": [_bytes(sigs[n], "sig") for n in signers],
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
    (the global model does not move) and :attr:`discarded` says why.
    """

    def __init__(
        self, *, stage_config: dict[str, str], params: SecAggParams, stage_timeout: float,
        distributed: DistributedPlan | None = None, dropout_tolerance: float = 0.0, server_momentum: float = 0.0,
        **fedavg: Any,
    ) -> None:
        super().__init__(**fedavg)
        self.server_momentum = server_momentum
        # FedAvgM's momentum on the decoded mean update: post-processing of the released sum
        self._velocity: dict[str, np.ndarray] | None = None
        self.stage_config = stage_config
        self.params = params
        self.stage_timeout = stage_timeout
        self.distributed = distributed
        self.dropout_tolerance = dropout_tolerance
        self.min_contributors = 0
        # Per round: the nodes that failed a set-up stage (and why), and why a round was discarded.
        self.stage_failures: dict[int, str] = {}
        self.discarded: dict[int, str] = {}
        self._secagg: SecAggRound | None = None
        self._global: dict[str, np.ndarray] = {}
        self._grid: Grid | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._grid = grid  # the unmask stage of this round goes through the same grid
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
        assert self._grid is not None  # configure_train of this round set it
        try:
            total = secagg_unmask(self._grid, rnd, masked, server_round, self.stage_config, self.stage_timeout)
        except SecAggError as exc:
            self.discarded[server_round] = f"{exc}: round discarded"
            return None, None
        new = self._distributed_model(total, len(masked)) if self.distributed is not None else self._weighted_model(total, len(masked), server_round)
        if new is None:
            return None, None
        new = self._with_momentum(new)
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)
        return ArrayRecord({k: Array(v) for k, v in new.items()}), metrics

    def _with_momentum(self, new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """FedAvgM (Hsu et al. 2019) on the round's mean update ``new - global``: ``v = beta v + update``,
        the global model moved by ``v``. With ``server_momentum`` 0, ``new`` itself."""
        if self.server_momentum <= 0:
            return new
        update = {k: new[k].astype(np.float64) - g.astype(np.float64) for k, g in self._global.items()}
        if self._velocity is None:
            self._velocity = update
        else:
            self._velocity = {k: self.server_momentum * self._velocity[k] + u for k, u in update.items()}
        return {k: (g.astype(np.float64) + self._velocity[k]).astype(g.dtype) for k, g in self._global.items()}

    def _distributed_model(self, total: np.ndarray, contributors: int) -> dict[str, np.ndarray]:
        """The global model moved by the decoded mean of a distributed-DP sum."""
        assert self.distributed is not None
        # Under node-side sampling (rate q) the expected number of updates in the sum is q * m.
        mean = decode_mean(total, contributors, self.distributed) / self.distributed.sample_rate
        new: dict[str, np.ndarray] = {}
        at = 0
        for k, g in self._global.items():  # the nodes flatten the update in the global model's order
            new[k] = (g.astype(np.float64) + mean[at : at + g.size].reshape(g.shape)).astype(g.dtype)
            at += g.size
        return new

    def _weighted_model(self, total: np.ndarray, contributors: int, server_round: int) -> dict[str, np.ndarray] | None:
        """The global model moved by the sum of weighted updates over the sum of weights; None
        (and the round discarded) when the weights sum to 0."""
        sums, weight = decode_sum(total, contributors, [v.shape for v in self._global.values()], self.params)
        if weight <= 0:
            self.discarded[server_round] = "the nodes' weights sum to 0: round discarded"
            return None
        return {k: (g.astype(np.float64) + s / weight).astype(g.dtype) for (k, g), s in zip(self._global.items(), sums, strict=True)}
