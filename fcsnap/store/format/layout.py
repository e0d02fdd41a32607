"""Store layout, BUILD arguments, atomic publication (docs/FORMAT.md §2, §8.1).

A build never changes once written: it is assembled in a hidden staging directory inside the
store, fsynced, and renamed into place in one step, so an interrupted command leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Container, Iterator
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.files import fsync_path, fsync_paths, writing
from fcsnap.store.format.locks import DirLock, locked_new_dir, stop_point, try_remove_staging
from fcsnap.store.format.names import VMS as VMS
from fcsnap.store.format.names import check_vm_name, read_vm_pointer
from fcsnap.store.format.prefixes import is_prefix, match_prefix

HEADER = "memfile.header"
DIFF_RAW = "memfile.diff"
DIFF_ZSTD = "memfile.diff.zst"
HASHES = "memfile.hashes"
MANIFEST = "build.json"
SNAPFILE = "snapfile"
STAGING_PREFIX = ".staging-"
GC_LOCK = ".gc.lock"  # gc's lock (docs/FORMAT.md §8.4)
TRASH_PREFIX = ".trash-"  # a build gc is deleting
LEASES = "leases"  # in S3: what stands for locks (docs/FORMAT.md §8.6)
FCSNAP_FILES = (MANIFEST, HASHES, DIFF_RAW, DIFF_ZSTD)
"""What fcsnap writes into a build and E2B/Wrenn never do: one of them marks a build fcsnap's."""


def foreign_build(names: Container[str]) -> bool:
    """Whether a build's files (or objects) are an E2B/Wrenn build's: a header and none of
    fcsnap's own. An fcsnap build that lost its build.json still has its sidecar or diff."""
    return HEADER in names and not any(name in names for name in FCSNAP_FILES)


def parse_build_id(text: str) -> uuid.UUID | None:
    """The UUID in canonical text form, or None when `text` is not one."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def resolve_build(arg: str, store: Path | None) -> Path:
    """A BUILD argument is a build directory, or a build id or VM name inside the store.

    With a store, a bare word (no '/') is looked up in it only, never as a directory of the
    working directory, and a path must lead to a build of that store.
    """
    if store is not None and not store.is_dir():
        raise FcsnapError(f"store {store} is not a directory")
    if store is not None and "/" not in arg:
        return _in_store(arg, store)
    path = Path(arg)
    if not (path.is_dir() and (path / HEADER).exists()):
        if path.is_dir():
            raise FcsnapError(f"{arg} is a directory without {HEADER}: not a build")
        if store is None:
            raise FcsnapError(f"build {arg} not found (give a build directory, or --store DIR)")
        raise FcsnapError(f"no build or VM named {arg!r} in store {store}")
    if store is not None and path.resolve().parent != store.resolve():
        raise FcsnapError(f"build {arg} is not in store {store}")
    return path


def _in_store(arg: str, store: Path) -> Path:
    """A build id, VM name or build id prefix of `store`, as its build directory. A name
    that also reads as a prefix is the name, as docker takes a container name first."""
    if parse_build_id(arg) is not None:
        candidate = store / str(uuid.UUID(arg))
        if (candidate / HEADER).exists():
            return candidate
        raise FcsnapError(f"build {arg} not found in store {store}")
    try:
        check_vm_name(arg)
    except FcsnapError:
        raise FcsnapError(f"no build or VM named {arg!r} in store {store}") from None
    build_id = read_vm_pointer(store, arg)
    if build_id is None:
        build_id = match_prefix(arg, _store_ids(store), str(store)) if is_prefix(arg) else None
        if build_id is None:
            raise FcsnapError(f"no build or VM named {arg!r} in store {store}")
        return store / str(build_id)
    candidate = store / str(build_id)
    if not (candidate / HEADER).exists():
        raise FcsnapError(f"VM {arg!r} points at build {build_id}, which is not in {store}")
    return candidate


def _store_ids(store: Path) -> list[uuid.UUID]:
    """The ids of the published builds of `store` (directories named by an id, with a header)."""
    out = []
    with os.scandir(store) as entries:
        for entry in entries:
            build_id = parse_build_id(entry.name)
            if (build_id is not None and str(build_id) == entry.name
                    and os.path.exists(os.path.join(entry.path, HEADER))):
                out.append(build_id)
    return out


def build_path(store: Path, build_id: uuid.UUID) -> Path:
    return store / str(build_id)


def store_of(build_dir: Path) -> Path:
    """The store a build directory is in (builds live at the top of their store)."""
    return build_dir.parent


def diff_path(build_dir: Path) -> Path:
    """The build's diff file, raw or compressed; the raw name when neither exists."""
    zst = build_dir / DIFF_ZSTD
    return zst if zst.exists() else build_dir / DIFF_RAW


@contextlib.contextmanager
def staged_build(store: Path, build_id: uuid.UUID) -> Iterator[DirLock]:
    """Yield the LOCK_EX'd staging directory (lock.path); on normal exit fsync it and rename it
    to STORE/<build_id>. The lock stays held by the caller (it follows the directory through
    the rename) until the caller releases it: until then no cleanup or gc removes the build.

    On any exception (including KeyboardInterrupt) the staging directory is removed and the lock
    released. A process killed outright leaves only a hidden `.staging-*` directory, never a
    visible build, and its lock dies with it, so the next command removes the directory.
    """
    try:
        store.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FcsnapError(f"store {store} is not a directory") from None
    remove_stale_staging(store)
    final = build_path(store, build_id)
    if final.exists():
        raise FcsnapError(f"build {build_id} already exists in {store}")
    staging = store / f"{STAGING_PREFIX}{os.getpid()}-{build_id}"
    try:
        lock = locked_new_dir(staging)
    except OSError as e:  # named after the store: the staging name means nothing to the user
        raise FcsnapError(f"cannot write to store {store}: {e.strerror or e}") from e
    stop_point("staged")
    try:
        yield lock
        with writing(f"the new build to store {store}"):  # a full disk may show only now
            fsync_paths([*staging.iterdir(), staging])
            os.rename(staging, final)
            lock.path = final
            fsync_path(store)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()
        raise


def remove_stale_staging(store: Path) -> None:
    """Remove staging directories whose writer is gone: those no process holds locked. (Not by
    pid: a writer in another pid namespace has a pid that means nothing here.)"""
    for entry in store.glob(f"{STAGING_PREFIX}*"):
        try_remove_staging(entry)
