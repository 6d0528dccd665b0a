"""The node policy: what a municipality's node takes part in, decided by the municipality.

A municipality's IT staff and its privacy officer write one TOML file next to their node. It
names the data sets the node serves (each under a data contract, with a privacy budget for a
period, all tasks together), which kinds of task, models, strategies, coordinators and
submitters it accepts, and the minimums every task must meet (at most this much epsilon and
delta per task, at least this much noise, enough rows). The coordinator cannot change any of
it: the node checks every task against its own policy before it touches data, and refuses
with a stable, machine-readable code (:class:`PolicyCode`) and a text that names the rule,
the task's value and the policy's limit.

Example (``configs/policies/GM0363.toml`` is a complete one)::

    node = "GM0363"
    approval = "auto"                 # auto | manual | deny
    [[datasets]]
    name = "adult"
    contract = "adult-income"
    versions = ["1.0"]
    path = "data/train.csv"           # relative to this file; or a [datasets.sql] query
    [datasets.budget]
    epsilon = 10.0
    delta = 1e-5
    period = "year"
    [accept]
    kinds = ["training"]
    [limits]
    max_epsilon_per_task = 3.0

:func:`check_task` (a training task) and :func:`check_query` (a statistics query) are pure
functions of the policy and what is asked: both run the same ordered rules (:data:`RULES`, one
signature, ``rule(policy, proposal) -> Decision | None``), and the first rule broken decides.
They do not look at the remaining budget, which the ledger checks and reserves atomically when
the task starts.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedgov.config._base import ConfigPath, StrictModel, load_toml, parse_toml, problems_from_validation
from fedgov.config.contract import Contract
from fedgov.config.registry import CODE_PATTERN
from fedgov.config.task import MODEL_NAMES, Task
from fedgov.config.datasource import DataSource, SqlSource
from fedgov.errors import ConfigError, Problem

__all__ = [
    "KINDS",
    "STRATEGIES",
    "PolicyCode",
    "BudgetSpec",
    "ContractPin",
    "DatasetSpec",
    "AcceptSpec",
    "LimitsSpec",
    "SecureAggregationSpec",
    "NodePolicy",
    "Decision",
    "Proposal",
    "Rule",
    "RULES",
    "decide",
    "load_policy",
    "check_task",
    "min_rows_for",
    "MIN_ROWS_LOCAL",
    "check_query",
    "default_policy_text",
    "secure_aggregation_text",
    "file_sha256",
    "pin_contract_text",
]

KINDS = ("training", "statistics")
"""Kinds of task a node can take part in: model training, or a statistics query."""

STRATEGIES = ("fedavg", "fedprox")
"""Flower strategies a training task can name (``training.strategy``)."""

MIN_ROWS_LOCAL = 10
"""The floor of ``limits.min_rows`` under local DP-SGD: a node trains with local DP-SGD on at
least this many training rows, whatever its policy sets (a lower ``min_rows`` counts as this;
DP-SGD's Poisson sampling needs a few batches' worth of rows). Statistics queries and
distributed DP have no floor of their own."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_VERSION = r"^\d+\.\d+(\.\d+)?$"
_CONTEXT_SINK = "policy_problems"


class PolicyCode(str, Enum):
    """Why a policy refuses a task: stable codes. Their rules are checked in the order of
    :data:`RULES` (the first failure wins)."""

    APPROVAL_DENY = "approval-deny"
    KIND_NOT_ALLOWED = "kind-not-allowed"
    COORDINATOR_NOT_ALLOWED = "coordinator-not-allowed"
    SUBMITTER_NOT_ALLOWED = "submitter-not-allowed"
    CONTRACT_NOT_SERVED = "contract-not-served"
    MODEL_NOT_ALLOWED = "model-not-allowed"
    STRATEGY_NOT_ALLOWED = "strategy-not-allowed"
    PRIVACY_REQUIRED = "privacy-required"
    EPSILON_ABOVE_MAX = "epsilon-above-max"
    DELTA_ABOVE_MAX = "delta-above-max"
    NOISE_BELOW_MIN = "noise-below-min"
    TOO_FEW_ROWS = "too-few-rows"
    SECURE_AGGREGATION_REQUIRED = "secure-aggregation-required"
    DISTRIBUTED_REQUIRED = "distributed-dp-required"
    EVALUATION_EPSILON_ABOVE_MAX = "evaluation-epsilon-above-max"


# --- the file ------------------------------------------------------------------------------


class BudgetSpec(StrictModel):
    """The privacy budget of one data set: all tasks of a period together may spend this much."""

    epsilon: float = Field(gt=0, allow_inf_nan=False, description="total epsilon for the period")
    delta: float = Field(gt=0, lt=1, description="total delta for the period")
    period: Literal["year", "forever"] = Field(
        default="year",
        description="year: the budget renews every year; forever: it never renews",
    )


class ContractPin(StrictModel):
    """A contract file the node holds for one version, pinned by the SHA-256 of its bytes."""

    path: ConfigPath = Field(description="the contract file (TOML, or canonical JSON), relative to the policy file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the file's bytes (64 lower-case hex digits)")


class DatasetSpec(StrictModel):
    """One data set the node serves, under one contract, with its own budget.

    ``contract_files`` pins, per served version, the contract file the node holds itself: a
    task's contract must be byte for byte that file's canonical JSON, or the node refuses it
    (``contract-mismatch``) before its data is touched. A version listed in ``versions``
    without a pinned file is not served.

    The rows are a file (``path``, optionally ``test_path``: CSV or Parquet) or a SQL query on
    a database (``[datasets.sql]``, :class:`~fedgov.config.datasource.SqlSource`: the URL
    without a password, the password from an environment variable or a file only the node's
    user can read, one read-only SELECT), never both.
    """

    name: str = Field(min_length=1, pattern=_NAME, description="the data set id (the ledger's key)")
    contract: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="contract name")
    versions: list[str] = Field(min_length=1, description="contract versions served")
    path: ConfigPath | None = Field(default=None, description="training data (CSV or Parquet), relative to the policy file")
    test_path: ConfigPath | None = Field(default=None, description="optional held-out test data")
    sql: SqlSource | None = Field(default=None, description="instead of path: the data set as a SQL query on a database ([datasets.sql])")
    contract_files: dict[str, ContractPin] = Field(
        default_factory=dict, description="per served version: the contract file this node holds, pinned by SHA-256"
    )
    budget: BudgetSpec

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.path is None) == (self.sql is None):
            raise ValueError(
                "give the data set's rows either as a file (path, optionally test_path) or as a SQL query "
                "([datasets.sql]), " + ("not both" if self.path is not None else "one of them")
            )
        if self.sql is not None and self.test_path is not None:
            raise ValueError("test_path goes with path; a SQL data set gives its test split as [datasets.sql] test_query")
        return self

    @property
    def train_source(self) -> DataSource:
        """Where the training rows (or all rows) are read: the file, or the SQL query."""
        if self.sql is not None:
            return self.sql.queries()[0]
        assert self.path is not None  # _one_source
        return self.path

    @property
    def test_source(self) -> DataSource | None:
        """Where a held-out test split is read, when the policy names one."""
        return self.sql.queries()[1] if self.sql is not None else self.test_path

    @property
    def sources(self) -> list[DataSource]:
        """The training source, then the test source when there is one."""
        return [s for s in (self.train_source, self.test_source) if s is not None]

    @model_validator(mode="after")
    def _pins_are_served(self) -> DatasetSpec:
        extra = [v for v in self.contract_files if v not in self.versions]
        if extra:
            raise ValueError(
                f"contract_files pins version(s) {', '.join(extra)}, which versions does not list; "
                "add them to versions or remove the pin"
            )
        return self

    @property
    def unpinned(self) -> list[str]:
        """Versions listed but without a pinned contract file: not served."""
        return [v for v in self.versions if v not in self.contract_files]

    @field_validator("versions")
    @classmethod
    def _versions(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not re.match(_VERSION, v)]
        if bad:
            raise ValueError(
                f"versions must look like '1.0' or '1.0.2'; not {', '.join(repr(v) for v in bad)}"
            )
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"versions lists {', '.join(dupes)} twice")
        return value

    def serves(self, contract: Contract) -> bool:
        """Whether this data set is served under ``contract`` (same name, a listed version)."""
        return contract.name == self.contract and contract.version in self.versions

    @property
    def refs(self) -> list[str]:
        """The contract refs served, ``name@version``."""
        return [f"{self.contract}@{v}" for v in self.versions]


class AcceptSpec(StrictModel):
    """Which tasks the node takes part in. ``"*"`` in coordinators or submitters: anyone."""

    kinds: list[Literal["training", "statistics"]] = Field(default=["training"])
    models: list[Literal["logreg", "mlp"]] = Field(default=["logreg", "mlp"])
    strategies: list[Literal["fedavg", "fedprox"]] = Field(default=["fedavg", "fedprox"])
    coordinators: list[str] = Field(default_factory=lambda: ["*"])
    submitters: list[str] = Field(default_factory=lambda: ["*"])
    apps: list[str] = Field(
        default_factory=lambda: ["fedgov"],
        description=(
            "app bundles (Flower FABs) whose code this node runs: 'fedgov' (the bundle this "
            "node's own fedgov installation builds), a bundle's sha256, or '*' (any: warned)"
        ),
    )

    @field_validator("apps")
    @classmethod
    def _apps(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in ("fedgov", "*") and not re.fullmatch(r"[0-9a-f]{64}", v)]
        if bad:
            raise ValueError(
                "each entry must be 'fedgov', '*' or a bundle's sha256 (64 lower-case hex digits); "
                f"not {', '.join(repr(v) for v in bad)}"
            )
        return value

    @field_validator("kinds", "models", "strategies", "coordinators", "submitters", "apps")
    @classmethod
    def _not_empty(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if not value:
            raise ValueError(
                f"an empty list accepts no {info.field_name} at all; "
                "to refuse every task write approval = \"deny\""
            )
        if any(not str(v).strip() for v in value):
            raise ValueError("names must not be empty")
        return value


class LimitsSpec(StrictModel):
    """The minimums every task must meet at this node, whatever the coordinator asks."""

    max_epsilon_per_task: float = Field(gt=0, allow_inf_nan=False)
    max_delta_per_task: float = Field(default=1e-5, gt=0, lt=1)
    min_noise_multiplier: float = Field(default=0.3, ge=0, allow_inf_nan=False)
    max_evaluation_epsilon: float = Field(
        default=0.5, ge=0, allow_inf_nan=False,
        description="most of a task's epsilon that evaluations of the global model at this node may take "
        "(evaluation.epsilon; each evaluation releases noisy correct and total counts through the ledger)",
    )
    min_rows: int = Field(
        default=50, ge=1,
        description="smallest data set, in training rows (the data set's 'path', not its test data), this node trains "
        "on with local DP-SGD (privacy.mode = \"local\") or answers statistics queries from; under local DP-SGD never "
        f"fewer than {MIN_ROWS_LOCAL} (a lower value counts as {MIN_ROWS_LOCAL})",
    )
    min_rows_distributed: int = Field(
        default=1, ge=1,
        description="smallest data set this node trains on under distributed DP (privacy.mode = \"distributed\"): "
        "the guarantee is per municipality and the noise is added once, to the securely aggregated sum, so a small "
        "data set needs no minimum of its own; an operator may still set one",
    )
    min_cohort: int = Field(default=10, ge=2, description="smallest cell a statistics query may release")
    small_cells: Literal["publish-suppressed", "withhold"] = Field(
        default="publish-suppressed",
        description=(
            "statistics cells whose noisy count is under min_cohort: publish-suppressed sends them "
            "(they count in national and regional totals) but they are never published for this "
            "node alone; withhold does not send them at all (totals are then marked incomplete)"
        ),
    )
    require_privacy: bool = Field(default=True, description="refuse tasks with privacy.enabled = false")
    require_secure_aggregation: bool = Field(
        default=False,
        description="refuse training tasks without training.secure_aggregation: the coordinator may see only sums of updates",
    )
    require_distributed: bool = Field(
        default=False,
        description="refuse training tasks whose privacy.mode is not \"distributed\" (municipality-level DP, noise "
        "added once to the securely aggregated sum); min_noise_multiplier then bounds the sum's noise multiplier z",
    )


class SecureAggregationSpec(StrictModel):
    """``[secure_aggregation]``: the federation roster this node pins (:mod:`fedgov.privacy.roster`).
    Without it the node takes no part in secure aggregation (secure by default)."""

    roster: ConfigPath = Field(description="the signed federation roster (JSON), relative to the policy file")
    authority_key: str = Field(
        min_length=1,
        description="the roster authority: the SHA-256 fingerprint (64 hex digits) or the base64 Ed25519 public key",
    )

    @field_validator("authority_key")
    @classmethod
    def _authority(cls, v: str) -> str:
        import base64
        import binascii

        v = v.strip()
        if len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v):
            return v.lower()
        try:
            raw = base64.b64decode(v.encode(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(
                "must be the roster authority's SHA-256 fingerprint (64 hex digits, 'fedgov roster show') or its "
                "base64 Ed25519 public key (32 bytes)"
            )
        return v


class NodePolicy(StrictModel):
    """A node's whole policy file."""

    node: str = Field(
        min_length=1, pattern=CODE_PATTERN, description="the node's code, e.g. the CBS code GM0363, or its code in the federation's registry"
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="the organisation's name, as reports show it; none: the CBS name of a GM code, else the code",
    )
    approval: Literal["auto", "manual", "deny"] = Field(
        default="manual",
        description="auto: accept conforming tasks; manual: queue them for an operator; deny: refuse all",
    )
    datasets: list[DatasetSpec] = Field(min_length=1)
    accept: AcceptSpec = AcceptSpec()
    limits: LimitsSpec
    secure_aggregation: SecureAggregationSpec | None = Field(
        default=None, description="the federation roster for secure aggregation; none: secure aggregation is refused",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (value != value.strip() or any(unicodedata.category(ch).startswith("C") for ch in value)):
            raise ValueError("must be plain text: no control characters, no leading or trailing spaces")
        return value

    def display_name(self) -> str:
        """The name this node gives itself in its answers: ``name``, else the CBS name of its code."""
        from fedgov.config.municipalities import display_name

        return self.name or display_name(self.node)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> NodePolicy:
        problems = self._cross_problems()
        if not problems:
            return self
        sink = (info.context or {}).get(_CONTEXT_SINK)
        if isinstance(sink, list):  # load_policy: report each at its own location
            sink.extend(problems)
            return self
        raise ValueError("; ".join(f"{loc}: {msg}" for loc, msg in problems))

    def _cross_problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        seen_names: dict[str, int] = {}
        seen_refs: dict[str, int] = {}
        for i, ds in enumerate(self.datasets):
            if ds.name in seen_names:
                problems.append(
                    (f"datasets[{i}].name", f"data set name '{ds.name}' is already used by datasets[{seen_names[ds.name]}]; names must be unique")
                )
            else:
                seen_names[ds.name] = i
            for ref in ds.refs:
                if ref in seen_refs:
                    problems.append(
                        (f"datasets[{i}].versions", f"contract {ref} is also served by datasets[{seen_refs[ref]}]; a task could not tell which data set to use")
                    )
                else:
                    seen_refs[ref] = i
            if self.limits.max_epsilon_per_task > ds.budget.epsilon:
                problems.append(
                    (
                        "limits.max_epsilon_per_task",
                        f"{self.limits.max_epsilon_per_task} is above the whole budget of data set '{ds.name}' "
                        f"(datasets[{i}].budget.epsilon = {ds.budget.epsilon}); no task could ever be afforded at that "
                        "maximum: lower max_epsilon_per_task or raise the budget",
                    )
                )
            if self.limits.max_delta_per_task > ds.budget.delta:
                problems.append(
                    (
                        "limits.max_delta_per_task",
                        f"{self.limits.max_delta_per_task} is above the whole budget of data set '{ds.name}' "
                        f"(datasets[{i}].budget.delta = {ds.budget.delta}): lower max_delta_per_task or raise the budget",
                    )
                )
        return problems

    def dataset_for(self, contract: Contract) -> DatasetSpec | None:
        """The data set served under ``contract`` (same name, a listed version), or None."""
        for ds in self.datasets:
            if ds.serves(contract):
                return ds
        return None

    def dataset(self, name: str) -> DatasetSpec:
        """The data set called ``name``; KeyError if there is none."""
        for ds in self.datasets:
            if ds.name == name:
                return ds
        raise KeyError(name)


def _validate(data: dict[str, Any], file: str, base_dir: Path | None) -> NodePolicy:
    return _validate_parsed(_policy_model(data, file, base_dir, []), file, base_dir)


def _policy_model(data: dict[str, Any], file: str, base_dir: Path | None, sink: list[tuple[str, str]]) -> NodePolicy:
    try:
        policy = NodePolicy.model_validate(data, context={"base_dir": base_dir, _CONTEXT_SINK: sink})
    except ValidationError as exc:
        problems = problems_from_validation(exc, file)
        # not chained: pydantic's own text quotes the input, which may be a database URL with a password
        raise ConfigError(f"Invalid policy file {file} ({len(problems)} problem(s)):", problems) from None
    if sink:
        problems = [Problem(file, loc, msg) for loc, msg in sink]
        raise ConfigError(f"Invalid policy file {file} ({len(problems)} problem(s)):", problems)
    return policy


def _validate_parsed(policy: NodePolicy, file: str, base_dir: Path | None) -> NodePolicy:
    if base_dir is not None:
        problems = _pin_problems(policy, file)
        if problems:
            raise ConfigError(f"Invalid policy file {file} ({len(problems)} problem(s)):", problems)
    return policy


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, as 64 lower-case hex digits."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_contract_file(path: Path) -> Contract:
    """A contract file the node holds: TOML (as ``configs/contracts``) or canonical JSON."""
    from fedgov.config.contract import load_contract

    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            return Contract.model_validate_json(p.read_bytes())
        except ValidationError as exc:
            problems = problems_from_validation(exc, str(p))
            raise ConfigError(f"Invalid contract file {p} ({len(problems)} problem(s)):", problems) from exc
    return load_contract(p)


_CONTRACTS: OrderedDict[tuple[str, str], Contract] = OrderedDict()


def _contract_by_digest(path: str, sha256: str) -> Contract:
    """The contract file at ``path`` whose bytes have ``sha256`` (just checked): parsed once per
    content. Kept only when the file still has that digest after it was parsed."""
    hit = _CONTRACTS.get((path, sha256))
    if hit is not None:
        return hit
    c = read_contract_file(Path(path))
    if file_sha256(Path(path)) == sha256:
        _CONTRACTS[(path, sha256)] = c
        while len(_CONTRACTS) > 256:
            _CONTRACTS.popitem(last=False)
    return c


def _pin_problems(policy: NodePolicy, file: str) -> list[Problem]:
    """Each pinned contract file exists, has the pinned SHA-256, and is the contract and
    version it is pinned for."""
    problems: list[Problem] = []
    for i, ds in enumerate(policy.datasets):
        for version, pin in ds.contract_files.items():
            where = f"datasets[{i}].contract_files.{json.dumps(version)}"
            if not pin.path.is_file():
                problems.append(Problem(file, f"{where}.path", f"contract file {pin.path} not found"))
                continue
            actual = file_sha256(pin.path)
            if actual != pin.sha256:
                problems.append(
                    Problem(
                        file, f"{where}.sha256",
                        f"contract file {pin.path} has SHA-256 {actual}, the policy pins {pin.sha256}: the file "
                        "changed since it was pinned; check it and pin it again (fedgov node contract add)",
                    )
                )
                continue
            try:
                c = _contract_by_digest(str(pin.path), actual)
            except ConfigError as exc:
                problems.append(Problem(file, f"{where}.path", f"contract file {pin.path} is invalid: {str(exc).splitlines()[0]}"))
                continue
            if c.name != ds.contract or c.version != version:
                problems.append(
                    Problem(
                        file, f"{where}.path",
                        f"contract file {pin.path} is contract {c.ref}, not {ds.contract}@{version}",
                    )
                )
    return problems


def load_policy(path: Path | str) -> NodePolicy:
    """Load and validate a node policy file; every problem is listed with its location.

    Relative data paths are taken from the policy file's directory. The data files need not
    exist yet: the node checks them (against their contract) when it starts.
    """
    p = Path(path)
    base = p.resolve().parent
    try:
        raw = p.read_bytes()
    except OSError:
        raw = None  # load_toml says what is wrong
    data = load_toml(p) if raw is None else parse_toml(raw, p)
    # the key holds where each path of the file leads now: a symlink re-pointed is a new policy
    key = (str(p), str(base), raw, tuple(os.path.realpath(base / v) for v in _path_values(data)))
    policy = _PARSED.get(key) if raw is not None else None
    if policy is None:
        sink: list[tuple[str, str]] = []
        policy = _policy_model(data, str(p), base, sink)
        if raw is not None and not sink:
            _PARSED[key] = policy
            while len(_PARSED) > 1024:
                _PARSED.popitem(last=False)
    # the pinned contract files are checked on every load: they may change without the policy
    return _validate_parsed(policy, str(p), base)


_PARSED: OrderedDict[tuple[str, str, bytes | None, tuple[str, ...]], NodePolicy] = OrderedDict()
"""Policies already parsed and validated in this process, by their file's path and bytes and
where the paths in it lead (a node reads its policy several times per message; an edit changes
the bytes, a re-pointed link the paths)."""

_PATH_KEYS = frozenset({"path", "test_path", "roster", "password_file"})


def _path_values(data: Any) -> list[str]:
    """Every path a policy's TOML names (data files, contract files, the roster), in order."""
    out: list[str] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if k in _PATH_KEYS and isinstance(v, str):
                out.append(v)
            else:
                out.extend(_path_values(v))
    elif isinstance(data, list):
        for v in data:
            out.extend(_path_values(v))
    return out


# --- the decision ----------------------------------------------------------------------------


class Decision(BaseModel):
    """The policy's answer to one task. ``code`` is None when accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accepted: bool
    code: PolicyCode | None = None
    reason: str
    dataset: str | None = Field(default=None, description="the data set the task would use, when known")


def _num(x: float) -> str:
    """A number as a person reads it: 5.0, 1e-05, 0.213457 (6 significant digits)."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    return repr(float(f"{float(x):.6g}"))


def _names(values: Sequence[str]) -> str:
    return ", ".join(values)


def _allowed(value: str | None, allowed: Sequence[str]) -> bool:
    return "*" in allowed or (value is not None and value in allowed)


def _refuse(code: PolicyCode, reason: str, dataset: str | None = None) -> Decision:
    return Decision(accepted=False, code=code, reason=reason, dataset=dataset)


@dataclass(frozen=True)
class Proposal:
    """What the rules look at: a training task or a statistics query, as this node sees it.

    ``task`` is the training task (None for a query): the training-only rules (model,
    strategy, distributed DP, evaluation epsilon) look at it and pass when it is None.
    ``epsilon`` and ``delta`` are what the proposal asks of this node (for a task, the delta
    the node will use: :func:`_task_delta`); ``privacy`` is False only for a task without
    differential privacy. ``rows`` and ``noise_multiplier`` are None while unknown (before
    the data is read, before calibration): their rules then pass.
    """

    noun: Literal["task", "query"]
    kind: str
    contract: Contract
    coordinator: str | None
    submitter: str | None
    secure_aggregation: bool
    privacy: bool
    epsilon: float
    delta: float
    task: Task | None = None
    rows: int | None = None
    noise_multiplier: float | None = None


Rule = Callable[[NodePolicy, Proposal], Decision | None]
"""A policy rule: the refusal when ``proposal`` breaks it, else None."""


def _served(policy: NodePolicy, p: Proposal) -> str | None:
    """The name of the data set serving the proposal's contract (None: not served)."""
    ds = policy.dataset_for(p.contract)
    return ds.name if ds is not None else None


def _approval(policy: NodePolicy, p: Proposal) -> Decision | None:
    if policy.approval == "deny":
        return _refuse(PolicyCode.APPROVAL_DENY, 'this node refuses every task (approval = "deny")')
    return None


def _kind(policy: NodePolicy, p: Proposal) -> Decision | None:
    kinds = policy.accept.kinds
    if p.kind in kinds:
        return None
    return _refuse(
        PolicyCode.KIND_NOT_ALLOWED, f"task kind '{p.kind}' is not accepted; policy accepts {_names(kinds)} (accept.kinds)"
    )


def _party(who: str, value: str | None, allowed: Sequence[str], code: PolicyCode) -> Decision | None:
    """A coordinator or submitter that did not identify itself (None) passes only ``"*"``."""
    if _allowed(value, allowed):
        return None
    shown = f"{who} '{value}' is not accepted" if value is not None else f"the {who} did not identify itself"
    return _refuse(code, f"{shown}; policy accepts only {_names(allowed)} (accept.{who}s)")


def _coordinator(policy: NodePolicy, p: Proposal) -> Decision | None:
    return _party("coordinator", p.coordinator, policy.accept.coordinators, PolicyCode.COORDINATOR_NOT_ALLOWED)


def _submitter(policy: NodePolicy, p: Proposal) -> Decision | None:
    return _party("submitter", p.submitter, policy.accept.submitters, PolicyCode.SUBMITTER_NOT_ALLOWED)


def _contract(policy: NodePolicy, p: Proposal) -> Decision | None:
    if policy.dataset_for(p.contract) is not None:
        return None
    c = p.contract
    if p.noun == "query":
        text = (
            f"query uses contract {c.ref}; this node serves {_names([r for d in policy.datasets for r in d.refs])} "
            "(datasets.contract, datasets.versions)"
        )
    elif same_name := [d for d in policy.datasets if d.contract == c.name]:
        text = f"task uses contract {c.ref}; this node serves only {_names([r for d in same_name for r in d.refs])} (datasets.versions)"
    else:
        text = f"task uses contract {c.ref}; this node serves no version of '{c.name}' (datasets.contract)"
    return _refuse(PolicyCode.CONTRACT_NOT_SERVED, text)


def _model(policy: NodePolicy, p: Proposal) -> Decision | None:
    models = policy.accept.models
    if p.task is None or p.kind != "training" or p.task.model.name in models:
        return None
    return _refuse(
        PolicyCode.MODEL_NOT_ALLOWED,
        f"task uses model '{p.task.model.name}'; policy accepts {_names(models)} (accept.models)",
        _served(policy, p),
    )


def _strategy(policy: NodePolicy, p: Proposal) -> Decision | None:
    strategies = policy.accept.strategies
    if p.task is None or p.kind != "training" or p.task.training.strategy in strategies:
        return None
    return _refuse(
        PolicyCode.STRATEGY_NOT_ALLOWED,
        f"task uses strategy '{p.task.training.strategy}'; policy accepts {_names(strategies)} (accept.strategies)",
        _served(policy, p),
    )


def _secure_aggregation(policy: NodePolicy, p: Proposal) -> Decision | None:
    if p.secure_aggregation or not policy.limits.require_secure_aggregation:
        return None
    setting = "training.secure_aggregation" if p.noun == "task" else "secure_aggregation"
    return _refuse(
        PolicyCode.SECURE_AGGREGATION_REQUIRED,
        f"{p.noun} has {setting} = false; policy requires secure aggregation (limits.require_secure_aggregation)",
        _served(policy, p),
    )


def _privacy(policy: NodePolicy, p: Proposal) -> Decision | None:
    if p.privacy or not policy.limits.require_privacy:
        return None
    return _refuse(
        PolicyCode.PRIVACY_REQUIRED,
        f"{p.noun} has privacy.enabled = false; policy requires differential privacy (limits.require_privacy)",
        _served(policy, p),
    )


def _distributed(policy: NodePolicy, p: Proposal) -> Decision | None:
    if p.task is None or not policy.limits.require_distributed:
        return None
    priv = p.task.privacy
    if priv.enabled and priv.mode == "distributed":
        return None
    return _refuse(
        PolicyCode.DISTRIBUTED_REQUIRED,
        f"task has privacy.mode = \"{priv.mode}\"{'' if priv.enabled else ' and no privacy'}; policy requires "
        "distributed DP (limits.require_distributed)",
        _served(policy, p),
    )


def _epsilon(policy: NodePolicy, p: Proposal) -> Decision | None:
    limit = policy.limits.max_epsilon_per_task
    if not p.privacy or p.epsilon <= limit:
        return None
    return _refuse(
        PolicyCode.EPSILON_ABOVE_MAX,
        f"{p.noun} asks epsilon {_num(p.epsilon)} per node; policy allows at most {_num(limit)} "
        "(limits.max_epsilon_per_task)",
        _served(policy, p),
    )


def _evaluation_epsilon(policy: NodePolicy, p: Proposal) -> Decision | None:
    """Evaluations at the node spend part of a local-DP training task's epsilon."""
    task, limit = p.task, policy.limits.max_evaluation_epsilon
    if task is None or p.kind != "training" or not p.privacy or task.privacy.mode != "local":
        return None
    if task.evaluation.node_evaluations(task.training.rounds) == 0 or task.evaluation.epsilon <= limit:
        return None
    return _refuse(
        PolicyCode.EVALUATION_EPSILON_ABOVE_MAX,
        f"task spends epsilon {_num(task.evaluation.epsilon)} on evaluations at the node; policy allows at most "
        f"{_num(limit)} (limits.max_evaluation_epsilon)",
        _served(policy, p),
    )


def _delta(policy: NodePolicy, p: Proposal) -> Decision | None:
    limit = policy.limits.max_delta_per_task
    if not p.privacy or p.delta <= limit:
        return None
    return _refuse(
        PolicyCode.DELTA_ABOVE_MAX,
        f"{p.noun} asks delta {_num(p.delta)} per node; policy allows at most {_num(limit)} (limits.max_delta_per_task)",
        _served(policy, p),
    )


def _noise(policy: NodePolicy, p: Proposal) -> Decision | None:
    sigma, limit = p.noise_multiplier, policy.limits.min_noise_multiplier
    if not p.privacy or sigma is None or (math.isfinite(sigma) and sigma >= limit):
        return None
    return _refuse(
        PolicyCode.NOISE_BELOW_MIN,
        f"{p.noun} needs noise multiplier {_num(sigma)} at this node; policy requires at least {_num(limit)} "
        "(limits.min_noise_multiplier)",
        _served(policy, p),
    )


def min_rows_for(policy: NodePolicy, task: Task | None) -> tuple[int, str]:
    """The fewest training rows (the data set's ``path``, not its test data) this node serves
    ``task`` from (a statistics query: None), and the policy setting it comes from: the one rule
    on a data set's size, checked by every part of the node and by the simulation's warning.

    ``limits.min_rows_distributed`` for training under distributed DP; ``limits.min_rows`` for
    everything else, and under local DP-SGD at least :data:`MIN_ROWS_LOCAL`."""
    if task is not None and task.privacy.enabled and task.privacy.mode == "distributed":
        return policy.limits.min_rows_distributed, "limits.min_rows_distributed"
    if task is not None:  # training: local DP-SGD, or no DP at all (the same model, the same batches)
        return max(MIN_ROWS_LOCAL, policy.limits.min_rows), "limits.min_rows"
    return policy.limits.min_rows, "limits.min_rows"


def _rows(policy: NodePolicy, p: Proposal) -> Decision | None:
    limit, setting = min_rows_for(policy, p.task)
    if p.rows is None or p.rows >= limit:
        return None
    name = _served(policy, p)
    floor = f"; {MIN_ROWS_LOCAL} at least under local DP-SGD" if setting == "limits.min_rows" and limit > policy.limits.min_rows else ""
    return _refuse(
        PolicyCode.TOO_FEW_ROWS,
        f"data set '{name}' has {p.rows} training rows; policy requires at least {limit} ({setting}{floor})",
        name,
    )


RULES: tuple[Rule, ...] = (
    _approval,
    _kind,
    _coordinator,
    _submitter,
    _contract,
    _model,  # training
    _strategy,  # training
    _secure_aggregation,
    _privacy,
    _distributed,  # training
    _epsilon,
    _evaluation_epsilon,  # training
    _delta,
    _noise,  # training, once calibrated
    _rows,  # training, once the data is read
)
"""Every rule of the node policy, for tasks and queries alike, in the order they are checked:
the first one a proposal breaks decides which refusal the node gives. Who may ask comes
first (approval, kind, coordinator, submitter), then what is asked of which data set (the
contract, the model and strategy, secure aggregation, privacy), then how much (epsilon,
delta, noise, rows). A rule that does not apply to a proposal (a training rule to a query, a
rule on a value still unknown) passes it."""


def decide(policy: NodePolicy, proposal: Proposal) -> Decision:
    """The first of :data:`RULES` that ``proposal`` breaks refuses it; else it is accepted."""
    for rule in RULES:
        refusal = rule(policy, proposal)
        if refusal is not None:
            return refusal
    name = _served(policy, proposal)
    reason = f"{proposal.noun} conforms to the node policy; it would use data set '{name}'"
    if not proposal.privacy:
        reason += " without differential privacy (limits.require_privacy = false)"
    if policy.approval == "manual":
        reason += '; approval = "manual": it waits for an operator\'s approval'
    return Decision(accepted=True, code=None, reason=reason, dataset=name)


def _task_delta(task: Task, rows: int | None) -> float:
    """The delta a node uses for ``task`` (:func:`fedgov.privacy.plans.task_delta`, which this
    module does not import: it loads the DP-SGD machinery), or while ``rows`` is unknown the
    largest it can be."""
    priv = task.privacy
    if priv.mode == "distributed":
        return priv.delta if priv.delta is not None else 1e-5
    return priv.delta_for(rows) if rows is not None else priv.delta_for(1)


def check_task(
    policy: NodePolicy,
    *,
    task: Task,
    contract: Contract,
    rows: int | None,
    noise_multiplier: float | None,
    coordinator: str | None = None,
    submitter: str | None = None,
    kind: str = "training",
) -> Decision:
    """Check one task against the node's policy (:data:`RULES`); the first rule it breaks decides.

    ``rows`` and ``noise_multiplier`` may be None while unknown (before the data is read,
    before calibration): their rules are then skipped, so call again once they are known.
    The delta compared is the one the node will use (:func:`_task_delta`). A task without
    differential privacy (allowed only with ``require_privacy = false``) has no epsilon,
    delta or noise to check.

    The remaining budget is not checked here: the ledger checks and reserves it atomically.
    """
    return decide(
        policy,
        Proposal(
            noun="task",
            kind=kind,
            contract=contract,
            coordinator=coordinator,
            submitter=submitter,
            secure_aggregation=task.training.secure_aggregation,
            privacy=task.privacy.enabled,
            epsilon=task.privacy.target_epsilon,
            delta=_task_delta(task, rows),
            task=task,
            rows=rows,
            noise_multiplier=noise_multiplier,
        ),
    )


def check_query(
    policy: NodePolicy,
    *,
    contract: Contract,
    epsilon: float,
    delta: float,
    coordinator: str | None = None,
    submitter: str | None = None,
    secure_aggregation: bool = False,
) -> Decision:
    """Check a statistics query against the node's policy (:data:`RULES`; those of training
    pass it): approval, kind ``statistics``, coordinator and submitter, the contract served,
    secure aggregation, epsilon and delta per node. Rows and the budget are checked when the
    data is read and when the ledger reserves."""
    return decide(
        policy,
        Proposal(
            noun="query",
            kind="statistics",
            contract=contract,
            coordinator=coordinator,
            submitter=submitter,
            secure_aggregation=secure_aggregation,
            privacy=True,
            epsilon=epsilon,
            delta=delta,
        ),
    )


# --- a starting policy -----------------------------------------------------------------------


def _s(value: str | Path) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    text = value.as_posix() if isinstance(value, Path) else str(value)
    return json.dumps(text, ensure_ascii=False)


def _f(value: float) -> str:
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"not a finite number: {value}")
    return repr(x)


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_s(v) for v in values) + "]"


def _pins_line(pins: Mapping[str, tuple[str | Path, str]]) -> str:
    """The ``contract_files`` line of a data set (one inline table, versions in order)."""
    items = ", ".join(
        f"{_s(v)} = {{ path = {_s(path)}, sha256 = {_s(sha)} }}" for v, (path, sha) in sorted(pins.items())
    )
    return f"contract_files = {{ {items} }}"


def pin_contract_text(text: str, *, dataset: str, version: str, path: str | Path, sha256: str) -> str:
    """The policy ``text`` with ``version`` of data set ``dataset`` served and pinned to the
    contract file ``path`` (``fedgov node contract add``); comments and layout are kept.

    Only the data set's ``versions`` and ``contract_files`` lines change (a ``contract_files``
    line is added after ``versions`` when there is none). Both must be one line each; if not,
    a :class:`ConfigError` asks the operator to edit the file by hand.
    """
    data = tomllib.loads(text)
    sets = data.get("datasets") or []
    index = next((i for i, d in enumerate(sets) if d.get("name") == dataset), None)
    if index is None:
        raise ConfigError(f"the policy has no data set '{dataset}'", [Problem("<policy>", "datasets", f"no data set named {dataset!r}")])
    ds = sets[index]
    versions = sorted({*ds.get("versions", []), version})
    pins: dict[str, tuple[str | Path, str]] = {
        str(v): (str(p["path"]), str(p["sha256"])) for v, p in (ds.get("contract_files") or {}).items()
    }
    pins[version] = (Path(path).as_posix() if isinstance(path, Path) else path, sha256)
    lines = text.splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if line.strip() == "[[datasets]]"]
    start = headers[index]
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    key = re.compile(r"^\s*(versions|contract_files)\s*=")
    found = {m.group(1): i for i in range(start + 1, end) if (m := key.match(lines[i]))}
    if "versions" not in found:
        raise ConfigError(
            f"cannot find the versions line of data set '{dataset}'",
            [Problem("<policy>", f"datasets[{index}].versions", "edit the policy by hand")],
        )
    nl = "\n"
    lines[found["versions"]] = f"versions = {_list(versions)}{nl}"
    if "contract_files" in found:
        lines[found["contract_files"]] = _pins_line(pins) + nl
    else:
        lines.insert(found["versions"] + 1, _pins_line(pins) + nl)
    new_text = "".join(lines)
    check = tomllib.loads(new_text)["datasets"][index]
    if check.get("versions") != versions or set(check.get("contract_files", {})) != set(pins):
        raise ConfigError(
            f"the versions or contract_files of data set '{dataset}' span several lines",
            [Problem("<policy>", f"datasets[{index}].contract_files", "write each on one line, or pin the contract by hand")],
        )
    return new_text


def secure_aggregation_text(roster: str | Path | None, authority_key: str | None) -> str:
    """The policy's ``[secure_aggregation]`` section (commented out without a roster)."""
    if roster is None or authority_key is None:
        return """
# Secure aggregation: the signed federation roster this node pins ('fedgov roster'). Without it
# the node refuses every task and query under secure aggregation.
# [secure_aggregation]
# roster = "roster.json"
# authority_key = "<the roster authority's SHA-256 fingerprint>"
"""
    return f"""
# Secure aggregation: the signed federation roster this node pins ('fedgov roster'). A peer whose
# round keys the roster does not vouch for stops the round at this node.
[secure_aggregation]
roster = {_s(roster)}
authority_key = {_s(authority_key)}
"""


def default_policy_text(
    node: str,
    *,
    name: str | None = None,
    dataset: str,
    contract: str,
    version: str,
    path: str | Path,
    test_path: str | Path | None = None,
    budget_epsilon: float,
    budget_delta: float = 1e-5,
    period: Literal["year", "forever"] = "year",
    approval: Literal["auto", "manual", "deny"] = "manual",
    max_epsilon_per_task: float | None = None,
    max_delta_per_task: float | None = None,
    min_noise_multiplier: float = 0.3,
    min_rows: int = 50,
    min_rows_distributed: int = 1,
    min_cohort: int = 10,
    small_cells: Literal["publish-suppressed", "withhold"] = "publish-suppressed",
    require_privacy: bool = True,
    kinds: Sequence[str] = ("training",),
    models: Sequence[str] = MODEL_NAMES,
    strategies: Sequence[str] = STRATEGIES,
    coordinators: Sequence[str] = ("*",),
    submitters: Sequence[str] = ("*",),
    apps: Sequence[str] = ("fedgov",),
    contract_files: Mapping[str, tuple[str | Path, str]] | None = None,
    roster: str | Path | None = None,
    authority_key: str | None = None,
) -> str:
    """A commented policy file for one data set (``fedgov node init``, simulated nodes).

    ``max_epsilon_per_task`` defaults to the smaller of 3.0 and the budget, and
    ``max_delta_per_task`` to the smaller of 1e-5 and the budget's delta. ``contract_files``
    pins, per version, the contract file the node holds: ``{version: (path, sha256)}``. The
    text is validated before it is returned: bad arguments raise a :class:`ConfigError`.
    """
    max_eps = min(3.0, budget_epsilon) if max_epsilon_per_task is None else max_epsilon_per_task
    max_delta = min(1e-5, budget_delta) if max_delta_per_task is None else max_delta_per_task
    test_line = (
        f"test_path = {_s(test_path)}"
        if test_path is not None
        else '# test_path = "test.csv"'
    )
    name_line = "" if name is None else f"\n# The organisation's name, as reports show it.\nname = {_s(name)}"
    text = f"""\
# fedgov node policy: what this node takes part in. The municipality owns this file;
# the coordinator cannot change it. Relative paths are taken from this file's directory.

# This node's name (its CBS code).
node = {_s(node)}{name_line}
# auto: accept every task that fits this policy; manual: queue each task until an
# operator approves it; deny: refuse every task (e.g. while on hold).
approval = {_s(approval)}

# One [[datasets]] block per data set this node serves. Each has its own privacy budget,
# shared by all tasks on it, and is kept in the node's ledger under its name.
[[datasets]]
# The data set id (the ledger's key): never rename it, or its spent budget is forgotten.
name = {_s(dataset)}
# The data contract the data conforms to, and the contract versions served.
contract = {_s(contract)}
versions = {_list(sorted({version, *(contract_files or {})}))}
# The contract files this node holds, one per version, pinned by SHA-256: a task whose
# contract is not byte for byte one of them is refused before the data is read, and a version
# without a pinned file is not served. 'fedgov node contract add FILE' pins another version.
{_pins_line(contract_files) if contract_files else f'# contract_files = {{ "{version}" = {{ path = "contracts/{contract}-{version}.toml", sha256 = "..." }} }}'}
# Training data (CSV or Parquet), and optional held-out test data.
path = {_s(path)}
{test_line}

# The privacy budget of this data set: all tasks of the period together.
# period: "year" renews it every year, "forever" never does.
[datasets.budget]
epsilon = {_f(budget_epsilon)}
delta = {_f(budget_delta)}
period = {_s(period)}

# What this node takes part in. kinds: training | statistics.
# coordinators and submitters: names, or "*" for any.
[accept]
kinds = {_list(kinds)}
models = {_list(models)}
strategies = {_list(strategies)}
coordinators = {_list(coordinators)}
submitters = {_list(submitters)}
# Task code this node runs (deployment): "fedgov" is the app bundle built by this node's
# own fedgov installation; add a bundle's sha256 ('fedgov app hash') to trust another.
# "*" runs any bundle the coordinator sends, and warns every time.
apps = {_list(apps)}

# Minimums every task must meet at this node, whatever the coordinator asks.
[limits]
# No task may ask more epsilon or delta of this node than these.
max_epsilon_per_task = {_f(max_eps)}
max_delta_per_task = {_f(max_delta)}
# DP-SGD noise must be at least this (noise multiplier, sigma).
min_noise_multiplier = {_f(min_noise_multiplier)}
# Refuse tasks with local DP-SGD, and statistics queries, on fewer training rows than this
# (the rows of 'path', not of 'test_path'; under local DP-SGD never fewer than {MIN_ROWS_LOCAL}).
min_rows = {int(min_rows)}
# The same under distributed DP (privacy.mode = "distributed"): the guarantee is per
# municipality and the noise is added once, to the sum, so no minimum is needed (1).
min_rows_distributed = {int(min_rows_distributed)}
# Statistics: the smallest cell published for this node alone, and what happens to smaller
# ones: "publish-suppressed" sends them with their noise (they count in national and
# regional totals, never shown for this node alone); "withhold" does not send them.
min_cohort = {int(min_cohort)}
small_cells = {_s(small_cells)}
# Refuse tasks with privacy.enabled = false.
require_privacy = {"true" if require_privacy else "false"}
# Refuse training tasks whose updates the coordinator would see one by one
# (true: only tasks with training.secure_aggregation = true).
require_secure_aggregation = false
# Refuse training tasks that are not privacy.mode = "distributed" (noise once, on the sum).
require_distributed = false
"""
    text += secure_aggregation_text(roster, authority_key)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # pragma: no cover - the renderer escapes everything
        raise ConfigError("default policy is not valid TOML", [Problem("<default policy>", "", str(exc))]) from exc
    _validate(data, "<default policy>", None)
    return text
