"""The restore socket: who may connect to it, and creating it without harming anyone.

Whoever connects to a page server gets guest memory, so the socket admits only its VM: the file
is 0600 and owned by the server's user unless told otherwise, and the peer's uid (SO_PEERCRED)
must be admitted too, so that a wider mode (a jailed Firecracker's group, say) still lets in only
the uids named. The file appears already listening, with its final mode and owner: it is bound
in a private 0700 directory, set up there, and then hard-linked into place (link fails if the
name was taken meanwhile, where rename would replace it). An existing socket file is replaced
only if nothing listens on it.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.uffd import unixdiag

MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108, with the terminating NUL
PROBE_TIMEOUT = 1.0  # seconds a connect probe may take (a full backlog means "in use")


@dataclass(frozen=True)
class SocketAccess:
    """The socket file's mode and owner, and the uids admitted at accept. The server's own
    uid and the socket owner's are always admitted; root only if named (`allowed_uids`)."""

    mode: int = 0o600
    owner_uid: int | None = None
    owner_gid: int | None = None
    allowed_uids: frozenset[int] = field(default_factory=frozenset)

    def admitted_uids(self) -> frozenset[int]:
        own = {os.geteuid()} | ({self.owner_uid} if self.owner_uid is not None else set())
        return self.allowed_uids | own

    def admits(self, uid: int) -> bool:
        return uid in self.admitted_uids()


def parse_mode(text: str) -> int:
    """An octal permission mode ("600", "0660", "0o660"); ValueError if it is not one."""
    digits = text[2:] if text.lower().startswith("0o") else text
    if not digits or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise ValueError(f"{text!r} is not an octal permission mode (e.g. 0600)")
    return int(digits, 8)


def parse_uid(text: str) -> int:
    """A uid, as a number or a user name; ValueError if there is no such user."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f"no such user {text!r}") from None


def parse_owner(text: str) -> tuple[int, int | None]:
    """(uid, gid or None) from "UID[:GID]", numbers or names; ValueError if unknown."""
    user, _, group = text.partition(":")
    if not group:
        return parse_uid(user), None
    if group.isdigit():
        return parse_uid(user), int(group)
    try:
        return parse_uid(user), grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group {group!r}") from None


def listen(path: Path, access: SocketAccess) -> socket.socket:
    """A socket listening at `path` with `access`'s mode and owner. An existing socket file is
    replaced only when nothing listens on it; any other file is never replaced."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise FcsnapError(f"cannot listen on {path}: longer than the {MAX_SOCKET_PATH} bytes "
                          "a Unix socket path may have")
    stale = _stale_inode(path)
    try:
        private = path.parent / f".fcsnap-socket-{os.getpid()}-{os.urandom(4).hex()}"
        os.mkdir(private, 0o700)
    except OSError as e:
        raise FcsnapError(f"cannot listen on {path}: {e.strerror or e}") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    dir_fd = -1
    try:
        dir_fd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock.bind(f"/proc/self/fd/{dir_fd}/s")  # short whatever the directory's path
        os.chmod("s", access.mode, dir_fd=dir_fd)
        if access.owner_uid is not None:
            _chown(path, dir_fd, access.owner_uid, access.owner_gid)
        sock.listen(1)
        _publish(path, dir_fd, stale)
    except BaseException as e:
        sock.close()
        if isinstance(e, OSError):
            raise FcsnapError(f"cannot listen on {path}: {e.strerror or e}") from e
        raise
    finally:
        if dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("s", dir_fd=dir_fd)
            os.close(dir_fd)
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return sock


def _chown(path: Path, dir_fd: int, uid: int, gid: int | None) -> None:
    try:
        os.chown("s", uid, -1 if gid is None else gid, dir_fd=dir_fd)
    except OSError as e:
        owner = f"{uid}" if gid is None else f"{uid}:{gid}"
        raise FcsnapError(f"cannot give {path} to {owner}: {e.strerror or e}") from e


def _publish(path: Path, dir_fd: int, stale: int | None) -> None:
    """Link the listening socket into place, after removing the stale file it replaces."""
    if stale is not None:
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_ino == stale:
                os.unlink(path)
    try:
        os.link("s", path, src_dir_fd=dir_fd)
    except FileExistsError:
        raise FcsnapError(f"{path} was created by another process meanwhile; "
                          "refusing to replace it") from None


def _stale_inode(path: Path) -> int | None:
    """The inode of a socket file at `path` that nothing listens on (to replace), None if
    there is no file; FcsnapError for any other file or a socket in use."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FcsnapError(f"cannot listen on {path}: {e.strerror or e}") from e
    if not stat.S_ISSOCK(st.st_mode):
        raise FcsnapError(f"{path} exists and is not a socket; refusing to replace it")
    if unixdiag.listening(st.st_dev, st.st_ino) or _accepts_connections(path):
        raise FcsnapError(f"{path} is the socket of a running process (it accepts "
                          "connections); refusing to replace it")
    return st.st_ino


def _accepts_connections(path: Path) -> bool:
    """Connect probe, for listeners sock_diag cannot see (another network namespace):
    refused means stale; a connection, or a full backlog, means in use."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, TimeoutError):
            return True
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return True
            raise FcsnapError(f"cannot tell whether {path} is in use ({e.strerror or e}); "
                              "refusing to replace it") from e
        return True
