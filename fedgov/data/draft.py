"""First drafts of the files a new data set needs: a contract, an organisation registry, a
simulated federation, a training task and a statistics query, from one table with a column
naming each row's organisation (``fedgov data draft``).

Pure: a data frame in, texts out (the command line reads the file and writes the texts). The
drafts are a start, not a finished contract: every numeric bound is read off the table and
rounded outward, and says so in a comment, because DP clips to a contract's bounds and they
must be facts known without the data (a law, a code list, a plausible range) before a real
federation uses them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pandas as pd

from fedgov.config.registry import CODE_PATTERN
from fedgov.data.validate import FALSE_VALUES, TRUE_VALUES

__all__ = ["Draft", "DraftError", "draft", "nice_bounds"]

MAX_CATEGORIES = 50
"""A text column with at most this many distinct values is drafted as categorical; with more,
as free text (never a feature)."""


SMALL_ORGANISATION = 500
"""Organisations with fewer rows than this (the median) get a distributed-DP task."""

MIN_MEMBER_ROWS = 2
"""An organisation with fewer rows is left out of the drafted federation: a simulated node needs
a row to train on and one to test."""


class DraftError(ValueError):
    """The table cannot be drafted as asked (a column named that it does not have, ...)."""


@dataclass
class Draft:
    """The drafted files' texts, by their path relative to the output folder."""

    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _q(text: str) -> str:
    """A TOML basic string."""
    out = text.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in out)
    return f'"{out}"'


def nice_bounds(lo: float, hi: float, *, integer: bool) -> tuple[float, float]:
    """``[lo, hi]`` widened outward to round numbers (a step of the power of ten below the range), so
    that the draft does not state the table's exact minimum and maximum."""
    if lo == hi:
        step = 10.0 ** math.floor(math.log10(abs(lo))) if lo else 1.0
    else:
        step = 10.0 ** math.floor(math.log10(hi - lo))
    if integer:
        step = max(1.0, step)
    nlo = math.floor(lo / step) * step
    nhi = math.ceil(hi / step) * step
    if lo >= 0 > nlo:
        nlo = 0.0
    if nlo == nhi:
        nhi = nlo + step
    if integer:
        return float(int(nlo)), float(int(nhi))
    # printed short, and never inward of the table's own range (floating point can round either way)
    slo, shi = float(f"{nlo:.12g}"), float(f"{nhi:.12g}")
    return (slo if slo <= lo else lo), (shi if shi >= hi else hi)


def _num(v: float, integer: bool) -> str:
    return str(int(v)) if integer else repr(float(v))


def _column(name: str, cells: pd.Series, *, target: bool) -> tuple[str, str]:
    """The ``[[columns]]`` block of one column, and its type."""
    stripped = cells.str.strip()
    present = stripped[stripped != ""]
    nullable = len(present) < len(stripped)
    lines = ["[[columns]]", f"name = {_q(name)}"]
    distinct = sorted(set(present))
    lower = {v.lower() for v in distinct}
    kind: str
    if not target and distinct and lower <= (TRUE_VALUES | FALSE_VALUES) and len(lower) <= 2 and not lower <= {"0", "1"}:
        kind = "boolean"
        lines.append('type = "boolean"')
    else:
        as_int = pd.to_numeric(present, errors="coerce")
        numeric = len(present) > 0 and bool(as_int.notna().all()) and not target
        if numeric and len(distinct) > 2:
            integer = bool((as_int == as_int.round()).all()) and not present.str.contains(r"[.eE]").any()
            lo, hi = nice_bounds(float(as_int.min()), float(as_int.max()), integer=integer)
            kind = "integer" if integer else "float"
            lines += [
                f'type = "{kind}"',
                "# min and max were read off the table and rounded outward: replace them by bounds known",
                "# without the data (DP clips every value to them, and a contract is shared with everyone)",
                f"min = {_num(lo, integer)}",
                f"max = {_num(hi, integer)}",
            ]
        elif target or len(distinct) <= MAX_CATEGORIES:
            kind = "categorical"
            lines += [
                'type = "categorical"',
                "# the categories found in the table: add any that this table happens not to hold",
                "categories = [" + ", ".join(_q(v) for v in distinct) + "]",
            ]
        else:
            kind = "string"
            lines += ['type = "string"', f"# free text ({len(distinct)} distinct values): never a model feature"]
    if nullable:
        lines.append("nullable = true")
    return "\n".join(lines), kind


def _codes(values: list[str]) -> dict[str, str]:
    """A registry code for each organisation value: the value itself where it is a valid code,
    else a slug of it; unique ignoring case."""
    pattern = re.compile(CODE_PATTERN)
    out: dict[str, str] = {}
    taken: set[str] = set()
    for v in values:
        code = v if pattern.fullmatch(v) else re.sub(r"[^A-Za-z0-9_.-]+", "-", v).strip("-._")[:60] or "org"
        if not code[0].isalnum():
            code = "o" + code
        base, i = code, 2
        while code.lower() in taken:
            code, i = f"{base}-{i}", i + 1
        taken.add(code.lower())
        out[v] = code
    return out


def draft(
    df: pd.DataFrame,
    *,
    name: str,
    source: str,
    target: str,
    organisation: str,
    person_id: str | None = None,
    drop: tuple[str, ...] = (),
    epsilon: float = 2.0,
    central: str | None = None,
) -> Draft:
    """Drafts for the table ``df`` (read as text, as a CSV holds it), whose file is ``source``
    (relative to the output folder). Files: ``contracts/NAME.toml``,
    ``registries/NAME.csv``, ``federations/NAME.toml``, ``tasks/NAME.toml``,
    ``queries/NAME.toml``. ``central``: a held-out test file (relative to the output folder) the
    task evaluates the global model on every round (``[evaluation] centralized``)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise DraftError(f"name '{name}': lower-case letters, digits, '-' and '_', starting with a letter or digit")
    for what, col in (("target", target), ("organisation", organisation), ("person id", person_id), *(("drop", d) for d in drop)):
        if col is not None and col not in df.columns:
            raise DraftError(f"{what} column '{col}' is not a column of the table (its columns: {', '.join(map(str, df.columns))})")
    if target == organisation:
        raise DraftError("the target cannot be the organisation column")
    cells = df.astype(str).where(df.notna(), "")
    out = Draft()

    # The contract: every column but the organisation (the federation's split) and those dropped.
    blocks, kinds = [], {}
    for col in df.columns:
        if col in (organisation, *drop):
            continue
        block, kind = _column(str(col), cells[col], target=(col == target))
        blocks.append(block)
        kinds[str(col)] = kind
    n_target = cells[target].str.strip().replace("", pd.NA).dropna().nunique()
    if n_target < 2:
        raise DraftError(f"target column '{target}' has fewer than two values: nothing to learn")
    if (cells[target].str.strip() == "").any():
        raise DraftError(f"target column '{target}' has empty cells: a target must always be known (drop those rows first)")
    head = [
        f"# Draft contract for {PurePosixPath(source).name} (fedgov data draft): check every column before a federation uses it.",
        f"name = {_q(name)}",
        'version = "1.0"',
        f"description = {_q(f'Drafted from {PurePosixPath(source).name}')}",
        f"target = {_q(target)}",
    ]
    if person_id is not None:
        head.append(f"person_id = {_q(person_id)}")
        out.notes.append(f"person id '{person_id}': a person may have several rows; the contract says so")
    out.files[f"contracts/{name}.toml"] = "\n".join(head) + "\n\n" + "\n\n".join(blocks) + "\n"

    # The registry and the federation: one member per value of the organisation column.
    sizes = cells[organisation].str.strip().value_counts()
    # a member needs a row to train on and one to test: an organisation with a single row is left out
    orgs = sorted((v for v, n in sizes.items() if v and n >= MIN_MEMBER_ROWS), key=lambda v: (len(v), v) if v.isdigit() else (0, v))
    left_out = int(sum(1 for v, n in sizes.items() if v and n < MIN_MEMBER_ROWS))
    if left_out:
        out.notes.append(f"{left_out} organisation(s) with a single row left out of the federation (a node needs a row to train on and one to test)")
    if len(orgs) < 2:
        raise DraftError(f"organisation column '{organisation}' has fewer than two values: a federation needs two members")
    codes = _codes(orgs)
    numeric_orgs = all(v.isdigit() for v in orgs)
    reg = ["code,name"]
    for v in orgs:
        shown = f"{organisation} {v}" if numeric_orgs else v
        reg.append(f"{codes[v]},{_csv(shown)}")
    out.files[f"registries/{name}.csv"] = "\n".join(reg) + "\n"
    members = []
    for v in orgs:
        m = f"[[members]]\ncode = {_q(codes[v])}"
        if codes[v] != v:
            m += f"\nvalues = [{_q(v)}]"
        members.append(m)
    out.files[f"federations/{name}.toml"] = (
        f"# Draft federation (fedgov data draft): the {len(orgs)} organisations of column '{organisation}' in\n"
        f"# {source}, each with its own rows (a natural partition).\n"
        f"name = {_q(name)}\nregistry = {_q(f'../registries/{name}.csv')}\nsource = {_q(f'../{source}')}\nseed = 0\n\n"
        f'[partition]\nkind = "column"\ncolumn = {_q(organisation)}\ntest_fraction = 0.2\n\n'
        "# What the simulated nodes' policies say (a real node's policy is its own): no minimum of rows\n"
        "# of their own (local DP-SGD still needs 10 training rows); see the README, 'Steering a simulation'.\n"
        "[node_policy]\nmin_rows = 1\n\n" + "\n\n".join(members) + "\n"
    )

    # The task: the defaults, which size batches, epochs and rounds from each node's data; small
    # organisations get distributed DP (noise once on the sum), large ones DP-SGD at every node.
    median = float(sizes[sizes.index.isin(orgs)].median())
    small = median < SMALL_ORGANISATION
    if small:
        how = (f"# The organisations are small (median {median:.0f} rows, under {SMALL_ORGANISATION}): distributed DP, each\n"
               "# clipping its whole update and adding a share of the noise, summed under secure aggregation; the\n"
               "# guarantee is per organisation (and so per person in it). Record-level DP-SGD on a few hundred\n"
               "# rows drowns in its own noise (README, 'Utility under DP').\n")
        privacy = f'[privacy]\nmode = "distributed"\nupdate_clip = 3.0\ntarget_epsilon = {epsilon:g}\n\n[training]\nsecure_aggregation = true\nrounds = 4\n'
        out.notes.append(f"median {median:.0f} rows per organisation: the task uses distributed DP under secure aggregation")
    else:
        how = f"# DP-SGD at every node (median {median:.0f} rows per organisation).\n"
        privacy = f"[privacy]\ntarget_epsilon = {epsilon:g}\n"
    out.files[f"tasks/{name}.toml"] = (
        f"# Draft task (fedgov data draft): predict '{target}' from the other columns, epsilon {epsilon:g} per\n"
        f"# node for the whole task; the training settings left to fedgov's defaults.\n" + how +
        f"name = {_q(name)}\ndescription = {_q(f'Predict {target}')}\n"
        f"contract = {_q(f'../contracts/{name}.toml')}\nfederation = {_q(f'../federations/{name}.toml')}\n\n"
        f'[model]\nname = "logreg"\n\n' + privacy
        + (
            "\n# rows held out before the split, for the coordinator's figure of the global model every round\n"
            f"[evaluation]\ncentralized = {_q(f'../{central}')}\n" if central else ""
        )
    )

    # The query: rows per target class, and the mean of the first numeric column.
    measures = [f'[[measures]]\nname = "rows-by-{_slug(target)}"\nkind = "count"\nby = [{_q(target)}]']
    numeric = [c for c, k in kinds.items() if k in ("integer", "float") and c != person_id]
    if numeric:
        measures.append(f'[[measures]]\nname = "mean-{_slug(numeric[0])}"\nkind = "mean"\ncolumn = {_q(numeric[0])}')
    out.files[f"queries/{name}.toml"] = (
        f"# Draft statistics query (fedgov data draft): rows per class of '{target}'"
        + (f" and the mean of '{numeric[0]}'" if numeric else "")
        + ",\n# with the Laplace mechanism, epsilon 0.5 per node.\n"
        f"name = {_q(f'{name}-overview')}\ncontract = {_q(f'../contracts/{name}.toml')}\n"
        f"federation = {_q(f'../federations/{name}.toml')}\n\n"
        '[privacy]\nepsilon = 0.5\ndelta = 0.0\nmechanism = "laplace"\n'
        + ("# rows kept per person (the first k; a rule fixed without looking at the data)\n"
           "max_rows_per_person = 10\n" if person_id else "max_rows_per_person = 1\n")
        + "\n" + "\n\n".join(measures) + "\n"
    )
    free = [c for c, k in kinds.items() if k == "string"]
    if free:
        out.notes.append(f"free-text column(s) {', '.join(free)}: kept in the contract, never a feature; drop them with --drop if not needed")
    out.notes.append(f"{len(orgs)} organisations in column '{organisation}'; {len(kinds)} contract columns")
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "column"


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
