"""A real PostgreSQL server for the tests, started and stopped by the suite itself.

The server's binaries come from the ``pgserver`` wheel (the ``test`` extra of pyproject.toml,
so ``make test``'s set-up installs them); no system PostgreSQL is needed. The helper runs
``initdb`` and ``pg_ctl`` from that wheel directly, so that the server lives in a temporary
folder, listens on a Unix socket there only (no TCP port to collide with another test worker)
and is stopped and removed at the end. PostgreSQL refuses to run as root: when the tests run
as root, the server runs as the unprivileged user ``nobody`` (its data folder is handed to
that user), which is what pgserver itself does with a user it creates.

The cluster asks for passwords (``scram-sha-256``, also on the socket), so that the node's
credentials are really checked: the superuser ``postgres`` has :data:`SUPERUSER_PASSWORD`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPERUSER_PASSWORD = "pg-superuser-secret"


@dataclass(frozen=True)
class Postgres:
    """A running server: its socket folder, and URLs for fedgov's policies (no password in them)."""

    socket_dir: Path
    port: int = 5432

    def url(self, user: str, database: str = "postgres") -> str:
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run statements as the superuser (set-up: tables, roles, grants), in autocommit."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", password=SUPERUSER_PASSWORD, dbname=database, autocommit=True,
        ) as con:
            for s in statements:
                con.execute(s.encode())

    def fetch(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", password=SUPERUSER_PASSWORD, dbname=database,
        ) as con:
            return list(con.execute(sql.encode()).fetchall())


def _bin() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pgserver")  # not imported: only its PostgreSQL build is used
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver wheel is not installed: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _demote(uid: int, gid: int) -> Any:
    def run() -> None:
        os.setgid(gid)
        os.setuid(uid)

    return run


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a fresh PostgreSQL cluster in a temporary folder; stop it and remove the folder after."""
    bindir = _bin()
    folder = Path(tempfile.mkdtemp(prefix="fedgov-pg-", dir="/tmp"))  # short: a socket path has at most 107 bytes
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    preexec = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        preexec = _demote(nobody.pw_uid, nobody.pw_gid)
        env["HOME"] = str(folder)
    data, pwfile, logfile = folder / "data", folder / "pw", folder / "server.log"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    if preexec is not None:
        os.chown(pwfile, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)

    def run(*args: str) -> None:
        done = subprocess.run(args, env=env, preexec_fn=preexec, capture_output=True, text=True, timeout=120, cwd=folder)  # noqa: PLW1509 - drops root before exec
        if done.returncode != 0:
            log = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}\n{log}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "--auth=scram-sha-256",
        "--encoding=UTF8", "--locale=C", "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "60",
        "-o", f"-h '' -k {folder} -c fsync=off -c max_connections=20 -c shared_buffers=16MB", "start")
    try:
        yield Postgres(folder)
    finally:
        with contextlib.suppress(Exception):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "-t", "30", "stop")
        shutil.rmtree(folder, ignore_errors=True)
