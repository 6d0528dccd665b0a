"""The :mod:`fedgov.node` package: its public names, loaded lazily, and no module importing the package itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedgov.node as node

PACKAGE = Path(node.__file__).parent
ROOT = PACKAGE.parents[1]


def test_every_public_name_resolves_to_its_module() -> None:
    assert len(set(node.__all__)) == len(node.__all__)
    origin = {public: module for module, names in node._MODULES.items() for public in names}
    assert set(origin) == set(node.__all__)
    for name in node.__all__:
        value = getattr(node, name)
        module = origin[name]
        assert value is getattr(__import__(f"fedgov.node.{module}", fromlist=[name]), name), name


def test_every_module_names_its_public_api_and_the_package_re_exports_it() -> None:
    """Each module's ``__all__`` is re-exported, but for the errors (in :mod:`fedgov.errors`) and
    the file-format constants that would clash."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = __import__(f"fedgov.node.{path.stem}", fromlist=["__all__"])
        names = set(getattr(module, "__all__", ()))
        assert names, f"{path.name} has no __all__"
        for name in names - {"APPLICATION", "SCHEMA_VERSION", "FILENAME"}:
            if getattr(getattr(module, name), "__module__", None) == "fedgov.errors":
                continue
            assert name in node.__all__, (path.name, name)


def test_no_module_of_the_package_imports_the_package_itself() -> None:
    """Siblings import siblings (``from fedgov.node.ledger import X``), never ``fedgov.node``: no cycles."""
    submodules = {p.stem for p in PACKAGE.glob("*.py")}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and n.module == "fedgov.node":
                assert {a.name for a in n.names} <= submodules, (path.name, [a.name for a in n.names])
            if isinstance(n, ast.Import):
                assert all(a.name != "fedgov.node" for a in n.names), path.name


def test_importing_the_package_or_its_light_modules_does_not_load_torch() -> None:
    code = (
        "import sys, fedgov.node, fedgov.node.policy, fedgov.node.ledger, fedgov.node.budget; "
        "fedgov.node.NodeHome; fedgov.node.check_spend; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
