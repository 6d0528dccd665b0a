"""The messages between coordinator and node: record keys and the node's answers.

Flower carries them (``flwr.app.Message`` with ``RecordDict`` content); this module only
names the keys and turns them into typed values, so that ``server/`` and ``clients/`` agree.

* ``hello`` (a Flower *query* message): the coordinator sends the task and its contract;
  the node answers with a :class:`NodeHello`: who it is, whether it accepts the task, and if
  not, a machine-readable refusal (a code and a text). No data rows, no found values.
* *train*: the current global model (``arrays``) and ``config``; the reply carries the new
  local model, and a metric record with ``num-examples``, ``epsilon``, ``delta``.
* *evaluate*: the global model; the reply carries metrics on the node's own test split.
* ``stats`` (a Flower *query* message): a statistics query and its contract; the node answers
  with a :class:`StatsAnswer`: its noisy release, or a refusal.
"""

from __future__ import annotations

import hashlib
import unicodedata
from enum import Enum
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fedgov.config import Contract, Task

__all__ = [
    "fingerprint",
    "task_id_of",
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "HELLO",
    "BASELINE",
    "END",
    "TASK_ID",
    "KIND",
    "TASK_JSON",
    "CONTRACT_JSON",
    "NODE_JSON",
    "STATS",
    "QUERY_JSON",
    "ANSWER_JSON",
    "TASK_RUN",
    "SECAGG",
    "SECAGG_STAGE",
    "MASKED",
    "RefusalCode",
    "NodeHello",
    "StatsAnswer",
]

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
HELLO = "hello"
BASELINE = "baseline"
END = "end"
TASK_ID = "task-id"
KIND = "fedgov-kind"
TASK_JSON = "task-json"
CONTRACT_JSON = "contract-json"
NODE_JSON = "node-json"
STATS = "stats"  # a statistics query (kind of a Flower query message)
QUERY_JSON = "query-json"
ANSWER_JSON = "answer-json"
# A resumed run (fedgov run --resume, fedgov task resume) names the Flower run the nodes admitted
# the task in, so that each node continues that reservation in its ledger instead of reserving anew.
TASK_RUN = "task-run"
# Secure aggregation (fedgov.privacy.secagg): query messages of kind "secagg" carry a stage (keys, shares,
# unmask); the train message of a secure task carries a "secagg" ConfigRecord (the routed shares);
# the node's reply carries its masked vector as the array MASKED, instead of its model.
SECAGG = "secagg"
SECAGG_STAGE = "secagg-stage"
MASKED = "masked"


class RefusalCode(str, Enum):
    """Why a node refuses a task: stable codes a coordinator can act on."""

    DATA_MISSING = "data-missing"
    DATA_INVALID = "data-invalid"
    CONTRACT_MISMATCH = "contract-mismatch"
    TOO_FEW_ROWS = "too-few-rows"
    PRIVACY_UNREACHABLE = "privacy-unreachable"
    MODEL_REJECTED = "model-rejected"
    NO_POLICY = "no-policy"
    PAUSED = "paused"
    PENDING_APPROVAL = "pending-approval"
    BUDGET_EXHAUSTED = "budget-exhausted"
    NOT_ADMITTED = "not-admitted"
    APP_NOT_TRUSTED = "app-not-trusted"
    TASK_ENDED = "task-ended"
    REPRODUCIBLE_NOISE = "reproducible-noise"
    INTERNAL = "internal-error"
    # A policy rule (fedgov.node.policy.PolicyCode) refuses with its own code, e.g. epsilon-above-max.


def plain_text(text: str) -> str:
    """``text`` without control or format characters (a tab or newline becomes a space): what
    a node says of itself reaches the coordinator's terminal, logs and reports, where an escape
    sequence or a bidirectional override could forge or hide what they show."""
    return "".join(" " if c in "\t\n" else c for c in text if c in "\t\n" or not unicodedata.category(c).startswith("C"))


def _name(text: str) -> str:
    return plain_text(text)[:200]


PlainText = Annotated[str, AfterValidator(plain_text)]
NodeName = Annotated[str, AfterValidator(_name)]
"""A node's name as the coordinator keeps it: plain text of at most 200 characters (a node's
policy allows no more)."""


class NodeHello(BaseModel):
    """A node's answer to ``hello``. Sizes are reported to the coordinator; rows are not."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: PlainText = Field(description="the node's name, e.g. the CBS code GM0363")
    node_name: NodeName = ""
    accepted: bool
    code: PlainText | None = Field(default=None, description="a RefusalCode or a fedgov.node.policy.PolicyCode value")
    reason: PlainText = ""
    train_rows: int = 0
    test_rows: int = 0
    delta: float | None = None
    noise_multiplier: float | None = None
    planned_epsilon: float | None = None
    evaluation_noise: float | None = Field(
        default=None, description="z of the node's evaluations (std z * sqrt 2 per count), from its public plan",
    )


class StatsAnswer(BaseModel):
    """A node's answer to a statistics query: its noisy release, or a refusal (code and text).

    The release holds noisy aggregates only (``fedgov.analytics.LocalRelease``): no rows, no
    exact counts; the number of rows the node used is not sent either.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: PlainText
    node_name: NodeName = ""
    accepted: bool
    code: PlainText | None = None
    reason: PlainText = ""
    epsilon: float | None = None
    delta: float | None = None
    release_json: str | None = None


# --------------------------------------------------------------------------- task identity
# Node and coordinator compute these the same way: the fingerprint is what an operator approves.


def fingerprint(task: Task, contract: Contract) -> str:
    """What a task asks, as a short hash: the key an operator approves (``fedgov node approve``)."""
    return hashlib.sha256((task.model_dump_json() + contract.model_dump_json()).encode()).hexdigest()[:16]


def task_id_of(task: Task, contract: Contract, run_id: int | str) -> str:
    """The ledger's key for one run of a task: its name, its fingerprint and the run id."""
    return f"{task.name}-{fingerprint(task, contract)}-{run_id}"
