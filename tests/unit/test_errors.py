"""The error tree: every error fedgov raises on purpose lives in fedgov/errors.py, the tree
drawn in its docstring is the real one, and every exit code is documented."""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
from typer.testing import CliRunner

import fedgov
from fedgov import errors
from fedgov.cli import app
from fedgov.errors import EXIT_HELP, ExitCode, FedgovError

# "    ├── ConfigError                  10  a task, federation ..." -> (indent, name, code)
_TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*?)[├└]── (?P<name>\w+)\s+(?P<code>\d+)\s")


def _subclasses(cls: type[FedgovError]) -> set[type[FedgovError]]:
    found: set[type[FedgovError]] = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def _tree() -> dict[str, tuple[str, int]]:
    """The docstring's tree: each error's name -> (its parent's name, its exit code)."""
    doc = errors.__doc__ or ""
    parents: list[tuple[int, str]] = [(-1, "FedgovError")]
    tree: dict[str, tuple[str, int]] = {}
    for line in doc.splitlines():
        m = _TREE_LINE.match(line)
        if m is None:
            continue
        depth = len(m["indent"])
        while parents[-1][0] >= depth:
            parents.pop()
        tree[m["name"]] = (parents[-1][1], int(m["code"]))
        parents.append((depth, m["name"]))
    return tree


def _public_parent(cls: type) -> str:
    """The nearest base class that the tree shows (private helpers such as _ProblemsError are not)."""
    for base in cls.__mro__[1:]:
        if issubclass(base, FedgovError) and not base.__name__.startswith("_"):
            return base.__name__
    raise AssertionError(f"{cls} is not a FedgovError")


def test_every_fedgov_error_is_defined_in_errors_py() -> None:
    for info in pkgutil.walk_packages(fedgov.__path__, "fedgov."):
        if not info.name.endswith(".__main__"):  # a script: importing it runs it
            importlib.import_module(info.name)
    outside = sorted(
        f"{cls.__module__}.{cls.__qualname__}" for cls in _subclasses(FedgovError) if cls.__module__ != "fedgov.errors"
    )
    assert outside == [], "define these in fedgov/errors.py (and draw them in its tree)"


def test_coordinator_crash_is_no_error_on_purpose() -> None:
    from fedgov.testing import CoordinatorCrash

    assert issubclass(CoordinatorCrash, BaseException) and not issubclass(CoordinatorCrash, Exception)


def test_the_docstring_tree_is_the_class_tree() -> None:
    tree = _tree()
    public = {cls for cls in _subclasses(FedgovError) if cls.__module__ == "fedgov.errors" and not cls.__name__.startswith("_")}
    assert set(tree) == {cls.__name__ for cls in public}
    for cls in public:
        parent, code = tree[cls.__name__]
        assert parent == _public_parent(cls), cls.__name__
        assert code == int(cls.exit_code), f"{cls.__name__}: the tree says {code}, the class exits {int(cls.exit_code)}"


def test_every_exit_code_of_an_error_is_documented() -> None:
    for cls in _subclasses(FedgovError) | {FedgovError}:
        assert isinstance(cls.exit_code, ExitCode) and cls.exit_code in EXIT_HELP, cls


def test_exit_codes_command_lists_every_code_with_its_help() -> None:
    assert set(EXIT_HELP) == set(ExitCode)
    out = CliRunner().invoke(app, ["exit-codes"], terminal_width=200)
    assert out.exit_code == 0, out.output
    rows = {line.split("│")[2].strip(): line for line in out.output.splitlines() if line.count("│") >= 3}
    for code in ExitCode:
        assert code.name in rows, code
        assert rows[code.name].split("│")[1].strip() == str(int(code))
        assert EXIT_HELP[code].split()[0] in rows[code.name]


@pytest.mark.parametrize("name", fedgov.__all__)
def test_the_public_api_is_importable(name: str) -> None:
    assert getattr(fedgov, name) is not None


def test_the_public_api_exports_every_error_and_loader() -> None:
    import fedgov.config as config

    exported = set(fedgov.__all__)
    assert {"FedgovError", "ExitCode", "EXIT_HELP", "ConfigError", "load_task", "load_federation", "load_contract"} <= exported
    assert {"Task", "Federation", "Contract"} <= exported and all(hasattr(config, n) for n in ("load_task", "Task"))
    public_errors = {cls.__name__ for cls in _subclasses(FedgovError) if not cls.__name__.startswith("_")}
    assert public_errors <= exported, sorted(public_errors - exported)
