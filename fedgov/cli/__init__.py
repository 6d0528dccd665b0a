"""fedgov's command line."""

from fedgov.cli.commands import app, main

__all__ = ["app", "main"]
