"""A node's data set as a SQL query on a database (PostgreSQL through SQLAlchemy, or SQLite).

A node's policy can name, instead of a CSV or Parquet file, a query on the database where the
data lives (``[datasets.sql]``, :class:`SqlSource`). The query's result is read as *text*, as
:func:`fedgov.data.read_table` reads a file: every cell becomes the string an export would
hold (NULL and NaN become ``""``, booleans ``true``/``false``), so that the same validator
(:func:`fedgov.data.validate_frame`) checks it against the contract, with the same errors:
an undeclared column, a value of the wrong type or a NULL in a non-nullable column is refused
exactly as in a file. Row *r* in those errors is the *r*-th row the query returned (an
``ORDER BY`` makes the numbers stable).

What the node does to stay read-only and keep its secrets:

* the policy holds no password: a password in the URL (or as its ``password`` parameter) is
  refused when the policy is loaded; the password comes from an environment variable the
  policy names (``password_env``) or from a file only the node's user can read
  (``password_file``: a file that its group or others can read is refused, as ssh refuses a
  private key), and it is handed to the driver apart from the URL;
* the query must be one ``SELECT`` (or ``WITH ... SELECT``) statement: a second statement,
  ``SELECT ... INTO``, a data-modifying ``WITH`` or a locking clause are refused when the
  policy is loaded (:func:`check_select`), and again before it runs; PostgreSQL also refuses
  a second command itself (psycopg prepares the statement);
* it runs in a read-only transaction (PostgreSQL: ``default_transaction_read_only`` for the
  session and ``SET TRANSACTION READ ONLY``; SQLite: the file opened with ``mode=ro`` and
  ``PRAGMA query_only``) that is rolled back, under a timeout (PostgreSQL's
  ``statement_timeout`` and ``connect_timeout``; SQLite: the query is interrupted);
* no error or log message holds the password or a value of the result: a database error of
  the data-exception classes (SQLSTATE 22, 23), whose text may quote a value, is reported by
  its code only.

The policy's side (:class:`SqlSource`, :func:`check_select`) is in :mod:`fedgov.config.datasource`.

The rows come back in a canonical order (by a hash of each row's text, independent of the
order in which the database returned them: :func:`read_sql` sets the frame's index to each
row's rank in it) and :func:`frame_digest` is the SHA-256 of the rows in that order: a table
that did not change has the same digest whatever plan the database chose, which is what a
node keys its data check, its row-count release and its caches on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import time
from datetime import date, datetime, time as dtime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedgov.config.datasource import DataSource, SqlQuery, SqlSource, check_select
from fedgov.errors import DataFileError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DataSource", "SqlQuery", "SqlSource", "frame_digest", "read_source", "read_sql"]

log = logging.getLogger(__name__)


# --- credentials ---------------------------------------------------------------------------------


def _password(source: SqlSource, label: str) -> str | None:
    """The database password from the environment or the password file; None when the policy
    names neither (the driver's own means then apply: a trusted local socket, ``~/.pgpass``)."""
    if source.password_env is not None:
        value = os.environ.get(source.password_env)
        if value is None:
            raise DataFileError(
                f"{label}: the environment variable {source.password_env} (datasets.sql.password_env) is not set; "
                "set it in the node's environment to the database password"
            )
        return value
    if source.password_file is not None:
        return _read_password_file(source.password_file, label)
    return None


def _read_password_file(path: Path, label: str) -> str:
    """The first line of a password file that only its owner, the node's user, can read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))  # a FIFO: no wait
    except FileNotFoundError:
        raise DataFileError(f"{label}: password file {path} (datasets.sql.password_file) not found") from None
    except OSError as exc:
        raise DataFileError(f"{label}: password file {path} (datasets.sql.password_file) cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataFileError(f"{label}: password file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise DataFileError(
                f"{label}: permissions {mode:04o} for password file {path} are too open: it must be readable by the "
                f"node's user only; the file is ignored (chmod 600 {path})"
            )
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise DataFileError(
                f"{label}: password file {path} belongs to another user (uid {st.st_uid}); it must belong to the node's "
                f"user (uid {os.geteuid()}): the file is ignored"
            )
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataFileError(f"{label}: password file {path} is not UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise DataFileError(f"{label}: password file {path} is empty (the password is its first line)")
    return lines[0]


# --- running the query ---------------------------------------------------------------------------


_VALUE_CLASSES = ("22", "23", "P0", "38", "39", "2F", "XX")


def _db_message(exc: BaseException, secret: str | None) -> str:
    """What a database error may say: its SQLSTATE and first line, or only its code for the
    classes whose text may quote a value of the data (22 data exception, 23 integrity, a
    function's own RAISE P0 and external routines 38, 39, 2F, internal errors XX)."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    if code and str(code)[:2] in _VALUE_CLASSES:
        return (
            f"the database reported an error (SQLSTATE {code}, {type(orig).__name__}) whose message is not shown because it "
            "may quote a value of the rows: run the query yourself to see it"
        )
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if secret:
        text = text.replace(secret, "***")
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{text} (SQLSTATE {code})" if code else text


def _timed_out(exc: BaseException) -> bool:
    """Whether a driver error is the query's timeout: PostgreSQL's statement timeout (SQLSTATE
    57014, query canceled) or SQLite's progress handler (interrupted)."""
    orig = getattr(exc, "orig", None) or exc
    return getattr(orig, "sqlstate", None) == "57014" or "interrupted" in str(orig).lower()


def _cell(value: Any) -> str | None:
    """A result cell as the text a CSV export would hold; None for a type that has no text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    if isinstance(value, Decimal):
        return "" if value.is_nan() else str(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    return str(value)


def _frame(label: str, names: list[str], rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    """The result as a frame of text cells, in canonical order (see the module docstring)."""
    import numpy as np
    import pandas as pd

    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataFileError(f"{label}: column '{name}' appears twice in the query's result")
        seen.add(name)
    if not rows:
        raise DataFileError(f"{label}: the query returned no rows")
    columns: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        cells = [_cell(r[i]) for r in rows]
        if any(c is None for c in cells):
            kind = next(type(r[i]).__name__ for r, c in zip(rows, cells, strict=True) if c is None)
            raise DataFileError(f"{label}: column '{name}' holds binary values ({kind}), which cannot be read as text")
        columns[name] = [c or "" for c in cells]  # no None is left: the check above
    df = pd.DataFrame(columns, columns=names, dtype=str)
    order = np.argsort(pd.util.hash_pandas_object(df, index=False).to_numpy(), kind="stable")
    rank = np.empty(len(df), dtype=np.int64)
    rank[order] = np.arange(len(df))
    df.index = pd.Index(rank)
    return df


def frame_digest(df: pd.DataFrame) -> str:
    """SHA-256 of a query's result: its column names and its rows in canonical order (the
    frame's index, as :func:`read_sql` sets it)."""
    ordered = df.sort_index()
    h = hashlib.sha256(json.dumps([str(c) for c in ordered.columns]).encode())
    for name in ordered.columns:
        h.update(b"\x00")
        h.update(json.dumps(ordered[name].tolist(), ensure_ascii=False).encode())
    return h.hexdigest()


def read_sql(q: SqlQuery) -> pd.DataFrame:
    """Run one of a policy's queries, read-only and under its timeout, and return its result as
    text cells (as :func:`fedgov.data.read_table` returns a file), the index being each row's
    rank in canonical order.

    Raises :class:`~fedgov.errors.DataFileError` naming the query and the database (never the
    password, never a value of the rows) when the password cannot be had, the database cannot
    be reached, the query fails or times out, returns no rows, repeats a column or returns a
    binary column."""
    label = q.label
    sql = check_select(q.text, sqlite=q.source.is_sqlite)  # again: a SqlQuery can be made without the policy's validation
    secret = _password(q.source, label)
    started = time.monotonic()
    try:
        names, rows = _run_sqlite(q, sql) if q.source.is_sqlite else _run_postgres(q, sql, secret)
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - every driver error becomes one clear DataFileError
        if _timed_out(exc):
            raise DataFileError(f"{label}: the query ran longer than timeout_s = {q.source.timeout_s:g} s and was stopped") from None
        raise DataFileError(f"{label}: the query failed: {_db_message(exc, secret)}") from None
    df = _frame(label, names, rows)
    # no rows, values or password in the log: the query's identity and the size only
    log.debug("read %s: %d rows, %d columns in %.2f s", label, len(df), df.shape[1], time.monotonic() - started)
    return df


def _fetch(conn: Any, sql: str, *, postgres: bool) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The query's column names and rows, run on the driver's own cursor of the transaction
    SQLAlchemy opened: without parameters, so that a '%' or ':name' in the query is text. One
    statement only, by the server too: psycopg prepares it (PostgreSQL refuses to prepare two
    commands), and SQLite's ``execute`` runs one statement at a time."""
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        if postgres:
            cursor.execute(sql, prepare=True)
        else:
            cursor.execute(sql)
        names = [str(d[0]) for d in cursor.description or ()]
        rows = [tuple(r) for r in cursor.fetchall()]
    finally:
        cursor.close()
    return names, rows


def _run_postgres(q: SqlQuery, sql: str, secret: str | None) -> tuple[list[str], list[tuple[Any, ...]]]:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    timeout_ms = max(1, int(q.source.timeout_s * 1000))
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, math.ceil(q.source.timeout_s)),
        # the session's default: every transaction read-only, every statement under the timeout
        # standard_conforming_strings: a backslash ends no string, for the server as for check_select
        "options": f"-c default_transaction_read_only=on -c statement_timeout={timeout_ms} -c standard_conforming_strings=on",
        "application_name": "fedgov-node",
    }
    if secret is not None:
        connect_args["password"] = secret  # apart from the URL: never part of anything shown
    engine = create_engine(q.source.url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {timeout_ms}")
            names, rows = _fetch(conn, sql, postgres=True)
            conn.rollback()
    finally:
        engine.dispose()
    return names, rows


def _run_sqlite(q: SqlQuery, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    path = Path(q.source.url[len("sqlite:///"):])
    if not path.is_file():
        raise DataFileError(f"{q.label}: database file {path} not found")
    deadline = time.monotonic() + q.source.timeout_s

    def connect() -> sqlite3.Connection:
        con = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=q.source.timeout_s, check_same_thread=False)
        con.execute("PRAGMA query_only = ON")
        con.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10_000)
        return con

    engine = create_engine("sqlite+pysqlite://", creator=connect, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            names, rows = _fetch(conn, sql, postgres=False)
            conn.rollback()
    finally:
        engine.dispose()
    return names, rows


def read_source(src: DataSource) -> pd.DataFrame:
    """A data source's rows as text cells: a file through :func:`fedgov.data.read_table`, a
    query through :func:`read_sql`."""
    if isinstance(src, SqlQuery):
        return read_sql(src)
    from fedgov.data.io import read_table

    return read_table(src)
