"""The cffi userfaultfd bindings against the real kernel uffd.

Guest-memory reads happen in helper threads through ctypes.memmove (which releases the GIL):
a Python thread blocked in a uffd fault would otherwise hold the GIL and stall the test.
Closing the uffd at teardown wakes any thread a failed test left blocked.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from fcsnap.uffd import abi
from fcsnap.units import PAGE

PAGES = 16
TIMEOUT = 5.0


@dataclass
class Registered:
    """A uffd with a registered anonymous range, and the threads that fault on it."""

    fd: int
    addr: int
    length: int
    threads: list[threading.Thread] = field(default_factory=list)

    def page(self, i: int) -> int:
        return self.addr + i * PAGE

    def background(self, fn: Callable[[], object]) -> dict[str, object]:
        """Run fn in a daemon thread; the returned dict gets "result" or "error"."""
        out: dict[str, object] = {}

        def run() -> None:
            try:
                out["result"] = fn()
            except BaseException as e:  # handed to the test
                out["error"] = e

        t = threading.Thread(target=run, daemon=True)
        self.threads.append(t)
        t.start()
        return out

    def read_in_thread(self, addr: int, length: int = PAGE) -> dict[str, object]:
        """Copy guest bytes out without holding the GIL; result is the bytes."""

        def read() -> bytes:
            buf = ctypes.create_string_buffer(length)
            ctypes.memmove(buf, addr, length)
            return buf.raw

        return self.background(read)

    def join(self) -> None:
        for t in self.threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "a thread is still blocked on the uffd"


def wait_events(fd: int, timeout: float = TIMEOUT) -> list[abi.Event]:
    """Poll the uffd, then read what is pending (at least one event, or fail)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(timeout * 1000), "no uffd event arrived"
    events = abi.read_events(fd)
    assert events
    return events


@pytest.fixture
def reg() -> Iterator[Registered]:
    fd = abi.userfaultfd()
    length = PAGES * PAGE
    addr = abi.mmap_anonymous(length)
    r = Registered(fd, addr, length)
    try:
        features = abi.api_handshake(fd, abi.UFFD_FEATURE_EVENT_REMOVE)
        assert features & abi.UFFD_FEATURE_EVENT_REMOVE
        abi.register(fd, addr, length)
        yield r
    finally:
        os.close(fd)  # unblocks any thread still waiting on a fault
        for t in r.threads:
            t.join(TIMEOUT)
        abi.munmap(addr, length)


def test_struct_layout() -> None:
    sizes = {
        "struct uffd_msg": 32,
        "struct uffdio_api": 24,
        "struct uffdio_range": 16,
        "struct uffdio_register": 32,
        "struct uffdio_copy": 40,
        "struct uffdio_zeropage": 32,
        "struct uffdio_writeprotect": 24,
        "struct uffdio_continue": 32,
    }
    assert {name: abi.ffi.sizeof(name) for name in sizes} == sizes
    msg = "struct uffd_msg"
    assert abi.ffi.offsetof(msg, "arg", "pagefault", "flags") == 8
    assert abi.ffi.offsetof(msg, "arg", "pagefault", "address") == 16
    assert abi.ffi.offsetof(msg, "arg", "pagefault", "ptid") == 24
    assert abi.ffi.offsetof(msg, "arg", "remove", "end") == 16
    assert abi.ffi.offsetof("struct uffdio_copy", "copy") == 32


def test_ioctl_numbers_match_spec() -> None:
    assert abi.UFFDIO_API == 0xC018AA3F
    assert abi.UFFDIO_REGISTER == 0xC020AA00
    assert abi.UFFDIO_UNREGISTER == 0x8010AA01
    assert abi.UFFDIO_WAKE == 0x8010AA02
    assert abi.UFFDIO_COPY == 0xC028AA03
    assert abi.UFFDIO_ZEROPAGE == 0xC020AA04
    assert abi.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert abi.UFFDIO_CONTINUE == 0xC020AA07
    assert abi.USERFAULTFD_IOC_NEW == 0xAA00


def test_device_fallback_opens_a_working_uffd() -> None:
    fd = abi._userfaultfd_device(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        assert abi.api_handshake(fd, 0) & abi.UFFD_FEATURE_EVENT_REMOVE
    finally:
        os.close(fd)


def test_api_twice_is_refused() -> None:
    fd = abi.userfaultfd()
    try:
        abi.api_handshake(fd, abi.UFFD_FEATURE_EVENT_REMOVE)
        with pytest.raises(abi.UffdError):
            abi.api_handshake(fd, abi.UFFD_FEATURE_EVENT_REMOVE)
    finally:
        os.close(fd)


def test_register_offers_copy_and_zeropage() -> None:
    fd2 = abi.userfaultfd()
    try:
        abi.api_handshake(fd2, 0)
        addr = abi.mmap_anonymous(PAGE)
        try:
            ioctls = abi.register(fd2, addr, PAGE)
            for nr in (abi._UFFDIO_COPY, abi._UFFDIO_ZEROPAGE, abi._UFFDIO_WAKE):
                assert ioctls & (1 << nr)
            abi.unregister(fd2, addr, PAGE)
        finally:
            abi.munmap(addr, PAGE)
    finally:
        os.close(fd2)


def test_fault_copy_and_eexist(reg: Registered) -> None:
    data = os.urandom(PAGE)
    target = reg.page(3)
    reader = reg.read_in_thread(target + 100, 200)
    [event] = wait_events(reg.fd)
    assert type(event) is abi.Fault
    assert (event.address, event.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE) == (target, 0)
    assert abi.copy(reg.fd, target, abi.buffer_address(data), PAGE) == PAGE
    reg.join()
    assert reader["result"] == data[100:300]
    with pytest.raises(abi.UffdError) as e:
        abi.copy(reg.fd, target, abi.buffer_address(data), PAGE)
    assert e.value.errno == errno.EEXIST


def test_partial_copy_reports_progress(reg: Registered) -> None:
    data = os.urandom(3 * PAGE)
    src = abi.buffer_address(data)
    abi.copy(reg.fd, reg.page(6), src, PAGE)
    with pytest.raises(abi.UffdError) as e:  # page 6 is present: stops after page 5
        abi.copy(reg.fd, reg.page(5), src, 3 * PAGE)
    assert e.value.errno == errno.EAGAIN
    assert e.value.copied == PAGE
    reader = reg.read_in_thread(reg.page(5), 2 * PAGE)
    reg.join()
    assert reader["result"] == data[:PAGE] * 2


def test_zeropage_and_write_fault(reg: Registered) -> None:
    target = reg.page(7)
    ones = b"\x01" * PAGE
    writer = reg.background(lambda: ctypes.memmove(target, ones, PAGE))
    [event] = wait_events(reg.fd)
    assert type(event) is abi.Fault and event.address == target
    assert event.flags & abi.UFFD_PAGEFAULT_FLAG_WRITE
    assert abi.zeropage(reg.fd, target, PAGE) == PAGE
    assert abi.zeropage(reg.fd, reg.page(8), PAGE) == PAGE  # no fault needed
    reg.join()
    assert "error" not in writer
    reader = reg.read_in_thread(target, 2 * PAGE)
    reg.join()
    assert reader["result"] == ones + bytes(PAGE)


def test_wake_after_dontwake_copy(reg: Registered) -> None:
    data = os.urandom(PAGE)
    reader = reg.read_in_thread(reg.page(9))
    wait_events(reg.fd)
    abi.copy(reg.fd, reg.page(9), abi.buffer_address(data), PAGE, abi.UFFDIO_COPY_MODE_DONTWAKE)
    abi.wake(reg.fd, reg.page(9), PAGE)
    reg.join()
    assert reader["result"] == data


def test_remove_event_blocks_copies_until_read(reg: Registered) -> None:
    start, length = reg.page(2), 4 * PAGE
    advice = reg.background(lambda: abi.madvise(start, length, abi.MADV_DONTNEED))
    poller = select.poll()
    poller.register(reg.fd, select.POLLIN)
    assert poller.poll(TIMEOUT * 1000)
    data = bytes(PAGE)
    with pytest.raises(abi.UffdError) as e:  # the REMOVE is pending, unread
        abi.copy(reg.fd, reg.page(12), abi.buffer_address(data), PAGE)
    assert (e.value.errno, e.value.copied) == (errno.EAGAIN, 0)
    [event] = abi.read_events(reg.fd)
    assert (type(event), event) == (abi.Remove, (start, start + length))
    reg.join()
    assert "error" not in advice
    assert abi.copy(reg.fd, reg.page(12), abi.buffer_address(data), PAGE) == PAGE


def test_read_events_empty_when_idle(reg: Registered) -> None:
    assert abi.read_events(reg.fd) == []


def test_buffer_address_matches_ctypes() -> None:
    ba = bytearray(b"abc" * 100)
    assert abi.buffer_address(ba) == ctypes.addressof((ctypes.c_char * len(ba)).from_buffer(ba))
    raw = b"some bytes"
    assert ctypes.string_at(abi.buffer_address(raw), len(raw)) == raw
    m = mmap.mmap(-1, PAGE)
    m[:4] = b"mmap"
    assert ctypes.string_at(abi.buffer_address(m), 4) == b"mmap"
    m.close()  # no export is held: closing still works
    ba.extend(b"x")  # and so does resizing


def test_read_events_parses_every_kind() -> None:
    """Message decoding, fed from a pipe with the kernel's byte layout."""
    msg = struct.Struct("<B7xQQQ")
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        assert abi.read_events(r) == []
        os.write(w, b"".join([
            msg.pack(abi.UFFD_EVENT_PAGEFAULT, abi.UFFD_PAGEFAULT_FLAG_WRITE, 0x7F00_0000_1000,
                     (0xDEAD << 32) | 4242),
            msg.pack(abi.UFFD_EVENT_REMOVE, 0x1000, 0x3000, 0),
            msg.pack(abi.UFFD_EVENT_UNMAP, 0x4000, 0x5000, 0),
            msg.pack(abi.UFFD_EVENT_REMAP, 0x1000, 0x9000, 0x2000),
            msg.pack(abi.UFFD_EVENT_FORK, (0xBEEF << 32) | 17, 0, 0),
            msg.pack(0x7F, 1, 2, 3),
        ]))
        events = abi.read_events(r)
        assert [(type(e), e) for e in events] == [
            (abi.Fault, (0x7F00_0000_1000, abi.UFFD_PAGEFAULT_FLAG_WRITE, 4242)),
            (abi.Remove, (0x1000, 0x3000)),
            (abi.Unmap, (0x4000, 0x5000)),
            (abi.Remap, (0x1000, 0x9000, 0x2000)),
            (abi.Fork, (17,)),
            (abi.Unknown, (0x7F,)),
        ]
    finally:
        os.close(r)
        os.close(w)
