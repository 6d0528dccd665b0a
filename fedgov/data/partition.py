"""Simulated federations: splitting a data set over municipalities, and writing node files.

Real municipalities differ in two ways that matter for federated learning: size (Rotterdam
has a hundred times the inhabitants of Oudewater) and the make-up of their population (label
and feature skew). A simulation that splits a data set evenly and at random hides both, and
with them the hard part of the problem. So a ``population`` partition gives each node a share
that follows its municipality's population, and draws each node's class (or feature) mix from
a Dirichlet distribution around the global mix: a small ``dirichlet_alpha`` makes nodes very
different, a large one makes them alike.

Everything here is a pure function of its inputs and the federation's seed (a numpy
``Generator``), so that a federation is reproducible bit for bit. Logs name nodes and row
counts, never row values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from fedgov.config.contract import ColumnType, Contract
from fedgov.config.federation import Federation
from fedgov.data.io import atomic_write_bytes, read_table, write_csv
from fedgov.data.validate import validate_frame
from fedgov.errors import ConfigError, DataFileError, DataValidationError, Problem

__all__ = [
    "NodeData",
    "population_sizes",
    "split_federation",
    "train_test_split",
    "materialize",
    "problem_classes",
    "write_manifest",
    "read_manifest",
]

log = logging.getLogger(__name__)


class NodeData(BaseModel):
    """Where one simulated node's data lies, and how many rows it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    name: str
    train_path: Path
    test_path: Path
    train_rows: int
    test_rows: int


_MANIFEST = TypeAdapter(list[NodeData])


def _where(federation: Federation) -> str:
    return f"federation '{federation.name}'"


# --- sizes --------------------------------------------------------------------------------


def population_sizes(weights: Sequence[int], total: int, min_rows: int) -> list[int]:
    """Node sizes proportional to ``weights``, each at least ``min_rows``, summing to ``total``.

    Nodes whose proportional share would fall below ``min_rows`` get exactly ``min_rows``; the
    rest of the rows are shared among the others in proportion to their weights
    (largest-remainder rounding, in exact integer arithmetic). So a node with a larger weight
    never gets fewer rows than one with a smaller weight, and all ``total`` rows are used.

    Raises :class:`ValueError` when ``min_rows * len(weights) > total`` or a weight is not
    positive.
    """
    m = len(weights)
    w = [int(x) for x in weights]
    if m == 0:
        return []
    if any(x <= 0 for x in w):
        raise ValueError("every weight must be positive")
    if min_rows * m > total:
        raise ValueError(f"{m} nodes of at least {min_rows} rows need {min_rows * m} rows; there are {total}")
    fixed = [False] * m
    while True:
        free = [i for i in range(m) if not fixed[i]]
        remaining = total - min_rows * (m - len(free))
        weight_sum = sum(w[i] for i in free)
        small = [i for i in free if remaining * w[i] < min_rows * weight_sum]
        if not small:
            break
        for i in small:
            fixed[i] = True
    # At least one node stays free: the largest free share is at least the average share,
    # which is at least min_rows because total >= min_rows * m.
    sizes = [min_rows if fixed[i] else (remaining * w[i]) // weight_sum for i in range(m)]
    left = total - sum(sizes)
    by_remainder = sorted(free, key=lambda i: (-((remaining * w[i]) % weight_sum), -w[i], i))
    for i in by_remainder[:left]:
        sizes[i] += 1
    return sizes


def _largest_remainder(p: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``p`` (non-negative, summing to 1) that sum to ``total``."""
    raw = p * total
    out: np.ndarray = np.floor(raw).astype(np.int64)
    left = total - int(out.sum())
    if left > 0:
        order = np.argsort(-(raw - out), kind="stable")
        out[order[:left]] += 1
    return out


# --- splitting ----------------------------------------------------------------------------


def _groups(federation: Federation, contract: Contract, df: pd.DataFrame) -> np.ndarray | None:
    """Each row's group for a skewed split (class or feature category), or None for no skew."""
    spec = federation.partition
    if spec.skew == "none":
        return None
    name = contract.target if spec.skew == "label" else spec.skew_column
    if name is None:
        raise ConfigError(
            f"{_where(federation)} asks for label skew, but contract {contract.ref} names no target",
            [Problem(_where(federation), "partition.skew", "label skew needs a contract with a target")],
        )
    if name not in contract.names():
        raise ConfigError(
            f"{_where(federation)}: skew column '{name}' is not in contract {contract.ref}",
            [
                Problem(
                    _where(federation), "partition.skew_column", f"'{name}' is not a column of {contract.ref}"
                )
            ],
        )
    if name not in df.columns:
        raise DataFileError(f"the source data of {_where(federation)} has no column '{name}' to skew on")
    col = contract.column(name)
    values = df[name]
    if col.type == ColumnType.CATEGORICAL:
        codes = pd.Categorical(values.to_numpy(dtype=object), categories=col.categories).codes.astype(
            np.int64
        )
        # Missing values (a nullable column) form a group of their own.
        return np.where(codes < 0, len(col.categories or []), codes)
    if col.type == ColumnType.BOOLEAN:
        x = values.to_numpy(dtype=np.float64, na_value=np.nan)
        return np.where(np.isnan(x), 2, x).astype(np.int64)
    raise ConfigError(
        f"{_where(federation)}: skew column '{name}' must be categorical or boolean",
        [
            Problem(
                _where(federation),
                "partition.skew_column",
                f"'{name}' is {col.type.value}, not categorical or boolean",
            )
        ],
    )


def _skewed_split(
    groups: np.ndarray, sizes: list[int], alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Positions for each node, with its group mix drawn from a Dirichlet around the global mix.

    Each node draws ``p ~ Dirichlet(alpha * prior * K)`` (``prior`` the global group shares,
    ``K`` the number of groups present), so ``E[p] = prior`` and ``alpha`` alone sets how far
    nodes stray from it. Its quota is filled from shuffled per-group pools without
    replacement; when a pool runs dry the shortfall comes from the other groups, most
    preferred first. Nodes are filled smallest first: small nodes get the mix they drew and
    the large ones, which take most of the rows anyway, absorb what is left.
    """
    n_groups = int(groups.max()) + 1 if groups.size else 0
    counts = np.bincount(groups, minlength=n_groups)
    present = counts > 0
    prior = counts / counts.sum()
    concentration = alpha * prior[present] * int(present.sum())
    pools = [rng.permutation(np.flatnonzero(groups == g)) for g in range(n_groups)]
    used = np.zeros(n_groups, dtype=np.int64)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(sizes)
    for node in np.argsort(np.asarray(sizes), kind="stable"):
        quota = int(sizes[node])
        p = np.zeros(n_groups)
        p[present] = rng.dirichlet(concentration)
        p = np.nan_to_num(p, nan=0.0)
        p = p / p.sum() if p.sum() > 0 else prior.copy()
        want = _largest_remainder(p, quota)
        avail = counts - used
        take = np.minimum(want, avail)
        short = quota - int(take.sum())
        for g in np.argsort(-p, kind="stable"):
            if short == 0:
                break
            extra = min(int(avail[g] - take[g]), short)
            take[g] += extra
            short -= extra
        out[node] = np.concatenate([pools[g][used[g] : used[g] + take[g]] for g in range(n_groups)])
        used += take
    return out


def _split_population(
    federation: Federation, contract: Contract, df: pd.DataFrame, rng: np.random.Generator
) -> list[np.ndarray]:
    spec = federation.partition
    registry = federation.organisations
    weights = []
    for m in federation.members:
        org = registry.get(m.code)
        if org is None or org.population is None:  # Federation refuses this; a hand-made one may not
            raise ConfigError(
                f"{_where(federation)}: partition.kind = 'population' needs a population for every member",
                [Problem(_where(federation), "partition.kind", f"{registry.describe()} gives no population for {m.code}")],
            )
        weights.append(org.population or spec.min_rows)
    n = len(df)
    try:
        sizes = population_sizes(weights, n, spec.min_rows)
    except ValueError as exc:
        raise ConfigError(
            f"{_where(federation)} cannot be split: {exc}",
            [
                Problem(
                    _where(federation),
                    "partition.min_rows",
                    f"{len(weights)} members x min_rows {spec.min_rows} = {len(weights) * spec.min_rows} "
                    f"rows needed, the source has {n}",
                )
            ],
        ) from exc
    groups = _groups(federation, contract, df)
    if groups is None:
        perm = rng.permutation(n)
        bounds = np.cumsum([0, *sizes])
        return [perm[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]
    return _skewed_split(groups, sizes, spec.dirichlet_alpha, rng)


def _split_column(federation: Federation, df: pd.DataFrame) -> list[np.ndarray]:
    spec = federation.partition
    col = spec.column
    assert col is not None  # PartitionSpec guarantees it for kind 'column'
    where = _where(federation)
    if col not in df.columns:
        raise ConfigError(
            f"{where}: the source data has no column '{col}' to split on",
            [Problem(where, "partition.column", f"'{col}' is not a column of the source data")],
        )
    key = df[col]
    owner: dict[str, str] = {}
    problems: list[Problem] = []
    for i, m in enumerate(federation.members):
        for v in m.values or [m.code]:
            if v in owner and owner[v] != m.code:
                problems.append(
                    Problem(where, f"members[{i}].values", f"'{v}' is claimed by {owner[v]} and {m.code}")
                )
            owner[v] = m.code
    if problems:
        raise ConfigError(f"{where}: a row may belong to one member only", problems)

    if pd.api.types.is_numeric_dtype(key.dtype):
        as_key = key.to_numpy(dtype=np.float64, na_value=np.nan)

        def rows_of(values: list[str]) -> np.ndarray:
            wanted = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(
                dtype=np.float64
            )
            return np.flatnonzero(np.isin(as_key, wanted))
    else:
        text = key.astype(object).where(key.notna(), "").astype(str).str.strip()

        def rows_of(values: list[str]) -> np.ndarray:
            return np.flatnonzero(text.isin(values).to_numpy(dtype=bool))

    out: list[np.ndarray] = []
    for i, m in enumerate(federation.members):
        values = m.values or [m.code]
        rows = rows_of(values)
        if rows.size == 0:
            problems.append(
                Problem(
                    where,
                    f"members[{i}]",
                    f"{m.code} ({m.name}) has no rows: no value of column '{col}' is one of {values}",
                )
            )
        out.append(rows)
    if problems:
        raise ConfigError(f"{where}: {len(problems)} member(s) have no rows in the source data", problems)
    unassigned = len(df) - sum(r.size for r in out)
    if unassigned:
        log.info("%s: %d source rows belong to no member and are left out", where, unassigned)
    return out


def split_federation(federation: Federation, contract: Contract, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Split one source frame over the federation's members; keys are member codes in member order.

    ``df`` is the typed frame of the whole source (from :func:`~fedgov.data.validate_frame`);
    for kind ``column`` it must also hold the partition column. Each row goes to at most one
    member, and each member's rows keep the source order and index (so that disjointness can
    be checked on the index).

    * ``population``: sizes from :func:`population_sizes` over the members' approximate
      populations in the federation's registry (one listed with population 0 counts as ``min_rows``), then a
      label-, feature- or un-skewed draw (see the module docstring), seeded with
      ``federation.seed``;
    * ``column``: each member takes the rows whose partition column holds one of its
      ``values`` (default: its code); a member without rows is a :class:`ConfigError`;
    * ``files``: each member has its own file, nothing to split: :class:`ValueError`.
    """
    kind = federation.partition.kind
    if kind == "files":
        raise ValueError("partition kind 'files' has nothing to split: each member names its own data file")
    if kind == "population":
        rng = np.random.default_rng(federation.seed)
        positions = _split_population(federation, contract, df, rng)
    else:
        positions = _split_column(federation, df)
    out: dict[str, pd.DataFrame] = {}
    for m, pos in zip(federation.members, positions, strict=True):
        out[m.code] = df.iloc[np.sort(pos)]
        log.debug("%s: %s gets %d rows", _where(federation), m.code, len(pos))
    return out


def train_test_split(df: pd.DataFrame, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded random split into ``(train, test)``, each keeping the source order.

    The test part holds ``round(len(df) * test_fraction)`` rows, but at least 1 and at most
    ``len(df) - 1`` when ``len(df) >= 2``, so that a node can both train and evaluate.
    The split is not stratified: nodes are small and skewed, and a random split keeps them
    as they are.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), not {test_fraction}")
    n = len(df)
    n_test = int(round(n * test_fraction))
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    else:
        n_test = 0
    perm = np.random.default_rng(seed).permutation(n)
    is_test = np.zeros(n, dtype=bool)
    is_test[perm[:n_test]] = True
    return df.iloc[np.flatnonzero(~is_test)], df.iloc[np.flatnonzero(is_test)]


# --- writing node files -------------------------------------------------------------------


def _load(path: Path, contract: Contract) -> pd.DataFrame:
    return validate_frame(read_table(path), contract, file=str(path))


def ensure_source(federation: Federation) -> None:
    """Generate a synthetic source (``generator``) when its file does not exist yet."""
    if federation.generator == "iwmo" and federation.source is not None and not Path(federation.source).is_file():
        from fedgov.data.iwmo import ensure

        ensure(Path(federation.source), seed=federation.seed)


InvalidMember = Callable[[int, DataValidationError], None]
"""``on_invalid(i, error)``: member ``i``'s data does not conform to the contract."""


def problem_classes(error: DataValidationError) -> list[str]:
    """What is wrong in a data file, by column and kind, without a row number or a found value:
    ``"column 'sex': 2 cell(s), expected one of 2 categories (Female, Male)"``. For the
    simulation's own summary of a member's data (a found value can identify a person)."""
    import re

    counts: dict[tuple[str, str], int] = {}
    for p in error.problems:
        m = re.fullmatch(r"row \d+, column '(.+)'", p.location)
        if m is None:
            if p.location:  # a column problem (missing, undeclared): no value in it
                counts[(p.location, p.message)] = counts.get((p.location, p.message), 0) + 1
            continue
        expected = p.message.partition(", expected ")[2].split("; did you mean")[0] or "another value"
        key = (f"column '{m.group(1)}'", f"expected {expected}")
        counts[key] = counts.get(key, 0) + 1
    return [
        f"{where}: {what}" if what.startswith(("missing", "not declared")) else f"{where}: {n} cell(s), {what}"
        for (where, what), n in counts.items()
    ]


def _write_raw(frame: pd.DataFrame, path: Path) -> None:
    """A member's data as it was read (text cells), for its node to check and refuse."""
    write_csv(frame, path)


def materialize(
    federation: Federation, contract: Contract, out_dir: Path | str, *, on_invalid: InvalidMember | None = None
) -> list[NodeData]:
    """Write every member's ``train.csv`` and ``test.csv`` under ``out_dir/<code>/``.

    For kinds ``population`` and ``column`` the source is read, projected on the contract's
    columns (a source may hold more: it is a simulation's raw material, not an export),
    validated against the contract as a whole (a partition column the contract does not declare is set aside for
    the split and not written), split over the members, and each member's part split into
    train and test with seed ``federation.seed + i`` (``i`` its place in the member list).
    For kind ``files`` each member's ``data`` is read and validated; its ``test_data`` is the
    test set when given, else ``data`` is split the same way. Violations in several member
    files are reported together.

    Node files hold the contract's columns in the contract's order, missing values as empty
    cells, and are written atomically. Returns one :class:`NodeData` per member, in member
    order, with absolute paths.

    ``on_invalid`` (a simulation): a member whose data does not conform (its file, for kind
    ``files``; its rows of the source, for kind ``column``) does not stop the others. Its data
    is written to its node as it was read, split the same way, so that its node checks it and
    refuses as a real node would (``data-invalid``); ``on_invalid(i, error)`` is told.
    """
    out = Path(out_dir).resolve()
    spec = federation.partition
    ensure_source(federation)
    parts: list[tuple[pd.DataFrame, pd.DataFrame]] = []
    invalid: set[int] = set()  # members whose data is written as read, for their node to refuse
    if spec.kind == "files":
        problems: list[Problem] = []
        for i, m in enumerate(federation.members):
            assert m.data is not None  # Federation guarantees it for kind 'files'
            try:
                full = _load(m.data, contract)
                if m.test_data is not None:
                    parts.append((full, _load(m.test_data, contract)))
                else:
                    parts.append(train_test_split(full, spec.test_fraction, federation.seed + i))
            except DataValidationError as exc:
                if on_invalid is None:
                    problems.extend(exc.problems)
                    continue
                on_invalid(i, exc)
                raw = read_table(m.data)
                parts.append(
                    (raw, read_table(m.test_data)) if m.test_data is not None
                    else train_test_split(raw, spec.test_fraction, federation.seed + i)
                )
                invalid.add(i)
        if problems:
            raise DataValidationError(
                f"member data of {_where(federation)} does not conform to contract {contract.ref}", problems
            )
    else:
        assert federation.source is not None  # Federation guarantees it for these kinds
        raw = read_table(federation.source)
        org: pd.Series | None = None
        if spec.kind == "column" and spec.column not in contract.names():
            if spec.column not in raw.columns:
                raise ConfigError(
                    f"{_where(federation)}: the source {federation.source} has no column '{spec.column}'",
                    [
                        Problem(
                            _where(federation),
                            "partition.column",
                            f"'{spec.column}' is not a column of the source",
                        )
                    ],
                )
            org = raw[spec.column]
            raw = raw.drop(columns=[spec.column])
        # The source is raw material for a simulation, not a node's export: each simulated
        # node gets only the columns its contract declares (missing ones are still errors).
        raw = raw[[c for c in raw.columns if c in set(contract.names())]]
        try:
            typed = validate_frame(raw, contract, file=str(federation.source))
        except DataValidationError as exc:
            if on_invalid is None or spec.kind != "column":
                raise
            # One member's rows of the source do not stop the others: each member's rows are
            # checked on their own, and a member whose rows do not conform refuses at its node.
            parts, invalid = _column_parts(federation, contract, raw, org, on_invalid, exc)
        else:
            if org is not None:
                typed = typed.assign(**{str(spec.column): org.str.strip()})
            split = split_federation(federation, contract, typed)
            for i, m in enumerate(federation.members):
                node = split[m.code]
                if org is not None:
                    node = node.drop(columns=[spec.column])
                parts.append(train_test_split(node, spec.test_fraction, federation.seed + i))

    small = [
        Problem(
            _where(federation),
            f"members[{i}]",
            f"{m.code} ({m.name}) has {len(tr) + len(te)} row(s); "
            "a node needs at least 2 (one to train on, one to test)",
        )
        for i, (m, (tr, te)) in enumerate(zip(federation.members, parts, strict=True))
        if len(tr) == 0 or len(te) == 0
    ]
    if small:
        raise DataValidationError(f"{_where(federation)}: {len(small)} member(s) have too little data", small)

    order = [c for c in contract.names()]
    nodes: list[NodeData] = []
    for i, (m, (train, test)) in enumerate(zip(federation.members, parts, strict=True)):
        cols = [c for c in order if c in train.columns]
        node_dir = out / m.code
        train_path, test_path = node_dir / "train.csv", node_dir / "test.csv"
        if i in invalid:
            _write_raw(train, train_path)
            _write_raw(test, test_path)
        else:
            write_csv(train[cols], train_path, contract)
            write_csv(test[[c for c in order if c in test.columns]], test_path, contract)
        nodes.append(
            NodeData(
                code=m.code,
                name=m.name,
                train_path=train_path,
                test_path=test_path,
                train_rows=len(train),
                test_rows=len(test),
            )
        )
    log.info("%s: wrote %d nodes under %s", _where(federation), len(nodes), out)
    return nodes


def _column_parts(
    federation: Federation, contract: Contract, raw: pd.DataFrame, org: pd.Series | None,
    on_invalid: InvalidMember, error: DataValidationError,
) -> tuple[list[tuple[pd.DataFrame, pd.DataFrame]], set[int]]:
    """A ``column`` split of a source that does not conform as a whole: each member's rows,
    checked on their own (typed when they conform, as read when not); rows of no member are
    left out, as in a conforming source. All members' rows not conforming: ``error``."""
    spec = federation.partition
    keyed = raw if org is None else raw.assign(**{str(spec.column): org})
    positions = _split_column(federation, keyed)
    parts: list[tuple[pd.DataFrame, pd.DataFrame]] = []
    invalid: set[int] = set()
    for i, (m, pos) in enumerate(zip(federation.members, positions, strict=True)):
        rows = raw.iloc[np.sort(pos)]
        try:
            node = validate_frame(rows, contract, file=f"{federation.source} (the rows of {m.code})")
        except DataValidationError as exc:
            on_invalid(i, exc)
            invalid.add(i)
            node = rows
        parts.append(train_test_split(node, spec.test_fraction, federation.seed + i))
    if len(invalid) == len(federation.members):
        raise error
    return parts, invalid


def write_manifest(nodes: Sequence[NodeData], path: Path | str) -> None:
    """Write the node list as JSON, atomically, for the node processes to find their files."""
    atomic_write_bytes(Path(path), _MANIFEST.dump_json(list(nodes), indent=2) + b"\n")


def read_manifest(path: Path | str) -> list[NodeData]:
    """Read a manifest written by :func:`write_manifest`; DataFileError if it is missing or bad."""
    p = Path(path)
    if not p.is_file():
        raise DataFileError(f"{p}: manifest not found")
    try:
        return _MANIFEST.validate_json(p.read_bytes())
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise DataFileError(f"{p}: not a valid node manifest ({first['msg']})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # pragma: no cover - pydantic wraps these
        raise DataFileError(f"{p}: not a valid node manifest ({exc})") from exc
