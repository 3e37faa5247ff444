"""A module imported where it is first used, not where it is named.

``sp = lazy_module("scipy.sparse")`` at the top of a module reads like ``import
scipy.sparse as sp``, but SciPy is imported at the first ``sp.<name>`` read: a process
that never calls that code never pays for it (the attribution service imported
scipy.sparse at every start, ~0.2 CPU-s of its ~0.6 s, for the requests that compute an
attribution). Each name read once is kept on the object: later reads are plain
attribute lookups."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    def __init__(self, name: str) -> None:
        self.__dict__["_lazy_name"] = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self.__dict__["_lazy_name"])

    def __getattr__(self, name: str):
        value = getattr(self._module(), name)
        self.__dict__[name] = value
        return value

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_name']!r}>"


def lazy_module(name: str) -> LazyModule:
    return LazyModule(name)
