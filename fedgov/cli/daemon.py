"""Keeping a daemon in the foreground: ``fedgov node start`` and ``fedgov coordinator start``;
and the web consoles (``fedgov node console``, ``fedgov coordinator console``, ``fedgov console``)
with the options they share."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedgov.cli.console import console
from fedgov.errors import ConfigError, Problem
from fedgov.launch.processes import ManagedProcess

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from fedgov.console.security import Guard

__all__ = ["ConsoleHost", "ConsolePort", "PasswordFile", "TlsCert", "TlsDev", "TlsKey", "foreground", "serve_console"]

ConsoleHost = Annotated[
    str, typer.Option("--host", help="Address to listen on; anything but loopback (127.0.0.1, the default) needs TLS"),
]
ConsolePort = Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on")]
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help="TLS certificate (PEM) to serve with")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="The TLS certificate's private key (PEM)")]
TlsDev = Annotated[
    Path | None,
    typer.Option("--tls-dev", help="Make (once) and use a development CA and certificate in this directory (fedgov's PKI "
                 "helper); browsers must trust its ca.crt"),
]
PasswordFile = Annotated[
    Path | None,
    typer.Option("--password-file", help="Log in with the password in this file (mode 0600, 12 characters or more) "
                 "instead of a token printed at start"),
]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def foreground(procs: ManagedProcess | list[ManagedProcess], what: str) -> None:
    """Keep a daemon (one or more processes) in the foreground until Ctrl-C or SIGTERM; stop it
    with all it started. If one of its processes exits, the others are stopped too."""
    group = procs if isinstance(procs, list) else [procs]
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.running() for p in group):
            for p in group:
                p.remember_descendants()
            time.sleep(1.0)
        dead = next(p for p in group if not p.running())
        console.print(f"[red]the {what} ({dead.name}) exited (exit {dead.proc.returncode})[/]:\n{dead.tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print(f"stopping the {what}")
    finally:
        for p in reversed(group):
            p.stop()


def serve_console(
    make_app: Callable[[Guard, list[str] | None], Starlette],
    *,
    what: str,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_dev: Path | None,
    password_file: Path | None,
    default_tls: tuple[Path, Path] | None = None,
) -> None:
    """Serve a web console in the foreground until Ctrl-C: TLS beyond loopback (``default_tls``:
    the certificate and key to use there when none is given), a login token printed now (or the
    password in ``password_file``)."""
    from fedgov.console.security import Guard, check_binding, is_loopback, new_token, read_password_file  # lazy: the console (fedgov --help)
    from fedgov.console.server import Tls, serve, tls_files  # lazy: uvicorn, Starlette (fedgov --help)
    from fedgov.console.web import allowed_hosts_for  # lazy: Starlette, Jinja2 (fedgov --help)

    tls = tls_files(host, tls_cert, tls_key, tls_dev)
    if tls is None and default_tls is not None and not is_loopback(host):
        tls = Tls(*default_tls)
    check_binding(host, tls=tls is not None)
    secret = read_password_file(password_file) if password_file is not None else new_token()
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"the console cannot listen on {host}:{port}", [Problem("--port", str(port), exc.strerror or str(exc))]) from None
    guard = Guard(secret, secure=tls is not None)
    app = make_app(guard, allowed_hosts_for(host))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    print(f"{what} on {'https' if tls else 'http'}://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
    if password_file is None:
        print(f"login token: {secret}", flush=True)
    else:
        print(f"log in with the password in {password_file}", flush=True)
    if tls is not None and tls.ca is not None:
        print(f"development certificate: browsers must trust {tls.ca}", flush=True)
    serve(app, host=host, port=port, tls=tls)
