"""Fixtures of the end-to-end tests, which start real Flower processes (SuperLink, SuperNodes,
Ray): a look at which of them are still alive."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

_FLOWER = ("flower-", "flwr", "raylet", "gcs_server", "ray::", "fedgov.deploy.worker", "fedgov.deploy.noderun", "fedgov.deploy.linkrun",
           "fedgov/deploy/relay.py")


def flower_processes_(under: Path) -> list[str]:
    """Command lines of live Flower and Ray processes started for ``under``.

    A process counts when its FLWR_HOME or its command line lies under ``under``: only this
    test's own, since other test sessions on the machine may run Flower at the same time.
    Zombies (exited, not yet reaped) do not count.
    """
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] == "Z":
            continue
        home = next((e[len(b"FLWR_HOME=") :].decode() for e in env if e.startswith(b"FLWR_HOME=")), "")
        if (home.startswith(str(under)) or str(under) in cmd) and any(k in cmd for k in _FLOWER):
            out.append(cmd)
    return out


@pytest.fixture(scope="session")
def flower_processes() -> Callable[[Path], list[str]]:
    """``flower_processes(folder)``: command lines of the live Flower and Ray processes started for ``folder``."""
    return flower_processes_
