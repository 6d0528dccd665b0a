"""An append-only, hash-chained audit log of what a node did, in one SQLite file.

Each entry ``(seq, time, kind, task_id, payload)`` carries ``prev_hash`` (the previous entry's
hash; 64 zeros for the first) and ``hash = sha256(prev_hash + canonical_json([seq, time, kind,
task_id, payload]))``. Canonical JSON is ``json.dumps(..., sort_keys=True, separators=(",",
":"), ensure_ascii=False, allow_nan=False)``, so the same entry always hashes the same way.
After each append the head ``{seq, hash}`` is written atomically to the anchor file
``<path>.head``. :meth:`AuditLog.verify` recomputes everything and does **not** trust the
database: triggers refuse ``UPDATE`` and ``DELETE``, but whoever can write the file can drop
them. It finds a changed entry (hash mismatch), a removed or reordered entry (a gap in
``seq`` or a broken ``prev_hash`` link), and a removed tail (the anchor names a head that is
no longer there).

What it cannot find: someone who can write both files can rebuild the whole chain and anchor.
Tamper *evidence* against such a person needs the head hash kept somewhere they cannot write
(sent to the coordinator, printed in a report, signed); ``verify`` then checks against it via
``expected_head``.

**Payloads never hold data rows.** Callers record kinds, sizes, array shapes, parameter names,
metric names and values, hashes, and decisions, never a citizen's record or any part of a data
set. As a guard against accidents, a payload above :data:`MAX_PAYLOAD_BYTES` is refused.
Non-finite numbers (NaN, infinity) are refused as well: canonical JSON has no spelling for
them; record ``None`` or a string instead.

Errors (``FedgovError`` is in :mod:`fedgov.errors`)::

    FedgovError
    └── AuditError            the audit log refuses an entry (payload too large, not JSON)
        └── AuditCorrupted    the file is not a fedgov audit log, or SQLite reports it damaged
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from fedgov.node import _sqlite
from fedgov.errors import AuditError, AuditCorrupted

try:  # POSIX: appends and verification serialize with the anchor file through flock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # no flock on Windows: the anchor is then not locked

__all__ = [
    "APPLICATION",
    "GENESIS_HASH",
    "MAX_PAYLOAD_BYTES",
    "AuditCorrupted",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditVerification",
    "as_finite",
    "canonical_json",
    "entry_hash",
]

logger = logging.getLogger(__name__)

APPLICATION = "fedgov-audit-log"
SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
MAX_PAYLOAD_BYTES = 64 * 1024
_APPLICATION_ID = 0x46474155  # "FGAU"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int
    time: datetime
    kind: str
    task_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class AuditVerification(BaseModel):
    """``ok``; how many ``entries``; the first ``seq`` found bad (None if ok, or if the
    problem has no position, e.g. a missing anchor); and the ``reason`` in words."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    entries: int
    first_bad_seq: int | None
    reason: str


def as_finite(value: Any) -> Any:
    """``value`` as a payload may hold it: a non-finite float (NaN, infinity), alone or in a
    list, becomes its text (canonical JSON has no spelling for it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [as_finite(x) for x in value]
    return value


def canonical_json(value: Any) -> str:
    """The one JSON spelling of ``value`` that hashes use (sorted keys, no spaces, no NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(*, prev_hash: str, seq: int, time: str, kind: str, task_id: str | None, payload: Any) -> str:
    """``sha256(prev_hash + canonical_json([seq, time, kind, task_id, payload]))``, hex."""
    body = canonical_json([seq, time, kind, task_id, payload])
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('application', '{APPLICATION}'), ('schema_version', '{SCHEMA_VERSION}');
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    task_id TEXT,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX entries_by_task ON entries (task_id);
CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: entries cannot be changed'); END;
CREATE TRIGGER entries_no_delete BEFORE DELETE ON entries
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: entries cannot be deleted'); END;
"""


class AuditLog:
    """The audit log in the SQLite file ``path``, with its anchor ``<path>.head`` (and a lock
    file ``<path>.lock``). Safe across threads and processes: each append is one
    ``BEGIN IMMEDIATE`` transaction, and the append-plus-anchor pair holds an exclusive
    ``flock`` on the lock file, so the anchor always names the newest head (a crash between
    the commit and the anchor write leaves the anchor one behind, which ``verify`` accepts)."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.anchor_path = Path(f"{self.path}.head")
        self.lock_path = Path(f"{self.path}.lock")
        self.busy_timeout = busy_timeout
        if not self.path.exists():
            self._create()
        self._check_file()

    # ------------------------------------------------------------------ plumbing

    def _create(self) -> None:
        """Schema in a private file, linked into place (never over an existing file)."""
        _sqlite.create_linked(
            self.path, schema=_SCHEMA, application_id=_APPLICATION_ID, busy_timeout=self.busy_timeout
        )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            raise AuditCorrupted(self.path, "the audit log file has disappeared")
        try:
            # this thread's kept-open connection to this very file (_sqlite.pooled)
            yield _sqlite.pooled(self.path, "rw", self.busy_timeout)
        except FileNotFoundError:
            raise AuditCorrupted(self.path, "the audit log file has disappeared") from None
        except sqlite3.DatabaseError as exc:
            _sqlite.discard(self.path)
            if _sqlite.is_corruption(exc):
                raise AuditCorrupted(self.path, f"SQLite reports: {exc}") from exc
            raise

    @contextlib.contextmanager
    def _flock(self, exclusive: bool) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self.lock_path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _check_file(self) -> None:
        if self.path.stat().st_size == 0:
            raise AuditCorrupted(self.path, "the file is empty, not an audit log")
        with self._connect() as con:
            problems = _sqlite.quick_check(con)
            if problems:
                raise AuditCorrupted(self.path, "SQLite integrity check failed: " + "; ".join(problems))
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            if not {"meta", "entries"} <= names:
                raise AuditCorrupted(self.path, "not a fedgov audit log (no meta/entries tables)")
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("application") != APPLICATION or meta.get("schema_version") != str(SCHEMA_VERSION):
                raise AuditCorrupted(self.path, f"not a fedgov audit log of schema {SCHEMA_VERSION} ({meta})")

    def _write_anchor(self, seq: int, hash_: str) -> None:
        tmp = self.anchor_path.with_name(f".{self.anchor_path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(canonical_json({"seq": seq, "hash": hash_}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.anchor_path)

    def _read_anchor(self) -> dict[str, Any] | None | str:
        """The anchor dict, None if there is none, or a string saying why it is unreadable."""
        try:
            raw = self.anchor_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            anchor = json.loads(raw)
            if not (isinstance(anchor, dict) and isinstance(anchor.get("seq"), int) and isinstance(anchor.get("hash"), str)):
                raise ValueError("not {seq, hash}")  # noqa: TRY004 - caught just below
        except ValueError as exc:
            return f"the anchor {self.anchor_path} is unreadable ({exc})"
        return anchor

    def _check_head(self, con: sqlite3.Connection, last_seq: int) -> None:
        """Refuse to extend a log whose tail was removed: appending would overwrite the anchor
        and so hide the removal. Legitimately the anchor is at the head, or one behind it
        (a crash between a commit and the anchor write); appends are serialized by the lock."""
        anchor = self._read_anchor()
        if isinstance(anchor, str):
            raise AuditCorrupted(self.path, anchor)
        if anchor is None:
            if last_seq > 1:
                raise AuditCorrupted(self.path, f"the anchor {self.anchor_path} is missing; run verify")
            return
        a_seq, a_hash = int(anchor["seq"]), str(anchor["hash"])
        row = con.execute("SELECT hash FROM entries WHERE seq = ?", (a_seq,)).fetchone()
        matches = (a_seq == 0 and a_hash == GENESIS_HASH) or (row is not None and row[0] == a_hash)
        if a_seq > last_seq or not matches or last_seq - a_seq > 1:
            raise AuditCorrupted(
                self.path, f"the log (head {last_seq}) does not match its anchor (entry {a_seq}); run verify"
            )

    # ------------------------------------------------------------------ public API

    def append(self, kind: str, *, task_id: str | None = None, payload: dict[str, Any]) -> AuditEntry:
        """Append one entry and move the anchor to it. See the module docstring on payloads."""
        if not isinstance(kind, str) or not kind:
            raise AuditError("an audit entry needs a kind (a non-empty string)")
        if not isinstance(payload, dict):
            raise AuditError(f"an audit payload must be a dict, got {type(payload).__name__}")
        try:
            text = canonical_json(payload)
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit payload of '{kind}' is not plain finite JSON: {exc}") from exc
        if len(text.encode("utf-8")) > MAX_PAYLOAD_BYTES:
            raise AuditError(
                f"audit payload of '{kind}' is {len(text.encode('utf-8'))} bytes, above {MAX_PAYLOAD_BYTES}: "
                "record sizes, shapes and metrics, never data rows"
            )
        value = json.loads(text)  # exactly what verify will see
        with self._flock(exclusive=True), self._connect() as con:
            with _sqlite.immediate(con):
                last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS_HASH)
                self._check_head(con, seq - 1)
                time = datetime.now(UTC).strftime(_TIME_FORMAT)  # under the lock: times follow seq
                h = entry_hash(prev_hash=prev, seq=seq, time=time, kind=kind, task_id=task_id, payload=value)
                con.execute(
                    "INSERT INTO entries (seq, time, kind, task_id, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                    (seq, time, kind, task_id, text, prev, h),
                )
            self._write_anchor(seq, h)
        return AuditEntry(
            seq=seq, time=_parse_time(time), kind=kind, task_id=task_id, payload=value, prev_hash=prev, hash=h
        )

    def entries(self, task_id: str | None = None) -> list[AuditEntry]:
        """The entries (of ``task_id``, if given) in order. Not verified: call :meth:`verify`."""
        with self._connect() as con:
            q = "SELECT seq, time, kind, task_id, payload, prev_hash, hash FROM entries"
            rows = con.execute(q + (" WHERE task_id = ?" if task_id is not None else "") + " ORDER BY seq",
                               (task_id,) if task_id is not None else ()).fetchall()
        return [
            AuditEntry(seq=s, time=_parse_time(t), kind=k, task_id=tid, payload=json.loads(p), prev_hash=ph, hash=h)
            for s, t, k, tid, p, ph, h in rows
        ]

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the newest entry (``(0, GENESIS_HASH)`` when empty): publish it
        somewhere else to make the log tamper-evident against whoever can write this file."""
        with self._connect() as con:
            last = con.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return (last[0], last[1]) if last else (0, GENESIS_HASH)

    def verify(self, *, expected_head: tuple[int, str] | None = None) -> AuditVerification:
        """Recompute the chain from the first entry and compare the head with the anchor
        (and with ``expected_head``, a head published elsewhere, if given)."""
        with self._flock(exclusive=False), self._connect() as con:
            con.execute("BEGIN")  # one snapshot for the whole walk
            try:
                rows = con.execute(
                    "SELECT seq, time, kind, task_id, payload, prev_hash, hash FROM entries ORDER BY seq"
                ).fetchall()
            finally:
                con.execute("COMMIT")
            anchor = self._read_anchor()
        n = len(rows)

        def bad(seq: int | None, reason: str) -> AuditVerification:
            return AuditVerification(ok=False, entries=n, first_bad_seq=seq, reason=reason)

        prev = GENESIS_HASH
        hashes: dict[int, str] = {}
        for expected, (seq, time, kind, task_id, payload, prev_hash, stored) in enumerate(rows, start=1):
            if seq != expected:
                return bad(expected, f"entry {expected} is missing (the next entry has seq {seq}): removed or reordered")
            if prev_hash != prev:
                return bad(seq, f"entry {seq} does not link to entry {seq - 1}: an entry was removed, "
                                "replaced or reordered here")
            try:
                value = json.loads(payload)
                canonical = canonical_json(value)
            except (TypeError, ValueError):
                return bad(seq, f"entry {seq}: the payload is not valid JSON")
            if canonical != payload:
                return bad(seq, f"entry {seq}: the payload is not in canonical form (it was edited)")
            try:
                recomputed = entry_hash(prev_hash=prev_hash, seq=seq, time=time, kind=kind, task_id=task_id, payload=value)
            except (TypeError, ValueError):
                return bad(seq, f"entry {seq}: a field has an impossible type")
            if recomputed != stored:
                return bad(seq, f"entry {seq} was changed: its hash does not match its content")
            hashes[seq] = stored
            prev = stored

        heads = []
        if isinstance(anchor, str):
            return bad(None, anchor)
        if anchor is None:
            if n:
                return bad(None, f"the anchor {self.anchor_path} is missing: a removed tail cannot be ruled out")
        else:
            heads.append(("the anchor", int(anchor["seq"]), str(anchor["hash"])))
        if expected_head is not None:
            heads.append(("the expected head", int(expected_head[0]), str(expected_head[1])))
        lag = ""
        for name, a_seq, a_hash in heads:
            if a_seq > n:
                return bad(n + 1, f"{name} names entry {a_seq} but the log ends at {n}: its tail was removed")
            if a_seq == 0:
                if a_hash != GENESIS_HASH:
                    return bad(1, f"{name} does not match the log")
            elif hashes.get(a_seq) != a_hash:
                return bad(a_seq, f"entry {a_seq} differs from {name}: the log was rewritten up to here")
            if name == "the anchor" and n - a_seq > 1:
                return bad(a_seq + 1, f"the anchor names entry {a_seq}, {n - a_seq} behind the head {n}: appends "
                                      "move it every time, so it was replaced with an older one")
            if name == "the anchor" and a_seq == n - 1:
                lag = "; the anchor is one entry behind (a crash between a commit and the anchor write)"
        return AuditVerification(ok=True, entries=n, first_bad_seq=None, reason=f"{n} entries, chain intact{lag}")


def _parse_time(s: str) -> datetime:
    return datetime.fromisoformat(s)  # Python 3.11 reads the trailing Z

