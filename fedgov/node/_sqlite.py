"""SQLite plumbing shared by the node's databases (privacy ledger, audit log, node state).

Plain functions, no state: each database module keeps its own errors and messages and calls
these for the parts that are the same everywhere.

- :func:`connect`: a connection in autocommit mode (transactions are explicit), usable from
  any thread, that waits ``busy_timeout`` seconds for a lock and syncs every commit
  (``synchronous=FULL``: a commit that returned survives a power cut).
- :func:`create_linked`: build a new database in a private temporary file, then ``os.link``
  it into place, so other processes see either no file or a complete one, and a file that
  appeared meanwhile is kept (a link never overwrites).
- :func:`immediate`: a ``BEGIN IMMEDIATE`` transaction, which takes the write lock at once,
  so a read-check-write inside it is atomic across threads and processes.
- :func:`is_corruption` and :func:`quick_check`: whether SQLite says a file is damaged or not
  a database.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import quote

__all__ = ["connect", "create_linked", "immediate", "is_corruption", "quick_check"]

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def connect(path: Path, mode: Literal["rw", "rwc"], busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` (``mode`` ``rw``: it must exist; ``rwc``: create it) for fedgov's use.

    Autocommit (``isolation_level=None``), shareable between threads
    (``check_same_thread=False``; callers serialize its use), ``busy_timeout`` seconds of
    waiting for locks, and ``synchronous=FULL``.
    """
    con = sqlite3.connect(
        f"file:{quote(str(path.resolve()))}?mode={mode}",
        uri=True,
        timeout=busy_timeout,
        isolation_level=None,  # transactions are explicit
        check_same_thread=False,
    )
    con.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    con.execute("PRAGMA synchronous = FULL")
    return con


def create_linked(
    path: Path, *, schema: str, application_id: int, user_version: int | None = None, busy_timeout: float
) -> bool:
    """Create the database ``path`` in WAL mode with ``application_id`` (and ``user_version``,
    if given) and ``schema``, unless a file appears there first.

    The schema is built in a private file next to ``path``, which is then linked into place:
    other processes never see a half-made database, and an existing file is never
    overwritten. The private file (and its ``-wal``/``-shm``) is removed in every case.
    Returns True if this call put the file in place, False if another file was there.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        con = connect(tmp, "rwc", busy_timeout)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.execute(f"PRAGMA application_id = {application_id}")
            if user_version is not None:
                con.execute(f"PRAGMA user_version = {user_version}")
            con.executescript(schema)
        finally:
            con.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


@contextlib.contextmanager
def immediate(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` on ``con`` (in autocommit mode): commit when the block ends, roll
    back if it raises (unless SQLite already ended the transaction), and re-raise."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the file is damaged or not a database (``SQLITE_CORRUPT``,
    ``SQLITE_NOTADB``, or a bare ``DatabaseError``), rather than e.g. a lock or a constraint."""
    return getattr(exc, "sqlite_errorcode", None) in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or type(exc) is sqlite3.DatabaseError


def quick_check(con: sqlite3.Connection) -> list[str]:
    """The problems ``PRAGMA quick_check`` finds (at most its first five), ``[]`` if none."""
    problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
    return [] if problems == ["ok"] else problems[:5]
