"""VM names: which names a store accepts, and reading the pointer `vms/<name>`.

A name is checked before any build work starts, so a bad one costs nothing and never leaves a
build behind. A name must be one file name that can be typed back and looked up: the
filesystem's limit of 255 bytes, valid UTF-8, no control characters, and not a build id (which
a lookup would take for an id).
"""

from __future__ import annotations

import os
import unicodedata
import uuid
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.files import open_regular

VMS = "vms"
NAME_MAX = 255  # bytes: the limit of a file name on Linux filesystems
POINTER_MAX = 4096  # bytes: a pointer is one build id and a newline


def check_vm_name(name: str) -> None:
    """Raise FcsnapError saying why `name` cannot be a VM name."""
    problem = _name_problem(name)
    if problem is not None:
        raise FcsnapError(f"invalid VM name {name!r}: it {problem}")


def _name_problem(name: str) -> str | None:
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogate escapes
        return "is not valid UTF-8"
    if not name:
        return "is empty"
    if name.startswith("."):
        return "starts with '.' (reserved for the store's own files)"
    if "/" in name:
        return "contains '/'"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return "contains a control character or line break"
    if len(encoded) > NAME_MAX:
        return f"is {len(encoded)} bytes long (at most {NAME_MAX})"
    if _is_build_id(name):
        return "looks like a build id (it would be looked up as one)"
    return None


def _is_build_id(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def read_vm_pointer(store: Path, name: str) -> uuid.UUID | None:
    """The build id `vms/<name>` holds; None when there is no such name. A pointer file that
    is not a regular file, is too big or does not hold a build id is an FcsnapError."""
    path = store / VMS / name
    if not os.path.lexists(path):
        return None
    fd = open_regular(path, "VM pointer")
    try:
        data = os.read(fd, POINTER_MAX + 1)
    except OSError as e:
        raise FcsnapError(f"cannot read VM pointer {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(data) > POINTER_MAX:
        raise FcsnapError(f"{path} is not a VM pointer (more than {POINTER_MAX} bytes)")
    try:
        return uuid.UUID(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise FcsnapError(f"{path} does not hold a build id") from None
