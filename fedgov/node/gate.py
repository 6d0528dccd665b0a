"""The node's release gate: every reply passes here, and only declared fields may leave.

Everything a node sends is a release. :data:`DECLARATION` names, per message kind, each field
that may leave the node and what protects it: differential privacy whose spend is already in
the node's ledger, secure aggregation (only the round's sum is ever unmasked), encryption to a
peer, or a value declared public (the node's name, refusal codes and their fixed texts, the
task's own planned epsilon, public keys, a constant). :func:`check_reply` compares a reply
against the declaration and returns the violations (field names, never values); the node's
Flower mod (``clients.mods.gate_mod``) then sends a ``release-blocked`` error instead, records
the violation in the audit log and stops the task at the node.

This module is pure: the facts it needs from the node's state (is this round's spend in the
ledger? is this round's evaluation?) come in a :class:`GateContext`. The threat model's table
of what can leave a node is generated from :data:`DECLARATION` (:func:`table_markdown`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from flwr.app import Message

from fedgov import protocol as P
from fedgov.node.refusals import is_allowed, parse_error_reason
from fedgov.transport import UPDATE

__all__ = ["Release", "DECLARATION", "GateContext", "check_reply", "table_markdown", "ERROR_KIND"]

ERROR_KIND = "error"


@dataclass(frozen=True)
class Release:
    """One field that may leave the node in a reply of one kind."""

    record: str
    kind: Literal["array", "metric", "config", "error"]
    field: str
    protection: str
    rule: str


_SPENT = "differential privacy: DP-SGD noise at the node; the round's spend is in the ledger before the reply leaves"
_MASKED = (
    "secure aggregation: masked, only the round's sum over at least the threshold of nodes is ever unmasked "
    "(under distributed DP the node's noise share is inside)"
)
_ONE = "public constant 1"
_WEIGHT = (
    "the node's released row count (Gaussian noise, released once per data-set version through the ledger): "
    "the FedAvg weight; 1 under secure aggregation, where the weight is inside the masked sum"
)

DECLARATION: dict[str, tuple[Release, ...]] = {
    P.HELLO: (
        Release(
            P.HELLO, "config", P.NODE_JSON,
            "public: the node's code and name, accepted or not, a refusal code with its fixed template text, the task's "
            "own target epsilon as the node's planned epsilon; the released row count (Gaussian noise, its spend in the "
            "ledger, once per data-set version) and the delta, noise multiplier and evaluation noise computed from it and the "
            "task; no test row count",
            "hello",
        ),
    ),
    "train": (
        Release(P.ARRAYS, "array", UPDATE, _SPENT + " (a task without DP, which the node's policy must allow: none)", "train-update"),
        Release(P.ARRAYS, "array", P.MASKED, _MASKED, "masked"),
        Release(P.METRICS, "metric", "num-examples", _WEIGHT, "weight"),
    ),
    "evaluate": (
        Release(P.METRICS, "metric", "num-examples", _ONE, "one"),
        Release(
            P.METRICS, "metric", "correct",
            "differential privacy: Gaussian noise (z_eval * sqrt 2), its spend in the ledger before it is computed; at most "
            "one evaluation per round, only the rounds the node planned (a task without DP: exact)",
            "evaluated",
        ),
        Release(P.METRICS, "metric", "total", "as correct", "evaluated"),
    ),
    P.STATS: (
        Release(
            P.STATS, "config", P.ANSWER_JSON,
            "differential privacy: noisy aggregates (OpenDP samplers) whose spend is in the ledger; the query's own "
            "epsilon and delta; or a refusal code with its fixed template text",
            "stats",
        ),
        Release(P.ARRAYS, "array", P.MASKED, _MASKED, "masked"),
    ),
    "secagg-keys": (
        Release(P.SECAGG, "config", "c-pk", "public: the round's public key for encrypting shares", "public"),
        Release(P.SECAGG, "config", "s-pk", "public: the round's public key for pairwise masks", "public"),
        Release(P.SECAGG, "config", "name", "public: the node's name in the federation roster", "public"),
        Release(
            P.SECAGG, "config", "graph-seed",
            "public: the SecAgg+ graph's seed, a hash of the signed roster's digest, the task's fingerprint and the round", "public",
        ),
        Release(
            P.SECAGG, "config", "sig",
            "public: the node's identity-key signature over the task key, round, Flower node id, roster name and both "
            "public keys (the peers check it against the roster)",
            "public",
        ),
    ),
    "secagg-shares": (
        Release(P.SECAGG, "config", "dst", "public: the peers' node ids", "public"),
        Release(P.SECAGG, "config", "ct", "encrypted to each peer (Fernet: AES-128-CBC with HMAC-SHA256, under an ECDH + HKDF key); the coordinator cannot read them", "public"),
    ),
    "secagg-consistency": (
        Release(
            P.SECAGG, "config", "sig",
            "public: the node's identity-key signature over the task key, round and sorted survivor list; one list per "
            "round, recorded in the node's state before it leaves",
            "public",
        ),
    ),
    "secagg-unmask": (
        Release(P.SECAGG, "config", "owner", "public: whose secret each share belongs to", "public"),
        Release(
            P.SECAGG, "config", "share",
            "Shamir shares the protocol reveals, only for the survivor list this node signed and at least the threshold "
            "of roster members signed: a survivor's self-mask seed or a dropped node's mask key, never both for one node "
            "(recorded per round and peer in the node's state before the reply leaves, kept across restarts)",
            "public",
        ),
    ),
    P.BASELINE: (
        Release(
            P.METRICS, "metric", "accuracy",
            "simulation only (a deployed node refuses): the local-only model, computed apart from the node's budget and "
            "labelled so in the report",
            "simulated",
        ),
        Release(P.METRICS, "metric", "epsilon", "public: what the local-only model would cost (the task's own target)", "simulated"),
        Release(
            P.METRICS, "metric", "personal-accuracy",
            "simulation only (a deployed node refuses): the personal model's exact accuracy on the node's test split, "
            "apart from the budget like the local-only one; a deployed node sends nothing about its personal model",
            "simulated",
        ),
        Release(P.METRICS, "metric", "personal-fine-tuned", "simulation only: which variant the personal model is (1 fine-tuned, 0 global)", "simulated"),
        Release(P.METRICS, "metric", "test-rows", "simulation only: the test split's size, for the standard error of its figures", "simulated"),
    ),
    P.END: (Release(P.METRICS, "metric", "ok", "public constant 1", "one"),),
    ERROR_KIND: (
        Release(
            "error", "error", "reason",
            "public: a refusal or failure code with its fixed template text (fedgov.node.refusals); no counts, rows or values",
            "template",
        ),
    ),
}


@dataclass
class GateContext:
    """What the gate needs to know of the node's own state for one reply."""

    kind: str
    server_round: int | None = None
    privacy_enabled: bool = True
    secure: bool = False
    simulated: bool = False
    target_epsilon: float | None = None
    released_rows: Callable[[], set[int]] = field(default=lambda: set())
    round_spent: Callable[[int], bool] = field(default=lambda r: False)
    round_evaluated: Callable[[int], bool] = field(default=lambda r: False)
    query_spent: Callable[[], bool] = field(default=lambda: False)
    # (code, name) this node states in its answers: its policy's node and name
    # (:func:`fedgov.node.admission.node_display_name`); None: not checked
    identity: tuple[str, str] | None = None


def _identity_problem(raw: dict[str, Any], ctx: GateContext, what: str) -> str | None:
    """A hello or answer names the node by its own code and name only: the name is free text
    from the node's policy, and must not carry anything else."""
    if ctx.identity is None:
        return None
    code, name = ctx.identity
    if raw.get("node") != code:
        return f"{what}: node is not this node's code"
    if raw.get("node_name") not in (None, "", name):
        return f"{what}: node_name is not this node's name"
    return None


def _declared(kind: str) -> dict[tuple[str, str], Release]:
    return {(r.record, r.field): r for r in DECLARATION.get(kind, ())}


def _value_of(reply: Message, record: str, name: str) -> Any:
    rec = reply.content[record]
    return rec[name]


def _check_rule(rule: Release, value: Any, ctx: GateContext) -> str | None:
    """None when ``value`` may leave under ``rule``; else why not (no values in the text)."""
    r = rule.rule
    if r == "public":
        return None
    if r == "one":
        return None if isinstance(value, (int, float)) and float(value) == 1.0 else f"{rule.field} is not the constant 1"
    if r == "weight":
        if not isinstance(value, (int, float)):
            return f"{rule.field} is not a number"
        if ctx.secure:
            return None if float(value) == 1.0 else f"{rule.field} is not 1 under secure aggregation"
        if float(value) == 1.0 or (float(value).is_integer() and int(value) in ctx.released_rows()):
            return None
        return f"{rule.field} is not the node's released row count"
    if r == "masked":
        return None if ctx.secure else f"{rule.field} without secure aggregation"
    if r == "train-update":
        if ctx.secure:
            return f"{rule.field}: a plaintext update under secure aggregation"
        if not ctx.privacy_enabled:
            return None
        if ctx.server_round is None or not ctx.round_spent(ctx.server_round):
            return f"{rule.field}: this round's spend is not in the ledger"
        return None
    if r == "evaluated":
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            return f"{rule.field} is not a finite number"
        if not ctx.privacy_enabled:
            return None
        if ctx.server_round is None or not ctx.round_evaluated(ctx.server_round):
            return f"{rule.field}: this evaluation's spend is not in the ledger"
        return None
    if r == "simulated":
        return None if ctx.simulated else f"{rule.field} outside a simulation"
    if r == "hello":
        return _check_hello(str(value), ctx)
    if r == "stats":
        return _check_stats(str(value), ctx)
    return f"{rule.field}: unknown rule"


_HELLO_PUBLIC = {
    "node", "node_name", "accepted", "code", "reason", "planned_epsilon", "train_rows", "delta", "noise_multiplier", "evaluation_noise",
}


def _check_hello(text: str, ctx: GateContext) -> str | None:
    try:
        raw = json.loads(text)
    except ValueError:
        return "node-json is not JSON"
    if not isinstance(raw, dict):
        return "node-json is not an object"
    for k, v in raw.items():
        if k in _HELLO_PUBLIC:
            continue
        if v not in (None, 0):
            return f"node-json field {k} is not public"
    who = _identity_problem(raw, ctx, "node-json")
    if who is not None:
        return who
    if raw.get("accepted"):
        if raw.get("reason"):
            return "node-json: an acceptance carries a text"
        rows = raw.get("train_rows")
        if rows and int(rows) not in ctx.released_rows():
            return "node-json: train_rows is not the node's released row count"
        pe = raw.get("planned_epsilon")
        if pe is not None and (ctx.target_epsilon is None or float(pe) != float(ctx.target_epsilon)):
            return "node-json: planned_epsilon is not the task's target epsilon"
        return None
    if any(raw.get(k) not in (None, 0) for k in ("train_rows", "delta", "noise_multiplier", "planned_epsilon", "evaluation_noise")):
        return "node-json: a refusal carries sizes or a plan"
    if not is_allowed(raw.get("code"), str(raw.get("reason", ""))):
        return "node-json: the refusal text is not a template"
    return None


_STATS_PUBLIC = {"node", "node_name", "accepted", "code", "reason", "epsilon", "delta"}


def _check_stats(text: str, ctx: GateContext) -> str | None:
    try:
        raw = json.loads(text)
    except ValueError:
        return "answer-json is not JSON"
    if not isinstance(raw, dict):
        return "answer-json is not an object"
    extra = [k for k, v in raw.items() if k not in _STATS_PUBLIC | {"release_json"} and v not in (None, 0, "")]
    if extra:
        return f"answer-json field {extra[0]} is not declared"
    who = _identity_problem(raw, ctx, "answer-json")
    if who is not None:
        return who
    if raw.get("accepted"):
        if raw.get("release_json") and not ctx.query_spent():
            return "answer-json: a release whose spend is not in the ledger"
        return None
    if raw.get("release_json"):
        return "answer-json: a refusal with a release"
    if not is_allowed(raw.get("code"), str(raw.get("reason", ""))):
        return "answer-json: the refusal text is not a template"
    return None


def check_reply(reply: Message, ctx: GateContext) -> list[str]:
    """The violations of ``reply`` against :data:`DECLARATION` for ``ctx.kind`` (empty: it may
    leave). Each is a short text naming the field, never its value."""
    if reply.has_error():
        code, text = parse_error_reason(reply.error.reason or "")
        return [] if is_allowed(code, text) else ["error reason is not a template"]
    declared = _declared(ctx.kind)
    if not declared:
        return [f"message kind {ctx.kind} releases nothing"]
    out: list[str] = []
    content = reply.content
    for kind, records in (("array", content.array_records), ("metric", content.metric_records), ("config", content.config_records)):
        for rname, rec in records.items():
            for fname in rec.keys():
                rule = declared.get((rname, fname))
                if rule is None or rule.kind != kind:
                    out.append(f"{kind} {rname}.{fname} is not declared for {ctx.kind}")
                    continue
                why = _check_rule(rule, _value_of(reply, rname, fname), ctx)
                if why:
                    out.append(why)
    return out


def table_markdown() -> str:
    """The threat model's table of every field that can leave a node, per message kind."""
    lines = ["| message kind | record | field | what protects it |", "|---|---|---|---|"]
    for kind, rules in DECLARATION.items():
        for r in rules:
            lines.append(f"| {kind} | {r.record} | `{r.field}` | {r.protection} |")
    return "\n".join(lines) + "\n"
