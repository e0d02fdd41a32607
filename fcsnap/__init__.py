"""fcsnap: Firecracker memory snapshots in a generational store, restored lazily over uffd.

The public API (see README.md, "Use from Python"): `Store` (pack, diff, squash, unpack, verify,
inspect, restore), the functions `inspect`, `verify`, `unpack`, `restore` for builds outside a
store, the result types `Build`, `Verification`, `Inspection`, `Served`, and the errors
`FcsnapError` and `UsageError`. Names load on first use, so `import fcsnap` costs next to
nothing: the command line starts fast, and an embedder pays only for what it calls.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fcsnap.version import __version__

_EXPORTS = {
    "Build": "fcsnap.api",
    "Inspection": "fcsnap.api",
    "Served": "fcsnap.api",
    "Store": "fcsnap.api",
    "Verification": "fcsnap.api",
    "inspect": "fcsnap.api",
    "restore": "fcsnap.api",
    "unpack": "fcsnap.api",
    "verify": "fcsnap.api",
    "FcsnapError": "fcsnap.errors",
    "UsageError": "fcsnap.errors",
}
__all__ = [
    "Build",
    "FcsnapError",
    "Inspection",
    "Served",
    "Store",
    "UsageError",
    "Verification",
    "__version__",
    "inspect",
    "restore",
    "unpack",
    "verify",
]

if TYPE_CHECKING:
    from fcsnap.api import (
        Build,
        Inspection,
        Served,
        Store,
        Verification,
        inspect,
        restore,
        unpack,
        verify,
    )
    from fcsnap.errors import FcsnapError, UsageError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fcsnap' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
