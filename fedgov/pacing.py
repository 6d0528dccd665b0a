"""Flower's fixed waits for message content, shortened in the processes where fedgov runs Flower's code.

A Flower message travels as a tree of objects; whoever pulls it (the SuperNode from the
SuperLink, the ClientApp from its SuperNode, the ServerApp's grid from the SuperLink) fetches
the objects with ``flwr.supercore.inflatable.inflatable_utils.pull_objects``. An object that is
not there yet (its sender is still pushing it, which on a fast path is the usual case) is asked
for again after 1 s, doubling to 10 s (``PULL_INITIAL_BACKOFF``, ``PULL_BACKOFF_CAP``): a
second or more per message for nothing. fedgov asks again after :data:`FIRST` s, doubling
to at most :data:`LONGEST` s, with Flower's own function and its own overall limit
(``PULL_MAX_TIME``). The numbers are Flower's parameters; nothing else of the pull changes.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

__all__ = ["FIRST", "LONGEST", "shorten_object_pulls"]

FIRST = 0.005
LONGEST = 0.5


def shorten_object_pulls(module: types.ModuleType, name: str = "pull_objects") -> bool:
    """Make ``module.<name>`` (Flower's ``pull_objects``, as that module imported it) retry
    after :data:`FIRST` s instead of 1 s. False, and nothing changed, if it is not there."""
    fn: Callable[..., Any] | None = getattr(module, name, None)
    if not callable(fn):
        return False
    if getattr(fn, "_fedgov_short", False):
        return True
    short = functools.partial(fn, initial_backoff=FIRST, backoff_cap=LONGEST)
    setattr(short, "_fedgov_short", True)  # noqa: B010 - partial objects take attributes
    setattr(module, name, short)
    return True
