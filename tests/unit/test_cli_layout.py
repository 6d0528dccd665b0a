"""fedgov/cli/ is one package without cycles: its modules import each other at the top only,
in one direction; a library import inside a command says why it is lazy; ``fedgov --help``
loads none of the heavy libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedgov.cli

CLI = Path(fedgov.cli.__file__).parent
HEAVY = ("torch", "flwr", "opacus", "numpy", "pandas", "pyarrow", "matplotlib", "cryptography")


def _modules() -> dict[str, ast.Module]:
    return {f"fedgov.cli.{p.stem}" if p.stem != "__init__" else "fedgov.cli": ast.parse(p.read_text("utf-8")) for p in CLI.glob("*.py")}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        return [base] + [f"{base}.{a.name}" for a in node.names]
    return [a.name for a in node.names]


def _function_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def test_no_cli_module_is_imported_inside_a_function() -> None:
    for name, tree in _modules().items():
        for node in _function_imports(tree):
            assert not any(m.startswith("fedgov.cli") for m in _imported(node)), f"{name}:{node.lineno}"


def test_every_lazy_import_says_why() -> None:
    for name, tree in _modules().items():
        lines = (CLI / f"{name.rsplit('.', 1)[-1] if name != 'fedgov.cli' else '__init__'}.py").read_text("utf-8").splitlines()
        for node in _function_imports(tree):
            assert "# lazy:" in lines[node.lineno - 1], f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}"


def test_the_cli_modules_import_each_other_without_a_cycle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        deps = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= {m for m in _imported(node) if m in modules and m != name}
        graph[name] = deps
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name not in done:
            for dep in graph[name]:
                visit(dep, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_help_loads_no_heavy_library_and_python_m_works() -> None:
    code = (
        "import sys, runpy; sys.argv = ['fedgov', '--help']\n"
        "try:\n    runpy.run_module('fedgov.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "Usage: fedgov" in out.stdout and "local-federation" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"
