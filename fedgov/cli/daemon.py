"""Keeping a daemon in the foreground: ``fedgov node start`` and ``fedgov coordinator start``."""

from __future__ import annotations

import signal
import time

import typer

from fedgov.cli.console import console
from fedgov.launch.processes import ManagedProcess

__all__ = ["foreground"]


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
