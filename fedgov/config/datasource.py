"""Where a node reads a data set: a file, or a SQL query on a database (the policy's syntax).

:class:`SqlSource` is a node policy's ``[datasets.sql]``: a database URL without a password,
where the password comes from (an environment variable or a file only the node's user can
read), and one read-only ``SELECT`` (:func:`check_select`) giving the rows, optionally a second
one giving a held-out test split. :class:`SqlQuery` names one of those queries as a
:class:`~pathlib.Path` names a file; :data:`DataSource` is either. Reading is
:mod:`fedgov.data.sql`'s business; this module is light (no pandas, no driver), so that a
policy loads without them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fedgov.config._base import ConfigPath, StrictModel

__all__ = ["DataSource", "SqlQuery", "SqlSource", "check_select", "source_id", "source_label"]

_DRIVERS = {"postgresql": "postgresql+psycopg", "postgresql+psycopg": "postgresql+psycopg", "sqlite": "sqlite", "sqlite+pysqlite": "sqlite"}
_SUPPORTED = "postgresql://user@host:port/database (psycopg) or sqlite:///path/to/file.db"


# --- the query: one SELECT -----------------------------------------------------------------------

_WRITES = frozenset({"insert", "update", "delete", "merge", "into"})
"""Words that make a SELECT or WITH write (``WITH x AS (DELETE ...)``, ``SELECT ... INTO``, ``FOR UPDATE``)."""

_EFFECTS = frozenset({
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote", "pg_switch_wal",
    "pg_create_restore_point", "pg_logical_emit_message", "pg_notify", "set_config", "pg_import_system_collations",
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
    "load_extension", "writefile", "fts3_tokenizer",
})
_EFFECT_PREFIXES = ("dblink", "lo_", "pg_advisory", "pg_file_", "pg_stat_reset", "pg_replication_", "pg_create_", "pg_drop_", "pg_log_")
"""Functions a read-only transaction does not stop: they act on another connection (``dblink``),
on the server's files (large objects ``lo_*``, adminpack's ``pg_file_*``), on other sessions or
the server (``pg_terminate_backend``, ``pg_reload_conf``, advisory locks, replication slots),
change the session (``set_config``), run SQL given as a string (``query_to_xml``), or load code
(SQLite's ``load_extension``). A list cannot know every such function (an extension's, or one a
database administrator wrote): the database role the node connects as is the real boundary
and should be allowed to SELECT only."""


def _effect(name: str) -> bool:
    return name in _EFFECTS or name.startswith(_EFFECT_PREFIXES)


def _words(sql: str, sqlite: bool = False) -> tuple[list[str], list[int]]:
    """The words of ``sql`` outside string literals, quoted identifiers and comments (lower
    case), and the offsets of every ``;`` outside them. ValueError for an unterminated one."""
    words, semicolons, _ = _scan(sql, sqlite)
    return words, semicolons


def _scan(sql: str, sqlite: bool = False) -> tuple[list[str], list[int], list[str]]:
    """:func:`_words`, and the names called as functions (a word or quoted name before ``(``,
    comments and blanks between them allowed; lower case). ValueError for an unterminated
    string, quoted name or comment, and for a Unicode-escaped name (``U&"..."``), which
    could spell any function's name. ``sqlite``: read as SQLite does (names also in
    `backticks` and [brackets]; no ``$$`` strings, no ``E'...'`` escapes)."""
    quotes = "'\"`[" if sqlite else "'\""
    words: list[str] = []
    semicolons: list[int] = []
    calls: list[str] = []
    last: str | None = None  # the name just before, while only blanks and comments follow it
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
            continue
        if c == "(" and last is not None:
            calls.append(last)
        if not (c == "-" and sql.startswith("--", i)) and not (c == "/" and sql.startswith("/*", i)):
            last = None
        if c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise ValueError("a /* comment is not closed")
        elif c in quotes:
            if c == '"' and i >= 2 and sql[i - 1] == "&" and sql[i - 2] in "uU" and (i < 3 or not (sql[i - 3].isalnum() or sql[i - 3] == "_")):
                raise ValueError('a Unicode-escaped name (U&"...") is not allowed in the query: write the name itself')
            close = "]" if c == "[" else c
            escapes = not sqlite and c == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            j = i + 1
            while True:
                if j >= n:
                    raise ValueError(f"a {'string' if c == chr(39) else 'quoted name'} is not closed ({c})")
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == close:
                    if close != "]" and j + 1 < n and sql[j + 1] == c:  # '' or "" inside: the quote itself
                        j += 2
                        continue
                    break
                j += 1
            if c != "'":
                last = sql[i + 1 : j].replace(c * 2, c).lower()
            i = j + 1
        elif c == "$" and not sqlite and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            j = sql.find("$", i + 1)
            tag = sql[i : j + 1] if j > 0 else ""
            if tag and all(ch.isalnum() or ch == "_" for ch in tag[1:-1]) and not tag[1:2].isdigit():
                end = sql.find(tag, j + 1)
                if end < 0:
                    raise ValueError(f"a dollar-quoted string ({tag}) is not closed")
                i = end + len(tag)
            else:
                i += 1
        elif c == ";":
            semicolons.append(i)
            i += 1
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            words.append(sql[i:j].lower())
            last = words[-1]
            i = j
        else:
            i += 1
    return words, semicolons, calls


def check_select(sql: str, *, sqlite: bool = False) -> str:
    """The statement of ``sql`` (without a trailing ``;``) when it is one read-only ``SELECT``
    or ``WITH ... SELECT``; ValueError saying what is wrong otherwise.

    Refused: anything but SELECT or WITH first; a second statement; ``SELECT ... INTO`` (it
    creates a table); INSERT, UPDATE, DELETE or MERGE anywhere (a
    data-modifying ``WITH``); a locking clause (``FOR UPDATE``, ``FOR SHARE``); a call of a
    function that acts beyond the read-only transaction (``dblink``, ``lo_export``,
    ``set_config``, ``query_to_xml``, ...: :data:`_EFFECTS`), also by a quoted name; a
    Unicode-escaped name. Words inside string literals, quoted names and comments do not
    count, read as the database reads them (``sqlite``: SQLite's quoting, else PostgreSQL's).
    The read-only transaction the query runs in (:func:`read_sql`) is the second line of
    defence; a database role that may only SELECT is the last."""
    words, semicolons, calls = _scan(sql, sqlite)
    if not words:
        raise ValueError("the query is empty")
    body = sql.rstrip()
    if semicolons and not any(_words(sql[semicolons[-1] + 1 :], sqlite)):  # only blanks or comments after it
        body = sql[: semicolons[-1]].rstrip()
        semicolons = semicolons[:-1]
    if semicolons:
        raise ValueError("the query holds more than one statement (a ';' before its end): give one SELECT")
    if words[0] not in ("select", "with"):
        raise ValueError(f"the query must be one SELECT (or WITH ... SELECT) statement, not {words[0].upper()}")
    bad = sorted(_WRITES.intersection(words))
    if bad:
        raise ValueError(f"the query must only read: {bad[0].upper()} is not allowed in it")
    for a, b in zip(words, words[1:], strict=False):
        if a == "for" and b in ("share", "key", "no"):
            raise ValueError("the query must only read: a locking clause (FOR SHARE, FOR KEY SHARE) is not allowed in it")
    for name in calls:
        if _effect(name):
            raise ValueError(
                f"the query must only read: {name.upper()}() acts beyond the query's read-only transaction and is not "
                "allowed in it (and give the node a database role that may only SELECT)"
            )
    return body


# --- the policy's [datasets.sql] -----------------------------------------------------------------


def _parse_url(value: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(value)
    except (ArgumentError, ValueError):
        # never echo the value: it may hold a password in a form make_url could not read
        raise ValueError(f"not a database URL; expected {_SUPPORTED}") from None


def _normalised_url(value: str, info: ValidationInfo) -> str:
    """The policy's database URL, checked (a supported database, no password, no session
    options) and normalised (PostgreSQL through psycopg; a SQLite path made absolute)."""
    url = _parse_url(value)
    driver = _DRIVERS.get(url.drivername)
    if driver is None:
        raise ValueError(f"database type {url.drivername!r} is not supported; expected {_SUPPORTED}")
    if url.password is not None or any("password" in str(k).lower() for k in url.query):
        raise ValueError(
            "the URL holds a password; a policy must never hold one: remove it from the URL and give "
            "password_env (an environment variable's name) or password_file (a file only the node's user can read)"
        )
    if "options" in url.query:
        raise ValueError("the URL sets 'options'; fedgov sets the session's options itself (read-only, timeout)")
    if driver == "sqlite":
        if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
            raise ValueError("a SQLite URL must name a database file: sqlite:///relative/path.db or sqlite:////absolute/path.db")
        if url.query:
            raise ValueError("a SQLite URL takes no parameters (fedgov opens the file read-only itself)")
        path = Path(url.database)
        base = (info.context or {}).get("base_dir")
        if not path.is_absolute() and base is not None:
            path = (Path(base) / path).resolve()
        return f"sqlite:///{path}"
    return str(url.set(drivername=driver).render_as_string(hide_password=False))


class SqlSource(StrictModel):
    """``[datasets.sql]`` in a node's policy: a data set as a query on a database.

    ``url`` names the database without a password (``postgresql://reader@db.example.nl:5432/sociaal``
    or ``sqlite:///data/sociaal.db``, a relative SQLite path taken from the policy file's
    directory); the password, when the database needs one, comes from ``password_env`` (the
    name of an environment variable) or ``password_file`` (a file readable by the node's user
    only), never from the policy. ``query`` gives the training data (or all of it);
    ``test_query``, optionally, a held-out test split, as a policy's ``test_path`` does.
    """

    # a refused URL may hold a password: pydantic's own error text (str(ValidationError)) must
    # not quote it either, whoever prints or logs it
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    url: str = Field(min_length=1, description="the database, without a password: postgresql://user@host:port/db or sqlite:///file.db")
    query: str = Field(min_length=1, description="one SELECT (or WITH ... SELECT) statement: the data set's rows")
    test_query: str | None = Field(default=None, description="optionally, one SELECT giving a held-out test split")
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the password")
    password_file: ConfigPath | None = Field(default=None, description="file holding the password (mode 0600 or stricter), relative to the policy")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="how long connecting and running the query may take, in seconds")

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return _normalised_url(value, info)
        except ValueError as exc:
            # a custom type: the error names the field and the rule, never the URL (a password)
            raise PydanticCustomError("secret", str(exc)) from None

    @field_validator("query", "test_query")
    @classmethod
    def _select(cls, value: str | None, info: ValidationInfo) -> str | None:
        sqlite = str(info.data.get("url", "")).startswith("sqlite:")  # the url is checked first
        return None if value is None else check_select(value, sqlite=sqlite)

    @model_validator(mode="after")
    def _credentials(self) -> SqlSource:
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give password_env or password_file, not both")
        if self.is_sqlite and (self.password_env is not None or self.password_file is not None):
            raise ValueError("a SQLite database has no password: remove password_env / password_file")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite:")

    @property
    def shown_url(self) -> str:
        """The URL as messages show it (it holds no password: the policy refuses one)."""
        from urllib.parse import unquote

        return unquote(self.url)

    def queries(self) -> tuple[SqlQuery, SqlQuery | None]:
        """The training query and, when given, the test query."""
        test = SqlQuery(self, "test") if self.test_query is not None else None
        return SqlQuery(self, "train"), test


@dataclass(frozen=True)
class SqlQuery:
    """One of a :class:`SqlSource`'s queries (``part``: its ``query`` or its ``test_query``):
    where a node reads a data set's rows, as a :class:`~pathlib.Path` names a file."""

    source: SqlSource
    part: Literal["train", "test"] = "train"

    @property
    def text(self) -> str:
        q = self.source.query if self.part == "train" else self.source.test_query
        assert q is not None
        return q

    @property
    def label(self) -> str:
        """How errors name it (as they name a file): the query's key and the database."""
        key = "query" if self.part == "train" else "test_query"
        return f"SQL {key} on {self.source.shown_url}"

    def __str__(self) -> str:
        return self.label


DataSource = Path | SqlQuery
"""Where a node reads a data set: a CSV or Parquet file, or a SQL query."""


def source_label(src: DataSource) -> str:
    """How messages name a data source: a file's path, or the query and its database."""
    return str(src)


def source_id(src: DataSource) -> str:
    """A data source's identity for caches: a file's resolved path; a query's database,
    part and the SHA-256 of its text."""
    if isinstance(src, SqlQuery):
        return f"sql:{src.source.url}#{src.part}:{hashlib.sha256(src.text.encode()).hexdigest()}"
    return str(Path(src).resolve())
