"""fedgov's command line: ``app`` (the Typer application) and ``main`` (the console entry point).

One module per command group: :mod:`~fedgov.cli.run` (run, check, report, exit-codes, version,
data), :mod:`~fedgov.cli.query`, :mod:`~fedgov.cli.node`, :mod:`~fedgov.cli.roster`,
:mod:`~fedgov.cli.deploy` (coordinator, task, local-federation, app); :mod:`~fedgov.cli.app`
registers them. The consoles and the one error handler are in :mod:`~fedgov.cli.console`.
"""

from fedgov.cli.app import app, main

__all__ = ["app", "main"]
