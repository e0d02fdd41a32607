"""Is anyone listening on this Unix socket file? Asked of the kernel (sock_diag), not by connecting.

A connect probe is answered by whoever listens, and a page server that listens takes the first
connection as its VM: probing another restore's socket would end that restore. The kernel's
socket diagnostics list every listening Unix socket with the device and inode of the file it is
bound to, which identifies the socket file exactly and touches nobody. They see only this
network namespace; the caller falls back to a connect probe for the others.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10  # sock_diag uses the TCP state numbers for Unix sockets too
UDIAG_SHOW_VFS = 0x2
UNIX_DIAG_VFS = 1
NLMSG = struct.Struct("=IHHII")  # length, type, flags, seq, pid
UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie
UNIX_DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie
RTATTR = struct.Struct("=HH")  # length, type
VFS = struct.Struct("=II")  # inode, device (the kernel's dev_t: major << 20 | minor)


def listening(st_dev: int, st_ino: int) -> bool | None:
    """Whether a socket of this network namespace listens on the file (st_dev, st_ino), as
    os.stat gives them; None when the kernel cannot say (no sock_diag for Unix sockets)."""
    wanted = (os.major(st_dev), os.minor(st_dev), st_ino)
    try:
        return any((dev >> 20, dev & 0xFFFFF, ino) == wanted for dev, ino in _listening_files())
    except OSError:
        return None


def _listening_files() -> list[tuple[int, int]]:
    """(kernel dev_t, inode) of the file of every listening Unix socket that has one."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as nl:
        request = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, UDIAG_SHOW_VFS,
                                     0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendto(NLMSG.pack(NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request, (0, 0))
        files: list[tuple[int, int]] = []
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + NLMSG.size <= len(data):
                length, kind = NLMSG.unpack_from(data, offset)[:2]
                if kind == NLMSG_DONE:
                    return files
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + NLMSG.size)[0]
                    raise OSError(code, os.strerror(code or errno.EIO))
                files += _vfs_attributes(data[offset + NLMSG.size : offset + length])
                offset += max(NLMSG.size, (length + 3) & ~3)
            if not data:
                return files


def _vfs_attributes(body: bytes) -> list[tuple[int, int]]:
    found = []
    at = UNIX_DIAG_MSG.size
    while at + RTATTR.size <= len(body):
        length, kind = RTATTR.unpack_from(body, at)
        if length < RTATTR.size:
            break
        if kind == UNIX_DIAG_VFS and length >= RTATTR.size + VFS.size:
            ino, dev = VFS.unpack_from(body, at + RTATTR.size)
            found.append((dev, ino))
        at += (length + 3) & ~3
    return found
