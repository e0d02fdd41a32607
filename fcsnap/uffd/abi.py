"""userfaultfd through cffi ABI mode: the structs, constants and ioctls a page server needs.

ABI mode (``ffi.dlopen(None)``) needs no compiler at install time. Every cffi call releases the
GIL, so a thread blocked in an ioctl never stalls the rest of the process. The structs and
constants are declared here rather than taken from the installed 6.1 headers, which lack the
features added since (WP_UNPOPULATED, POISON, WP_ASYNC, MOVE); the layouts are the x86-64 and
aarch64 ABI (the same for these structs). Which of those features this kernel has is asked of
the kernel (`kernel_features`), never assumed from a version.

Events are parsed through the declared `struct uffd_msg` itself, so there is one model of the
kernel's message. The fault hot path of a serving VM lives in C (fcsnap/uffd/fastpath.py); the
calls here allocate one small struct per call (cheaper than a thread-local cache, and safe from
any thread).
"""

from __future__ import annotations

import errno
import functools
import os
import platform
from typing import NamedTuple

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
    struct uffdio_range { uint64_t start; uint64_t len; };
    struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
    struct uffdio_copy {
        uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy;
    };
    struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
    struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
    struct uffdio_continue { struct uffdio_range range; uint64_t mode; int64_t mapped; };
    struct uffd_msg {
        uint8_t event; uint8_t reserved1; uint16_t reserved2; uint32_t reserved3;
        union {
            struct { uint64_t flags; uint64_t address; uint32_t ptid; } pagefault;
            struct { uint32_t ufd; } fork;
            struct { uint64_t from; uint64_t to; uint64_t len; } remap;
            struct { uint64_t start; uint64_t end; } remove;
            struct { uint64_t reserved1; uint64_t reserved2; uint64_t reserved3; } reserved;
        } arg;
    };

    long syscall(long number, ...);
    /* ioctl is variadic in C; declared with a fixed pointer argument because the Linux
       x86-64 and aarch64 calling conventions pass it identically, and a fixed signature
       saves cffi ~0.3 us per call on the fault path. */
    int ioctl(int fd, unsigned long request, void *arg);
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
    int munmap(void *addr, size_t length);
    int madvise(void *addr, size_t length, int advice);
    """
)
lib = ffi.dlopen(None)

# -- constants --------------------------------------------------------------------------------

_SYSCALL_NUMBERS = {"x86_64": 323, "aarch64": 282}  # userfaultfd(2) on each architecture
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
MISSING = UFFDIO_REGISTER_MODE_MISSING

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1

# ioctl command numbers (the bit positions of the `ioctls` masks UFFDIO_API/REGISTER return)
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux _IOC encoding for the 0xAA ioctl type (direction: 1 write, 2 read, 3 both)."""
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_API = _ioc(3, _UFFDIO_API, ffi.sizeof("struct uffdio_api"))
UFFDIO_REGISTER = _ioc(3, _UFFDIO_REGISTER, ffi.sizeof("struct uffdio_register"))
UFFDIO_UNREGISTER = _ioc(2, _UFFDIO_UNREGISTER, ffi.sizeof("struct uffdio_range"))
UFFDIO_WAKE = _ioc(2, _UFFDIO_WAKE, ffi.sizeof("struct uffdio_range"))
UFFDIO_COPY = _ioc(3, _UFFDIO_COPY, ffi.sizeof("struct uffdio_copy"))
UFFDIO_ZEROPAGE = _ioc(3, _UFFDIO_ZEROPAGE, ffi.sizeof("struct uffdio_zeropage"))
UFFDIO_WRITEPROTECT = _ioc(3, _UFFDIO_WRITEPROTECT, ffi.sizeof("struct uffdio_writeprotect"))
UFFDIO_CONTINUE = _ioc(3, _UFFDIO_CONTINUE, ffi.sizeof("struct uffdio_continue"))
USERFAULTFD_IOC_NEW = _ioc(0, 0x00, 0)  # on /dev/userfaultfd; the argument is the flags

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_HUGETLB = 0x40000
MAP_HUGE_2MB = 21 << 26
MADV_DONTNEED = 4

MSG_SIZE = ffi.sizeof("struct uffd_msg")


class Fault(NamedTuple):
    """A thread touched a missing page at `address` (flags: UFFD_PAGEFAULT_FLAG_*)."""

    address: int
    flags: int
    ptid: int


class Remove(NamedTuple):
    """[start, end) was emptied (MADV_DONTNEED, a balloon): it faults again, as zeros."""

    start: int
    end: int


class Unmap(NamedTuple):
    start: int
    end: int


class Remap(NamedTuple):
    old: int
    new: int
    length: int


class Fork(NamedTuple):
    uffd: int


class Unknown(NamedTuple):
    code: int


Event = Fault | Remove | Unmap | Remap | Fork | Unknown

_API_T = ffi.typeof("struct uffdio_api *")
_REGISTER_T = ffi.typeof("struct uffdio_register *")
_RANGE_T = ffi.typeof("struct uffdio_range *")
_COPY_T = ffi.typeof("struct uffdio_copy *")
_ZEROPAGE_T = ffi.typeof("struct uffdio_zeropage *")
_WRITEPROTECT_T = ffi.typeof("struct uffdio_writeprotect *")
_ioctl = lib.ioctl


class UffdError(OSError):
    """A failed userfaultfd call; `errno` says why, `copied` how many bytes a COPY or ZEROPAGE
    installed before it stopped (EAGAIN can interrupt a multi-page install part way)."""

    def __init__(self, err: int, op: str, copied: int = 0) -> None:
        super().__init__(err, f"{op}: {os.strerror(err)}")
        self.copied = copied


def _fail(op: str, copied: int = 0) -> UffdError:
    return UffdError(ffi.errno, op, copied)


def syscall_number(machine: str | None = None) -> int:
    """userfaultfd(2)'s number on this machine's architecture; refuses the ones not known, as
    a wrong number would call some other system call."""
    machine = machine or platform.machine()
    try:
        return _SYSCALL_NUMBERS[machine]
    except KeyError:
        raise UffdError(
            errno.ENOSYS, f"userfaultfd on {machine} (fcsnap knows its number only on "
            f"{' and '.join(_SYSCALL_NUMBERS)})",
        ) from None


def userfaultfd(flags: int = os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """A new uffd. Falls back to /dev/userfaultfd, which the kernel permits by file mode even
    when the syscall is refused (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE)."""
    fd = lib.syscall(syscall_number(), ffi.cast("int", flags))
    if fd >= 0:
        return fd
    err = ffi.errno
    try:
        return _userfaultfd_device(flags)
    except UffdError:
        raise
    except OSError:  # no usable device either: report why the syscall failed
        raise UffdError(err, "userfaultfd") from None


def _userfaultfd_device(flags: int) -> int:
    """A new uffd from /dev/userfaultfd (Linux 6.1+)."""
    dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    try:
        fd = _ioctl(dev, USERFAULTFD_IOC_NEW, ffi.cast("void *", flags))
        if fd < 0:
            raise _fail("USERFAULTFD_IOC_NEW")
        return fd
    finally:
        os.close(dev)


def api_handshake(fd: int, features: int) -> int:
    """UFFDIO_API (once per uffd): enable `features`; returns every feature the kernel offers."""
    api = ffi.new(_API_T, (UFFD_API, features))
    if _ioctl(fd, UFFDIO_API, api) < 0:
        raise _fail("UFFDIO_API")
    return int(api.features)


@functools.cache
def kernel_features() -> int:
    """Every UFFD_FEATURE_* this kernel offers, asked of it once (UFFDIO_API on a new uffd);
    0 when userfaultfd is not available at all."""
    try:
        fd = userfaultfd()
    except OSError:
        return 0
    try:
        return api_handshake(fd, 0)
    except OSError:
        return 0
    finally:
        os.close(fd)


def register(fd: int, addr: int, length: int, mode: int = MISSING) -> int:
    """UFFDIO_REGISTER a range; returns the mask (1 << _UFFDIO_*) of ioctls it accepts."""
    reg = ffi.new(_REGISTER_T, ((addr, length), mode))
    if _ioctl(fd, UFFDIO_REGISTER, reg) < 0:
        raise _fail("UFFDIO_REGISTER")
    return int(reg.ioctls)


def unregister(fd: int, addr: int, length: int) -> None:
    """UFFDIO_UNREGISTER a range; faults there then resolve as ordinary memory."""
    if _ioctl(fd, UFFDIO_UNREGISTER, ffi.new(_RANGE_T, (addr, length))) < 0:
        raise _fail("UFFDIO_UNREGISTER")


def copy(fd: int, dst: int, src: int, length: int, mode: int = 0) -> int:
    """UFFDIO_COPY `length` bytes from `src` to the missing pages at `dst`; returns bytes
    copied. EEXIST means the page is already there, EAGAIN retry after reading events, ESRCH
    the faulting process is gone; `UffdError.copied` holds any partial progress."""
    c = ffi.new(_COPY_T, (dst, src, length, mode))
    if _ioctl(fd, UFFDIO_COPY, c) == 0:
        return int(c.copy)
    raise _fail("UFFDIO_COPY", max(int(c.copy), 0))


def zeropage(fd: int, dst: int, length: int, mode: int = 0) -> int:
    """UFFDIO_ZEROPAGE (not on hugetlbfs); returns bytes mapped, errors as for `copy`."""
    z = ffi.new(_ZEROPAGE_T, ((dst, length), mode))
    if _ioctl(fd, UFFDIO_ZEROPAGE, z) == 0:
        return int(z.zeropage)
    raise _fail("UFFDIO_ZEROPAGE", max(int(z.zeropage), 0))


def writeprotect(fd: int, addr: int, length: int, mode: int) -> None:
    """UFFDIO_WRITEPROTECT a range: protect (mode UFFDIO_WRITEPROTECT_MODE_WP) or lift the
    protection and wake the waiting threads (mode 0; with MODE_DONTWAKE alone, no wake).
    ENOENT: the range is not registered for write-protect."""
    if _ioctl(fd, UFFDIO_WRITEPROTECT, ffi.new(_WRITEPROTECT_T, ((addr, length), mode))) < 0:
        raise _fail("UFFDIO_WRITEPROTECT")


def uffd_features(fd: int) -> int | None:
    """The UFFD_FEATURE_* the uffd's creator enabled (its UFFDIO_API), read from this
    process's /proc fdinfo of it: the creator alone can ask, and only once. None where /proc
    cannot tell (not mounted)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    return int(line.split(":")[2], 16) & ((1 << 31) - 1)  # bit 31: internal
    except (OSError, ValueError, IndexError):
        pass
    return None


def wake(fd: int, addr: int, length: int) -> None:
    """UFFDIO_WAKE threads waiting on a range (after installs made with DONTWAKE)."""
    if _ioctl(fd, UFFDIO_WAKE, ffi.new(_RANGE_T, (addr, length))) < 0:
        raise _fail("UFFDIO_WAKE")


def parse_events(messages: object, count: int) -> list[Event]:
    """`count` kernel messages from `messages` (a `struct uffd_msg[]`) as typed events."""
    events: list[Event] = []
    append = events.append
    for i in range(count):
        m = messages[i]  # type: ignore[index]
        event = m.event
        if event == UFFD_EVENT_PAGEFAULT:
            f = m.arg.pagefault
            append(Fault(f.address, f.flags, f.ptid))
        elif event == UFFD_EVENT_REMOVE:
            append(Remove(m.arg.remove.start, m.arg.remove.end))
        elif event == UFFD_EVENT_UNMAP:
            append(Unmap(m.arg.remove.start, m.arg.remove.end))
        elif event == UFFD_EVENT_REMAP:
            r = m.arg.remap
            append(Remap(getattr(r, "from"), r.to, r.len))
        elif event == UFFD_EVENT_FORK:
            append(Fork(m.arg.fork.ufd))
        else:
            append(Unknown(event))
    return events


class EventReader:
    """Reads a uffd's pending messages, up to `capacity` in one read, into one buffer that is
    kept (no allocation per read). One reader per thread."""

    def __init__(self, capacity: int = 256) -> None:
        self.messages = ffi.new("struct uffd_msg[]", capacity)
        self._buffer = memoryview(ffi.buffer(self.messages))  # type: ignore[arg-type]

    def read(self, fd: int) -> list[Event]:
        """Pending events; [] when there are none (a blocking uffd waits, GIL released)."""
        try:
            n = os.readv(fd, [self._buffer])
        except BlockingIOError:
            return []
        return parse_events(self.messages, n // MSG_SIZE)


def read_events(fd: int, max_events: int = 64) -> list[Event]:
    """Read pending messages from a non-blocking uffd, as typed events; [] when there are
    none. A blocking uffd blocks here (with the GIL released) until an event arrives."""
    return EventReader(max_events).read(fd)


def buffer_address(buf: object) -> int:
    """The address of a buffer's bytes (bytes, bytearray, mmap, numpy array), e.g. as a COPY
    source. The address is only as good as the object: keep it alive, and do not resize a
    bytearray or close an mmap, while the address is in use. No buffer export is held, so the
    object stays resizable/closable (which is why those rules are the caller's)."""
    p = ffi.from_buffer(buf)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


def mmap_anonymous(length: int, flags: int = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE) -> int:
    """Map `length` bytes of read/write anonymous memory; returns its address. A raw mapping
    (no Python object) so nothing in Python can touch it while holding the GIL."""
    addr = int(ffi.cast("intptr_t", lib.mmap(ffi.NULL, length, PROT_READ | PROT_WRITE,
                                              flags | MAP_ANONYMOUS, -1, 0)))
    if addr == -1:
        err = ffi.errno
        raise OSError(err, f"mmap {length} bytes: {os.strerror(err)}")
    return addr


def munmap(addr: int, length: int) -> None:
    """Unmap a range from `mmap_anonymous`."""
    if lib.munmap(ffi.cast("void *", addr), length) < 0:
        err = ffi.errno
        raise OSError(err, f"munmap: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise without the GIL: MADV_DONTNEED on a range registered with EVENT_REMOVE blocks
    until the uffd reader has read the REMOVE event, which may be a thread of this process."""
    if lib.madvise(ffi.cast("void *", addr), length, advice) < 0:
        err = ffi.errno
        raise OSError(err, f"madvise: {os.strerror(err)}")
