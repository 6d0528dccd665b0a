"""Differential privacy and secure aggregation for fedgov, shared by node and coordinator: pure
math and value objects, no messages.

* :mod:`~fedgov.privacy.accounting`: epsilon of a ledger of DP-SGD steps (Opacus' PRV and RDP
  accountants as calculators), noise calibration, a node's DP-SGD plan;
* :mod:`~fedgov.privacy.plans`: the plans a task implies, computed alike at every node and at
  the coordinator;
* :mod:`~fedgov.privacy.distributed`: distributed DP (each node's discrete Gaussian share of the
  noise, the decoded mean);
* :mod:`~fedgov.privacy.dpsgd`: per-sample clipping and noise for DP-SGD (its ``poisson_batches``,
  batches of row indices, is reached as ``fedgov.privacy.dpsgd.poisson_batches``: the package's
  is the accounting one);
* :mod:`~fedgov.privacy.rng`: the random numbers of DP, from AES-256-CTR;
* :mod:`~fedgov.privacy.secagg`, :mod:`~fedgov.privacy.shamir`, :mod:`~fedgov.privacy.roster`:
  secure aggregation, its secret sharing and the signed roster of its members.

A name is imported from its module when first used (PEP 562), so that a node or a command that
needs only the roster or the accountant does not import torch (:mod:`~fedgov.privacy.rng` does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedgov._lazy import lazy_exports

if TYPE_CHECKING:
    from fedgov.privacy.accounting import (
        ACCOUNTANTS,
        AccountantName,
        DPPlan,
        HistoryEntry,
        calibrate_noise,
        epsilon_for,
        epsilon_from_history,
        merge_history,
        plan_node_dp,
        poisson_batches,
    )
    from fedgov.privacy.distributed import (
        DistributedPlan,
        TAU_LIMIT,
        clip_update,
        decode_mean,
        discrete_gaussian,
        encode_share,
        epsilon_distributed,
        plan_distributed,
        tau,
    )
    from fedgov.privacy.dpsgd import (
        FusedClipper,
        FusedStep,
        clipped_grad_sum,
        fused_supported,
        noised_mean_grad,
        poisson_indices,
    )
    from fedgov.privacy.events import Mechanism
    from fedgov.privacy.plans import (
        distributed_plan,
        node_evaluations,
        node_plan,
        task_delta,
    )
    from fedgov.privacy.rng import (
        KEY_BYTES,
        RandomSource,
        SecureRNG,
        draw_normal,
        draw_uniform,
    )
    from fedgov.privacy.roster import (
        AUTHORITY_KEY,
        IDENTITY_KEY,
        IDENTITY_PUB,
        Member,
        Roster,
        RosterError,
        authority_matches,
        consistency_message,
        ensure_identity,
        federation_roster,
        fingerprint,
        keys_message,
        load_pinned,
        load_private_key,
        load_roster_file,
        make_roster,
        new_authority,
        public_key_of,
        read_public_key,
        save_roster_file,
        sign,
        verify,
    )
    from fedgov.privacy.secagg import (
        MODULUS_BITS,
        NodeSecAgg,
        RoundKeys,
        SecAggError,
        SecAggParams,
        decode_sum,
        encode_update,
        neighbourhood_size,
        neighbours,
        prg,
        roster_graph_seed,
        threshold_for,
        unmask_sum,
    )
    from fedgov.privacy.shamir import (
        ShareError,
        combine_shares,
        combine_shares_many,
        lagrange_at_zero,
        share_index,
    )

_EXPORTS: dict[str, tuple[str, ...]] = {
    "accounting": (
        "ACCOUNTANTS", "AccountantName", "DPPlan", "HistoryEntry", "calibrate_noise", "epsilon_for",
        "epsilon_from_history", "merge_history", "plan_node_dp", "poisson_batches",
    ),
    "distributed": (
        "DistributedPlan", "TAU_LIMIT", "clip_update", "decode_mean", "discrete_gaussian", "encode_share",
        "epsilon_distributed", "plan_distributed", "tau",
    ),
    "dpsgd": (
        "FusedClipper", "FusedStep", "clipped_grad_sum", "fused_supported", "noised_mean_grad", "poisson_indices",
    ),
    "events": ("Mechanism",),
    "plans": (
        "distributed_plan", "node_evaluations", "node_plan", "task_delta",
    ),
    "rng": (
        "KEY_BYTES", "RandomSource", "SecureRNG", "draw_normal", "draw_uniform",
    ),
    "roster": (
        "AUTHORITY_KEY", "IDENTITY_KEY", "IDENTITY_PUB", "Member", "Roster", "RosterError", "authority_matches",
        "consistency_message", "ensure_identity", "federation_roster", "fingerprint", "keys_message", "load_pinned",
        "load_private_key", "load_roster_file", "make_roster", "new_authority", "public_key_of", "read_public_key",
        "save_roster_file", "sign", "verify",
    ),
    "secagg": (
        "MODULUS_BITS", "NodeSecAgg", "RoundKeys", "SecAggError", "SecAggParams", "decode_sum", "encode_update",
        "neighbourhood_size", "neighbours", "prg", "roster_graph_seed", "threshold_for", "unmask_sum",
    ),
    "shamir": (
        "ShareError", "combine_shares", "combine_shares_many", "lagrange_at_zero", "share_index",
    ),
}
"""Each public name, by the module that defines it (read by :func:`__getattr__`)."""

__all__ = [
    "Mechanism",
    "ACCOUNTANTS",
    "AUTHORITY_KEY",
    "AccountantName",
    "DPPlan",
    "DistributedPlan",
    "FusedClipper",
    "FusedStep",
    "HistoryEntry",
    "IDENTITY_KEY",
    "IDENTITY_PUB",
    "KEY_BYTES",
    "MODULUS_BITS",
    "Member",
    "NodeSecAgg",
    "RandomSource",
    "Roster",
    "RosterError",
    "RoundKeys",
    "SecAggError",
    "SecAggParams",
    "SecureRNG",
    "ShareError",
    "TAU_LIMIT",
    "authority_matches",
    "calibrate_noise",
    "clip_update",
    "clipped_grad_sum",
    "combine_shares",
    "combine_shares_many",
    "consistency_message",
    "decode_mean",
    "decode_sum",
    "discrete_gaussian",
    "distributed_plan",
    "draw_normal",
    "draw_uniform",
    "encode_share",
    "encode_update",
    "ensure_identity",
    "epsilon_distributed",
    "epsilon_for",
    "epsilon_from_history",
    "federation_roster",
    "fingerprint",
    "fused_supported",
    "keys_message",
    "lagrange_at_zero",
    "load_pinned",
    "load_private_key",
    "load_roster_file",
    "make_roster",
    "merge_history",
    "neighbourhood_size",
    "neighbours",
    "new_authority",
    "node_evaluations",
    "node_plan",
    "noised_mean_grad",
    "plan_distributed",
    "plan_node_dp",
    "poisson_batches",
    "poisson_indices",
    "prg",
    "public_key_of",
    "read_public_key",
    "roster_graph_seed",
    "save_roster_file",
    "share_index",
    "sign",
    "task_delta",
    "tau",
    "threshold_for",
    "unmask_sum",
    "verify",
]

if not TYPE_CHECKING:  # type checkers read the imports above; a __getattr__ would hide typos from them
    __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
