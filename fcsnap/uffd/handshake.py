"""Firecracker's side of the UFFD socket: listen, accept, receive regions and the uffd.

Firecracker connects, makes one sendmsg (JSON regions + the uffd as SCM_RIGHTS) and never
answers anything; the fd can trail the connection, so we wait for it up to a deadline.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.uffd.regions import HandshakeError, Region, parse_regions

MAX_PAYLOAD = 64 << 10
MAX_FDS = 8
UCRED = struct.Struct("3i")


@dataclass
class Peer:
    """The connected VM process: its regions, its uffd, and a pidfd to watch it with."""

    conn: socket.socket
    uffd: int
    regions: list[Region]
    pid: int
    pidfd: int | None
    extra_fds: int

    def kill(self) -> None:
        """Kill the VM: a guest whose page server gave up would otherwise hang forever."""
        kill_process(self.pid, self.pidfd)

    def close(self) -> None:
        for fd in (self.uffd, self.pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.conn.close()


def kill_process(pid: int, pidfd: int | None) -> None:
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        elif pid > 0:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def listen(path: Path) -> socket.socket:
    """Listen on a Unix socket at `path`, replacing a stale socket file (never another file)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise FcsnapError(f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise FcsnapError(f"cannot listen on {path}: {e.strerror or e}") from e
    return sock


def wait_readable(fds: list[int], timeout: float | None) -> list[int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000))
    return [fd for fd, _ in poller.poll(ms)]


def peer_pid(conn: socket.socket) -> int:
    pid, _uid, _gid = UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    )
    return pid


def receive_handshake(
    conn: socket.socket, memory_size: int, timeout: float
) -> tuple[list[Region], int, int]:
    """(regions, uffd, number of extra fds closed); HandshakeError on anything wrong."""
    deadline = time.monotonic() + timeout
    payload = b""
    fds: list[int] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable([conn.fileno()], left):
                what = "the uffd" if payload and not fds else "its handshake"
                raise HandshakeError(f"the VM connected but did not send {what} in {timeout:g}s")
            data, ancdata, _flags, _ = conn.recvmsg(
                MAX_PAYLOAD, socket.CMSG_SPACE(MAX_FDS * 4)
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
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds[1:]:
        os.close(fd)
    return regions, fds[0], len(fds) - 1


def _complete_json(payload: bytes) -> bool:
    """True once the payload could be a whole JSON document (it ends its outer array)."""
    return payload.rstrip().endswith(b"]") or not payload.lstrip().startswith(b"[")


def accept_peer(
    listener: socket.socket, memory_size: int, timeout: float, stop_fd: int
) -> Peer | None:
    """Wait for Firecracker (or a stop request: returns None), then take its handshake.

    The listener is closed once a VM is accepted: a second client gets a refused connection
    instead of a silent hang. On a bad handshake the peer is killed and HandshakeError raised.
    """
    if listener.fileno() not in wait_readable([listener.fileno(), stop_fd], None):
        return None
    conn, _ = listener.accept()
    conn.setblocking(True)
    pid = peer_pid(conn)
    try:
        pidfd = os.pidfd_open(pid) if pid > 0 else None
    except OSError:
        pidfd = None
    try:
        regions, uffd, extra = receive_handshake(conn, memory_size, timeout)
    except BaseException:
        kill_process(pid, pidfd)
        if pidfd is not None:
            os.close(pidfd)
        conn.close()
        raise
    return Peer(conn, uffd, regions, pid, pidfd, extra)
