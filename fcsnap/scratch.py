"""Private temporary directories that do not outlive their process, even one killed outright.

A store in S3 is read through a local mirror, and builds are staged on their way up; both live
in temporary directories. Removing them at exit is not enough: a process SIGKILLed (by an
orchestrator, the OOM killer) leaves them, and a host that restores thousands of VMs would fill
its /tmp. So a process keeps its scratch directories in one directory of its own, locked
(flock) for as long as the process lives (one descriptor however many it makes), and every
fcsnap process first removes those of its user that no one holds. A lock, not a pid: a
process in another pid namespace sharing /tmp is seen as alive.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

PREFIX = "fcsnap-scratch-"  # a process's directory, locked from the moment it has this name
_MAKING = "fcsnap-making-"  # before its lock is taken
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# this process's directory in each temporary directory it used, and its locked descriptor
_held: dict[Path, tuple[Path, int]] = {}
_lock = threading.RLock()  # threads making their first at once make one directory


def scratch_dir(what: str) -> Path:
    """A new private directory (mode 0700), removed when the process exits, or by the next
    fcsnap process to make one if this one is killed."""
    return Path(tempfile.mkdtemp(prefix=f"{what}-", dir=_own_directory()))


@contextlib.contextmanager
def scratch(what: str) -> Iterator[Path]:
    """A scratch directory for the length of a `with`."""
    path = scratch_dir(what)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def release_all(root: Path | None = None) -> None:
    """Remove this process's scratch directories (those in `root` only, if given) and drop
    their locks: what its exit does."""
    with _lock:
        for tmp, (path, fd) in list(_held.items()):
            if root is None or tmp == root:
                del _held[tmp]
                shutil.rmtree(path, ignore_errors=True)
                os.close(fd)


atexit.register(release_all)


def _forget_in_child() -> None:
    """After a fork, in the child: its parent's directories stay the parent's (removed by the
    parent's exit, not the child's, and still locked by the parent); the child makes its own.
    (The lock anew: another thread of the parent may have held it at the fork.)"""
    global _lock
    _lock = threading.RLock()
    for _path, fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _own_directory() -> Path:
    """This process's locked directory in the temporary directory, made (after a sweep) the
    first time; made again if something removed it."""
    root = Path(tempfile.gettempdir())
    with _lock:
        held = _held.get(root)
        if held is not None:
            path, fd = held
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                    return path
            release_all(root)
        sweep(root)
        making = Path(tempfile.mkdtemp(prefix=_MAKING, dir=root))
        fd = os.open(making, _DIR_FLAGS)
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = making.with_name(PREFIX + making.name[len(_MAKING):])
        os.rename(making, path)  # the name a sweep looks for, once the lock is held
        _held[root] = (path, fd)
        return path


def sweep(root: Path) -> None:
    """Remove the scratch directories in `root` that belong to this user and that no process
    holds: their process is gone. Another user's, a symlink, or one still held is left."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            fd = os.open(entry.path, _DIR_FLAGS)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its process lives
            os.close(fd)
            continue
        try:
            if os.fstat(fd).st_ino == st.st_ino:  # still the directory looked at
                shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)
