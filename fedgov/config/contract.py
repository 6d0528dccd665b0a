"""Data contracts: the standard columns a task needs, as data rather than code.

A contract names each column with its type, its allowed range or categories and whether it
may be empty, says which column is the target and which identifies the person, and carries a
version. A node validates its data against the contract before any training, and all
preprocessing takes its parameters (category lists, bounds for scaling and clipping) from the
contract, never from a look at the data of other nodes.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal
from pathlib import Path

from pydantic import Field, model_validator

from fedgov.config._base import StrictModel, validate_file

__all__ = ["ColumnType", "Column", "Contract", "load_contract"]


class ColumnType(str, Enum):
    """The type of a column's values."""

    INTEGER = "integer"
    FLOAT = "float"
    CATEGORICAL = "categorical"
    BOOLEAN = "boolean"
    STRING = "string"


NUMERIC = (ColumnType.INTEGER, ColumnType.FLOAT)


class Column(StrictModel):
    """One column of a contract."""

    name: str = Field(min_length=1)
    type: ColumnType
    description: str = ""
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None
    unit: str = ""
    scale: Literal["linear", "log"] = "linear"

    @model_validator(mode="after")
    def _check(self) -> Column:
        if self.type == ColumnType.CATEGORICAL:
            if not self.categories:
                raise ValueError("a categorical column needs a non-empty 'categories' list")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError("'categories' holds a value twice")
        elif self.categories is not None:
            raise ValueError(f"'categories' is only allowed on categorical columns, not {self.type.value}")
        if self.type not in NUMERIC and (self.min is not None or self.max is not None):
            raise ValueError(f"'min'/'max' are only allowed on numeric columns, not {self.type.value}")
        if self.type in NUMERIC and (self.min is None or self.max is None):
            raise ValueError(
                "a numeric column needs both 'min' and 'max': DP clipping and scaling take "
                "their bounds from the contract, never from the data"
            )
        if self.scale == "log" and (self.min is None or self.min < 0):
            raise ValueError("scale = 'log' needs a numeric column with min >= 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"'min' ({self.min}) is above 'max' ({self.max})")
        return self

    @property
    def is_numeric(self) -> bool:
        return self.type in NUMERIC


class Contract(StrictModel):
    """A versioned data contract."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: str = Field(pattern=r"^\d+\.\d+(\.\d+)?$")
    description: str = ""
    target: str | None = None
    person_id: str | None = None
    columns: list[Column] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Contract:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column names must be unique; repeated: {', '.join(dupes)}")
        if self.target is not None:
            if self.target not in names:
                raise ValueError(f"target '{self.target}' is not one of the columns")
            tcol = self.column(self.target)
            if tcol.type != ColumnType.CATEGORICAL:
                raise ValueError(f"target '{self.target}' must be categorical, not {tcol.type.value}")
            if tcol.nullable:
                raise ValueError(f"target '{self.target}' must not be nullable")
        if self.person_id is not None and self.person_id not in names:
            raise ValueError(f"person_id '{self.person_id}' is not one of the columns")
        return self

    @property
    def ref(self) -> str:
        """``name@version``, how tasks and policies name a contract."""
        return f"{self.name}@{self.version}"

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def feature_names(self, selected: list[str] | None = None) -> list[str]:
        """The model's input columns: ``selected`` or all but the target and the person id."""
        if selected:
            return list(selected)
        skip = {self.target, self.person_id}
        return [c.name for c in self.columns if c.name not in skip and c.type != ColumnType.STRING]


def load_contract(path: Path | str) -> Contract:
    """Load and validate a contract TOML file; every problem is listed with its location."""
    return validate_file(Contract, path, "contract")
