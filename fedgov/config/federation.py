"""Simulated federations: which municipalities take part and where each one's data comes from.

Three ways to give members data:

* ``files``: each member names its own CSV or Parquet file (``members[i].data``);
* ``column``: one source file with a column naming each row's organisation (a natural
  partition); a member takes the rows whose value is in its ``values`` (default: its code);
* ``population``: one source file split with sizes following the municipalities'
  populations (long-tailed), with label or feature skew from a Dirichlet parameter and a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fedgov.config._base import ConfigPath, StrictModel, validate_file
from fedgov.config.municipalities import all_municipalities

__all__ = ["Member", "PartitionSpec", "Federation", "load_federation"]


class Member(StrictModel):
    """One municipality in a simulated federation."""

    code: str = Field(pattern=r"^GM\d{4}$", description="CBS code, e.g. GM0363")
    data: ConfigPath | None = None
    test_data: ConfigPath | None = None
    values: list[str] | None = None

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
    min_rows: int = Field(default=50, ge=1)
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
