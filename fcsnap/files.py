"""Opening the files fcsnap reads: memory files, headers, hash sidecars, manifests, working sets.

Each must be a regular file. A FIFO where one belongs would block open() until some writer came
along, and a character device could read without end, so files are opened non-blocking and
refused before the first read unless they are regular.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.threads import start_signal_free


def open_regular(path: Path, what: str) -> int:
    """A read-only fd of `path`, which must be a regular file (FcsnapError naming `what`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FcsnapError(f"cannot read {what} {path}: {e.strerror or e}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "is a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise FcsnapError(f"cannot read {what} {path}: {kind}")
    os.set_blocking(fd, True)  # a regular file: plain reads from here on
    return fd


def read_regular(path: Path, what: str) -> bytes:
    """The whole content of the regular file `path`."""
    fd = open_regular(path, what)
    try:
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise FcsnapError(f"cannot read {what} {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file or directory by name (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(paths: list[Path]) -> None:
    """fsync several files and directories at once, each but the first on a thread of its
    own: a journaling filesystem makes them durable in one commit, where one after another
    each waits for a commit of its own. Returns once every one is durable; raises the first
    error once all are done."""
    errors: list[OSError] = []

    def one(path: Path) -> None:
        try:
            fsync_path(path)
        except OSError as e:
            errors.append(e)

    helpers = [start_signal_free(threading.Thread(target=one, args=(p,), name="fcsnap-fsync"))
               for p in paths[1:]]
    if paths:
        one(paths[0])
    for thread in helpers:
        thread.join()
    if errors:
        raise errors[0]


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Name `what` was being written in an OSError: the error of a failed write (a full disk)
    carries no file name of its own."""
    try:
        yield
    except OSError as e:
        raise FcsnapError(f"cannot write {what}: {e.strerror or e}") from e
