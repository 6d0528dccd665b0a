"""Simulated federations: which organisations take part and where each one's data comes from.

Members are named by their code in an organisation registry (:mod:`fedgov.config.registry`):
by default the 342 CBS municipalities (``GM0363``), or the registry file the federation names
(``registry = "orgs.csv"``, relative to the federation file) for any other organisations.

Three ways to give members data:

* ``files``: each member names its own CSV or Parquet file (``members[i].data``);
* ``column``: one source file with a column naming each row's organisation (a natural
  partition); a member takes the rows whose value is in its ``values`` (default: its code);
* ``population``: one source file split with sizes following the members' populations in
  the registry (long-tailed), with label or feature skew from a Dirichlet parameter and a
  seed; every member needs a population (a registry file may leave it out: then use
  ``column`` or ``files``).

``[node_policy]`` (and a member's own ``node_policy``) sets what the simulated nodes' policy
files say (:class:`NodePolicyDefaults`). A simulation only: a deployed node's policy is its
operator's file, which no federation file or command line touches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from fedgov.config._base import ConfigPath, StrictModel, validate_file
from fedgov.config.registry import CODE_PATTERN, Registry, default_registry, load_registry
from fedgov.errors import ConfigError, Problem

__all__ = ["Member", "NODE_POLICY_KEYS", "NodePolicyDefaults", "PartitionSpec", "Federation", "load_federation"]


class NodePolicyDefaults(StrictModel):
    """What a simulated node's new policy file says, where it differs from fedgov's simulation
    defaults (``fedgov run`` and ``fedgov query``). Each key is optional; what is not given keeps
    the default. Order of precedence, last wins: fedgov's defaults, the federation's
    ``[node_policy]``, a member's ``node_policy``, ``--node-policy KEY=VALUE`` (and
    ``--node-budget``, ``--approval``) on the command line. The policy written is validated by
    the node's own policy loader, like any other."""

    approval: Literal["auto", "manual", "deny"] | None = Field(
        default=None, description="approval: auto, manual (queue each task for 'fedgov node approve') or deny (default auto)"
    )
    budget_epsilon: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="the data set's total privacy budget, [datasets.budget] epsilon (default 10)",
    )
    max_epsilon_per_task: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="limits.max_epsilon_per_task (default: the task's epsilon, at least 3, at most the budget)",
    )
    min_rows: int | None = Field(
        default=None, ge=1, description="limits.min_rows: fewest training rows for local DP-SGD and statistics (default 50)"
    )
    min_rows_distributed: int | None = Field(
        default=None, ge=1, description="limits.min_rows_distributed: fewest training rows under distributed DP (default 1)"
    )
    require_privacy: bool | None = Field(
        default=None, description="limits.require_privacy: refuse tasks without DP (default true)"
    )

    def given(self) -> dict[str, object]:
        """The keys this table sets."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


NODE_POLICY_KEYS: tuple[str, ...] = tuple(NodePolicyDefaults.model_fields)
"""The keys of ``[node_policy]`` and ``--node-policy``."""


def _errors(items: Sequence[tuple[tuple[int | str, ...], str, str]]) -> ValidationError:
    """A validation error with one line per (location, message, input): a member's own place."""
    return ValidationError.from_exception_data(
        "Federation",
        [InitErrorDetails(type=PydanticCustomError("registry", "{text}", {"text": text, "input_shown": True}), loc=loc, input=value) for loc, text, value in items],
    )


class Member(StrictModel):
    """One organisation in a simulated federation, by its code in the federation's registry."""

    code: str = Field(
        pattern=CODE_PATTERN,
        description="the organisation's code in the registry: a CBS code such as GM0363 by default",
    )
    data: ConfigPath | None = None
    test_data: ConfigPath | None = None
    values: list[str] | None = None
    node_policy: NodePolicyDefaults | None = Field(
        default=None, description="this member's simulated node policy, over the federation's [node_policy]"
    )
    _name: str = PrivateAttr(default="")

    @property
    def name(self) -> str:
        """The organisation's name in the federation's registry (the code before validation)."""
        return self._name or self.code


class PartitionSpec(StrictModel):
    """How a single source data set is split over the members."""

    kind: Literal["population", "column", "files"] = "population"
    column: str | None = None
    skew: Literal["label", "feature", "none"] = "label"
    skew_column: str | None = None
    dirichlet_alpha: float = Field(default=1.0, gt=0)
    min_rows: int = Field(
        default=50, ge=1,
        description="population split only: the smallest member's share of the source (all its rows, before the "
        "test split). Whether a node trains is its policy's limits.min_rows, on its training rows ([node_policy])",
    )
    test_fraction: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> PartitionSpec:
        if self.kind == "column" and not self.column:
            raise ValueError("kind = 'column' needs 'column', the column naming each row's organisation")
        if self.kind != "column" and self.column:
            raise ValueError("'column' only applies to kind = 'column'")
        if self.skew == "feature" and not self.skew_column:
            raise ValueError("skew = 'feature' needs 'skew_column'")
        return self


class Federation(StrictModel):
    """A simulated federation of organisations (by default CBS municipalities)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
    registry: ConfigPath | None = Field(
        default=None,
        description="the organisation registry (a CSV file: code, name[, region, population]); none: the CBS municipalities",
    )
    source: ConfigPath | None = None
    generator: Literal["iwmo"] | None = Field(
        default=None,
        description="synthetic source: when 'source' does not exist it is generated, seeded with 'seed' (iwmo: fedgov.data.iwmo)",
    )
    partition: PartitionSpec = PartitionSpec()
    node_policy: NodePolicyDefaults = Field(
        default_factory=NodePolicyDefaults, description="what the simulated nodes' new policies say (simulation only)"
    )
    members: list[Member] = Field(min_length=1)

    @field_validator("registry")
    @classmethod
    def _registry_loads(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                load_registry(value)
            except ConfigError as exc:
                problems = exc.problems or [Problem(str(value), "", exc.summary)]
                raise _errors([((), str(p), str(value)) for p in problems[:20]]) from None
        return value

    @field_validator("members")
    @classmethod
    def _members_known(cls, members: list[Member], info: ValidationInfo) -> list[Member]:
        if "registry" not in info.data:
            return members  # the registry itself is wrong (reported under 'registry')
        path = info.data["registry"]
        registry = default_registry() if path is None else load_registry(path)
        unknown = [((i, "code"), registry.unknown(m.code), m.code) for i, m in enumerate(members) if m.code not in registry]
        if unknown:
            raise _errors(unknown)
        for m in members:
            m._name = registry.name(m.code)
        return members

    @property
    def organisations(self) -> Registry:
        """The federation's organisation registry (the CBS municipalities by default)."""
        return default_registry() if self.registry is None else load_registry(self.registry)

    @model_validator(mode="after")
    def _check(self) -> Federation:
        codes = [m.code for m in self.members]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"an organisation may take part once; repeated: {', '.join(dupes)}")
        if self.partition.kind == "files":
            missing = [m.code for m in self.members if m.data is None]
            if missing:
                raise ValueError(f"partition kind 'files' needs 'data' for every member; missing for {', '.join(missing)}")
        else:
            if self.source is None:
                raise ValueError(f"partition kind '{self.partition.kind}' needs 'source', the data set to split")
            if self.partition.kind == "population" and self.partition.min_rows * len(self.members) > 10**9:
                raise ValueError("min_rows times the number of members is implausibly large")
        if self.partition.kind == "population":
            registry = self.organisations
            missing = [m.code for m in self.members if (org := registry.get(m.code)) is None or org.population is None]
            if missing:
                shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                raise _errors([(
                    ("partition", "kind"),
                    f"'population' splits the source by each member's population, and {registry.describe()} gives "
                    f"none for {shown}: add a 'population' column to the registry, or use partition.kind = 'column' "
                    "(a column naming each row's organisation) or 'files'",
                    "population",
                )])
        return self

    def name_of(self, code: str) -> str:
        """A member's name in the federation's registry (the code for one it does not hold)."""
        return self.organisations.name(code)

    def policy_name(self, code: str) -> str | None:
        """The ``name`` a simulated node's policy states: the member's registry name, or None
        where a node finds that name itself (a CBS municipality under its own name), so that
        a Dutch municipality's policy stays as it always was."""
        from fedgov.config.municipalities import display_name

        name = self.name_of(code)
        return None if name == display_name(code) else name


def load_federation(path: Path | str) -> Federation:
    """Load and validate a federation TOML file; every problem is listed with its location."""
    return validate_file(Federation, path, "federation")
