"""``python -m fedgov.cli``: the same as the ``fedgov`` command."""

from fedgov.cli.app import main

main()
