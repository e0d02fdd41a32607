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


def receive_handshake(
    conn: socket.socket, memory_size: int, timeout: float, stop_fd: int
) -> tuple[list[Region], int, int] | None:
    """(regions, uffd, number of extra fds closed), or None if `stop_fd` became readable
    first; HandshakeError on anything wrong."""
    deadline = time.monotonic() + timeout
    payload = b""
    fds: list[int] = []
    try:
        while True:
            left = deadline - time.monotonic()
            ready = wait_readable([conn.fileno(), stop_fd], left) if left > 0 else []
            if stop_fd in ready:
                for fd in fds:
                    os.close(fd)
                return None
            if not ready:
                what = "the uffd" if payload and not fds else "its handshake"
                raise HandshakeError(f"the VM connected but did not send {what} in {timeout:g}s")
            data, ancdata, _flags, _ = conn.recvmsg(
                MAX_PAYLOAD, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
            )
            for level, kind, body in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(body[: len(body) - len(body) % 4])
                    fds.extend(got)
            if not data and not ancdata:
                raise HandshakeError("the VM closed the connection before the handshake ended")
            payload += data
            if len(payload) > MAX_PAYLOAD:
                raise HandshakeError(f"handshake larger than {MAX_PAYLOAD} bytes")
            if fds and payload and _complete_json(payload):
                break
        regions = parse_regions(payload, memory_size)
        uffd = next((fd for fd in fds if _is_uffd(fd)), None)
        if uffd is None:
            raise HandshakeError(f"none of the {len(fds)} fds the VM sent is a userfaultfd")
        # Non-blocking whatever the VM chose: a blocking uffd would stall the fault loop in
        # read(), and poll reports it as an error, not as readable.
        os.set_blocking(uffd, False)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds:
        if fd != uffd:
            os.close(fd)
    return regions, uffd, len(fds) - 1


def _is_uffd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == UFFD_LINK
    except OSError:
        return False


def _complete_json(payload: bytes) -> bool:
    """True once the payload could be a whole JSON document (it ends its outer array)."""
    return payload.rstrip().endswith(b"]") or not payload.lstrip().startswith(b"[")


def accept_peer(
    listener: socket.socket, memory_size: int, timeout: float, stop_fd: int,
    admits: Callable[[int], bool] = lambda uid: True,
    refused: Callable[[int, int], None] = lambda pid, uid: None,
    watch: Callable[[int, int], None] = lambda pid, pidfd: None,
) -> Peer | None:
    """Wait for Firecracker, then take its handshake; None if `stop_fd` became readable first.

    A peer whose uid is not admitted is disconnected at once and reported to `refused`
    (pid, uid): it does not take the VM's place, and the wait goes on. The listener is closed
    as soon as an admitted VM is accepted, before its handshake: a second client is refused
    (or, if it was already queued, disconnected) at once instead of waiting behind this
    handshake. The VM's pidfd goes to `watch` (pid, pidfd) before the handshake. A VM that
    connected and is not served (bad handshake, stop request) is killed: it would wait for its
    pages forever.
    """
    while True:
        if listener.fileno() not in wait_readable([listener.fileno(), stop_fd], None):
            return None
        conn, _ = listener.accept()
        try:
            pid, uid = peer_credentials(conn)
        except BaseException:
            conn.close()
            raise
        if admits(uid):
            break
        conn.close()
        refused(pid, uid)
    listener.close()
    try:
        conn.setblocking(True)
        pidfd = peer_pidfd(pid)
    except BaseException:
        conn.close()
        raise
    received = None
    try:
        watch(pid, pidfd)
        received = receive_handshake(conn, memory_size, timeout, stop_fd)
    finally:
        if received is None:  # stopped, or a bad handshake on its way up
            kill_process(pidfd)
            os.close(pidfd)
            conn.close()
    if received is None:
        return None
    regions, uffd, extra = received
    return Peer(conn, uffd, regions, pid, pidfd, extra)
