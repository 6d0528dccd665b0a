"""The web consoles: the node's (``fedgov node console``) and the coordinator's
(``fedgov coordinator console``, ``fedgov console --runs-dir`` for simulation runs).

Server-rendered pages (Starlette and Jinja2, served by uvicorn) with SVG charts drawn on the
server and no script: :mod:`~fedgov.console.node` and :mod:`~fedgov.console.coordinator` hold
the pages, :mod:`~fedgov.console.web` what they share (login, sessions, forgery checks,
headers), :mod:`~fedgov.console.security` the rules, :mod:`~fedgov.console.charts` the SVG, and
:mod:`~fedgov.console.server` serving (TLS beyond loopback).

A console reads only what the node or the coordinator already holds, through fedgov's own
classes; the node console's decisions (approve, reject, pause, resume) write the same node
state and audit entries as the command line.
"""

from __future__ import annotations

__all__: list[str] = []
