"""The ``fedgov`` command: every command and group, registered in the order ``--help`` lists
them. Entry point: :func:`main` (``fedgov = "fedgov.cli:main"``).

Errors fedgov raises on purpose end in a clear message and a documented exit code
(``fedgov exit-codes``), never a traceback: see :mod:`fedgov.cli.console`.
"""

from __future__ import annotations

import logging

import typer

from fedgov.cli.console import GuardedGroup
from fedgov.cli.deploy import app_app, coordinator_app, local_app, task_app
from fedgov.cli.node import node_app
from fedgov.cli.query import query
from fedgov.cli.roster import roster_app
from fedgov.cli.run import check, data_app, exit_codes, report, run, runs_console, version

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedgov",
    help="Privacy-preserving federated learning for municipalities.",
    cls=GuardedGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command()(run)
app.command()(query)
app.command()(check)
app.command()(report)
app.command("exit-codes")(exit_codes)
app.command()(version)
app.command("console")(runs_console)
app.add_typer(data_app, name="data")
app.add_typer(node_app, name="node")
app.add_typer(roster_app, name="roster")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(task_app, name="task")
app.add_typer(local_app, name="local-federation")
app.add_typer(app_app, name="app")


def main() -> None:
    """Console entry point: logging for the command line, then the command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
