"""The contracts a node holds, and its data checked against them (no Flower in here).

A node serves each data set under contract files it holds itself, in its node directory
(``contracts/<name>-<version>.toml``), pinned by SHA-256 in its policy (``contract_files``).
The coordinator still sends the task's contract with every message, but the node does not
take it on trust: :func:`check_received` compares it, byte for byte, with the canonical JSON
(``Contract.model_dump_json()``) of the pinned file, before any data is read. A coordinator
that changes a bound, drops ``person_id`` or adds a category gets ``contract-mismatch`` and
learns nothing about the data.

The data itself is checked against the pinned contracts when it is registered (``fedgov node
data check``, and at ``fedgov node start``): the details (rows, columns, found values) go to
a report file only the node's user can read (``reports/data-check-<dataset>.txt``, mode
0600), and the result (files' SHA-256, contract's SHA-256, conforms or not) into the node
state. At task time :func:`data_status` looks that result up (and checks again when the
files changed), so that a task is told only that the data conforms or does not.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedgov.config import Contract
from fedgov.config.datasource import DataSource, SqlQuery, source_id, source_label
from fedgov.errors import ConfigError, DataFileError, DataNotConforming, DataValidationError, FedgovError, Problem
from fedgov.node.policy import DatasetSpec, NodePolicy, file_sha256, pin_contract_text, read_contract_file

if TYPE_CHECKING:
    import pandas as pd

    from fedgov.node.home import NodeHome

__all__ = [
    "conforming_frame",
    "CONTRACTS_DIR",
    "REPORTS_DIR",
    "ContractCheck",
    "DataCheck",
    "contract_sha256",
    "held_contracts",
    "check_received",
    "add_contract",
    "pin_new_contract",
    "check_dataset",
    "check_all",
    "data_status",
    "serving",
    "one_read",
    "read_text",
    "validated_frame",
    "current_home",
    "report_path",
    "append_private",
]

log = logging.getLogger(__name__)

CONTRACTS_DIR = "contracts"
REPORTS_DIR = "reports"

DataStatus = Literal["conforms", "invalid", "missing"]


def contract_sha256(contract: Contract) -> str:
    """SHA-256 of a contract's canonical JSON (what the node compares and records)."""
    return hashlib.sha256(contract.model_dump_json().encode()).hexdigest()


# --- the contracts the node holds ---------------------------------------------------------------


def held_contracts(ds: DatasetSpec) -> dict[str, Contract]:
    """The contracts pinned for a data set, per version (the policy checked their hashes)."""
    return {v: read_contract_file(pin.path) for v, pin in ds.contract_files.items()}


@dataclass(frozen=True)
class ContractCheck:
    """The node's verdict on a received contract.

    ``outcome``: ``ok`` (it is the pinned contract of data set ``dataset``), ``not-served``
    (the node serves nothing under that contract name: the policy check refuses it), or
    ``mismatch`` (refuse with ``contract-mismatch``). ``ref`` is the contract as the message
    names it, ``name@version``, when it could be read."""

    outcome: Literal["ok", "not-served", "mismatch"]
    ref: str
    dataset: str | None = None
    why: str = ""


def _ref_text(value: object) -> str:
    text = str(value)
    return text if text and len(text) <= 60 and all(c.isalnum() or c in "._-" for c in text) else "unknown"


def check_received(policy: NodePolicy, contract_json: str) -> ContractCheck:
    """Is ``contract_json`` byte for byte the canonical JSON of a contract this node holds?"""
    try:
        raw = json.loads(contract_json)
        name, version = raw["name"], raw["version"]
    except (ValueError, KeyError, TypeError):
        return ContractCheck("mismatch", "unknown", why="the message's contract is not a contract")
    ref = f"{_ref_text(name)}@{_ref_text(version)}"
    sets = [ds for ds in policy.datasets if ds.contract == name]
    if not sets:
        return ContractCheck("not-served", ref)
    for ds in sets:
        pin = ds.contract_files.get(str(version))
        if pin is None:
            continue
        held = read_contract_file(pin.path)
        if held.model_dump_json() == contract_json:
            return ContractCheck("ok", ref, ds.name)
        return ContractCheck("mismatch", ref, ds.name, why=f"differs from the pinned file {pin.path.name}")
    return ContractCheck("mismatch", ref, why="no contract file pinned for this version")


def pin_new_contract(home_path: Path, contract: Contract, source: Path | None = None) -> tuple[str, str]:
    """Put a contract file into the node directory (``contracts/``): a copy of ``source``'s
    bytes, or else the contract's canonical JSON. Returns (path relative to the node
    directory, its SHA-256). An existing, different file of the same name is an error."""
    directory = Path(home_path) / CONTRACTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".json" if source is None or source.suffix.lower() == ".json" else ".toml"
    target = directory / f"{contract.name}-{contract.version}{suffix}"
    data = Path(source).read_bytes() if source is not None else (contract.model_dump_json(indent=2) + "\n").encode()
    if target.exists() and target.read_bytes() != data:
        raise ConfigError(
            f"{target} exists with other content",
            [Problem(str(target), "", "a node keeps each contract version it pinned; remove the old file first if it is not pinned")],
        )
    if not target.exists():
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(target)
    return f"{CONTRACTS_DIR}/{target.name}", hashlib.sha256(data).hexdigest()


def add_contract(home: NodeHome, source: Path, *, dataset: str | None = None) -> tuple[str, Contract, str]:
    """``fedgov node contract add``: copy a contract file into the node directory and pin it
    (a new version) for the data set serving that contract name, or ``dataset``.
    Returns (data set, contract, the file's SHA-256)."""
    from fedgov.node.policy import load_policy

    contract = read_contract_file(source)
    policy = home.policy()
    if dataset is None:
        names = [ds.name for ds in policy.datasets if ds.contract == contract.name]
        if len(names) != 1:
            raise ConfigError(
                f"which data set serves contract {contract.name}?",
                [Problem(str(home.policy_path), "datasets.contract",
                         f"{'no data set' if not names else 'several data sets'} under {contract.name}: give --dataset")],
            )
        dataset = names[0]
    try:
        ds = policy.dataset(dataset)
    except KeyError:
        raise ConfigError(
            f"the policy has no data set '{dataset}'", [Problem(str(home.policy_path), "datasets.name", f"no data set {dataset!r}")]
        ) from None
    if ds.contract != contract.name:
        raise ConfigError(
            f"data set '{dataset}' is served under contract {ds.contract}, not {contract.name}",
            [Problem(str(home.policy_path), "datasets.contract", f"{ds.contract} != {contract.name} ({source})")],
        )
    rel, sha = pin_new_contract(home.path, contract, source)
    text = pin_contract_text(home.policy_path.read_text("utf-8"), dataset=dataset, version=contract.version, path=rel, sha256=sha)
    tmp = home.policy_path.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        load_policy(tmp)  # the new policy must load, pins and all, before it replaces the old one
    except FedgovError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(home.policy_path)
    home.audit.append("contract", payload={"dataset": dataset, "contract": contract.ref, "file": rel, "sha256": sha})
    return dataset, contract, sha


# --- node-local reports -------------------------------------------------------------------------


def report_path(home_path: Path, name: str) -> Path:
    return Path(home_path) / REPORTS_DIR / name


def _reports_dir(home_path: Path) -> Path:
    d = Path(home_path) / REPORTS_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def _write_private(path: Path, text: str, *, append: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def append_private(home_path: Path, name: str, text: str) -> Path:
    """Append ``text`` to a node-local report (``reports/<name>``, mode 0600, directory 0700)."""
    path = _reports_dir(home_path) / name
    _write_private(path, text, append=True)
    return path


# --- the data, checked against the contracts ----------------------------------------------------


@dataclass
class DataCheck:
    """One data set's files checked against one contract: for the operator's terminal and report."""

    dataset: str
    contract: str
    contract_sha256: str
    data_sha256: str
    conforms: bool
    missing: bool = False
    problems: list[Problem] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """The columns the problems concern (file-level problems have none)."""
        out = set()
        for p in self.problems:
            if "column '" in p.location:
                out.add(p.location.split("column '", 1)[1].rstrip("'"))
        return sorted(out)

    @property
    def n_problems(self) -> int:
        return len(self.problems)


def _files(ds: DatasetSpec) -> list[DataSource]:
    """Where a data set's rows are read: its files, or its SQL queries."""
    if getattr(ds, "sql", None) is not None:
        return ds.sources
    return [p for p in (ds.path, ds.test_path) if p is not None]


# --- SQL data sets: one read per message --------------------------------------------------------
#
# A file has a digest that costs no read of its rows (its SHA-256, computed again only when its
# size, inode or times change). A query has none: its rows are its version. So a node runs a
# query once per message that needs the data (a hello, each round's train and evaluate, a
# statistics query, a data check) and keeps that snapshot, with the SHA-256 of its rows in
# canonical order (fedgov.data.sql.frame_digest), for that message only. Within one message the
# recorded check, the released row count and the computation all come from the one snapshot;
# across messages the digest plays the role of a file's: an unchanged table hits the recorded
# check, the row-count release and the prepared-data cache; a changed one is checked again
# (and refused when it no longer conforms) and gets a new released count at the next hello.

_SNAPSHOTS: contextvars.ContextVar[dict[str, tuple[pd.DataFrame, str]] | None] = contextvars.ContextVar(
    "fedgov_sql_snapshots", default=None
)


@contextlib.contextmanager
def one_read() -> Iterator[None]:
    """While a message (or a data check) is handled: each SQL query runs at most once, and every
    use of its rows in between sees that one snapshot. Nested scopes share the outer one."""
    if _SNAPSHOTS.get() is not None:
        yield
        return
    token = _SNAPSHOTS.set({})
    try:
        yield
    finally:
        _SNAPSHOTS.reset(token)


def _snapshot(q: SqlQuery) -> tuple[pd.DataFrame, str]:
    from fedgov.data.sql import frame_digest, read_sql

    scope = _SNAPSHOTS.get()
    key = source_id(q)
    if scope is not None and key in scope:
        return scope[key]
    frame = read_sql(q)
    snap = (frame, frame_digest(frame))
    if scope is not None:
        scope[key] = snap
    return snap


def source_exists(src: DataSource) -> bool:
    """A file is there; a query is taken to be (reading it says otherwise, as DataFileError)."""
    return True if isinstance(src, SqlQuery) else Path(src).is_file()


def read_text(src: DataSource) -> pd.DataFrame:
    """A data source's rows as text cells: the file read now, or this message's snapshot of the query."""
    if isinstance(src, SqlQuery):
        return _snapshot(src)[0]
    from fedgov.data import read_table

    return read_table(src)


def validated_frame(src: DataSource, contract: Contract, *, columns: list[str] | None = None) -> pd.DataFrame:
    """A data source validated against ``contract`` (:func:`fedgov.data.validate_frame`; errors
    name the file, or the query and its database), its rows in their canonical order (a
    query's, independent of the order the database returned them in)."""
    from fedgov.data import validate_frame

    frame = validate_frame(read_text(src), contract, file=source_label(src), columns=columns)
    if isinstance(src, SqlQuery):
        frame = frame.sort_index().reset_index(drop=True)
    return frame


_HASHES: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()


def file_digest(path: DataSource) -> str:
    """The SHA-256 of a file, computed again when its size, inode, modification or change time
    differ (a replacement that keeps the modification time, as ``cp -p`` does, changes the
    inode or the change time); of a query, the SHA-256 of this message's snapshot of its rows."""
    if isinstance(path, SqlQuery):
        return _snapshot(path)[1]
    return _hash(path)


def _hash(path: DataSource) -> str:
    if isinstance(path, SqlQuery):
        return _snapshot(path)[1]
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    digest = _HASHES.get(key)
    if digest is None:
        digest = _HASHES[key] = file_sha256(path)
        while len(_HASHES) > 4096:  # a simulation's worker serves hundreds of nodes' files
            _HASHES.popitem(last=False)
    else:
        _HASHES.move_to_end(key)
    return digest


_FRAMES: OrderedDict[tuple[str, str, str], pd.DataFrame] = OrderedDict()


def conforming_frame(path: DataSource, contract: Contract) -> pd.DataFrame | None:
    """The typed frame of ``path`` as :func:`check_dataset` validated it against ``contract``
    (every column conforms), while the file (or the query's rows) is unchanged; None when it
    was not checked here lately. Spares the task's read (:func:`fedgov.node.prepare`) a second
    validation."""
    try:
        digest = file_digest(path)
    except (OSError, FedgovError):
        return None
    return _FRAMES.get((source_id(path), digest, contract_sha256(contract)))


def data_sha256(ds: DatasetSpec) -> str | None:
    """The SHA-256 of a data set's files or queries' rows (training, then test); None when one
    is missing (a query: cannot be read)."""
    files = _files(ds)
    if not all(source_exists(p) for p in files):
        return None
    try:
        hashes = [_hash(p) for p in files]
    except FedgovError as exc:  # a query that cannot be run: check_dataset says why
        # the query's label and the reason only: no password, no value of the rows (fedgov.data.sql)
        log.warning("data set %s cannot be read: %s", ds.name, str(exc).splitlines()[0])
        return None
    return hashes[0] if len(hashes) == 1 else hashlib.sha256(":".join(hashes).encode()).hexdigest()


def check_dataset(ds: DatasetSpec, contract: Contract) -> DataCheck:
    """Read and validate a data set's files (or run its queries) against ``contract``; every problem collected."""
    with one_read():
        return _check_dataset(ds, contract)


def _check_dataset(ds: DatasetSpec, contract: Contract) -> DataCheck:
    digest = data_sha256(ds)
    check = DataCheck(dataset=ds.name, contract=contract.ref, contract_sha256=contract_sha256(contract),
                      data_sha256=digest or "", conforms=False)
    if digest is None:
        check.missing = True
        for p in _files(ds):
            if not source_exists(p):
                check.messages.append(f"file not found: {p}")
                continue
            try:
                _hash(p)
            except FedgovError as exc:
                check.messages.append(str(exc).splitlines()[0])
        return check
    for p in _files(ds):
        try:
            before = file_digest(p)
            frame = validated_frame(p, contract)
            if file_digest(p) == before:  # the file that was read: kept under its own digest only
                _FRAMES[(source_id(p), before, check.contract_sha256)] = frame
                while len(_FRAMES) > 8:  # wanted only by the same message's prepare
                    _FRAMES.popitem(last=False)
        except DataValidationError as exc:
            check.problems.extend(exc.problems)
            check.messages.append(str(exc).splitlines()[0])
        except FedgovError as exc:
            check.missing = True
            check.messages.append(str(exc).splitlines()[0])
    check.conforms = not check.problems and not check.missing
    return check


def _report_text(check: DataCheck, home_path: Path) -> str:
    lines = [
        f"fedgov data check of data set '{check.dataset}' against contract {check.contract}",
        f"time (UTC): {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"node directory: {home_path}",
        f"data SHA-256: {check.data_sha256 or '-'}",
        f"contract SHA-256 (canonical JSON): {check.contract_sha256}",
        f"conforms: {'yes' if check.conforms else 'no'}",
        "",
        "This report stays at the node: it names rows and the values found in them.",
        "",
    ]
    lines += check.messages
    lines += [f"{p.file}: {p.location}: {p.message}" if p.location else f"{p.file}: {p.message}" for p in check.problems]
    return "\n".join(lines) + "\n"


def record(home: NodeHome, checks: list[DataCheck]) -> Path:
    """Write the checks' report (one data set, mode 0600), record each result in the node
    state and audit it (no counts, rows or values)."""
    path = _reports_dir(home.path) / f"data-check-{checks[0].dataset}.txt"
    _write_private(path, "\n".join(_report_text(check, home.path) for check in checks))
    for check in checks:
        _record_one(home, check)
    return path


def _record_one(home: NodeHome, check: DataCheck) -> None:
    if check.data_sha256:
        home.state.record_data_check(
            dataset=check.dataset, data_sha256=check.data_sha256, contract=check.contract,
            contract_sha256=check.contract_sha256, conforms=check.conforms,
        )
    home.audit.append(
        "check",
        payload={"dataset": check.dataset, "contract": check.contract, "data_sha256": check.data_sha256 or None,
                 "contract_sha256": check.contract_sha256, "conforms": check.conforms},
    )


def check_all(home: NodeHome) -> list[tuple[DataCheck, Path]]:
    """``fedgov node data check``: every data set against every contract it pins (a policy or
    contract error raises a :class:`ConfigError`; a version without a pinned file too)."""
    policy = home.policy()
    unpinned = [(i, ds, v) for i, ds in enumerate(policy.datasets) for v in ds.unpinned]
    if unpinned:
        raise ConfigError(
            f"Policy {home.policy_path} lists contract versions without a pinned contract file",
            [Problem(str(home.policy_path), f"datasets[{i}].contract_files",
                     f"version {v} of {ds.contract} has no pinned file: fedgov node contract add CONTRACT_FILE")
             for i, ds, v in unpinned],
        )
    out: list[tuple[DataCheck, Path]] = []
    for ds in policy.datasets:
        with one_read():  # a query runs once for all the contract versions it is checked against
            checks = [check_dataset(ds, contract) for contract in held_contracts(ds).values()]
        if checks:
            path = record(home, checks)
            out.extend((check, path) for check in checks)
    return out


def data_status(home: NodeHome, ds: DatasetSpec, contract: Contract) -> DataStatus:
    """At task time: whether the data set's current files conform to ``contract``, as
    recorded; checked (and recorded) again when the files changed or were never checked."""
    digest = data_sha256(ds)
    if digest is None:
        return "missing"
    found = home.state.data_check(ds.name, data_sha256=digest, contract_sha256=contract_sha256(contract))
    if found is None:
        check = check_dataset(ds, contract)
        record(home, [check])
        if check.missing:
            return "missing"
        return "conforms" if check.conforms else "invalid"
    return "conforms" if found.conforms else "invalid"


# --- which node a handler runs for ---------------------------------------------------------------

_HOME: contextvars.ContextVar[NodeHome | None] = contextvars.ContextVar("fedgov_node_home", default=None)


@contextlib.contextmanager
def serving(home: NodeHome) -> Iterator[None]:
    """While a message is handled: the node directory whose recorded data checks apply."""
    token = _HOME.set(home)
    try:
        with one_read():
            yield
    finally:
        _HOME.reset(token)


def current_home() -> NodeHome | None:
    return _HOME.get()


def require_conforming(contract: Contract, train_path: DataSource) -> None:
    """For :func:`fedgov.node.prepare`: when a node directory is being served, its recorded
    data check must say the files conform (:class:`DataFileError` / :class:`DataNotConforming`
    otherwise). Without one (a direct call) nothing is looked up."""
    home = current_home()
    if home is None or not home.exists():
        return
    ds = home.policy().dataset_for(contract)
    if ds is None or source_id(ds.train_source) != source_id(train_path):
        return
    status = data_status(home, ds, contract)
    if status == "missing":
        raise DataFileError(f"the data set of {contract.ref} cannot be read")
    if status == "invalid":
        raise DataNotConforming(f"the data set does not conform to {contract.ref}", [])
