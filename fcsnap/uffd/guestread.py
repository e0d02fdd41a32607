"""Read a live VM's guest memory with process_vm_readv, for a checkpoint.

The daemon serving a VM knows its pid (the VM socket's SO_PEERCRED) and where each region of
guest memory lives in the VM's address space (the handshake). A checkpoint reads the pages the
guest wrote straight from there: no memory file, nothing read that the guest did not write.
The kernel allows it where ptrace would be allowed (same uid and Yama's ptrace_scope, or
CAP_SYS_PTRACE); where it refuses, one line says so.

A pid can be recycled: after the reads, the VM's pidfd must show the process still alive, or
what was read may belong to another process and is thrown away.

The reads must not run on the thread that serves the VM's faults: a page not yet installed
(a balloon gave it back) faults into the VM's uffd, which that thread resolves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
from collections.abc import Iterator

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.store.operations.scan import consecutive_runs
from fcsnap.uffd.regions import Region
from fcsnap.units import PAGE

IOV_MAX = 1024  # remote iovecs per call (the kernel's UIO_MAXIOV)


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_readv = _libc.process_vm_readv
_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                   ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_readv.restype = ctypes.c_ssize_t


class GuestMemory:
    """The memory of the VM process `pid` (watched through `pidfd`), by memory-file offset."""

    def __init__(self, pid: int, pidfd: int, regions: list[Region]) -> None:
        """`pidfd` must stay open (the caller's own) until the reads are checked."""
        self.pid = pid
        self.pidfd = pidfd
        self.regions = sorted(regions, key=lambda r: r.offset)
        self._starts = np.array([r.offset for r in self.regions], np.int64)

    def read_pages(self, offsets: np.ndarray, into: memoryview, at: int) -> None:
        """Read the 4 KiB pages at memory-file `offsets` into `into`, where memory-file offset
        `at` is `into[0]`. FcsnapError (one line) where the kernel refuses or the VM is gone."""
        pages = np.asarray(offsets, np.int64) // PAGE
        remote: list[tuple[int, int, int]] = []  # (host address, length, position in `into`)
        for first, count in consecutive_runs(pages):
            start, end = int(first) * PAGE, int(first + count) * PAGE
            while start < end:
                region = self._region(start)
                stop = min(end, region.offset + region.size)
                remote.append((region.base + start - region.offset, stop - start, start - at))
                start = stop
        base = ctypes.addressof(ctypes.c_char.from_buffer(into))
        for k in range(0, len(remote), IOV_MAX):
            self._readv(base, remote[k:k + IOV_MAX])

    def read_span(self, address: int, length: int, local: int) -> None:
        """Read `length` bytes at the VM's `address` to this process's address `local`: one
        call, none of read_pages' array work (a write waits on it: preimage.py)."""
        local_iov, remote_iov = _Iovec(local, length), _Iovec(address, length)
        got = _readv(self.pid, ctypes.byref(local_iov), 1, ctypes.byref(remote_iov), 1, 0)
        if got != length:
            raise FcsnapError(self.refusal(ctypes.get_errno()) if got < 0 else
                              f"reading the VM's memory (pid {self.pid}) stopped after {got} "
                              f"of {length} bytes (did it exit or unmap its memory?)")

    def check_alive(self) -> None:
        """FcsnapError if the VM has exited (its pid may since name another process)."""
        if select.select([self.pidfd], [], [], 0)[0]:
            raise FcsnapError(f"the VM (pid {self.pid}) exited during the checkpoint")

    def _region(self, offset: int) -> Region:
        i = int(np.searchsorted(self._starts, offset, side="right")) - 1
        if i < 0 or offset >= self.regions[i].offset + self.regions[i].size:
            raise FcsnapError(f"guest memory offset {offset:#x} is in none of the VM's regions")
        return self.regions[i]

    def _readv(self, base: int, remote: list[tuple[int, int, int]]) -> None:
        n = len(remote)
        local_iov = (_Iovec * n)(*[_Iovec(base + pos, length) for _, length, pos in remote])
        remote_iov = (_Iovec * n)(*[_Iovec(address, length) for address, length, _ in remote])
        want = sum(length for _, length, _ in remote)
        got = _readv(self.pid, local_iov, n, remote_iov, n, 0)
        if got < 0:
            raise FcsnapError(self.refusal(ctypes.get_errno()))
        if got != want:
            raise FcsnapError(f"reading the VM's memory (pid {self.pid}) stopped after {got} "
                              f"of {want} bytes (did it exit or unmap its memory?)")

    def refusal(self, err: int) -> str:
        """The one line for process_vm_readv's errno `err`."""
        what = f"the kernel refused to read the VM's memory (process_vm_readv on pid {self.pid}: "
        if err in (errno.EPERM, errno.EACCES):
            return (what + f"{os.strerror(err)}): the daemon needs ptrace access to the VM "
                    "(the same uid and Yama ptrace_scope 0, or CAP_SYS_PTRACE)")
        if err == errno.ESRCH:
            return f"the VM (pid {self.pid}) has exited"
        return what + f"{os.strerror(err)})"


def guest_blocks(memory: GuestMemory, offsets: np.ndarray, block_size: int, chunk: int,
                 base_read: object = None) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of the blocks holding the written pages at `offsets`, ascending, runs
    of neighbours at most `chunk` bytes at once: the written pages read from the guest, the
    rest of a block larger than a page from `base_read(offset, length)` (the served build).
    The memoryview is reused."""
    offsets = np.unique(np.asarray(offsets, np.int64))
    blocks = offsets // block_size
    blocks = blocks[np.append(True, blocks[1:] != blocks[:-1])] if len(blocks) else blocks
    per = max(1, chunk // block_size)
    pieces = [(int(start) + lo, min(per, int(count) - lo))
              for start, count in consecutive_runs(blocks) for lo in range(0, int(count), per)]
    if not pieces:
        return
    view = memoryview(bytearray(max(n for _, n in pieces) * block_size))
    for start, count in pieces:
        lo, hi = start * block_size, (start + count) * block_size
        part = view[: hi - lo]
        if block_size != PAGE:
            assert callable(base_read)
            part[:] = base_read(lo, hi - lo)
        inside = offsets[np.searchsorted(offsets, lo):np.searchsorted(offsets, hi)]
        memory.read_pages(inside, part, lo)
        yield lo, part
