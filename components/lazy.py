"""Names of a package imported on first use (PEP 562): a package's `__init__` maps each public
name to the submodule that defines it, and importing the package costs nothing more."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_names(package: str, where: dict[str, str]):
    """(`__getattr__`, `__dir__`, `__all__`) for `package`, whose names live in the submodules
    `where` maps them to. A name is imported once, then kept in the package's namespace."""
    names = sorted(where)

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return names

    return __getattr__, __dir__, names
