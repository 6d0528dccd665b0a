"""What the coordinator accepts from a node before aggregating it: a pure check per update.

A node's training reply carries its new local model. Before the strategy averages it, the
coordinator checks it against the global model it sent that round
(:func:`check_update`): the same arrays with the same shapes, every value finite, and, when
the task sets ``training.max_update_norm``, an update (local model minus global model) no
longer than that in L2 norm over all arrays. A reply that fails is left out of the round and
named in the report with the reason (``RoundMetrics.nodes_rejected``); the others are
aggregated as usual. This stops broken exports and crude poisoning (NaN, scaled updates);
robust aggregation (``training.aggregation``: median, trimmed mean, Krum) limits what a
subtler attacker can do. No I/O here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["check_update", "update_norm"]


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
