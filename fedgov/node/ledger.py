"""The privacy-budget ledger of a node: one SQLite file, append-only events, check before commit.

Each municipal node keeps, per data set it serves, a total privacy budget ``(epsilon, delta)``
for a period (a calendar year in UTC, or forever). The budget is a *ledger*, not a variable
(dp_accounting's ``PrivacyAccountant.compose`` and ``ledger``): every change is an immutable
event, the balance is always recomputed from the events, and nothing is ever overwritten.

The protocol of a task on a node::

    reserve  before the task touches any data: its whole planned spend (e.g. the DPPlan's
             history for all rounds). Refused with BudgetExceeded if the composition of
             everything already committed plus this task exceeds the budget.
    spend    once per round, *before* the round touches data (write-ahead): what the round
             uses (that round's history entries). Refused beyond the reservation.
    release  when the task ends: the task is closed, and from then on only what it actually
             spent counts; the unused part of the reservation is handed back.

What counts against a data set's budget (its *committed* epsilon) is the composition of, for
each **open** task (reserved, not released), its whole reservation, and for each **closed**
task, its recorded spends. A crash between reservation and release therefore never hands
budget back: the open reservation keeps counting in full until someone releases it. Because
spends are recorded before the round runs, a crash in the middle of a round over-counts (the
round is counted, perhaps not run), never under-counts.

Concurrency: every read-check-write runs in one ``BEGIN IMMEDIATE`` transaction, which takes
SQLite's write lock at once, so reservers in threads and in separate processes serialize and
can never both see the same balance. The file is in WAL mode with ``synchronous=FULL`` (a
commit that returned survives a power cut), the ``events`` table refuses ``UPDATE`` and
``DELETE`` by triggers, and at most one ``reserve`` and one ``release`` event exist per
``(dataset, task_id)`` by unique indexes.

Errors (``PrivacyError`` and ``FedgovError`` are in :mod:`fedgov.errors`)::

    FedgovError
    ├── PrivacyError              (exit 14)
    │   └── LedgerError           the ledger refuses an operation (spend without reservation,
    │       │                     spend beyond it, re-reserving a closed task, ...)
    │       └── BudgetExceeded    a reservation would exceed the data set's budget; .status
    └── LedgerCorrupted           the file is not a fedgov ledger, or is damaged (exit 31)

A damaged or foreign file is never recreated or "repaired": deleting a ledger would hand back
every epsilon ever spent. Restore it from a backup instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedgov.node import _sqlite
from fedgov.errors import PrivacyError
from fedgov.privacy.accounting import HistoryEntry, epsilon_from_history, merge_history
from fedgov.errors import LedgerError, BudgetExceeded, LedgerCorrupted

__all__ = [
    "APPLICATION",
    "SCHEMA_VERSION",
    "Budget",
    "BudgetExceeded",
    "BudgetStatus",
    "LedgerCorrupted",
    "LedgerError",
    "LedgerEvent",
    "Mechanism",
    "PrivacyLedger",
    "TaskState",
    "compose",
]

logger = logging.getLogger(__name__)

APPLICATION = "fedgov-privacy-ledger"
SCHEMA_VERSION = 1
_APPLICATION_ID = 0x46474C47  # "FGLG", in the SQLite header (PRAGMA application_id)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # fixed width: string order == time order

TaskState = Literal["none", "open", "closed"]
_INHERITED: list[sqlite3.Connection] = []  # connections a forked child inherited: never used, never closed


# --------------------------------------------------------------------------- errors


# --------------------------------------------------------------------------- models


class Mechanism(BaseModel):
    """What a task reserves, or a round spends: a frozen value object (dp_accounting's DpEvent).

    - ``dpsgd``: ``history`` of ``(noise_multiplier, sample_rate, steps)`` entries, Opacus'
      ``accountant.history`` (Poisson-subsampled Gaussian, Abadi et al. 2016,
      arXiv:1607.00133), evaluated by ``accountant``; ``epsilon`` stays None, ``delta`` 0
      (its delta is whatever the budget leaves after the other mechanisms).
    - ``gaussian``, ``laplace``, ``other``: an already calibrated ``(epsilon, delta)``
      guarantee (``delta`` 0 for pure DP), composed with the rest by basic composition.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dpsgd", "gaussian", "laplace", "other"]
    history: list[tuple[float, float, int]] = Field(default_factory=list)
    epsilon: float | None = None
    delta: float = 0.0
    accountant: Literal["prv", "rdp"] = "prv"

    @model_validator(mode="after")
    def _check(self) -> Mechanism:
        if self.kind == "dpsgd":
            if self.epsilon is not None or self.delta != 0:
                raise ValueError("a dpsgd mechanism is given by its history; leave epsilon and delta unset")
            for sigma, q, steps in self.history:
                if not (math.isfinite(sigma) and sigma > 0):
                    raise ValueError(f"history entry {(sigma, q, steps)}: noise multiplier must be > 0")
                if not 0 < q <= 1:
                    raise ValueError(f"history entry {(sigma, q, steps)}: sample rate must be in (0, 1]")
                if steps < 0:
                    raise ValueError(f"history entry {(sigma, q, steps)}: steps must be >= 0")
        else:
            if self.history:
                raise ValueError(f"a {self.kind} mechanism has no history; give epsilon (and delta)")
            if self.epsilon is None or not (math.isfinite(self.epsilon) and self.epsilon >= 0):
                raise ValueError(f"a {self.kind} mechanism needs a finite epsilon >= 0")
            if not 0 <= self.delta < 1:
                raise ValueError(f"delta must be in [0, 1), got {self.delta}")
        return self

    @classmethod
    def dpsgd(cls, history: list[HistoryEntry], *, accountant: Literal["prv", "rdp"] = "prv") -> Mechanism:
        return cls(kind="dpsgd", history=list(history), accountant=accountant)

    def steps_by_key(self) -> dict[tuple[float, float], int]:
        """DP-SGD steps per ``(noise_multiplier, sample_rate)`` (empty for other kinds)."""
        out: dict[tuple[float, float], int] = {}
        for sigma, q, steps in self.history:
            out[(sigma, q)] = out.get((sigma, q), 0) + steps
        return out


class Budget(BaseModel):
    """A data set's total privacy budget for a period (``year``: a calendar year in UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    period: Literal["year", "forever"] = "year"


class LedgerEvent(BaseModel):
    """One immutable row of the ledger.

    ``mechanism`` is None for ``release``; ``round`` is set for ``spend``; ``budget`` is the
    budget a ``reserve`` was checked against (kept for audit).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int
    time: datetime
    dataset: str
    task_id: str
    kind: Literal["reserve", "spend", "release"]
    mechanism: Mechanism | None
    round: int | None = None
    note: str = ""
    budget: Budget | None = None


class BudgetStatus(BaseModel):
    """A data set's balance in the budget period of some moment.

    ``epsilon_committed`` is the composition (:func:`compose`) of every open task's
    reservation and every closed task's spends, at the budget's delta: this is what is
    checked against the budget. ``epsilon_naive`` is, for comparison, the plain sum of each
    task's epsilon alone at the budget's delta (what summing per-task reports would give; it
    is not a guarantee at that delta). ``remaining = budget.epsilon - epsilon_committed``.
    ``events`` counts the events of the tasks in the period; ``year`` is None for ``forever``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    budget: Budget
    year: int | None
    epsilon_committed: float
    epsilon_naive: float
    remaining: float
    open_tasks: list[str]
    closed_tasks: list[str]
    events: int


# --------------------------------------------------------------------------- composition


@functools.lru_cache(maxsize=4096)
def _dpsgd_epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    """Epsilon of one merged DP-SGD history (cached: it runs under the ledger's write lock)."""
    return epsilon_from_history(history=list(history), delta=delta, accountant=accountant)


def _parts(mechanisms: list[Mechanism], delta: float) -> tuple[tuple[HistoryEntry, ...], float, str, float, float]:
    """``(merged dpsgd history, delta left for it, accountant, epsilon of the rest, delta of the rest)``."""
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    history: list[HistoryEntry] = []
    accountant = "prv"
    eps_other = 0.0
    delta_other = 0.0
    for m in mechanisms:
        if m.kind == "dpsgd":
            history.extend(m.history)
            if m.accountant == "rdp":
                accountant = "rdp"
        else:
            eps_other += float(m.epsilon or 0.0)
            delta_other += m.delta
    merged = tuple(sorted(merge_history(history)))  # sorted: one cache key per multiset
    return merged, delta - delta_other, accountant, eps_other, delta_other


def _check_delta(merged: tuple[HistoryEntry, ...], delta_dpsgd: float, delta: float, delta_other: float) -> None:
    if delta_dpsgd < 0 or (merged and delta_dpsgd <= 0):
        raise PrivacyError(
            f"the non-DP-SGD mechanisms use delta {delta_other:g}, which leaves "
            f"{'nothing' if delta_dpsgd <= 0 else f'{delta_dpsgd:g}'} of the total delta {delta:g}"
            + (" for the DP-SGD steps" if merged else "")
        )


def _dpsgd_bound(merged: tuple[HistoryEntry, ...], delta_dpsgd: float, accountant: str, *, cheap: bool) -> float:
    """Epsilon of the merged DP-SGD history. ``cheap``: the RDP bound only (milliseconds)."""
    if not merged:
        return 0.0
    rdp = _dpsgd_epsilon(merged, delta_dpsgd, "rdp")
    if accountant == "rdp" or cheap:
        return rdp
    return min(_dpsgd_epsilon(merged, delta_dpsgd, "prv"), rdp)


def compose(mechanisms: list[Mechanism], *, delta: float) -> float:
    """Epsilon at ``delta`` of all ``mechanisms`` run on the same data, in any adaptive order.

    How:

    1. Every DP-SGD history is merged into ONE accountant history (equal
       ``(noise_multiplier, sample_rate)`` entries summed; order does not matter to
       composition). Each entry is a Poisson-subsampled Gaussian mechanism; the PRV
       accountant (Gopi, Lee and Wutschitz 2021, arXiv:2106.02848) composes their
       privacy-loss random variables numerically, which is valid for adaptive composition:
       the same theorem that lets one accountant cover all steps of one training run covers
       the steps of several tasks on the same data. That is why ``k`` identical tasks cost
       much less than ``k`` times one.
    2. The other mechanisms (``gaussian``, ``laplace``, ``other``, each an ``(eps_i,
       delta_i)`` guarantee) are added by basic composition (Dwork and Roth 2014, Thm. 3.16,
       which also holds adaptively): the result is ``(eps_dpsgd + sum eps_i, delta)``-DP with
       the DP-SGD part evaluated at ``delta_dpsgd = delta - sum delta_i``. If nothing is
       left for DP-SGD (``delta_dpsgd <= 0``) this raises :class:`PrivacyError`.
    3. If any DP-SGD mechanism asks for ``rdp``, the whole history is evaluated with RDP
       (Mironov et al. 2019, arXiv:1908.10530): the looser of the two, so every task's own
       choice is honoured. With ``prv`` the result is ``min(PRV, RDP)``: both are valid
       upper bounds at the same delta, so their minimum is too. In practice PRV is always
       the smaller (RDP is 9 to 16% looser; FLOWER-NOTES); taking the minimum makes the cheap
       RDP pre-check of :meth:`PrivacyLedger.reserve` exact rather than approximately right.

    Pure: no I/O. DP-SGD evaluations are cached per (merged history, delta, accountant).
    """
    merged, delta_dpsgd, accountant, eps_other, delta_other = _parts(mechanisms, delta)
    _check_delta(merged, delta_dpsgd, delta, delta_other)
    return eps_other + _dpsgd_bound(merged, delta_dpsgd, accountant, cheap=False)


def _fits(mechanisms: list[Mechanism], budget: Budget) -> tuple[bool, float | None, str]:
    """Whether ``compose(mechanisms) <= budget``: ``(fits, epsilon or None, why not)``.

    Runs under the write lock, so it tries the cheap RDP bound first: if that fits, so does
    ``compose`` (which is at most the RDP bound), and the expensive PRV evaluation is left
    for after the commit. Only near the edge of the budget is PRV evaluated under the lock.
    """
    merged, delta_dpsgd, accountant, eps_other, delta_other = _parts(mechanisms, budget.delta)
    if delta_other > budget.delta or (merged and delta_dpsgd <= 0):
        return False, None, (
            f"the (epsilon, delta) mechanisms would use delta {delta_other:g} of the budget's {budget.delta:g}"
            + (", leaving nothing for DP-SGD" if merged else "")
        )
    if eps_other + _dpsgd_bound(merged, delta_dpsgd, accountant, cheap=True) <= budget.epsilon:
        return True, None, ""
    eps = eps_other + _dpsgd_bound(merged, delta_dpsgd, accountant, cheap=False)
    return eps <= budget.epsilon, eps, ""


# --------------------------------------------------------------------------- storage

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('application', '{APPLICATION}'), ('schema_version', '{SCHEMA_VERSION}');
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    dataset TEXT NOT NULL,
    task_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('reserve', 'spend', 'release')),
    mechanism TEXT,
    round INTEGER,
    note TEXT NOT NULL DEFAULT '',
    budget TEXT
);
CREATE INDEX events_by_task ON events (dataset, task_id);
CREATE UNIQUE INDEX one_reserve_per_task ON events (dataset, task_id) WHERE kind = 'reserve';
CREATE UNIQUE INDEX one_release_per_task ON events (dataset, task_id) WHERE kind = 'release';
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: events cannot be changed'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only: events cannot be deleted'); END;
CREATE TRIGGER meta_no_update BEFORE UPDATE ON meta
BEGIN SELECT RAISE(ABORT, 'ledger metadata cannot be changed'); END;
CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
BEGIN SELECT RAISE(ABORT, 'ledger metadata cannot be deleted'); END;
"""
_TRIGGERS = {"events_no_update", "events_no_delete", "meta_no_update", "meta_no_delete"}


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("pass an aware datetime (e.g. datetime.now(UTC)); a naive one is ambiguous")
    return now.astimezone(UTC)


def _fmt(t: datetime) -> str:
    return t.strftime(_TIME_FORMAT)


def _parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s)  # Python 3.11 reads the trailing Z; 30x faster than strptime


# Stored mechanisms repeat (every round of a task spends the same), and parsing dominates the
# time under the write lock: fold with a cache of parsed ones. Internal use only, never handed out.
_parse_mechanism = functools.lru_cache(maxsize=65536)(Mechanism.model_validate_json)


class _Task:
    """A task's events in one data set, folded."""

    __slots__ = ("closed", "events", "reserved", "reserved_at", "spends", "task_id")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.reserved: Mechanism | None = None
        self.reserved_at: datetime | None = None
        self.spends: list[Mechanism] = []
        self.closed = False
        self.events = 0

    def committed(self) -> list[Mechanism]:
        """What counts against the budget: all of the reservation while open, the spends once closed."""
        if self.closed:
            return list(self.spends)
        return [self.reserved] if self.reserved is not None else []


class PrivacyLedger:
    """A node's privacy-budget ledger in the SQLite file ``path`` (created on first use).

    Safe to share between threads, and to open from several processes at once: each thread
    (and each forked process) uses its own connection, and every check-then-write is one
    ``BEGIN IMMEDIATE`` transaction. ``busy_timeout`` (seconds) is how long a call waits for another writer;
    a reservation near the edge of the budget holds the lock for one PRV evaluation (0.1 s
    to seconds, growing with the number of steps).
    """

    def __init__(self, path: Path | str, *, busy_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._identity: tuple[int, int] | None = None
        if not self.path.exists():
            self._create()
        self._check_file()
        st = self.path.stat()
        self._identity = (st.st_dev, st.st_ino)

    # ------------------------------------------------------------------ plumbing

    def _create(self) -> None:
        """Build the schema in a private file, then link it into place (:func:`_sqlite.create_linked`):
        other processes see either no file or a complete ledger, never a half-made one; a file
        that appeared meanwhile is kept."""
        if _sqlite.create_linked(
            self.path,
            schema=_SCHEMA,
            application_id=_APPLICATION_ID,
            user_version=SCHEMA_VERSION,
            busy_timeout=self.busy_timeout,
        ):
            logger.info("created privacy ledger %s", self.path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (one per thread and process, kept open: closing the last
        connection to a WAL file checkpoints it, which made every call several ms slower)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise LedgerCorrupted(self.path, "the ledger file has disappeared") from None
        if self._identity is not None and (st.st_dev, st.st_ino) != self._identity:
            raise LedgerCorrupted(self.path, "the ledger file was replaced by another file while open")
        local = self._local
        con: sqlite3.Connection | None = getattr(local, "con", None)
        try:
            with self._corruption_guard():
                if con is None or getattr(local, "pid", None) != os.getpid():  # new thread, or forked
                    if con is not None:
                        # Inherited through fork: SQLite forbids using it here, and closing it
                        # (as garbage collection would) can disturb the parent's locks. Keep it.
                        _INHERITED.append(con)
                    con = _sqlite.connect(self.path, "rw", self.busy_timeout)
                    local.con, local.pid = con, os.getpid()
                yield con
        except LedgerCorrupted:
            self.close()
            raise

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's state is collected).
        The ledger stays usable: the next call reconnects."""
        con = getattr(self._local, "con", None)
        if con is not None:
            if getattr(self._local, "pid", None) == os.getpid():
                con.close()
            else:
                _INHERITED.append(con)
        self._local.con = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _corruption_guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if _sqlite.is_corruption(exc):
                raise LedgerCorrupted(self.path, f"SQLite reports: {exc}") from exc
            raise
        except (ValidationError, json.JSONDecodeError) as exc:  # a stored event no longer parses
            raise LedgerCorrupted(self.path, f"an event cannot be read: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: take the write lock now, so the read-check-write is atomic."""
        with self._connect() as con, _sqlite.immediate(con):
            yield con

    def _check_file(self) -> None:
        if self.path.stat().st_size == 0:
            raise LedgerCorrupted(self.path, "the file is empty, not a privacy ledger (a ledger is never empty)")
        with self._connect() as con:
            problems = _sqlite.quick_check(con)
            if problems:
                raise LedgerCorrupted(self.path, "SQLite integrity check failed: " + "; ".join(problems))
            names = {r[0]: r[1] for r in con.execute("SELECT name, type FROM sqlite_master")}
            if "meta" not in names or "events" not in names:
                raise LedgerCorrupted(self.path, "not a fedgov privacy ledger (no meta/events tables)")
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("application") != APPLICATION:
                raise LedgerCorrupted(self.path, f"not a fedgov privacy ledger (application {meta.get('application')!r})")
            if meta.get("schema_version") != str(SCHEMA_VERSION):
                raise LedgerCorrupted(
                    self.path, f"ledger schema version {meta.get('schema_version')!r}; this fedgov reads {SCHEMA_VERSION}"
                )
            missing = sorted(t for t in _TRIGGERS if names.get(t) != "trigger")
            if missing:
                raise LedgerCorrupted(self.path, f"the append-only triggers {', '.join(missing)} were removed")

    def _insert(
        self,
        con: sqlite3.Connection,
        *,
        time: datetime,
        dataset: str,
        task_id: str,
        kind: str,
        mechanism: Mechanism | None,
        round: int | None = None,
        note: str = "",
        budget: Budget | None = None,
    ) -> LedgerEvent:
        cur = con.execute(
            "INSERT INTO events (time, dataset, task_id, kind, mechanism, round, note, budget) VALUES (?,?,?,?,?,?,?,?)",
            (
                _fmt(time),
                dataset,
                task_id,
                kind,
                mechanism.model_dump_json() if mechanism is not None else None,
                round,
                note,
                budget.model_dump_json() if budget is not None else None,
            ),
        )
        assert cur.lastrowid is not None
        return LedgerEvent(
            id=cur.lastrowid,
            time=_parse_time(_fmt(time)),
            dataset=dataset,
            task_id=task_id,
            kind=kind,  # type: ignore[arg-type]
            mechanism=mechanism,
            round=round,
            note=note,
            budget=budget,
        )

    @staticmethod
    def _row_event(row: tuple) -> LedgerEvent:  # type: ignore[type-arg]
        id_, time, dataset, task_id, kind, mech, rnd, note, budget = row
        return LedgerEvent(
            id=id_,
            time=_parse_time(time),
            dataset=dataset,
            task_id=task_id,
            kind=kind,
            mechanism=Mechanism.model_validate_json(mech) if mech is not None else None,
            round=rnd,
            note=note,
            budget=Budget.model_validate_json(budget) if budget is not None else None,
        )

    def _select(self, con: sqlite3.Connection, where: str = "", args: tuple = ()) -> list[LedgerEvent]:  # type: ignore[type-arg]
        rows = con.execute(
            f"SELECT id, time, dataset, task_id, kind, mechanism, round, note, budget FROM events {where} ORDER BY id", args
        ).fetchall()
        return [self._row_event(r) for r in rows]

    @staticmethod
    def _tasks(
        con: sqlite3.Connection, dataset: str, *, year: int | None = None, task_id: str | None = None
    ) -> dict[str, _Task]:
        """The tasks of ``dataset`` folded from their events; only those reserved in ``year``,
        or only ``task_id``, if given (filtered in SQL: the ledger grows by a spend per round)."""
        where, args = "WHERE dataset = ?", [dataset]
        if task_id is not None:
            where += " AND task_id = ?"
            args.append(task_id)
        if year is not None:  # fixed-width times: string order is time order
            where += (
                " AND task_id IN (SELECT task_id FROM events WHERE dataset = ? AND kind = 'reserve'"
                " AND time >= ? AND time < ?)"
            )
            args += [dataset, f"{year:04d}-01-01T", f"{year + 1:04d}-01-01T"]
        tasks: dict[str, _Task] = {}
        for tid, kind, time, mech in con.execute(
            f"SELECT task_id, kind, time, mechanism FROM events {where} ORDER BY id", args
        ):
            t = tasks.setdefault(tid, _Task(tid))
            t.events += 1
            if kind == "reserve":
                t.reserved, t.reserved_at = _parse_mechanism(mech), _parse_time(time)
            elif kind == "spend":
                t.spends.append(_parse_mechanism(mech))
            else:
                t.closed = True
        return tasks

    @staticmethod
    def _year(budget: Budget, now: datetime) -> int | None:
        return now.year if budget.period == "year" else None

    @staticmethod
    def _in_period(tasks: dict[str, _Task], budget: Budget, now: datetime) -> list[_Task]:
        """The tasks counted in the budget period of ``now``: a task belongs to the period of its reservation."""
        out = [t for t in tasks.values() if t.reserved_at is not None]
        if budget.period == "year":
            out = [t for t in out if t.reserved_at is not None and t.reserved_at.year == now.year]
        return out

    @staticmethod
    def _status(dataset: str, budget: Budget, now: datetime, tasks: list[_Task]) -> BudgetStatus:
        committed = compose([m for t in tasks for m in t.committed()], delta=budget.delta)
        naive = sum(compose(t.committed(), delta=budget.delta) for t in tasks)
        return BudgetStatus(
            dataset=dataset,
            budget=budget,
            year=now.year if budget.period == "year" else None,
            epsilon_committed=committed,
            epsilon_naive=naive,
            remaining=budget.epsilon - committed,
            open_tasks=[t.task_id for t in tasks if not t.closed],
            closed_tasks=[t.task_id for t in tasks if t.closed],
            events=sum(t.events for t in tasks),
        )

    # ------------------------------------------------------------------ public API

    def reserve(
        self,
        *,
        dataset: str,
        task_id: str,
        mechanism: Mechanism,
        budget: Budget,
        now: datetime | None = None,
        note: str = "",
    ) -> BudgetStatus:
        """Reserve a task's whole planned spend on ``dataset``, or raise :class:`BudgetExceeded`.

        In one ``BEGIN IMMEDIATE`` transaction: the committed mechanisms of the budget period
        (open tasks: their reservation; closed tasks: their spends) plus ``mechanism`` are
        composed (:func:`compose`) at ``budget.delta``; if the result exceeds
        ``budget.epsilon`` (or the (epsilon, delta) mechanisms need more than
        ``budget.delta``) nothing is written. Re-reserving an open task with the same
        mechanism returns its status and writes nothing; with a different mechanism, or for a
        closed task, it raises :class:`LedgerError`. Returns the status after the reservation.
        """
        t = _utc(now)
        with self._transaction() as con:
            existing = self._tasks(con, dataset, task_id=task_id).get(task_id)
            if existing is not None and existing.reserved is not None:
                if existing.closed:
                    raise LedgerError(f"task '{task_id}' on data set '{dataset}' is closed; a task id cannot be reused")
                if existing.reserved != mechanism:
                    raise LedgerError(
                        f"task '{task_id}' on data set '{dataset}' is already reserved with a different mechanism"
                    )
                fits = True
            else:
                counted = self._in_period(self._tasks(con, dataset, year=self._year(budget, t)), budget, t)
                fits, _, why = _fits([m for x in counted for m in x.committed()] + [mechanism], budget)
                if fits:
                    self._insert(
                        con, time=t, dataset=dataset, task_id=task_id, kind="reserve", mechanism=mechanism,
                        note=note, budget=budget,
                    )
        if not fits:
            # Rolled back; the details are computed outside the write lock.
            status = self._status(dataset, budget, t, counted)
            try:
                task_eps = compose([mechanism], delta=budget.delta)
            except PrivacyError:
                task_eps = math.inf
            try:
                after = compose([m for x in counted for m in x.committed()] + [mechanism], delta=budget.delta)
            except PrivacyError:
                after = math.inf
            period = f"year {t.year}" if budget.period == "year" else "all time"
            raise BudgetExceeded(
                f"privacy budget of data set '{dataset}' exceeded: budget epsilon {budget.epsilon:g} at delta "
                f"{budget.delta:g} ({period}); committed epsilon {status.epsilon_committed:.4f} by "
                f"{len(status.open_tasks)} open and {len(status.closed_tasks)} closed task(s); task '{task_id}' asks "
                f"for epsilon {task_eps:.4f} alone, which would make the composed total {after:.4f}"
                + (f" ({why})" if why else ""),
                status=status,
                requested=mechanism,
                task_epsilon=task_eps,
                epsilon_after=after,
            )
        logger.info("reserved privacy budget: dataset=%s task=%s", dataset, task_id)
        return self.status(dataset, budget, now=t)

    def spend(
        self,
        *,
        dataset: str,
        task_id: str,
        mechanism: Mechanism,
        round: int,
        now: datetime | None = None,
        note: str = "",
    ) -> LedgerEvent:
        """Record what round ``round`` of an open task uses (that round's entries only).

        Call it *before* the round touches data: a round that then crashes is counted, not
        lost. Refused (:class:`LedgerError`) without an open reservation, if the kind or
        accountant differs from the reservation's, or if the task's spends would exceed the
        reservation: for DP-SGD, per ``(noise_multiplier, sample_rate)`` the total steps may
        not exceed the reserved steps (which implies a smaller epsilon, exactly, with no
        accountant in the loop); for the others, the summed epsilon and delta may not exceed
        the reserved ones.
        """
        t = _utc(now)
        if round < 0:
            raise LedgerError(f"round must be >= 0, got {round}")
        with self._transaction() as con:
            task = self._tasks(con, dataset, task_id=task_id).get(task_id)
            if task is None or task.reserved is None:
                raise LedgerError(f"task '{task_id}' has no reservation on data set '{dataset}': reserve before spending")
            if task.closed:
                raise LedgerError(f"task '{task_id}' on data set '{dataset}' is released: it can spend no more")
            res = task.reserved
            if mechanism.kind != res.kind or mechanism.accountant != res.accountant:
                raise LedgerError(
                    f"task '{task_id}' reserved a {res.kind}/{res.accountant} mechanism; "
                    f"a {mechanism.kind}/{mechanism.accountant} spend does not match it"
                )
            spends = task.spends + [mechanism]
            if res.kind == "dpsgd":
                reserved = res.steps_by_key()
                used: dict[tuple[float, float], int] = {}
                for m in spends:
                    for key, n in m.steps_by_key().items():
                        used[key] = used.get(key, 0) + n
                for (sigma, q), n in used.items():
                    if n > reserved.get((sigma, q), 0):
                        raise LedgerError(
                            f"task '{task_id}' on data set '{dataset}' would take {n} DP-SGD steps at noise "
                            f"multiplier {sigma:g} and sample rate {q:g}; it reserved {reserved.get((sigma, q), 0)}"
                        )
            else:
                eps = sum(float(m.epsilon or 0.0) for m in spends)
                dlt = sum(m.delta for m in spends)
                if eps > float(res.epsilon or 0.0) * (1 + 1e-12) or dlt > res.delta * (1 + 1e-12):
                    raise LedgerError(
                        f"task '{task_id}' on data set '{dataset}' would spend epsilon {eps:g}, delta {dlt:g}; "
                        f"it reserved epsilon {res.epsilon:g}, delta {res.delta:g}"
                    )
            return self._insert(
                con, time=t, dataset=dataset, task_id=task_id, kind="spend", mechanism=mechanism, round=round, note=note
            )

    def release(self, *, dataset: str, task_id: str, note: str = "", now: datetime | None = None) -> LedgerEvent:
        """Close a task: from now on only its spends count. Idempotent: releasing a closed task
        returns its release event. Raises :class:`LedgerError` for a task never reserved."""
        t = _utc(now)
        with self._transaction() as con:
            done = self._select(
                con, "WHERE dataset = ? AND task_id = ? AND kind IN ('reserve', 'release')", (dataset, task_id)
            )
            for ev in done:
                if ev.kind == "release":
                    return ev
            if not done:
                raise LedgerError(f"task '{task_id}' has no reservation on data set '{dataset}'; nothing to release")
            ev = self._insert(con, time=t, dataset=dataset, task_id=task_id, kind="release", mechanism=None, note=note)
        logger.info("released privacy budget: dataset=%s task=%s", dataset, task_id)
        return ev

    def status(self, dataset: str, budget: Budget, now: datetime | None = None) -> BudgetStatus:
        """The balance of ``dataset`` in the budget period of ``now`` (default: now)."""
        t = _utc(now)
        with self._connect() as con:
            tasks = self._tasks(con, dataset, year=self._year(budget, t))
        return self._status(dataset, budget, t, self._in_period(tasks, budget, t))

    def events(self, dataset: str | None = None) -> list[LedgerEvent]:
        """Every event (of ``dataset``, if given), oldest first: the whole history."""
        with self._connect() as con:
            if dataset is None:
                return self._select(con)
            return self._select(con, "WHERE dataset = ?", (dataset,))

    def datasets(self) -> list[str]:
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT dataset FROM events ORDER BY dataset")]

    def task_state(self, task_id: str, *, dataset: str | None = None) -> TaskState:
        """``none`` (never reserved), ``open`` (a reservation not released) or ``closed``.
        Without ``dataset``: ``open`` if open on any data set."""
        with self._connect() as con:
            q = "SELECT dataset, kind FROM events WHERE task_id = ? AND kind IN ('reserve', 'release')"
            args: tuple[str, ...] = (task_id,)
            if dataset is not None:
                q += " AND dataset = ?"
                args += (dataset,)
            rows = con.execute(q, args).fetchall()
        reserved = {d for d, k in rows if k == "reserve"}
        released = {d for d, k in rows if k == "release"}
        if not reserved:
            return "none"
        return "open" if reserved - released else "closed"
