"""The command line's consoles, and the one place where errors become messages and exit codes.

Every command runs through :func:`run_command`: the root group (and every group made with
:func:`new_typer`) is a :class:`GuardedGroup`, and Click invokes each subcommand from inside its
group's ``invoke``. There

- a :class:`~fedgov.errors.FedgovError` prints its message (with its problems) on stderr and
  exits with its documented code (``fedgov exit-codes``);
- Ctrl-C exits 130 (:attr:`~fedgov.errors.ExitCode.INTERRUPTED`);
- any other exception is a bug: one line on stderr that says so and where, exit 1. With
  ``FEDGOV_DEBUG=1`` in the environment it propagates, traceback and all.

Click's own exits and usage errors (``typer.Exit``, ``typer.BadParameter``) pass through
unchanged.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from fedgov.errors import ExitCode, FedgovError

__all__ = [
    "DEBUG_ENV",
    "GuardedGroup",
    "console",
    "err_console",
    "fail",
    "new_typer",
    "print_error",
    "run_command",
    "usage_error",
]

T = TypeVar("T")

DEBUG_ENV = "FEDGOV_DEBUG"
"""Set (to anything but ``""`` or ``0``) to see the traceback of an internal error."""

# Wide enough for the per-node table also when the output is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def print_error(message: str) -> None:
    """``error: message`` on stderr; the message is text (a ``[section]`` in it is not markup)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(exc: FedgovError) -> NoReturn:
    """Print a FedgovError (its problems are part of its message) and exit with its code."""
    print_error(str(exc))
    raise typer.Exit(int(exc.exit_code))


def usage_error(message: str) -> NoReturn:
    """A command line that cannot work (exit 2), said in fedgov's words."""
    print_error(message)
    raise typer.Exit(int(ExitCode.USAGE))


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown place"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def run_command(invoke: Callable[[], T]) -> T:
    """Run a command: the one handler of every error a command can end in (module docstring)."""
    try:
        return invoke()
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise  # Click's own: exit codes and usage errors it reports itself
    except FedgovError as exc:
        fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted; managed processes were stopped")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except Exception as exc:
        if _debug():
            raise
        first_line = next(iter(str(exc).splitlines()), "")
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first_line)} ({_where(exc)}); "
            f"a bug in fedgov, please report it ({DEBUG_ENV}=1 shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(int(ExitCode.INTERNAL)) from None


class GuardedGroup(TyperGroup):
    """A Typer group whose subcommands run through :func:`run_command`."""

    def invoke(self, ctx: click.Context) -> Any:
        return run_command(functools.partial(super().invoke, ctx))


def new_typer(help: str, **kwargs: Any) -> typer.Typer:
    """A command group: guarded, and showing its help when called without a command."""
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(help=help, cls=GuardedGroup, **kwargs)
