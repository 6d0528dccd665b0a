"""The node: everything a municipality runs next to its own data.

The node decides; the coordinator only asks. Its modules, by what they hold:

* its directory and files: :mod:`~fedgov.node.home` (the node directory), :mod:`~fedgov.node.policy`
  (the policy file and its ordered rules), :mod:`~fedgov.node.contracts` (the contracts it pins,
  its data checks), :mod:`~fedgov.node.state` (approvals, pause, secure-aggregation records),
  :mod:`~fedgov.node.audit` (the hash-chained audit log);
* the privacy budget: :mod:`~fedgov.node.budget` (frozen events, composition and the rule a
  spend must meet, pure) and :mod:`~fedgov.node.ledger` (the SQLite store that asks it);
* what it does with a task or query: :mod:`~fedgov.node.admission` (policy, approval,
  reservation), :mod:`~fedgov.node.rounds` (its data, DP-SGD plan, rounds and evaluation),
  :mod:`~fedgov.node.training` (one round of DP-SGD, free of Flower and files),
  :mod:`~fedgov.node.spend` (what a round or evaluation may spend, resend or refuse after a
  restart), :mod:`~fedgov.node.secure` (secure aggregation and distributed DP),
  :mod:`~fedgov.node.statistics` (a statistics query), :mod:`~fedgov.node.gate` and
  :mod:`~fedgov.node.refusals` (what may leave it);
* :mod:`~fedgov.node.context`: the one module that reads Flower messages, for the ClientApp's
  handlers and mods (``clients/``), which parse, call one function here and reply.

The public names of these modules are re-exported here (``fedgov.node.NodeHome``). They are
loaded on first use: importing :mod:`fedgov.node` or one of its light modules (the policy, the
ledger) does not load PyTorch. The modules import each other directly, never this package.
Errors are in :mod:`fedgov.errors`; the file-format constants (``APPLICATION``,
``SCHEMA_VERSION``, ``FILENAME``) stay in their modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedgov._lazy import lazy_exports

if TYPE_CHECKING:
    from fedgov.node.admission import (
        admit, after_hello, audit_decision, awaiting_approval, before_hello, check_admitted, dataset_name,
        evaluated_rounds, EVALUATION_NOTE, hello_refusal, is_admitted, node_display_name, precheck, public_answer, public_hello,
        public_reason, query_gate_context, record_evaluation, record_spend, release, released_counts, spent,
        spent_history, stop_blocked, task_gate_context,
    )
    from fedgov.node.audit import (
        as_finite, AuditEntry, AuditLog, AuditVerification, canonical_json, entry_hash, GENESIS_HASH,
        MAX_PAYLOAD_BYTES,
    )
    from fedgov.node.budget import (
        Budget, BudgetStatus, check_spend, check_within_reservation, compose, LedgerEvent, Mechanism, SpendCheck,
        TaskState,
    )
    from fedgov.node.context import (
        config_float, config_int, data_of, kind_of, node_of, query_of, task_id, task_of,
    )
    from fedgov.node.contracts import (
        add_contract, append_private, check_all, check_dataset, check_received, conforming_frame, contract_sha256,
        ContractCheck,
        CONTRACTS_DIR, current_home, data_status, DataCheck, held_contracts, one_read, pin_new_contract, read_text,
        report_path, REPORTS_DIR, serving, validated_frame,
    )
    from fedgov.node.gate import (
        check_reply, DECLARATION, ERROR_KIND, GateContext, Release, table_markdown,
    )
    from fedgov.node.home import (
        budget_of, init_node, NodeHome,
    )
    from fedgov.node.ledger import (
        PrivacyLedger,
    )
    from fedgov.node.policy import (
        AcceptSpec, BudgetSpec, check_query, check_task, ContractPin, DatasetSpec, decide, Decision,
        default_policy_text, file_sha256, KINDS, LimitsSpec, load_policy, MIN_ROWS_LOCAL, min_rows_for, NodePolicy, pin_contract_text,
        PolicyCode, Proposal, Rule, RULES, secure_aggregation_text, SecureAggregationSpec, STRATEGIES,
    )
    from fedgov.node.personal import (
        ensure_personal, MIN_VALIDATION_ROWS, personal_test_accuracy, personalise, PersonalModel, PersonalModels,
        PersonalRecord, validation_split,
    )
    from fedgov.node.refusals import (
        error_reason, is_allowed, PARAMS, parse_error_reason, Refusal, refusal_text, TEMPLATES,
    )
    from fedgov.node.rounds import (
        Baseline, baseline, describe_error, DPState, evaluate_global, hello, local_only_baseline, model_digest,
        model_dimension, prepare, PreparedData, public_row_count, released_row_count, ROW_COUNT_NOISE, ROWS_NOTE,
        SentUpdates, train,
    )
    from fedgov.node.secure import (
        check_distributed, Identity, keep_keys, mask_release, mask_update, node_identity, NoRoster, receive_shares,
        run_stage, RunState, secagg_graph_key, secagg_key, SECAGG_STAGES, secure_coin, StageRequest,
    )
    from fedgov.node.spend import (
        after_train, before_evaluation, before_train, end_task, Resend,
    )
    from fedgov.node.state import (
        DataCheckRecord, NodeState, PendingTask, TaskStatus,
    )
    from fedgov.node.statistics import (
        answer_query, mechanism_of, query_fingerprint, query_id_of, read_node_frame,
    )
    from fedgov.node.training import (
        fine_tune, FineTuned, RoundResult, train_dp_round, train_nonprivate_round,
    )

_MODULES: dict[str, tuple[str, ...]] = {
    "admission": (
        "admit", "after_hello", "audit_decision", "awaiting_approval", "before_hello", "check_admitted",
        "dataset_name", "evaluated_rounds", "EVALUATION_NOTE", "hello_refusal", "is_admitted", "node_display_name", "precheck",
        "public_answer", "public_hello", "public_reason", "query_gate_context", "record_evaluation", "record_spend",
        "release", "released_counts", "spent", "spent_history", "stop_blocked", "task_gate_context",
    ),
    "audit": (
        "as_finite", "AuditEntry", "AuditLog", "AuditVerification", "canonical_json", "entry_hash", "GENESIS_HASH",
        "MAX_PAYLOAD_BYTES",
    ),
    "budget": (
        "Budget", "BudgetStatus", "check_spend", "check_within_reservation", "compose", "LedgerEvent", "Mechanism",
        "SpendCheck", "TaskState",
    ),
    "context": (
        "config_float", "config_int", "data_of", "kind_of", "node_of", "query_of", "task_id", "task_of",
    ),
    "contracts": (
        "add_contract", "append_private", "check_all", "check_dataset", "check_received", "conforming_frame",
        "contract_sha256",
        "ContractCheck", "CONTRACTS_DIR", "current_home", "data_status", "DataCheck", "held_contracts", "one_read",
        "pin_new_contract", "read_text", "report_path", "REPORTS_DIR", "serving", "validated_frame",
    ),
    "gate": (
        "check_reply", "DECLARATION", "ERROR_KIND", "GateContext", "Release", "table_markdown",
    ),
    "home": (
        "budget_of", "init_node", "NodeHome",
    ),
    "ledger": (
        "PrivacyLedger",
    ),
    "policy": (
        "AcceptSpec", "BudgetSpec", "check_query", "check_task", "ContractPin", "DatasetSpec", "decide", "Decision",
        "default_policy_text", "file_sha256", "KINDS", "LimitsSpec", "load_policy", "MIN_ROWS_LOCAL", "min_rows_for", "NodePolicy",
        "pin_contract_text",
        "PolicyCode", "Proposal", "Rule", "RULES", "secure_aggregation_text", "SecureAggregationSpec", "STRATEGIES",
    ),
    "personal": (
        "ensure_personal", "MIN_VALIDATION_ROWS", "personal_test_accuracy", "personalise", "PersonalModel", "PersonalModels",
        "PersonalRecord", "validation_split",
    ),
    "refusals": (
        "error_reason", "is_allowed", "PARAMS", "parse_error_reason", "Refusal", "refusal_text", "TEMPLATES",
    ),
    "rounds": (
        "Baseline", "baseline", "describe_error", "DPState", "evaluate_global", "hello", "local_only_baseline",
        "model_digest", "model_dimension", "prepare", "PreparedData", "public_row_count", "released_row_count",
        "ROW_COUNT_NOISE",
        "ROWS_NOTE", "SentUpdates", "train",
    ),
    "secure": (
        "check_distributed", "Identity", "keep_keys", "mask_release", "mask_update", "node_identity", "NoRoster",
        "receive_shares", "run_stage", "RunState", "secagg_graph_key", "secagg_key", "SECAGG_STAGES", "secure_coin",
        "StageRequest",
    ),
    "spend": (
        "after_train", "before_evaluation", "before_train", "end_task", "Resend",
    ),
    "state": (
        "DataCheckRecord", "NodeState", "PendingTask", "TaskStatus",
    ),
    "statistics": (
        "answer_query", "mechanism_of", "query_fingerprint", "query_id_of", "read_node_frame",
    ),
    "training": (
        "fine_tune", "FineTuned", "RoundResult", "train_dp_round", "train_nonprivate_round",
    ),
}
"""The public names of the package, by the module they come from."""

_SUBMODULES = frozenset({*_MODULES, "_sqlite"})

__all__ = [
    "AcceptSpec", "add_contract", "admit", "after_hello", "after_train", "answer_query", "append_private",
    "as_finite", "audit_decision", "AuditEntry", "AuditLog", "AuditVerification", "awaiting_approval", "Baseline",
    "baseline", "before_evaluation", "before_hello", "before_train", "Budget", "budget_of", "BudgetSpec",
    "BudgetStatus", "canonical_json", "check_admitted", "check_all", "check_dataset", "check_distributed",
    "check_query", "check_received", "check_reply", "check_spend", "check_task", "check_within_reservation",
    "compose", "conforming_frame", "config_float", "config_int", "contract_sha256", "ContractCheck", "ContractPin",
    "CONTRACTS_DIR",
    "current_home", "data_of", "data_status", "DataCheck", "DataCheckRecord", "dataset_name", "DatasetSpec", "decide",
    "Decision", "DECLARATION", "default_policy_text", "describe_error", "DPState", "end_task", "entry_hash",
    "ERROR_KIND", "error_reason", "evaluate_global", "evaluated_rounds", "EVALUATION_NOTE", "file_sha256",
    "GateContext", "GENESIS_HASH", "held_contracts", "hello", "hello_refusal", "Identity", "init_node", "is_admitted",
    "is_allowed", "keep_keys", "kind_of", "KINDS", "LedgerEvent", "LimitsSpec", "load_policy", "local_only_baseline",
    "mask_release", "mask_update", "MAX_PAYLOAD_BYTES", "Mechanism", "mechanism_of", "MIN_ROWS_LOCAL", "min_rows_for", "model_digest",
    "model_dimension", "node_display_name", "node_identity", "node_of", "NodeHome", "NodePolicy", "NodeState", "NoRoster", "one_read", "PARAMS",
    "parse_error_reason", "PendingTask", "pin_contract_text", "pin_new_contract", "PolicyCode", "precheck", "prepare",
    "PreparedData", "PrivacyLedger", "Proposal", "public_answer", "public_hello", "public_reason", "public_row_count",
    "query_fingerprint", "query_gate_context", "query_id_of", "query_of", "read_node_frame", "read_text", "receive_shares",
    "record_evaluation", "record_spend", "Refusal", "refusal_text", "Release", "release", "released_counts",
    "released_row_count", "report_path", "REPORTS_DIR", "Resend", "RoundResult", "ROW_COUNT_NOISE", "ROWS_NOTE",
    "Rule", "RULES", "run_stage", "RunState", "secagg_graph_key", "secagg_key", "SECAGG_STAGES",
    "secure_aggregation_text", "secure_coin", "SecureAggregationSpec", "SentUpdates", "serving", "SpendCheck",
    "spent", "spent_history", "StageRequest", "stop_blocked", "STRATEGIES", "table_markdown", "task_gate_context",
    "task_id", "task_of", "TaskState", "TaskStatus", "TEMPLATES", "train", "train_dp_round", "train_nonprivate_round",
    "validated_frame",
    # personal models (fedgov.node.personal, fedgov.node.training)
    "ensure_personal", "fine_tune", "FineTuned", "MIN_VALIDATION_ROWS", "personal_test_accuracy", "personalise",
    "PersonalModel", "PersonalModels", "PersonalRecord", "validation_split",
]


if not TYPE_CHECKING:  # type checkers read the imports above; a __getattr__ would hide typos from them
    __getattr__, __dir__ = lazy_exports(__name__, _MODULES, __all__, submodules=_SUBMODULES)
