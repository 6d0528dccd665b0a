"""Regenerate the table of what can leave a node in docs/threat-model.md from the release
gate's declaration (fedgov/node/gate.py): python scripts/gate_table.py"""

from __future__ import annotations

import re
from pathlib import Path

from fedgov.node.gate import table_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "threat-model.md"


def main() -> None:
    text = DOC.read_text(encoding="utf-8")
    new, n = re.subn(
        r"(<!-- gate-table:start -->\n).*?(<!-- gate-table:end -->)",
        lambda m: m.group(1) + table_markdown() + m.group(2),
        text,
        flags=re.S,
    )
    if n != 1:
        raise SystemExit(f"{DOC}: no gate-table markers")
    DOC.write_text(new, encoding="utf-8")
    print(f"{DOC}: table written ({table_markdown().count(chr(10)) - 2} fields)")


if __name__ == "__main__":
    main()
