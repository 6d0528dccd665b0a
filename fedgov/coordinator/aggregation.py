"""What the coordinator accepts from a node before aggregating it: a pure check per update.

A node's training reply carries its new local model. Before the strategy averages it, the
coordinator checks it against the global model it sent that round
(:func:`check_update`): the same arrays with the same shapes, every value finite, and, when
the task sets ``training.max_update_norm``, an update (local model minus global model) no
longer than that in L2 norm over all arrays. A reply that fails is left out of the round and
named in the report with the reason (``RoundMetrics.nodes_rejected``); the others are
aggregated as usual. This stops broken exports and crude poisoning (NaN, scaled updates);
robust aggregation (``training.aggregation``: median, trimmed mean, Krum) limits what a
subtler attacker can do.

The functions here work on records and arrays only, as Flower's own
``flwr/serverapp/strategy/strategy_utils.py`` does: :func:`aggregate_metrics` (the strategies'
metric aggregation), :func:`decode_updates` (encoded updates back into whole models) and
:func:`screen_updates` (the replies to aggregate and those left out, with the reason). They
send nothing and read no file; the strategies and :mod:`fedgov.coordinator.recording` call them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedgov import protocol as P
from fedgov.transport import is_encoded, local_model

__all__ = [
    "aggregate_metrics",
    "check_update",
    "decode_updates",
    "metric_values",
    "screen_updates",
    "update_norm",
    "weighted_nanmean",
]

log = logging.getLogger(__name__)


def update_norm(local: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``local - reference`` over all arrays (they must have the same keys and shapes)."""
    total = 0.0
    for k, ref in reference.items():
        d = np.asarray(local[k], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(d * d))
    return math.sqrt(total)


def check_update(
    local: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    *,
    max_norm: float | None = None,
) -> str | None:
    """Why ``local`` must not be aggregated, or None when it may.

    ``reference`` is the global model of the round (None: only finiteness is checked).
    """
    for k, a in local.items():
        arr = np.asarray(a)
        if not np.issubdtype(arr.dtype, np.number):
            return f"array '{k}' is not numeric ({arr.dtype})"
        if not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            return f"array '{k}' holds {bad} NaN or infinite value(s)"
    if reference is None:
        return None
    missing = sorted(set(reference) - set(local))
    extra = sorted(set(local) - set(reference))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        return "arrays do not match the global model: " + "; ".join(parts)
    for k, ref in reference.items():
        if tuple(np.shape(local[k])) != tuple(np.shape(ref)):
            return f"array '{k}' has shape {tuple(np.shape(local[k]))}, the global model has {tuple(np.shape(ref))}"
    if max_norm is not None:
        norm = update_norm(local, reference)
        if norm > max_norm:
            return f"update norm {norm:.4g} is above the task's bound of {max_norm:g} (training.max_update_norm)"
    return None


def weighted_nanmean(pairs: Iterable[tuple[float, float]]) -> float | None:
    """The weighted mean of ``(value, weight)`` pairs, leaving out NaN values and weights that
    are not positive; None when nothing is left."""
    ok = [(v, w) for v, w in pairs if not math.isnan(v) and w > 0]
    total = sum(w for _, w in ok)
    return sum(v * w for v, w in ok) / total if total else None


def metric_values(record: MetricRecord) -> dict[str, float]:
    """The scalar metrics of ``record`` as floats (lists of values are left out)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric, skipping NaN (an AUC a node could not compute).

    The signature of Flower's ``train_metrics_aggr_fn`` and ``evaluate_metrics_aggr_fn``;
    each record's first MetricRecord is read, and ``weight_key`` in it is the weight.
    """
    sums: dict[str, list[tuple[float, float]]] = {}
    for rd in records:
        values = metric_values(next(iter(rd.metric_records.values())))
        w = values[weight_key]
        for k, v in values.items():
            if k != weight_key:
                sums.setdefault(k, []).append((v, w))
    out = MetricRecord()
    for k, pairs in sums.items():
        m = weighted_nanmean(pairs)
        if m is not None:
            out[k] = m
    return out


def decode_updates(
    replies: list[Message], global_arrays: Mapping[str, np.ndarray] | None, *, name: Callable[[Message], str]
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
        # in the global model's order: Flower's FedAvgM pairs its arrays with the aggregate's by position
        order = list(global_arrays) if set(global_arrays) == set(local) else list(local)
        m.content[P.ARRAYS] = ArrayRecord({k: Array(local[k]) for k in order})
        out.append(m)
    return out, bad


def screen_updates(
    replies: list[Message],
    global_arrays: Mapping[str, np.ndarray] | None,
    *,
    max_norm: float | None,
    name: Callable[[Message], str],
) -> tuple[list[Message], dict[str, str]]:
    """Split training replies into those to aggregate and those left out, with the reason
    (:func:`check_update`). Error replies pass through (they are recorded as failures and
    ignored by the strategy)."""
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
