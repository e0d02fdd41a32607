"""The KVM checksum guest: it must read exactly the caller's memory, and read it through KVM so
that a userfaultfd on the range sees kernel-mode faults, as with Firecracker's vCPUs."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from fcsnap.testing.kvm import PAGE, expected_checksum, guest_checksum, kvm_available

needs_kvm = pytest.mark.skipif(
    not os.path.exists("/dev/kvm"), reason="/dev/kvm is missing: no KVM guest can run here"
)

SIZE = 4 << 20

SYS_USERFAULTFD = 323
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_COPY = 0xC028AA03
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_MSG_SIZE = 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_NONE = 0


@contextmanager
def anonymous(size: int) -> Iterator[tuple[mmap.mmap, int]]:
    """An anonymous mapping and its address, unmapped after the test."""
    region = mmap.mmap(-1, size)
    anchor = ctypes.c_char.from_buffer(region)
    try:
        yield region, ctypes.addressof(anchor)
    finally:
        del anchor
        region.close()


def random_bytes(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def test_expected_checksum_small_cases() -> None:
    assert expected_checksum(b"") == (0, 0)
    assert expected_checksum(struct.pack("<3I", 1, 2, 3)) == (6, 1 + 3 + 6)
    top = 0xFFFF_FFFF
    # Running A: top, top - 1 (wrapped); B: their sum, wrapped.
    assert expected_checksum(struct.pack("<2I", top, top)) == (top - 1, (2 * top - 1) & top)


def test_expected_checksum_matches_closed_form_across_chunks() -> None:
    """B weights the i-th of n words by n - i; long enough to span several numpy chunks."""
    n = (3 << 22) + 5
    words = np.random.default_rng(1).integers(0, 1 << 32, size=n, dtype=np.uint32)
    weights = np.arange(n, 0, -1, dtype=np.uint64)
    a = int(words.sum(dtype=np.uint64)) & 0xFFFF_FFFF
    b = int((weights * words).sum(dtype=np.uint64)) & 0xFFFF_FFFF
    assert expected_checksum(words.tobytes()) == (a, b)


@needs_kvm
def test_kvm_available() -> None:
    assert kvm_available()


@needs_kvm
def test_guest_checksum_of_plain_memory() -> None:
    data = random_bytes(SIZE, seed=2)
    with anonymous(SIZE) as (region, addr):
        region.write(data)
        assert guest_checksum(addr, SIZE) == expected_checksum(data)


@needs_kvm
def test_guest_checksum_sees_a_single_byte_change() -> None:
    data = bytearray(random_bytes(SIZE, seed=3))
    with anonymous(SIZE) as (region, addr):
        region.write(data)
        before = guest_checksum(addr, SIZE)
        where = SIZE // 2 + 12345
        data[where] ^= 0x40
        region[where] = data[where]
        after = guest_checksum(addr, SIZE)
    assert before != after
    assert after == expected_checksum(data)


@needs_kvm
def test_guest_checksum_rejects_unaligned_ranges() -> None:
    with pytest.raises(ValueError, match="page-aligned"):
        guest_checksum(0x1000, PAGE + 4)
    with pytest.raises(ValueError, match="page-aligned"):
        guest_checksum(0x1004, PAGE)


@needs_kvm
def test_guest_checksum_reports_an_unreadable_range() -> None:
    """KVM cannot fault in a PROT_NONE page: the caller gets an error, not a hang."""
    with anonymous(SIZE) as (_region, addr):
        assert _libc.mprotect(addr, SIZE, PROT_NONE) == 0
        with pytest.raises(RuntimeError, match="KVM_RUN: Bad address"):
            guest_checksum(addr, SIZE, timeout=30)


class Userfaultfd:
    """A userfaultfd with a MISSING registration, made directly through the syscalls."""

    def __init__(self, addr: int, size: int) -> None:
        fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        self.fd = int(fd)
        api = ctypes.create_string_buffer(struct.pack("<3Q", UFFD_API, 0, 0))
        self._ioctl(UFFDIO_API, api)
        register = ctypes.create_string_buffer(
            struct.pack("<4Q", addr, size, UFFDIO_REGISTER_MODE_MISSING, 0)
        )
        self._ioctl(UFFDIO_REGISTER, register)

    def _ioctl(self, request: int, arg: ctypes.Array[ctypes.c_char]) -> None:
        if _libc.ioctl(self.fd, request, ctypes.addressof(arg)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")

    def serve(self, source: bytes, base: int, stop: threading.Event) -> int:
        """Answer page faults from source until stop is set; return how many were served.

        Only ioctls touch the registered range: reading it here would fault on ourselves.
        """
        page = ctypes.create_string_buffer(PAGE)
        copy = ctypes.create_string_buffer(40)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        served = 0
        while not stop.is_set():
            if not poller.poll(50):
                continue
            try:
                msg = os.read(self.fd, UFFD_MSG_SIZE)
            except BlockingIOError:
                continue
            event, address = msg[0], struct.unpack_from("<Q", msg, 16)[0]
            assert event == UFFD_EVENT_PAGEFAULT, f"unexpected uffd event {event:#x}"
            dst = address & ~(PAGE - 1)
            offset = dst - base
            ctypes.memmove(page, source[offset : offset + PAGE], PAGE)
            struct.pack_into("<4Qq", copy, 0, dst, ctypes.addressof(page), PAGE, 0, 0)
            try:
                self._ioctl(UFFDIO_COPY, copy)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
            served += 1
        return served

    def close(self) -> None:
        os.close(self.fd)


@needs_kvm
def test_guest_reads_fault_into_a_userfaultfd() -> None:
    source = random_bytes(SIZE, seed=4)
    with anonymous(SIZE) as (_region, addr):
        uffd = Userfaultfd(addr, SIZE)
        stop = threading.Event()
        served: list[int | BaseException] = []

        def server() -> None:
            try:
                served.append(uffd.serve(source, addr, stop))
            except BaseException as exc:
                served.append(exc)

        thread = threading.Thread(target=server, name="uffd-server")
        thread.start()
        try:
            pair = guest_checksum(addr, SIZE, timeout=30)
        finally:
            stop.set()
            thread.join()
            uffd.close()
    count = served[0]
    assert not isinstance(count, BaseException), count
    assert 0 < count <= SIZE // PAGE
    assert pair == expected_checksum(source)


@needs_kvm
def test_guest_checksum_times_out_on_an_unserved_userfaultfd() -> None:
    with anonymous(SIZE) as (_region, addr):
        uffd = Userfaultfd(addr, SIZE)
        try:
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="did not finish"):
                guest_checksum(addr, SIZE, timeout=0.5)
            assert time.monotonic() - started < 5
            # The kick got the vCPU thread out of its userfault wait: nothing is left behind.
            assert not any(t.name == "kvm-vcpu" for t in threading.enumerate())
        finally:
            uffd.close()
