"""Lazy re-exports for a package's ``__init__`` (PEP 562), written once for all of them.

A package lists each public name under the submodule that defines it; the name is imported on
first use and then kept in the package, so that ``import fedgov.node.ledger`` does not pull in
torch through ``fedgov.node.training``. Packages call this under ``if not TYPE_CHECKING``: type
checkers read their explicit imports instead, and a ``__getattr__`` would hide typos from them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, Iterable[str]], public: Iterable[str], *, submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each submodule (its name
    under ``package``) to the public names it defines; ``submodules`` may be reached as
    attributes before anything imported them."""
    origin = {name: module for module, names in exports.items() for name in names}
    reachable = frozenset(submodules)
    namespace = sys.modules[package].__dict__
    listed = sorted(public)

    def __getattr__(name: str) -> Any:
        module = origin.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f"{package}.{module}"), name)
            namespace[name] = value  # the next lookup finds it directly
            return value
        if name in reachable:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *listed})

    return __getattr__, __dir__
