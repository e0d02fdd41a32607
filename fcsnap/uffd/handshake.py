"""Firecracker's side of the UFFD socket: accept the VM (an admitted uid), receive regions and
the uffd (docs/FORMAT.md §9.2). (Creating the socket: fcsnap.uffd.listener.)

Firecracker connects, makes one sendmsg (JSON regions + the uffd as SCM_RIGHTS) and never
answers anything; the fd can trail the connection, so we wait for it up to a deadline. Once a
VM has connected it waits for its pages: every way out of here that does not hand it to the
fault server kills it.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from fcsnap.uffd.regions import HandshakeError, Region, parse_regions

MAX_PAYLOAD = 64 << 10
MAX_FDS = 8
UCRED = struct.Struct("3i")
UFFD_LINK = "anon_inode:[userfaultfd]"  # what /proc/self/fd/N reads for a uffd


@dataclass
class Peer:
    """The connected VM process: its regions, its uffd, and a pidfd to watch it with (a pidfd,
    not the pid, so that a recycled pid can never make us signal an unrelated process)."""

    conn: socket.socket
    uffd: int
    regions: list[Region]
    pid: int
    pidfd: int
    extra_fds: int  # fds the VM sent besides the uffd; closed on arrival

    def kill(self) -> None:
        """Kill the VM: a guest whose page server gave up would otherwise hang forever."""
        kill_process(self.pidfd)

    def close(self) -> None:
        os.close(self.uffd)
        os.close(self.pidfd)
        self.conn.close()


def kill_process(pidfd: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def wait_readable(fds: list[int], timeout: float | None) -> list[int]:
    """The fds of `fds` that are readable within `timeout` seconds (None: wait forever)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return [fd for fd, _ in poller.poll(ms)]


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as it was when it connected (SO_PEERCRED)."""
    pid, uid, _gid = UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    )
    return pid, uid


def peer_pidfd(pid: int) -> int:
    """A pidfd of the connected VM, to watch it and kill it with."""
    if pid <= 0:
        raise HandshakeError("cannot tell which process connected (not in our pid namespace?)")
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise HandshakeError(f"the VM (pid {pid}) exited right after connecting") from None
    except OSError as e:
        raise HandshakeError(f"cannot watch the VM (pid {pid}): {e.strerror or e}") from e


class HandshakeReader:
    """Firecracker's one sendmsg, taken a recvmsg at a time as the connection becomes readable
    (so that a slow or silent VM holds up no one): `feed` until it returns the handshake; then,
    or on any way out, the fds received are the caller's or closed by `close`."""

    def __init__(self, memory_size: int, timeout: float) -> None:
        self.memory_size = memory_size
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.payload = b""
        self.fds: list[int] = []

    def feed(self, conn: socket.socket) -> tuple[list[Region], int, int] | None:
        """One read: (regions, uffd, number of extra fds closed) once it is all there, None
        while more is to come; HandshakeError on anything wrong (the fds are then closed)."""
        try:
            try:
                data, ancdata, _flags, _ = conn.recvmsg(
                    MAX_PAYLOAD, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return None
            for level, kind, body in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(body[: len(body) - len(body) % 4])
                    self.fds.extend(got)
            if not data and not ancdata:
                raise HandshakeError("the VM closed the connection before the handshake ended")
            self.payload += data
            if len(self.payload) > MAX_PAYLOAD:
                raise HandshakeError(f"handshake larger than {MAX_PAYLOAD} bytes")
            if not (self.fds and self.payload and _complete_json(self.payload)):
                return None
            return self._finish()
        except BaseException:
            self.close()
            raise

    def timed_out(self) -> HandshakeError:
        """The error for a VM that did not finish its handshake by the deadline."""
        what = "the uffd" if self.payload and not self.fds else "its handshake"
        return HandshakeError(f"the VM connected but did not send {what} in {self.timeout:g}s")

    def close(self) -> None:
        """Close every fd received and not handed out."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def _finish(self) -> tuple[list[Region], int, int]:
        regions = parse_regions(self.payload, self.memory_size)
        uffd = next((fd for fd in self.fds if _is_uffd(fd)), None)
        if uffd is None:
            raise HandshakeError(f"none of the {len(self.fds)} fds the VM sent is a userfaultfd")
        # Non-blocking whatever the VM chose: a blocking uffd would stall the fault loop in
        # read(), and poll reports it as an error, not as readable.
        os.set_blocking(uffd, False)
        fds, self.fds = self.fds, []
        for fd in fds:
            if fd != uffd:
                os.close(fd)
        return regions, uffd, len(fds) - 1


def receive_handshake(
    conn: socket.socket, memory_size: int, timeout: float, stop_fd: int
) -> tuple[list[Region], int, int] | None:
    """HandshakeReader, blocking: (regions, uffd, number of extra fds closed), or None if
    `stop_fd` became readable first; HandshakeError on anything wrong."""
    reader = HandshakeReader(memory_size, timeout)
    try:
        while True:
            left = reader.deadline - time.monotonic()
            ready = wait_readable([conn.fileno(), stop_fd], left) if left > 0 else []
            if stop_fd in ready:
                return None
            if not ready:
                raise reader.timed_out()
            received = reader.feed(conn)
            if received is not None:
                return received
    finally:
        reader.close()


def _is_uffd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == UFFD_LINK
    except OSError:
        return False


def _complete_json(payload: bytes) -> bool:
    """True once the payload could be a whole JSON document (it ends its outer array)."""
    return payload.rstrip().endswith(b"]") or not payload.lstrip().startswith(b"[")


def accept_admitted(
    listener: socket.socket, admits: Callable[[int], bool], refused: Callable[[int, int], None]
) -> tuple[socket.socket, int] | None:
    """The first pending connection from an admitted uid, as (conn, pid), or None once none
    is pending (the listener is non-blocking). A peer whose uid is not admitted is
    disconnected at once and reported to `refused` (pid, uid): it does not take the VM's
    place."""
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return None
        try:
            pid, uid = peer_credentials(conn)
        except BaseException:
            conn.close()
            raise
        if admits(uid):
            return conn, pid
        conn.close()
        refused(pid, uid)
