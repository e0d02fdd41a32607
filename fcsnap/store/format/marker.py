"""The store marker, `fcsnap-store.json` at the top of a store (docs/FORMAT.md §2.3).

A store exists because `fcsnap init` (or `pack --init`) made it: every other command refuses a
directory that is not one, so a mistyped `--store` never starts a second store. A store made
before the marker existed is recognised by its layout (`vms/`, or a build directory) and used
as it is; `fcsnap init` on it writes its marker.
"""

from __future__ import annotations

import enum
import errno
import json
import os
import stat
import uuid
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.store.format.layout import GC_LOCK, HEADER, MANIFEST, STAGING_PREFIX, TRASH_PREFIX
from fcsnap.store.format.names import VMS

MARKER = "fcsnap-store.json"
FORMAT = "fcsnap-store"
VERSION = 1
MARKER_MAX = 4096  # bytes read of a marker: anything longer is not one


class State(enum.Enum):
    """What is at a store's path."""

    MARKED = "a store"
    UNMARKED = "a store without a marker (made by an older fcsnap)"
    EMPTY = "empty"
    MISSING = "missing"
    FOREIGN = "it holds other files"


def marker_bytes() -> bytes:
    return (json.dumps({"format": FORMAT, "version": VERSION}) + "\n").encode()


def check_marker(data: bytes, where: str) -> None:
    """Accept a marker's content, or say in one line why the store cannot be used."""
    try:
        doc = json.loads(data) if len(data) <= MARKER_MAX else None
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep: damaged
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FcsnapError(f"{where} is damaged: not an fcsnap store marker")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FcsnapError(f"{where} is damaged: no format version")
    if version > VERSION:
        raise FcsnapError(f"{where} has store format version {version}; this fcsnap reads "
                          f"version {VERSION} (upgrade fcsnap)")


def _read_marker(path: Path) -> bytes | None:
    """The marker's bytes (None: there is none). Opened without following a symlink and only
    as a regular file, non-blocking: a planted FIFO or link is a damaged marker."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FcsnapError(f"{path} is damaged: a symbolic link") from None
        raise FcsnapError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FcsnapError(f"{path} is damaged: not a regular file")
        return os.read(fd, MARKER_MAX + 1)
    finally:
        os.close(fd)


def looks_like_store(names: set[str], build_ids: list[str]) -> bool:
    """A store's layout without its marker (an older fcsnap's store, or what a first `--init`
    build killed before its marker left): its names directory, a build (local: an id with a
    header or build.json, so E2B/Wrenn directories stay readable; in S3 any object under an
    id), a build being staged, or what gc leaves (its lock, a build it was deleting): gc of
    such a store's last build must not turn it into a directory of other files."""
    return (VMS in names or GC_LOCK in names or bool(build_ids)
            or any(n.startswith((STAGING_PREFIX, TRASH_PREFIX)) for n in names))


def local_state(store: Path) -> State:
    """What the directory `store` is (FcsnapError for a damaged or newer marker)."""
    try:
        entries = list(os.scandir(store))
    except FileNotFoundError:
        return State.MISSING
    except NotADirectoryError:
        raise FcsnapError(f"store {store} is not a directory") from None
    except OSError as e:
        raise FcsnapError(f"cannot read store {store}: {e.strerror or e}") from e
    names = {entry.name for entry in entries}
    if MARKER in names:
        data = _read_marker(store / MARKER)
        if data is not None:
            check_marker(data, str(store / MARKER))
            return State.MARKED
    if not names:
        return State.EMPTY
    # The first build found is enough: an E2B directory may hold tens of thousands.
    build = next((e.name for e in entries if _is_build(store, e.name)), None)
    return State.UNMARKED if looks_like_store(names, [build] if build else []) else State.FOREIGN


def _is_build(store: Path, name: str) -> bool:
    try:
        uuid.UUID(name)
    except ValueError:
        return False
    return (store / name / HEADER).exists() or (store / name / MANIFEST).exists()


def not_a_store(store: object, state: State) -> FcsnapError:
    """The one line for a --store that is not a store: no command but init makes one, so a
    mistyped --store never starts a second store."""
    if state is State.MISSING:
        return FcsnapError(f"store {store} does not exist: create it with 'fcsnap init "
                           f"{store}'")
    return FcsnapError(f"{store} is not an fcsnap store ({state.value}): create one with "
                       f"'fcsnap init {store}'")


def mark_local(store: Path) -> None:
    """Write the marker into the directory `store` unless it has one: by a temporary file
    renamed into place, never through a symlink planted at its name, and a reader sees none
    or all of it."""
    from fcsnap.outputs import write_output

    if not os.path.lexists(store / MARKER):
        write_output(store / MARKER, marker_bytes(), "the store marker")
