"""Simulated federations: which municipalities take part and where each one's data comes from.

Three ways to give members data:

* ``files``: each member names its own CSV or Parquet file (``members[i].data``);
* ``column``: one source file with a column naming each row's organisation (a natural
  partition); a member takes the rows whose value is in its ``values`` (default: its code);
* ``population``: one source file split with sizes following the municipalities'
  populations (long-tailed), with label or feature skew from a Dirichlet parameter and a seed.

``[node_policy]`` (and a member's own ``node_policy``) sets what the simulated nodes' policy
files say (:class:`NodePolicyDefaults`). A simulation only: a deployed node's policy is its
operator's file, which no federation file or command line touches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedgov.config._base import ConfigPath, StrictModel, validate_file
from fedgov.config.municipalities import all_municipalities

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


class Member(StrictModel):
    """One municipality in a simulated federation."""

    code: str = Field(pattern=r"^GM\d{4}$", description="CBS code, e.g. GM0363")
    data: ConfigPath | None = None
    test_data: ConfigPath | None = None
    values: list[str] | None = None
    node_policy: NodePolicyDefaults | None = Field(
        default=None, description="this member's simulated node policy, over the federation's [node_policy]"
    )

    @model_validator(mode="after")
    def _known(self) -> Member:
        if self.code not in all_municipalities():
            raise ValueError(f"'{self.code}' is not a CBS municipality code in nl_gemeenten.csv")
        return self

    @property
    def name(self) -> str:
        return all_municipalities()[self.code].name


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
    """A simulated federation of municipalities."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    seed: int = 0
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

    @model_validator(mode="after")
    def _check(self) -> Federation:
        codes = [m.code for m in self.members]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(f"a municipality may take part once; repeated: {', '.join(dupes)}")
        if self.partition.kind == "files":
            missing = [m.code for m in self.members if m.data is None]
            if missing:
                raise ValueError(f"partition kind 'files' needs 'data' for every member; missing for {', '.join(missing)}")
        else:
            if self.source is None:
                raise ValueError(f"partition kind '{self.partition.kind}' needs 'source', the data set to split")
            if self.partition.kind == "population" and self.partition.min_rows * len(self.members) > 10**9:
                raise ValueError("min_rows times the number of members is implausibly large")
        return self


def load_federation(path: Path | str) -> Federation:
    """Load and validate a federation TOML file; every problem is listed with its location."""
    return validate_file(Federation, path, "federation")
