"""Progress events of a run, as JSON lines in ``events.jsonl`` in the run directory.

The coordinator appends one line per event; ``fedgov run`` follows the file to show
progress. Lines are written whole (one ``write`` each), so a reader never sees half a line
except the last one while it is being written, which :class:`EventReader` leaves for later.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["EventWriter", "EventReader"]


class EventWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


class EventReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        """Events appended since the last call (complete lines only)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        out = []
        for raw in chunk[: end + 1].splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return out
