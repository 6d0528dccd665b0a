"""Helpers shared by the end-to-end tests (real Flower processes)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADULT = ROOT / "data" / "adult" / "adult.csv"
ADULT_TEST = ROOT / "data" / "adult" / "adult_test.csv"
CONTRACT = ROOT / "configs" / "contracts" / "adult-income.toml"

_FLOWER = ("flower-", "flwr", "raylet", "gcs_server", "ray::")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def flower_processes(under: Path) -> list[str]:
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
