"""Private temporary directories that do not outlive their process, even one killed outright.

A store in S3 is read through a local mirror, and builds are staged on their way up; both live
in temporary directories. Removing them at exit is not enough: a process SIGKILLed (by an
orchestrator, the OOM killer) leaves its directory, and a host that restores thousands of VMs
would fill its /tmp. So each directory is locked (flock) for as long as its process lives, and
every fcsnap process that makes one first removes those of its user that no one holds.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

PREFIX = "fcsnap-scratch-"  # a directory named so is locked from the moment it has the name
_MAKING = "fcsnap-making-"  # before its lock is taken
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_held: dict[Path, int] = {}  # this process's directories and their locked descriptors


def scratch_dir(what: str) -> Path:
    """A private temporary directory (mode 0700) removed when the process exits, or by the next
    fcsnap process to make one if this one is killed."""
    sweep(Path(tempfile.gettempdir()))
    making = Path(tempfile.mkdtemp(prefix=f"{_MAKING}{what}-"))
    fd = os.open(making, _DIR_FLAGS)
    fcntl.flock(fd, fcntl.LOCK_EX)
    path = making.with_name(PREFIX + making.name[len(_MAKING):])
    os.rename(making, path)  # the name a sweep looks for, once the lock is held
    _held[path] = fd
    atexit.register(release, path)
    return path


@contextlib.contextmanager
def scratch(what: str) -> Iterator[Path]:
    """A scratch directory for the length of a `with`."""
    path = scratch_dir(what)
    try:
        yield path
    finally:
        release(path)


def release(path: Path) -> None:
    """Remove one of this process's scratch directories (again: nothing)."""
    fd = _held.pop(path, None)
    if fd is not None:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


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
