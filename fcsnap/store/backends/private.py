"""Directories and files only the server's user may touch: the host chunk cache and the S3
mirror (guest memory, and what decides which memory a VM gets).

They are created private (directories 0700, files 0600) by the call that creates them, never
widened by the umask or tightened afterwards. A directory someone else controls is refused,
as ssh refuses its files: whoever owns a directory on the way to the cache, or can write one
that has no sticky bit, can rename the cache away and put their own in its place. Files are
durable before they are visible: written under an unpredictable name created exclusively in
their directory, fsynced, renamed into place, and the directory fsynced.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from fcsnap.errors import FcsnapError

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dirs(path: Path, what: str) -> None:
    """Create `path` and every missing directory above it with mode 0700, then refuse
    (FcsnapError) a path someone else controls (check_dir_chain). A `path` of this user's
    that existed readable by others (made by hand, or by an older fcsnap) is made 0700."""
    missing = []
    at = Path(os.path.abspath(path))
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile (another restore): checked below like any other
        except OSError as e:
            raise FcsnapError(f"cannot create {what} {path}: {e.strerror}") from e
    check_dir_chain(path, what)
    if not missing and os.stat(path).st_mode & 0o077:
        os.chmod(path, DIR_MODE)


def private_dir(path: Path) -> None:
    """`path` made a directory (0700) unless it is one (in a directory already checked)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)


def check_dir_chain(path: Path, what: str) -> None:
    """Refuse `path` unless it is a directory of this user, not writable by group or others,
    every directory above it (as named and as resolved, up to /) is this user's or root's
    and writable by group or others only with the sticky bit, and no symlink on the named
    path is another user's."""
    uid = os.geteuid()
    named = Path(os.path.abspath(path))
    try:
        own = os.stat(named)
    except OSError as e:
        raise FcsnapError(f"cannot use {what} {path}: {e.strerror}") from e
    if not stat.S_ISDIR(own.st_mode):
        raise FcsnapError(f"cannot use {what} {path}: not a directory")
    if own.st_uid != uid:
        raise FcsnapError(
            f"refusing {what} {path}: it is owned by uid {own.st_uid}, not by this user ({uid})"
        )
    if own.st_mode & 0o022:
        raise FcsnapError(f"refusing {what} {path}: it is writable by group or others "
                          f"(mode {stat.S_IMODE(own.st_mode):04o}; chmod 700 it)")
    for chain in (named.parents, Path(os.path.realpath(named)).parents):
        for directory in chain:
            _check_above(directory, path, what, uid)
    for link in (named, *named.parents):
        _check_link(link, path, what, uid)


def _check_link(link: Path, path: Path, what: str, uid: int) -> None:
    """Refuse a symlink on the named path that another user owns: its owner can point it
    elsewhere at any time after the check (what fs.protected_symlinks, often off in
    containers, would otherwise refuse to follow in a sticky directory)."""
    try:
        st = os.lstat(link)
    except OSError as e:
        raise FcsnapError(f"cannot use {what} {path}: {link}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode) and st.st_uid not in (uid, 0):
        raise FcsnapError(
            f"refusing {what} {path}: {link} is a symbolic link owned by uid {st.st_uid}, "
            "not by this user or root"
        )


def _check_above(directory: Path, path: Path, what: str, uid: int) -> None:
    try:
        st = os.stat(directory)
    except OSError as e:
        raise FcsnapError(f"cannot use {what} {path}: {directory}: {e.strerror}") from e
    if st.st_uid not in (uid, 0):
        raise FcsnapError(
            f"refusing {what} {path}: {directory} above it is owned by uid {st.st_uid}, "
            "not by this user or root"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise FcsnapError(
            f"refusing {what} {path}: {directory} above it is writable by group or others "
            "without the sticky bit"
        )


def new_private_file(directory: Path, mode: int = FILE_MODE) -> tuple[int, Path]:
    """A new empty file in `directory`, created exclusively (with `mode`: 0600 unless a
    store's file, whose mode the umask decides) under an unpredictable hidden name: its fd
    (read-write) and path."""
    while True:
        tmp = directory / f".tmp-{secrets.token_hex(12)}"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode)
        except FileExistsError:
            continue
        return fd, tmp


def publish(fd: int, tmp: Path, path: Path) -> None:
    """Make the file written at `tmp` (open as `fd`) durable, then visible as `path`."""
    os.fsync(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private(path: Path, data: bytes | memoryview) -> None:
    """`path` replaced whole by `data`, privately and durably (see the module doc)."""
    fd, tmp = new_private_file(path.parent)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        publish(fd, tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
