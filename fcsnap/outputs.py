"""Writing the files fcsnap outputs outside its store: --stats, --record-ws, `ws merge -o`,
`unpack -o`.

Those paths are often in directories other users can write (/tmp), and fcsnap often runs as
root, so a name someone planted must never redirect a write. A new file is written under a
temporary name created exclusively (O_CREAT|O_EXCL: a symlink or file already there is never
opened) with an unpredictable name in the target's own directory, fsynced, renamed over the
target and the directory fsynced: a reader sees the old file or the whole new one. The target
itself is never opened through a symlink: a symlink there is replaced as a link. A character
device or FIFO at the target (`--stats /dev/null`) is written in place, opened with
O_NOFOLLOW, never replaced; a directory, block device or socket is refused. One exception,
outside the daemon's --output-dir: a symlink of this user's or root's that leads to a
character device or FIFO (`--stats /dev/stdout`) is a device's other name, written in place
through the link, which stays.

All of it happens relative to a file descriptor of the target's directory. Under a `root` (the
daemon's --output-dir) that directory is reached from the root one component at a time with
O_NOFOLLOW, so a symlink planted in the path, before or after the request was checked, is
refused rather than followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fcsnap.errors import FcsnapError

TEMP_SUFFIX = ".tmp"
STALL_TIMEOUT = 10.0  # seconds a FIFO's reader may leave it full
_TRIES = 16  # names taken meanwhile (planted): another random name each time
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_KINDS = {
    stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory",
}


class OutputError(FcsnapError):
    """An output path that cannot or must not be written (one line naming it)."""


def _say(what: str, path: Path, problem: str) -> str:
    """'cannot write --stats /x/s.json: <problem>' (the path alone when `what` is empty)."""
    return f"cannot write {what + ' ' if what else ''}{path}: {problem}"


def kind_of(mode: int) -> str:
    """'a character device', 'a directory', ... for a file's st_mode."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def inside(path: Path, root: Path) -> bool:
    """Whether the absolute `path` names a file under the directory `root` without `..`
    (checked on the text, which pathlib has rid of `.` and `//`: the walk in open_parent
    checks symlinks)."""
    return (path.is_absolute() and ".." not in path.parts and path.name != ""
            and path.parent.parts[: len(root.parts)] == root.parts)


def open_parent(path: Path, what: str, root: Path | None = None) -> int:
    """An fd of the directory `path` is in. Under `root`, every component below it is opened
    with O_NOFOLLOW: a symlink anywhere in the path is refused."""
    try:
        if root is None:
            return os.open(path.parent, _DIR_FLAGS)
        if not inside(path, root):
            raise OutputError(_say(what, path, f"outside {root}, the directory the daemon "
                                               "writes output files in (--output-dir)"))
        fd = os.open(root, _DIR_FLAGS)
        for part in path.parent.parts[len(root.parts):]:
            try:
                nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = nxt
        return fd
    except OutputError:
        raise
    except OSError as e:
        problem = "no such directory" if e.errno == errno.ENOENT else e.strerror or str(e)
        if root is not None and e.errno in (errno.ELOOP, errno.ENOTDIR):
            problem = "a component of the path is a symbolic link or not a directory"
        raise OutputError(_say(what, path, problem)) from e


def check_output(path: Path, what: str, root: Path | None = None) -> None:
    """Refuse now (OutputError) what `write_output` would refuse later: a missing directory,
    a path escaping `root`, a directory, block device or socket at `path`."""
    dir_fd = open_parent(path, what, root)
    try:
        _existing(dir_fd, path, what)
    finally:
        os.close(dir_fd)


def _existing(dir_fd: int, path: Path, what: str) -> int | None:
    """The st_mode of what is at `path` (not followed), None if nothing; OutputError for a
    directory, block device or socket."""
    try:
        mode = os.lstat(path.name, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(_say(what, path, e.strerror or str(e))) from e
    if stat.S_ISDIR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
        raise OutputError(_say(what, path, f"it is {kind_of(mode)}"))
    return mode


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write everything (a short write is retried: the retry says why it cannot go on). A
    device or FIFO written in place is non-blocking: a reader that stops reading for
    STALL_TIMEOUT seconds fails the write rather than hold the writer (a daemon's reactor)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if not poller.poll(STALL_TIMEOUT * 1000):
                raise TimeoutError(errno.ETIMEDOUT, f"its reader read nothing for "
                                   f"{STALL_TIMEOUT:g}s") from None


def write_output(path: Path, data: bytes, what: str, root: Path | None = None) -> None:
    """Make `path` hold `data` (see the module's docstring); OutputError naming `what`."""
    with output(path, what, root=root) as fd:
        write_all(fd, data)


@contextlib.contextmanager
def output(
    path: Path, what: str, *, root: Path | None = None, in_place: bool = True,
    temp_name: Callable[[], str] | None = None, create: Callable[[int, str], int] | None = None,
    recheck: Callable[[], None] | None = None,
) -> Iterator[int]:
    """Yield a writable fd whose content becomes `path` when the block ends without an
    exception; on one, nothing is left behind. With in_place False, a device or FIFO at
    `path` is refused rather than written. `temp_name` and `create(dir_fd, name)` (which must
    create exclusively) let unpack name and lock its temporaries; `recheck` runs just before
    the rename."""
    dir_fd = open_parent(path, what, root)
    try:
        mode = _existing(dir_fd, path, what)
        link = mode is not None and stat.S_ISLNK(mode) and root is None
        alias = _device_alias(dir_fd, path) if link else 0
        mode = alias or mode
        if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
            if not in_place:
                raise OutputError(_say(what, path, f"it is {kind_of(mode)}, and only a "
                                                   "regular file is replaced"))
            fd = _open_in_place(dir_fd, path, what, follow=bool(alias))
            try:
                with _named(path, what):
                    yield fd
            finally:
                os.close(fd)
            return
        fd, tmp = _create_temp(dir_fd, path, what, temp_name, create)
        try:
            with _named(path, what):
                yield fd
                os.fsync(fd)
                if recheck is not None:
                    recheck()
                os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                tmp = ""
                os.fsync(dir_fd)
        finally:
            os.close(fd)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _named(path: Path, what: str) -> Iterator[None]:
    """An OSError of a write (a full disk) names no file: name the output."""
    try:
        yield
    except FcsnapError:
        raise
    except OSError as e:
        raise OutputError(_say(what, path, e.strerror or str(e))) from e


def _device_alias(dir_fd: int, path: Path) -> int:
    """The st_mode of the character device or FIFO the symlink at `path` leads to, when the
    link is this user's or root's (/dev/stdout, /dev/stderr: replacing one would take it
    from every program on the host); 0 otherwise (a link another user planted is never
    followed)."""
    try:
        link = os.lstat(path.name, dir_fd=dir_fd)
        mode = os.stat(path.name, dir_fd=dir_fd).st_mode
    except OSError:
        return 0
    trusted = link.st_uid in (os.geteuid(), 0)
    return mode if trusted and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)) else 0


def _open_in_place(dir_fd: int, path: Path, what: str, follow: bool = False) -> int:
    """Open the device or FIFO at `path` for writing, through a symlink only when `follow`
    (a device alias of this user's or root's). Non-blocking: a FIFO nobody reads is refused
    rather than waited on."""
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path.name, flags, dir_fd=dir_fd)
    except OSError as e:
        problem = "a FIFO nobody reads" if e.errno == errno.ENXIO else e.strerror or str(e)
        raise OutputError(_say(what, path, problem)) from e
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):  # replaced since we looked
        os.close(fd)
        raise OutputError(_say(what, path, "it changed while being opened"))
    return fd


def _create_temp(
    dir_fd: int, path: Path, what: str, temp_name: Callable[[], str] | None,
    create: Callable[[int, str], int] | None,
) -> tuple[int, str]:
    """A new file beside `path`, created exclusively under an unpredictable name."""
    def default_name() -> str:
        return f".{path.name[:64]}.{os.urandom(8).hex()}{TEMP_SUFFIX}"

    def default_create(fd: int, name: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, 0o666, dir_fd=fd)

    for _ in range(_TRIES):
        name = (temp_name or default_name)()
        try:
            return (create or default_create)(dir_fd, name), name
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(_say(what, path, e.strerror or str(e))) from e
    raise OutputError(_say(what, path, "no free temporary name in its directory"))
