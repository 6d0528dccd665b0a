"""Lines per package and the largest functions of fedgov, server and clients (issue 16's figures).

    python3 scripts/layout_stats.py [TREE]     # TREE: a checkout (default: this one)
    git archive <rev> | tar -x -C /tmp/old && python3 scripts/layout_stats.py /tmp/old
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

ROLES = ("fedgov", "server", "clients")


def _sources(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py")) if p.relative_to(root).parts[0] in ROLES]


def lines_per_package(root: Path) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for path in _sources(root):
        parts = path.relative_to(root).parts
        if parts[0] == "fedgov":
            key = "/".join(parts[:2]) if len(parts) > 2 else "fedgov/ (top-level modules)"
        else:
            key = parts[0]
        counts[key] += len(path.read_text("utf-8").splitlines())
    return dict(sorted(counts.items()))


def largest_functions(root: Path, n: int = 8) -> list[tuple[int, str]]:
    found = []
    for path in _sources(root):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                found.append((length, f"{path.relative_to(root)}:{node.name}"))
    return sorted(found, reverse=True)[:n]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
    counts = lines_per_package(root)
    for key, lines in counts.items():
        print(f"{key:35s} {lines:6d}")
    print(f"{'total':35s} {sum(counts.values()):6d}")
    print("largest functions (lines, docstrings included):")
    for length, name in largest_functions(root):
        print(f"  {length:4d} {name}")


if __name__ == "__main__":
    main()
