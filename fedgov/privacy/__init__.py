"""Differential privacy for fedgov: accounting (pure math) for node-level DP-SGD.

The ledger of a node is a list of ``(noise_multiplier, sample_rate, steps)`` entries; epsilon
is always that of the whole ledger. See :mod:`fedgov.privacy.accounting`.
"""

from fedgov.privacy.accounting import (
    ACCOUNTANTS,
    DPPlan,
    HistoryEntry,
    calibrate_noise,
    epsilon_for,
    epsilon_from_history,
    merge_history,
    plan_node_dp,
    poisson_batches,
)

__all__ = [
    "ACCOUNTANTS",
    "DPPlan",
    "HistoryEntry",
    "calibrate_noise",
    "epsilon_for",
    "epsilon_from_history",
    "merge_history",
    "plan_node_dp",
    "poisson_batches",
]
