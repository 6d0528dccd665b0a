"""Operator state of a node: the pause switch and the manual approval queue, in SQLite.

The node's operators (a municipality's IT staff, its privacy officer) act on a running node
through this small database in the node directory: ``fedgov node pause`` stops the node from
taking part in new rounds, and with ``approval = "manual"`` in the policy each task waits in
a queue until someone approves or rejects it. The daemon and the operator's commands are
different processes, so every call opens its own connection and reads the current state
from the file: a running node sees a pause at its next round, without a restart.

Writes take the database lock up front (``BEGIN IMMEDIATE``), the journal is in WAL mode so
that readers never block the writer, and a busy timeout makes concurrent writers wait rather
than fail. The queue stores only what a task would spend and send (its name, contract,
data set, epsilon, delta, rounds, model, coordinator), never data.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedgov.node import _sqlite
from fedgov.errors import NodeStateError, NodeStateRequestError, RevealConflict, TaskChanged, UnknownTask

__all__ = [
    "FILENAME",
    "TaskStatus",
    "PendingTask",
    "NodeState",
    "NodeStateError",
    "UnknownTask",
    "TaskChanged",
    "DataCheckRecord",
    "RevealConflict",
]

logger = logging.getLogger(__name__)

FILENAME = "nodestate.sqlite"
"""The file's name when :class:`NodeState` is given the node directory."""

TaskStatus = Literal["none", "pending", "approved", "rejected"]

_APPLICATION_ID = 0x46475354  # "FGST": marks the file as a fedgov node state
_SCHEMA_VERSION = 1
_MAX_SUMMARY_BYTES = 16_384

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pause (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    paused INTEGER NOT NULL,
    reason TEXT NOT NULL,
    changed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    task_id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected')),
    summary TEXT NOT NULL,
    queued_at TEXT NOT NULL,
    decided_at TEXT,
    decided_by TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS data_checks (
    dataset TEXT NOT NULL,
    data_sha256 TEXT NOT NULL,
    contract TEXT NOT NULL,
    contract_sha256 TEXT NOT NULL,
    conforms INTEGER NOT NULL,
    checked_at TEXT NOT NULL,
    PRIMARY KEY (dataset, data_sha256, contract_sha256)
);
CREATE TABLE IF NOT EXISTS secagg_reveals (
    key TEXT NOT NULL,
    round INTEGER NOT NULL,
    peer TEXT NOT NULL,  -- a Flower node id: unsigned 64-bit, beyond SQLite's INTEGER
    kind TEXT NOT NULL CHECK (kind IN ('self-mask', 'key')),
    revealed_at TEXT NOT NULL,
    PRIMARY KEY (key, round, peer)
);
CREATE TABLE IF NOT EXISTS secagg_consistency (
    key TEXT NOT NULL,
    round INTEGER NOT NULL,
    survivors TEXT NOT NULL,
    signed_at TEXT NOT NULL,
    PRIMARY KEY (key, round)
);
"""


class PendingTask(BaseModel):
    """A task in the approval queue, whatever its status now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str
    status: Literal["pending", "approved", "rejected"]
    summary: dict[str, Any] = Field(description="what the task would spend and send; no data")
    queued_at: datetime
    decided_at: datetime | None = None
    decided_by: str = ""
    reason: str = ""


class DataCheckRecord(BaseModel):
    """The result of checking a data set's files against one contract (``fedgov node data check``):
    which files (their SHA-256), which contract (the SHA-256 of its canonical JSON), whether
    they conform, when. No counts, rows or values: those are in the node-local report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    data_sha256: str
    contract: str
    contract_sha256: str
    conforms: bool
    checked_at: datetime


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _summary_json(summary: dict[str, Any]) -> str:
    """Canonical JSON of a summary; only scalars and lists of scalars, so that no table fits."""
    if not isinstance(summary, dict):
        raise NodeStateRequestError(f"a task summary must be a dict, not {type(summary).__name__}")
    for key, value in summary.items():
        if not isinstance(key, str):
            raise NodeStateRequestError(f"task summary keys must be strings, not {key!r}")
        if not (_scalar(value) or (isinstance(value, (list, tuple)) and all(_scalar(v) for v in value))):
            raise NodeStateRequestError(
                f"task summary '{key}' must be a number, text or a list of them "
                f"(the queue holds what a task would spend and send, never data); found {type(value).__name__}"
            )
    try:
        text = json.dumps(summary, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise NodeStateRequestError(f"task summary is not valid JSON: {exc}") from exc
    if len(text.encode()) > _MAX_SUMMARY_BYTES:
        raise NodeStateRequestError(f"task summary is larger than {_MAX_SUMMARY_BYTES} bytes; it should summarise, not carry data")
    return text


class NodeState:
    """The operator state of one node, in a SQLite file.

    ``path`` is the database file, or the node directory (then ``nodestate.sqlite`` in it).
    The file and its directory are created when missing. Every method opens its own
    connection, so instances are cheap, safe to share between threads, and always see what
    another process (the operator's command, the daemon) wrote last.
    """

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 10.0) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / FILENAME
        self.path = p
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init()

    def __repr__(self) -> str:
        return f"NodeState({str(self.path)!r})"

    # --- plumbing -------------------------------------------------------------------------

    def _corrupt(self, exc: Exception) -> NodeStateError:
        return NodeStateError(
            f"The node state file {self.path} cannot be read ({exc}). It holds the pause switch and "
            "the manual approval queue: move it aside (with its -wal and -shm files) and the node starts a fresh one "
            "(the node is then not paused, and queued tasks must be sent again)."
        )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            # this thread's kept-open connection to this very file (_sqlite.pooled)
            conn = _sqlite.pooled(self.path, "rwc", self.busy_timeout_s)
        except sqlite3.DatabaseError as exc:
            if _sqlite.is_corruption(exc):
                raise self._corrupt(exc) from exc
            raise NodeStateError(f"Cannot open the node state file {self.path}: {exc}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise NodeStateError(f"Cannot open the node state file {self.path}: {exc}") from exc
        try:
            yield conn
        except sqlite3.OperationalError as exc:
            _sqlite.discard(self.path)
            msg = str(exc).lower()
            if "locked" in msg or "busy" in msg:
                raise NodeStateError(
                    f"The node state file {self.path} stayed locked by another process for more "
                    f"than {self.busy_timeout_s:g} s; try again"
                ) from exc
            raise self._corrupt(exc) from exc
        except sqlite3.DatabaseError as exc:
            _sqlite.discard(self.path)
            raise self._corrupt(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the lock from its start."""
        with self._connect() as conn, _sqlite.immediate(conn):
            yield conn

    def _init(self) -> None:
        with self._connect() as conn:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if app_id not in (0, _APPLICATION_ID):
                raise NodeStateError(f"{self.path} is an SQLite file of another application, not a fedgov node state")
            if version > _SCHEMA_VERSION:
                raise NodeStateError(
                    f"{self.path} was written by a newer fedgov (schema {version}; this one reads {_SCHEMA_VERSION})"
                )
            if app_id == 0:
                tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
                if tables:
                    raise NodeStateError(f"{self.path} is an SQLite file of another application, not a fedgov node state")
            problems = _sqlite.quick_check(conn)
            if problems:
                raise self._corrupt(sqlite3.DatabaseError(problems[0]))
            if app_id == _APPLICATION_ID and version == _SCHEMA_VERSION:
                return  # made before, by this schema: nothing to write (no write lock, no sync)
            conn.execute("PRAGMA journal_mode = WAL")
        with self._write() as conn:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # --- secure aggregation: what this node revealed and signed, per round ---------------

    def record_reveals(self, key: str, round: int, reveals: dict[int, str]) -> None:
        """Record, before the shares leave, that this node reveals for round ``round`` of the task
        or query ``key`` the share of ``kind`` (``self-mask`` or ``key``) of each peer; all or
        nothing. :class:`RevealConflict` if any peer's other kind was revealed before, by any
        message of that round (kept across restarts): never both secrets of one peer."""
        if any(k not in ("self-mask", "key") for k in reveals.values()):
            raise ValueError("a reveal is of kind 'self-mask' or 'key'")
        with self._write() as conn:
            for peer, kind in sorted(reveals.items()):
                row = conn.execute(
                    "SELECT kind FROM secagg_reveals WHERE key = ? AND round = ? AND peer = ?", (key, int(round), str(int(peer)))
                ).fetchone()
                if row is not None and row[0] != kind:
                    raise RevealConflict(
                        f"round {round}: the {row[0]} share of node {peer} was revealed before; revealing its {kind} share "
                        "too would unmask its input"
                    )
            now = _now()
            conn.executemany(
                "INSERT OR IGNORE INTO secagg_reveals (key, round, peer, kind, revealed_at) VALUES (?, ?, ?, ?, ?)",
                [(key, int(round), str(int(peer)), kind, now) for peer, kind in reveals.items()],
            )

    def reveals(self, key: str, round: int) -> dict[int, str]:
        """What this node revealed in round ``round`` of ``key``: peer -> kind."""
        with self._connect() as conn:
            rows = conn.execute("SELECT peer, kind FROM secagg_reveals WHERE key = ? AND round = ?", (key, int(round))).fetchall()
        return {int(p): str(k) for p, k in rows}

    def sign_survivors(self, key: str, round: int, survivors: list[int]) -> None:
        """Record the one survivor list this node signs for round ``round`` of ``key`` (before the
        signature leaves); the same list again is fine, another one :class:`RevealConflict`."""
        text = ",".join(str(int(n)) for n in sorted(survivors))
        with self._write() as conn:
            row = conn.execute("SELECT survivors FROM secagg_consistency WHERE key = ? AND round = ?", (key, int(round))).fetchone()
            if row is not None and row[0] != text:
                raise RevealConflict(f"round {round}: this node signed another survivor list before")
            conn.execute(
                "INSERT OR IGNORE INTO secagg_consistency (key, round, survivors, signed_at) VALUES (?, ?, ?, ?)",
                (key, int(round), text, _now()),
            )

    def signed_survivors(self, key: str, round: int) -> list[int] | None:
        """The survivor list this node signed for round ``round`` of ``key``, or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT survivors FROM secagg_consistency WHERE key = ? AND round = ?", (key, int(round))).fetchone()
        if row is None:
            return None
        return [int(x) for x in str(row[0]).split(",") if x]

    # --- pause switch ---------------------------------------------------------------------

    def pause(self, reason: str = "") -> None:
        """Stop taking part in new rounds and tasks until :meth:`resume`."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO pause (id, paused, reason, changed_at) VALUES (1, 1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET paused = 1, reason = excluded.reason, changed_at = excluded.changed_at",
                (reason, _now()),
            )
        logger.info("node paused: %s", reason or "(no reason given)")

    def resume(self) -> None:
        """Take part again."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO pause (id, paused, reason, changed_at) VALUES (1, 0, '', ?) "
                "ON CONFLICT (id) DO UPDATE SET paused = 0, reason = '', changed_at = excluded.changed_at",
                (_now(),),
            )
        logger.info("node resumed")

    def paused(self) -> tuple[bool, str]:
        """``(paused, reason)``, read from the file now."""
        with self._connect() as conn:
            row = conn.execute("SELECT paused, reason FROM pause WHERE id = 1").fetchone()
        if row is None:
            return False, ""
        return bool(row[0]), str(row[1])

    # --- manual approval queue ------------------------------------------------------------

    @staticmethod
    def _row(row: tuple[Any, ...]) -> PendingTask:
        task_id, status, summary, queued_at, decided_at, decided_by, reason = row
        return PendingTask(
            task_id=task_id,
            status=status,
            summary=json.loads(summary),
            queued_at=datetime.fromisoformat(queued_at),
            decided_at=datetime.fromisoformat(decided_at) if decided_at else None,
            decided_by=decided_by,
            reason=reason,
        )

    _COLUMNS = "task_id, status, summary, queued_at, decided_at, decided_by, reason"

    def _get(self, conn: sqlite3.Connection, task_id: str) -> PendingTask | None:
        row = conn.execute(f"SELECT {self._COLUMNS} FROM approvals WHERE task_id = ?", (task_id,)).fetchone()
        return None if row is None else self._row(row)

    def enqueue(self, task_id: str, *, summary: dict[str, Any]) -> PendingTask:
        """Queue a task for an operator's decision; queuing the same task again changes nothing.

        Idempotent per ``task_id``: a task already queued is returned as it is (pending,
        approved or rejected). The same id with a *different* summary raises
        :class:`TaskChanged`, so that an approval given to one task cannot be reused for
        another that spends more.
        """
        if not task_id:
            raise NodeStateRequestError("a task id must not be empty")
        text = _summary_json(summary)
        with self._write() as conn:
            existing = conn.execute(
                f"SELECT {self._COLUMNS} FROM approvals WHERE task_id = ?", (task_id,)
            ).fetchone()
            if existing is None:
                conn.execute(
                    "INSERT INTO approvals (task_id, status, summary, queued_at) VALUES (?, 'pending', ?, ?)",
                    (task_id, text, _now()),
                )
                existing = conn.execute(
                    f"SELECT {self._COLUMNS} FROM approvals WHERE task_id = ?", (task_id,)
                ).fetchone()
                logger.info("task %s queued for approval", task_id)
            elif existing[2] != text:
                raise TaskChanged(
                    f"task {task_id} is already queued ({existing[1]}) with another summary: "
                    f"queued {existing[2]}, now {text}. A changed task needs a new task id."
                )
        return self._row(existing)

    def get(self, task_id: str) -> PendingTask | None:
        """The queued task ``task_id`` (any status), or None."""
        with self._connect() as conn:
            return self._get(conn, task_id)

    def pending(self) -> list[PendingTask]:
        """The tasks waiting for a decision, oldest first."""
        return self.tasks("pending")

    def tasks(self, status: Literal["pending", "approved", "rejected"] | None = None) -> list[PendingTask]:
        """Every queued task (or those with ``status``), oldest first."""
        query = f"SELECT {self._COLUMNS} FROM approvals"
        args: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY queued_at, rowid", args).fetchall()
        return [self._row(r) for r in rows]

    def _decide(self, task_id: str, status: Literal["approved", "rejected"], by: str, reason: str) -> PendingTask:
        return self.decide(task_id, status, by=by, reason=reason)[0]

    def decide(
        self, task_id: str, status: Literal["approved", "rejected"], *, by: str = "", reason: str = ""
    ) -> tuple[PendingTask, bool]:
        """Approve or reject a queued task: the task as decided, and whether this changed it
        (False: the same decision by the same person again, as from a double click; decided in
        one write transaction, so two at once change it once). :class:`UnknownTask` if it is not
        queued."""
        with self._write() as conn:
            current = self._get(conn, task_id)
            if current is None:
                raise UnknownTask(f"task {task_id} is not in the approval queue of {self.path}")
            if current.status == status and current.decided_by == by and current.reason == reason:
                return current, False  # the same decision again: nothing to record
            conn.execute(
                "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, reason = ? WHERE task_id = ?",
                (status, _now(), by, reason, task_id),
            )
            decided = self._get(conn, task_id)
        assert decided is not None
        if current.status != "pending":
            logger.warning("task %s was %s; now %s by %s", task_id, current.status, status, by or "(unnamed)")
        else:
            logger.info("task %s %s by %s", task_id, status, by or "(unnamed)")
        return decided, True

    def approve(self, task_id: str, *, by: str = "") -> PendingTask:
        """Approve a queued task; :class:`UnknownTask` if it is not queued.

        The last decision counts: an operator may approve a task rejected before, or reject
        one approved before it ran.
        """
        return self._decide(task_id, "approved", by, "")

    def reject(self, task_id: str, reason: str, *, by: str = "") -> PendingTask:
        """Reject a queued task, saying why; :class:`UnknownTask` if it is not queued."""
        return self._decide(task_id, "rejected", by, reason)

    def status(self, task_id: str) -> TaskStatus:
        """``none`` (never queued), ``pending``, ``approved`` or ``rejected``, read now."""
        task = self.get(task_id)
        return "none" if task is None else task.status

    # --- data checks ----------------------------------------------------------------------

    def record_data_check(
        self, *, dataset: str, data_sha256: str, contract: str, contract_sha256: str, conforms: bool
    ) -> DataCheckRecord:
        """Record (or replace) the result of checking these files against this contract."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO data_checks (dataset, data_sha256, contract, contract_sha256, conforms, checked_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dataset, data_sha256, contract_sha256) DO UPDATE SET "
                "contract = excluded.contract, conforms = excluded.conforms, checked_at = excluded.checked_at",
                (dataset, data_sha256, contract, contract_sha256, int(conforms), _now()),
            )
        found = self.data_check(dataset, data_sha256=data_sha256, contract_sha256=contract_sha256)
        assert found is not None
        return found

    def data_check(self, dataset: str, *, data_sha256: str, contract_sha256: str) -> DataCheckRecord | None:
        """The recorded result for these files and this contract, or None (never checked)."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT dataset, data_sha256, contract, contract_sha256, conforms, checked_at FROM data_checks "
                "WHERE dataset = ? AND data_sha256 = ? AND contract_sha256 = ?",
                (dataset, data_sha256, contract_sha256),
            ).fetchone()
        return None if row is None else self._check_row(row)

    def data_checks(self) -> list[DataCheckRecord]:
        """Every recorded data check, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT dataset, data_sha256, contract, contract_sha256, conforms, checked_at FROM data_checks "
                "ORDER BY checked_at, rowid"
            ).fetchall()
        return [self._check_row(r) for r in rows]

    @staticmethod
    def _check_row(row: tuple[Any, ...]) -> DataCheckRecord:
        dataset, data_sha, contract, contract_sha, conforms, checked_at = row
        return DataCheckRecord(
            dataset=dataset, data_sha256=data_sha, contract=contract, contract_sha256=contract_sha,
            conforms=bool(conforms), checked_at=datetime.fromisoformat(checked_at),
        )
