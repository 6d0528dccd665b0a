"""The fixed set of texts a node may send when it refuses or fails: one template per code.

A refusal text leaves the node, so it is a release like any other. Each code has one template;
its only placeholders are values the coordinator already knows or that the node's operator
chose (the task's name and stated values, the contract's name, the policy's limits and setting
names). No template has a place for a row count, a found value, a number of problems or
anything else derived from the node's data, so no refusal can carry one. The release gate
(:mod:`fedgov.node.gate`) checks every refusal and error text against these templates before
a reply leaves; the details stay at the node (its audit log, or for data problems the
validation report readable only by the node's user).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from fedgov.errors import RefusalTextError

__all__ = [
    "TEMPLATES",
    "PARAMS",
    "Refusal",
    "refusal_text",
    "error_reason",
    "parse_error_reason",
    "is_allowed",
    "RefusalTextError",
]


# What each placeholder may hold. Names: identifiers, contract refs, setting names. Numbers:
# a policy limit or a value the task itself states (never one derived from data).
_NAME = r"[A-Za-z0-9_.@:/=\"-]{1,128}"
_NUMBER = r"-?(?:inf|[0-9][0-9.]*(?:e[-+]?[0-9]+)?)"
PARAMS: dict[str, str] = {
    "task": _NAME,  # the task's or query's name (sent by the coordinator)
    "task_id": _NAME,  # the ledger key of a task (name, fingerprint, run id)
    "key": _NAME,  # an approval key (a fingerprint of the task)
    "contract": _NAME,  # a contract reference, e.g. adult-income@1.0
    "setting": _NAME,  # the policy or task setting a rule is about, e.g. limits.max_epsilon_per_task
    "value": _NAME,  # a value the task states (epsilon, model, strategy, mode)
    "limit": _NAME,  # the policy's limit or list of accepted values
    "round": r"[0-9]{1,9}",  # a round number the coordinator sent
}

TEMPLATES: dict[str, str] = {
    # --- before anything is read (policy, pause, approval) --------------------------------
    "no-policy": "this node has no policy: it takes part in nothing",
    "paused": "the node is paused by its operator",
    "pending-approval": "task {key} waits for the node's operator (fedgov node approve {key})",
    "approval-rejected": "task {key} was rejected by the node's operator",
    "approval-deny": "this node refuses every task (approval = \"deny\")",
    "kind-not-allowed": "task kind {value} is not accepted by this node's policy ({setting})",
    "coordinator-not-allowed": "this coordinator is not accepted by this node's policy ({setting})",
    "submitter-not-allowed": "this submitter is not accepted by this node's policy ({setting})",
    "contract-not-served": "this node serves no data set under contract {contract}",
    "contract-mismatch": "the task's contract is not the one this node holds for {contract}; nothing was read",
    "model-not-allowed": "model {value} is not accepted by this node's policy ({setting})",
    "strategy-not-allowed": "strategy {value} is not accepted by this node's policy ({setting})",
    "privacy-required": "this node's policy requires differential privacy ({setting})",
    "secure-aggregation-required": "this node's policy requires secure aggregation ({setting})",
    "distributed-dp-required": "this node's policy requires distributed DP ({setting})",
    "epsilon-above-max": "the task's epsilon {value} is above this node's maximum {limit} ({setting})",
    "delta-above-max": "the task's delta is above this node's maximum {limit} ({setting})",
    "noise-below-min": "the noise this task needs at this node is below the policy's minimum {limit} ({setting})",
    "evaluation-epsilon-above-max": "the task's evaluation epsilon {value} is above this node's maximum {limit} ({setting})",
    "reproducible-noise": "reproducible noise is for simulations only: this node draws DP noise from its own secure generator",
    "app-not-trusted": "this node does not trust the app that sent the task",
    # --- after the data is looked at: a fixed text, no counts --------------------------------
    "data-missing": "the node's data set for {contract} cannot be read",
    "data-invalid": "the node's data set does not conform to contract {contract}",
    "too-few-rows": "the node's data set has fewer training rows than this node's minimum of {limit} ({setting})",
    "privacy-unreachable": "the task's privacy target cannot be met at this node",
    "model-rejected": "model {value} cannot be trained with differential privacy",
    "budget-exhausted": "the task would take the data set beyond its privacy budget ({setting})",
    # --- while a task runs ------------------------------------------------------------------
    "not-admitted": "this node did not admit task {task_id}, or it has ended",
    "task-ended": "task {task_id} has ended at this node; it cannot be resumed",
    "task-stopped": "task {task_id} was stopped at this node by its release gate",
    "round-spent": "round {round} of task {task_id} was already spent at this node; a second update would be a second release",
    "evaluation-repeated": "round {round} of task {task_id} was already evaluated at this node",
    "evaluation-not-offered": "this task's evaluation at the nodes is off (evaluation.epsilon = 0)",
    "privacy-cap": "this round would take the task beyond its planned epsilon at this node",
    "secure-aggregation": "secure aggregation stopped at this node; the details are in its audit log",
    "secure-aggregation-no-roster": (
        "this node's policy pins no federation roster ([secure_aggregation]): it takes no part in secure aggregation"
    ),
    "distributed-dp": "the coordinator's distributed-DP parameters are not this node's plan; nothing was trained",
    "spend-not-recorded": "the node could not record this round's privacy spend; nothing was sent",
    "release-blocked": "a reply held a field this node does not release; the task is stopped at this node",
    "baseline-not-offered": "a local-only baseline is computed in simulations only",
    "internal-error": "the node could not answer this message; the details are in its log",
}


@lru_cache(maxsize=None)
def _pattern(code: str) -> re.Pattern[str]:
    template = TEMPLATES[code]
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if name is not None:
            out.append(f"(?:{PARAMS[name]})")
    return re.compile("".join(out))


def refusal_text(code: str, **params: object) -> str:
    """The text for ``code``, its placeholders filled; :class:`RefusalTextError` for an unknown
    code or a value that does not fit its placeholder."""
    if code not in TEMPLATES:
        raise RefusalTextError(f"no refusal template for code {code!r}")
    values = {k: (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in params.items()}
    text = TEMPLATES[code].format(**values)
    if not _pattern(code).fullmatch(text):
        raise RefusalTextError(f"a value given for refusal {code!r} does not fit its template")
    return text


def is_allowed(code: str | None, text: str) -> bool:
    """Whether ``text`` is the template of ``code`` with allowed values in its placeholders."""
    return code is not None and code in TEMPLATES and bool(_pattern(code).fullmatch(text))


def error_reason(code: str, **params: object) -> str:
    """The reason of an error reply: ``"<code>: <template text>"``."""
    return f"{code}: {refusal_text(code, **params)}"


def parse_error_reason(reason: str) -> tuple[str | None, str]:
    """``(code, text)`` of an error reason built by :func:`error_reason`."""
    code, sep, text = reason.partition(": ")
    return (code, text) if sep else (None, reason)


@dataclass(frozen=True)
class Refusal:
    """A node's decision not to answer a message: the ``code`` of a template and the values of
    its placeholders. The ClientApp sends it as an error reply (:func:`error_reason`)."""

    code: str
    params: Mapping[str, object] = field(default_factory=dict)

    def reason(self) -> str:
        """The reason of the error reply, ``"<code>: <template text>"``."""
        return error_reason(self.code, **self.params)
