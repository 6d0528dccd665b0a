"""Validating a node's data against its data contract, before any training.

A municipality's export is checked column by column against the contract: are all required
columns there, are there columns the contract does not declare, and does every cell parse as
its column's type and lie within its range or categories. All violations are collected and
reported together (row, column, found value, expected value), so that a node operator can fix
an export in one go instead of one error per run. The checks are vectorised with pandas: a
file of tens of thousands of rows is validated in a fraction of a second.

The found values appear only in the :class:`~fedgov.errors.Problem` messages, which are shown
to the node operator who owns the data; they are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedgov.config.contract import Column, ColumnType, Contract
from fedgov.errors import DataValidationError, Problem

__all__ = ["validate_frame", "TRUE_VALUES", "FALSE_VALUES"]

log = logging.getLogger(__name__)

TRUE_VALUES = frozenset({"true", "1", "yes"})
"""Spellings of a true boolean cell (compared case-insensitively)."""
FALSE_VALUES = frozenset({"false", "0", "no"})
"""Spellings of a false boolean cell (compared case-insensitively)."""

_MAX_FOUND_CHARS = 60
_CATEGORIES_SHOWN = 3


@dataclass(frozen=True)
class _Kind:
    """One kind of violation in one column: which cells, and what was expected there."""

    mask: np.ndarray
    expected: Callable[[str], str]


def _constant(text: str) -> Callable[[str], str]:
    """An ``expected`` text that does not depend on the value found."""

    def expected(_found: str) -> str:
        return text

    return expected


def _fmt_num(v: float) -> str:
    """A bound as a person writes it: ``17`` rather than ``17.0``."""
    f = float(v)
    if f.is_integer() and abs(f) < 1e15:
        return str(int(f))
    return repr(f)


def _fmt_found(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_FOUND_CHARS:
        text = text[: _MAX_FOUND_CHARS - 4] + "...'"
    return text


def _as_text(s: pd.Series) -> pd.Series:
    """The column as strings, ``""`` for missing, whatever dtype the caller passed."""
    if pd.api.types.is_string_dtype(s.dtype) and not s.isna().any():
        return s.astype(str)
    return s.astype(object).where(s.notna(), "").astype(str)


def _categories_text(col: Column) -> str:
    cats = col.categories or []
    shown = cats if len(cats) <= _CATEGORIES_SHOWN + 1 else cats[:_CATEGORIES_SHOWN] + ["..."]
    return f"one of {len(cats)} categories ({', '.join(shown)})"


def _check_column(col: Column, text: pd.Series) -> tuple[np.ndarray, list[_Kind]]:
    """Type one column and find its bad cells.

    Returns the typed values (float64 with NaN, or object with None) and the kinds of
    violation found, each with a mask over the rows. A cell is in at most one mask.
    """
    stripped = text.str.strip()
    missing = (stripped == "").to_numpy(dtype=bool)
    kinds: list[_Kind] = []
    if not col.nullable:
        kinds.append(_Kind(missing, _constant("a value (column is not nullable)")))

    if col.is_numeric:
        assert col.min is not None and col.max is not None  # the contract guarantees both
        num = pd.to_numeric(stripped.where(~missing, None), errors="coerce").to_numpy(dtype=np.float64)
        finite = np.isfinite(num)
        if col.type == ColumnType.INTEGER:
            # "39.0" is accepted: exports of integer columns with gaps often write floats.
            integral = finite & (np.floor(np.where(finite, num, 0.0)) == np.where(finite, num, 0.0))
            expected_text = f"an integer in [{_fmt_num(col.min)}, {_fmt_num(col.max)}]"
        else:
            integral = finite
            expected_text = f"a number in [{_fmt_num(col.min)}, {_fmt_num(col.max)}]"
        bad_parse = ~missing & ~integral
        with np.errstate(invalid="ignore"):
            out_of_range = integral & ((num < col.min) | (num > col.max))
        kinds.append(_Kind(bad_parse | out_of_range, _constant(expected_text)))
        typed = np.where(missing | bad_parse, np.nan, num)
        return typed, kinds

    if col.type == ColumnType.BOOLEAN:
        lower = stripped.str.lower()
        is_true = lower.isin(TRUE_VALUES).to_numpy(dtype=bool)
        is_false = lower.isin(FALSE_VALUES).to_numpy(dtype=bool)
        bad = ~missing & ~is_true & ~is_false
        kinds.append(_Kind(bad, _constant("a boolean (true/false, yes/no or 1/0)")))
        typed = np.where(is_true, 1.0, np.where(is_false, 0.0, np.nan))
        return typed, kinds

    values = stripped.to_numpy(dtype=object)
    if col.type == ColumnType.CATEGORICAL:
        cats = col.categories or []
        bad = ~missing & ~stripped.isin(cats).to_numpy(dtype=bool)
        by_lower = {c.lower(): c for c in cats}
        base = _categories_text(col)

        def expected(found: str, base: str = base, by_lower: dict[str, str] = by_lower) -> str:
            hint = by_lower.get(found.lower())
            return f"{base}; did you mean {hint!r}?" if hint is not None else base

        kinds.append(_Kind(bad, expected))
    typed = values.copy()
    typed[missing] = None
    return typed, kinds


def validate_frame(
    df: pd.DataFrame,
    contract: Contract,
    *,
    file: str,
    columns: list[str] | None = None,
    max_listed: int = 200,
) -> pd.DataFrame:
    """Check a frame of text cells (as :func:`~fedgov.data.read_table` gives) against a contract.

    ``columns`` restricts the check to the columns a task needs (its features and target);
    only those are required, validated and returned. Without it every contract column is.
    A column the contract does not declare is always an error: a municipality export should
    carry nothing the contract (and so the data agreement) does not name.

    Cells are compared after stripping surrounding whitespace; an empty cell is missing.
    Integer columns accept any finite number with an integral value (``39``, ``39.0``,
    ``3.9e1``); float columns any finite number; boolean columns ``true/false``, ``yes/no``
    and ``1/0`` in any case; categorical columns exactly one of the contract's categories.

    Every violation becomes a :class:`~fedgov.errors.Problem` with location
    ``row <r>, column '<c>'``, where *r* is the 1-based data row number: line *r + 1* of a
    CSV file (line 1 is the header), row *r - 1* of a Parquet file counted from 0. At most
    ``max_listed`` problems are listed, then one more saying how many were left out.

    Returns the typed frame (same index as ``df``, columns in contract order or in the order
    of ``columns``): integer and float columns as float64 with NaN for missing, boolean
    columns as float64 0/1 with NaN, categorical and string columns as object with None.

    Raises :class:`~fedgov.errors.DataValidationError` when anything does not conform, and
    :class:`ValueError` when ``columns`` names a column the contract does not have (a bug in
    the caller: tasks are checked against their contract when they are loaded).
    """
    names = contract.names()
    if columns is None:
        required = names
    else:
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise ValueError(f"columns {unknown} are not in contract {contract.ref}")
        required = list(dict.fromkeys(columns))

    column_problems: list[Problem] = []
    for c in required:
        if c not in df.columns:
            column_problems.append(
                Problem(
                    file,
                    f"column '{c}'",
                    f"missing; contract {contract.ref} requires this {contract.column(c).type.value} column",
                )
            )
    for c in df.columns:
        if c not in names:
            column_problems.append(
                Problem(
                    file,
                    f"column '{c}'",
                    f"not declared in contract {contract.ref}; remove it from the export "
                    "(a municipality shares only the columns its contract names)",
                )
            )

    present = [c for c in required if c in df.columns]
    n = len(df)
    typed: dict[str, pd.Series] = {}
    listed: list[tuple[int, int, Problem]] = []
    any_bad_row = np.zeros(n, dtype=bool)
    n_violations = 0
    for ci, name in enumerate(present):
        text = _as_text(df[name])
        values, kinds = _check_column(contract.column(name), text)
        # object dtype explicitly: pandas 3 would infer its str dtype, which turns None into NaN.
        typed[name] = pd.Series(values, index=df.index, dtype=values.dtype, name=name)
        if not kinds:
            continue
        kind_of = np.full(n, -1, dtype=np.int16)
        for ki, kind in enumerate(kinds):
            kind_of[kind.mask & (kind_of < 0)] = ki
        bad_positions = np.flatnonzero(kind_of >= 0)
        if bad_positions.size == 0:
            continue
        n_violations += int(bad_positions.size)
        any_bad_row[bad_positions] = True
        # Only the first max_listed of a column can be among the first max_listed overall.
        original = text.to_numpy(dtype=object)
        stripped_first = [str(original[pos]).strip() for pos in bad_positions[:max_listed]]
        for pos, found_stripped in zip(bad_positions[:max_listed], stripped_first, strict=True):
            expected = kinds[int(kind_of[pos])].expected(found_stripped)
            listed.append(
                (
                    int(pos),
                    ci,
                    Problem(
                        file,
                        f"row {int(pos) + 1}, column '{name}'",
                        f"found {_fmt_found(original[pos])}, expected {expected}",
                    ),
                )
            )

    if column_problems or n_violations:
        n_rows = int(any_bad_row.sum())
        listed.sort(key=lambda t: (t[0], t[1]))
        problems = column_problems + [p for _, _, p in listed]
        total = len(column_problems) + n_violations
        if total > max_listed:
            problems = problems[:max_listed]
            problems.append(Problem(file, "", f"... and {total - max_listed} more violation(s) not listed"))
        parts = []
        if column_problems:
            parts.append(f"{len(column_problems)} column problem(s)")
        if n_violations or not column_problems:
            parts.append(f"{n_violations} violation(s) in {n_rows} row(s)")
        summary = f"{file} does not conform to contract {contract.ref}: {'; '.join(parts)}"
        # No counts, rows or values in the log: they are the node operator's, in the error.
        log.warning("%s does not conform to contract %s", file, contract.ref)
        raise DataValidationError(summary, problems)

    log.info("%s conforms to contract %s: %d rows, %d columns", file, contract.ref, n, len(present))
    return pd.DataFrame(typed, index=df.index, columns=present)
