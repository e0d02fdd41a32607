"""Who is using what in a store: flock(2) locks on build directories, staging and names.

Locks, not pids: a process in another pid namespace (a container sharing the store) has a pid
that means nothing here, but its flock on a shared directory is seen by every process. A lock
belongs to the open file description, so a locked directory stays locked when it is renamed
(staging into place), and it is released by the kernel when its holder dies, however it dies.

The protocol (who takes which lock, in which order) is docs/FORMAT.md §8.2.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.files import fsync_path, read_regular
from fcsnap.header import NIL
from fcsnap.header.format import MAPPING, METADATA
from fcsnap.store.format.names import VMS, read_vm_pointer

HEADER = "memfile.header"  # (layout.HEADER: layout imports this module)
NAME_LOCK = ".lock"
POINTER_TMP_PREFIX = ".tmp-"


class DirLock:
    """One flock'd file descriptor (of a directory or a lock file); released once."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @property
    def inode(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def still_at(self, path: Path) -> bool:
        """Is `path` still the file we locked (not renamed away, replaced or removed)?"""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only fd of the description drops the lock
            self.fd = -1

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a lock must not outlive a forgotten object
        self.release()


def _flock(fd: int, exclusive: bool, block: bool) -> bool:
    """Lock `fd`; False when `block` is off and someone else holds a conflicting lock."""
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if block else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        return False
    return True


def lock_dir(path: Path, *, exclusive: bool, block: bool = True) -> DirLock | None:
    """flock a directory (opened read-only); None if `block` is off and it is busy.

    Raises FileNotFoundError (an OSError) when the directory is gone.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if not _flock(fd, exclusive, block):
        os.close(fd)
        return None
    return DirLock(fd, path)


class LineageLock:
    """LOCK_SH on a build and every build its header reads, each checked to be the directory
    the store still holds under its id (gc renames a build away before removing it)."""

    def __init__(self, locks: list[DirLock]) -> None:
        self.locks = locks
        self.pinned = False  # set by pins.open_lineage: the head's build.json pins the rest

    @property
    def build_dirs(self) -> list[Path]:
        return [lock.path for lock in self.locks]

    def release(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks = []

    def __enter__(self) -> LineageLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_build(build_dir: Path) -> DirLock:
    """LOCK_SH on one build, refusing it if it was removed (before or while we waited)."""
    try:
        lock = lock_dir(build_dir, exclusive=False)
    except FileNotFoundError:
        raise FcsnapError(f"build {build_dir.name} is not in store {build_dir.parent}") from None
    except OSError as e:
        raise FcsnapError(f"cannot open build {build_dir}: {e.strerror or e}") from e
    assert lock is not None  # a blocking lock always comes back
    if not lock.still_at(build_dir):
        lock.release()
        raise FcsnapError(f"build {build_dir.name} was removed")
    return lock


_BUILD_ID_COLUMN = struct.Struct("<16x16s8x")  # a mapping record's build id


def builds_read(build_dir: Path) -> list[uuid.UUID]:
    """The other builds the header's mappings name, straight from the records' id column: a
    header of many mappings costs one pass in C (struct), not a parse, and no numpy, which
    restore loads only once it listens. A malformed header is left to its reader, who reads it
    in full."""
    data = read_regular(build_dir / HEADER, "header")
    body = len(data) - METADATA.size
    if body < 0 or body % MAPPING.size:
        return []
    own = METADATA.unpack_from(data)[4]
    ids = {raw for (raw,) in _BUILD_ID_COLUMN.iter_unpack(memoryview(data)[METADATA.size:])}
    return [uuid.UUID(bytes=raw) for raw in sorted(ids - {own, NIL.bytes})]


def lock_lineage(store: Path, build_dir: Path) -> LineageLock:
    """LOCK_SH on `build_dir` (the head) and on every other build its header reads in `store`.

    The head is locked before its header is read, so the list of builds read is the locked
    head's. A build removed while we waited for it is an FcsnapError naming it; one missing
    from the start is skipped (reading it fails later, naming it).
    """
    locks = [_lock_build(build_dir)]
    try:
        for build_id in builds_read(build_dir):
            ancestor = store / str(build_id)
            if ancestor.is_dir():  # a missing build: whoever reads it says so, in its own words
                locks.append(_lock_build(ancestor))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return LineageLock(locks)


def try_remove_staging(path: Path) -> bool:
    """Remove a staging directory (or a stale `.partial` file) if no process holds its lock.

    Taking LOCK_EX|LOCK_NB succeeds only if its writer is gone (or, a rare race, has not yet
    locked it: the writer then sees its directory is not the one at its path, and starts over).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # gone already (published, or removed by another cleanup), or not ours
    with DirLock(fd, path) as lock:
        if not _flock(fd, exclusive=True, block=False) or not lock.still_at(path):
            return False
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return True


def locked_new_dir(path: Path) -> DirLock:
    """mkdir `path` and hold LOCK_EX on it; FileExistsError if it exists. If a cleanup removed
    it in the instant between the mkdir and the lock, it is made again."""
    while True:
        os.mkdir(path)
        with contextlib.suppress(FileNotFoundError):
            lock = lock_dir(path, exclusive=True, block=False)
            if lock is not None and lock.still_at(path):
                return lock
            if lock is not None:
                lock.release()


@contextlib.contextmanager
def name_lock(store: Path) -> Iterator[Path]:
    """Hold STORE/vms/.lock LOCK_EX: the short critical section in which names change.
    Yields the vms directory."""
    vms = store / VMS
    try:
        vms.mkdir(exist_ok=True)
        fd = os.open(vms / NAME_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise FcsnapError(f"cannot lock the names of store {store}: {e.strerror or e}") from e
    with DirLock(fd, vms / NAME_LOCK):
        _flock(fd, exclusive=True, block=True)
        yield vms


class NameMoved(FcsnapError):
    """The name a command was to publish no longer points where it did when the command began."""


def publish_name(
    store: Path, name: str, build_id: uuid.UUID, expected: uuid.UUID | None, verb: str
) -> None:
    """Point vms/<name> at build_id if it still points at `expected` (None: does not exist).

    A compare-and-swap under the name lock; on mismatch NameMoved says where the name went.
    The new pointer is written to a temporary file (named independently of `name`, so any name
    the filesystem allows fits) and renamed over the old one.
    """
    stop_point("publish")
    with name_lock(store) as vms:
        for stale in vms.glob(f"{POINTER_TMP_PREFIX}*"):  # left by a killed publisher
            stale.unlink(missing_ok=True)
        current = read_vm_pointer(store, name)
        if current != expected:
            where = f"moved to {current}" if current is not None else "was removed"
            raise NameMoved(f"{name} {where} while this {verb} ran")
        tmp = vms / f"{POINTER_TMP_PREFIX}{uuid.uuid4().hex}"
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
                raise FcsnapError(
                    f"cannot point {vms / name} at {build_id}: {e.strerror or e}"
                ) from e
            raise


STOP_ENV = "FCSNAP_STOP_AT"


def stop_point(point: str) -> None:
    """Tests force an interleaving of concurrent commands with FCSNAP_STOP_AT=<point>: the
    process stops itself (SIGSTOP) here, and goes on when the test sends SIGCONT."""
    if os.environ.get(STOP_ENV) == point:
        os.kill(os.getpid(), signal.SIGSTOP)
