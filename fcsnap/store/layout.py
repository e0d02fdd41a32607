"""Where things live in a store, how a BUILD argument is found, and atomic publication.

A build never changes once written: it is assembled in a hidden staging directory inside the
store, fsynced, and renamed into place in one step, so an interrupted command leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from fcsnap.errors import FcsnapError

HEADER = "memfile.header"
DIFF_RAW = "memfile.diff"
DIFF_ZSTD = "memfile.diff.zst"
HASHES = "memfile.hashes"
MANIFEST = "build.json"
SNAPFILE = "snapfile"
VMS = "vms"
STAGING_PREFIX = ".staging-"


def parse_build_id(text: str) -> uuid.UUID | None:
    """The UUID in canonical text form, or None when `text` is not one."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def resolve_build(arg: str, store: Path | None) -> Path:
    """A BUILD argument is a build directory, or a build id or VM name inside the store."""
    path = Path(arg)
    if path.is_dir() and (path / HEADER).exists():
        return path
    if store is None:
        if path.is_dir():
            raise FcsnapError(f"{arg} is a directory without {HEADER}: not a build")
        raise FcsnapError(f"build {arg} not found (give a build directory, or --store DIR)")
    if not store.is_dir():
        raise FcsnapError(f"store {store} is not a directory")
    if parse_build_id(arg) is not None:
        candidate = store / str(uuid.UUID(arg))
        if (candidate / HEADER).exists():
            return candidate
        raise FcsnapError(f"build {arg} not found in store {store}")
    pointer = store / VMS / arg
    if "/" in arg or not pointer.is_file():
        raise FcsnapError(f"no build or VM named {arg!r} in store {store}")
    build_id = parse_build_id(pointer.read_text().strip())
    if build_id is None:
        raise FcsnapError(f"{pointer} does not hold a build id")
    candidate = store / str(build_id)
    if not (candidate / HEADER).exists():
        raise FcsnapError(f"VM {arg!r} points at build {build_id}, which is not in {store}")
    return candidate


def build_path(store: Path, build_id: uuid.UUID) -> Path:
    return store / str(build_id)


def store_of(build_dir: Path) -> Path:
    """The store a build directory is in (builds live at the top of their store)."""
    return build_dir.parent


def diff_path(build_dir: Path) -> Path:
    """The build's diff file, raw or compressed; the raw name when neither exists."""
    zst = build_dir / DIFF_ZSTD
    return zst if zst.exists() else build_dir / DIFF_RAW


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_build(store: Path, build_id: uuid.UUID) -> Iterator[Path]:
    """Yield a staging directory; on normal exit fsync it and rename it to STORE/<build_id>.

    On any exception (including KeyboardInterrupt) the staging directory is removed. A process
    killed outright leaves only a hidden `.staging-*` directory, never a visible build.
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
        staging.mkdir()
    except OSError as e:  # named after the store: the staging name means nothing to the user
        raise FcsnapError(f"cannot write to store {store}: {e.strerror or e}") from e
    try:
        yield staging
        for child in staging.iterdir():
            fsync_path(child)
        fsync_path(staging)
        os.rename(staging, final)
        fsync_path(store)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_vm_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or "\0" in name:
        raise FcsnapError(f"invalid VM name {name!r}: use a plain file name")


def remove_stale_staging(store: Path) -> None:
    """Remove staging directories left by killed commands (their process is gone)."""
    for entry in store.glob(f"{STAGING_PREFIX}*"):
        pid_text = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def set_vm_pointer(store: Path, name: str, build_id: uuid.UUID) -> None:
    """Point vms/<name> at build_id atomically (write a temporary file, then rename)."""
    check_vm_name(name)
    vms = store / VMS
    vms.mkdir(exist_ok=True)
    tmp = vms / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{build_id}\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, vms / name)
        fsync_path(vms)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FcsnapError(f"cannot point {vms / name} at {build_id}: {e.strerror or e}") from e
        raise
