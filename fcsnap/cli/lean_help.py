"""`--help` without the parts of rich that typer's help module imports and fcsnap never uses.

typer.rich_utils imports rich.markdown (markdown_it, pygments) and rich.traceback (pygments,
attrs) at its top: about two thirds of what rendering `fcsnap --help` costs, for the markdown
markup mode and the pretty tracebacks, both of which fcsnap turns off. Before the help module
is imported, each of those two modules is registered as a stand-in whose one class loads the
real module the first time it is used, so nothing breaks if some code does use it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

UNUSED = {"rich.markdown": "Markdown", "rich.traceback": "Traceback"}


def defer_unused_rich() -> None:
    """Register the stand-ins (modules already imported are left alone)."""
    for module, name in UNUSED.items():
        if module not in sys.modules:
            stand_in = types.ModuleType(module, "Loaded when its class is first used.")
            setattr(stand_in, name, _deferred_class(module, name))
            sys.modules[module] = stand_in


def _real(module: str, name: str) -> Any:
    """The real class: the stand-in module is replaced by the real one on first use."""
    if isinstance(getattr(sys.modules.get(module), name, None), _Deferred):
        del sys.modules[module]
    return getattr(importlib.import_module(module), name)


class _Deferred(type):
    """The metaclass of a stand-in class: calls and attributes go to the real class."""

    _where: tuple[str, str]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return _real(*cls._where)(*args, **kwargs)

    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(_real(*cls._where), attr)


def _deferred_class(module: str, name: str) -> type:
    return _Deferred(name, (), {"_where": (module, name), "__module__": module})
