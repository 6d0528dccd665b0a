"""SQLite plumbing shared by the node's databases (privacy ledger, audit log, node state).

Plain functions, no state: each database module keeps its own errors and messages and calls
these for the parts that are the same everywhere.

- :func:`connect`: a connection in autocommit mode (transactions are explicit), usable from
  any thread, that waits ``busy_timeout`` seconds for a lock and syncs every commit
  (``synchronous=FULL``: a commit that returned survives a power cut).
- :func:`pooled`: this thread's kept-open connection to a file (closing the last connection to
  a WAL file checkpoints it, several ms per call), shared by every object of this process that
  opens the same file; :func:`discard` drops it after an error.
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
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import quote

__all__ = ["connect", "create_linked", "discard", "immediate", "is_corruption", "pooled", "quick_check"]

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


_POOL: dict[tuple[str, int, int, float], tuple[tuple[int, int, int, int], sqlite3.Connection]] = {}
_POOL_LOCK = threading.Lock()
_POOL_PRUNE_AT = 256
_NEVER_CLOSE: list[sqlite3.Connection] = []  # connections never to use or close: to files found damaged, or inherited


def pooled(path: Path, mode: Literal["rw", "rwc"], busy_timeout: float) -> sqlite3.Connection:
    """This thread's open connection to the file at ``path`` (:func:`connect` the first time),
    kept for the life of the process and shared by every object that opens the file.

    Kept per process (a forked child never uses its parent's connection) and thread, and only
    while the file is the same: its device, inode, size and modification time. Commits go to
    the write-ahead log, so the file itself changes only when the log is checkpointed (every
    1000 pages, or when a process closes its last connection): then, or when the file was
    replaced or overwritten, the next call connects afresh, and a damaged file is found as a
    new connection would find it. A kept connection sees every commit of other connections and
    processes: in autocommit mode each statement or transaction reads the newest state.
    ``FileNotFoundError`` when there is no file (``rw``)."""
    if mode == "rwc" and not path.exists():
        connect(path, mode, busy_timeout).close()  # create it; then connect as to any file
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    key = (str(path), os.getpid(), threading.get_ident(), busy_timeout)
    kept = _POOL.get(key)
    if kept is not None and kept[0] == ident:
        return kept[1]
    con = connect(path, mode, busy_timeout)
    if kept is not None:
        with _POOL_LOCK:
            _POOL.pop(key, None)
        try:
            # the file changed: read its header before the old connection closes (closing the
            # last connection writes its log into the file, which would hide a damaged one)
            con.execute("PRAGMA schema_version").fetchone()
        except sqlite3.DatabaseError:
            _NEVER_CLOSE.append(kept[1])  # never closed: it would write over the damaged file
            con.close()
            raise
        with contextlib.suppress(sqlite3.Error):
            kept[1].close()
    with _POOL_LOCK:
        _POOL[key] = (ident, con)
        if len(_POOL) >= _POOL_PRUNE_AT:
            _prune()
    return con


def _prune() -> None:
    """Drop the connections of threads that ended (closed) and of other processes (left
    alone: closing an inherited connection can disturb the parent's locks). Under the lock."""
    global _POOL_PRUNE_AT
    alive = {t.ident for t in threading.enumerate()}
    pid = os.getpid()
    for key in [k for k in _POOL if k[1] != pid or k[2] not in alive]:
        _, con = _POOL.pop(key)
        if key[1] == pid:
            with contextlib.suppress(sqlite3.Error):
                con.close()
        else:
            _NEVER_CLOSE.append(con)  # inherited through fork: never used here, never closed (its parent's locks)
    _POOL_PRUNE_AT = max(256, 2 * len(_POOL))


def discard(path: Path) -> None:
    """Close and forget this thread's pooled connections to ``path`` (after an error, or when
    the caller closes): the next :func:`pooled` call connects afresh."""
    me, pid = threading.get_ident(), os.getpid()
    with _POOL_LOCK:
        for key in [k for k in _POOL if k[0] == str(path) and k[1] == pid and k[2] == me]:
            with contextlib.suppress(sqlite3.Error):
                _POOL.pop(key)[1].close()


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
