"""The privacy-budget ledger of a node: one SQLite file, append-only events, check before commit.

Each municipal node keeps, per data set it serves, a total privacy budget ``(epsilon, delta)``
for a period (a calendar year in UTC, or forever). The budget is a *ledger*, not a variable
(dp_accounting's ``PrivacyAccountant.compose`` and ``ledger``): every change is an immutable
event, the balance is always recomputed from the events, and nothing is ever overwritten.
This module is the SQLite store; the values it stores (:class:`Mechanism`, :class:`Budget`,
:class:`LedgerEvent`), their composition and the rules a reservation or a spend must meet are
pure functions in :mod:`fedgov.node.budget`, which the store asks before it commits.

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
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import ValidationError

from fedgov.errors import BudgetExceeded, LedgerCorrupted, LedgerError, PrivacyError
from fedgov.node import _sqlite
from fedgov.node.budget import (
    Budget,
    BudgetStatus,
    LedgerEvent,
    Mechanism,
    TaskState,
    check_spend,
    check_within_reservation,
    compose,
)

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


def _committed(tasks: Sequence[_Task]) -> list[Mechanism]:
    """What the ``tasks`` have committed against the budget, together."""
    return [m for t in tasks for m in t.committed()]


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
        try:
            with self._corruption_guard():
                # this thread's connection to this very file, shared with every other ledger
                # object of the process (a forked child gets its own: _sqlite.pooled)
                con = _sqlite.pooled(self.path, "rw", self.busy_timeout)
                yield con
        except LedgerCorrupted:
            self.close()
            raise

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends). The ledger
        stays usable: the next call reconnects."""
        _sqlite.discard(self.path)

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
        kind: Literal["reserve", "spend", "release"],
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
            kind=kind,
            mechanism=mechanism,
            round=round,
            note=note,
            budget=budget,
        )

    @staticmethod
    def _row_event(row: tuple[Any, ...]) -> LedgerEvent:
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

    def _select(self, con: sqlite3.Connection, where: str = "", args: tuple[str, ...] = ()) -> list[LedgerEvent]:
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
        committed = compose(_committed(tasks), delta=budget.delta)
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

    @classmethod
    def _exceeded(
        cls, dataset: str, task_id: str, mechanism: Mechanism, budget: Budget, now: datetime, counted: list[_Task], why: str
    ) -> BudgetExceeded:
        """The error for a reservation :func:`~fedgov.node.budget.check_spend` refused, with the balance."""
        status = cls._status(dataset, budget, now, counted)
        try:
            task_eps = compose([mechanism], delta=budget.delta)
        except PrivacyError:
            task_eps = math.inf
        try:
            after = compose([*_committed(counted), mechanism], delta=budget.delta)
        except PrivacyError:
            after = math.inf
        period = f"year {now.year}" if budget.period == "year" else "all time"
        return BudgetExceeded(
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
        refused: tuple[list[_Task], str] | None = None
        with self._transaction() as con:
            existing = self._tasks(con, dataset, task_id=task_id).get(task_id)
            if existing is not None and existing.reserved is not None:
                if existing.closed:
                    raise LedgerError(f"task '{task_id}' on data set '{dataset}' is closed; a task id cannot be reused")
                if existing.reserved != mechanism:
                    raise LedgerError(
                        f"task '{task_id}' on data set '{dataset}' is already reserved with a different mechanism"
                    )
            else:
                counted = self._in_period(self._tasks(con, dataset, year=self._year(budget, t)), budget, t)
                check = check_spend(committed=_committed(counted), mechanism=mechanism, budget=budget)
                if check.fits:
                    self._insert(
                        con, time=t, dataset=dataset, task_id=task_id, kind="reserve", mechanism=mechanism,
                        note=note, budget=budget,
                    )
                else:
                    refused = (counted, check.why)
        if refused is not None:
            # Rolled back; the details are computed outside the write lock.
            raise self._exceeded(dataset, task_id, mechanism, budget, t, *refused)
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
            problem = check_within_reservation(
                reserved=task.reserved, spent=task.spends, mechanism=mechanism, task_id=task_id, dataset=dataset
            )
            if problem is not None:
                raise LedgerError(problem)
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
