"""A minimal KVM guest that checksums a host memory range, for the Firecracker stand-in.

Firecracker's vCPUs read guest memory from kernel mode (KVM resolving guest page faults through
get_user_pages), which reaches userfaultfd differently from a process touching the memory itself.
To reproduce exactly that path, this module maps the caller's range into a fresh VM and runs one
vCPU over it.

KVM on these machines is PVM (the kvm_pvm module: shadow paging, no hardware virtualization), so
real-mode code and full Linux guests fail, and guest kernel-mode code (CPL0, in any mode) is run
by KVM's instruction emulator at about 300 ms per MiB read. Guest user-mode 64-bit code runs
natively, some 50 times faster, so the vCPU starts in long mode at CPL3, with flat segments and
identity-mapped page tables set up from the host. CPL3 code may not use port I/O (PVM masks
IOPL) nor HLT, so the program reports its result by storing to a guest-physical address with no
memory behind it, which KVM hands to us as MMIO exits; the host stops the vCPU there.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import signal
import threading
import time

import numpy as np

PAGE = 4096
GUEST_BASE = 0x1000_0000  # guest-physical address of the caller's range
BOOT_GPA = 0x10_0000  # guest-physical address of the program page, then the page tables
REPORT_GPA = 0x0800_0000  # unbacked: the program's stores here reach us as MMIO exits
# The page tables map the first 4 GiB; stay clear of the pages KVM may reserve just below it.
MAX_SIZE = 0xE000_0000
_MASK = 0xFFFF_FFFF
_KICK_GRACE = 5.0  # seconds a timed-out vCPU gets to leave KVM_RUN after being signalled

# The guest program, 64-bit code. RSI = GUEST_BASE, RCX = dword count, RDI = REPORT_GPA,
# EAX = A, EDX = B. The host stops the vCPU at the second store, so nothing follows it.
_PROGRAM = bytes(
    [
        0x03, 0x06,              # loop: add eax, [rsi]
        0x01, 0xC2,              #       add edx, eax
        0x48, 0x83, 0xC6, 0x04,  #       add rsi, 4
        0x48, 0xFF, 0xC9,        #       dec rcx
        0x75, 0xF3,              #       jnz loop
        0x89, 0x07,              #       mov [rdi], eax
        0x89, 0x57, 0x04,        #       mov [rdi + 4], edx
    ]
)  # fmt: skip
_PT_TABLE = 0x7  # present, writable, user
_PT_LARGE = 0x87  # the same, mapping a 2 MiB page
_TABLE_PAGES = 6  # PML4, PDPT and four page directories: 4 GiB in 2 MiB pages
_BOOT_SIZE = PAGE * (1 + _TABLE_PAGES)
_CR0_PE, _CR0_PG, _CR4_PAE = 1, 1 << 31, 1 << 5
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10

_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class _Segment(ctypes.Structure):
    _fields_ = [
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    ]


class _DTable(ctypes.Structure):
    _fields_ = [("base", _u64), ("limit", _u16), ("padding", _u16 * 3)]


class _Sregs(ctypes.Structure):
    _fields_ = [
        *((name, _Segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", _DTable),
        ("idt", _DTable),
        *((name, _u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
        ("interrupt_bitmap", _u64 * 4),
    ]


class _Regs(ctypes.Structure):
    _fields_ = [
        (name, _u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class _MemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
    ]


class _ExitMmio(ctypes.Structure):
    _fields_ = [("phys_addr", _u64), ("data", _u8 * 8), ("len", _u32), ("is_write", _u8)]


class _ExitInternal(ctypes.Structure):
    _fields_ = [("suberror", _u32), ("ndata", _u32), ("data", _u64 * 16)]


class _ExitFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", _u64), ("cpu", _u32)]


class _ExitInfo(ctypes.Union):
    _fields_ = [
        ("hardware_exit_reason", _u64),
        ("fail_entry", _ExitFailEntry),
        ("mmio", _ExitMmio),
        ("internal", _ExitInternal),
    ]


class _KvmRun(ctypes.Structure):
    """The head of struct kvm_run, the page shared with KVM through mmap of the vCPU fd."""

    _fields_ = [
        ("request_interrupt_window", _u8),
        ("immediate_exit", _u8),
        ("padding1", _u8 * 6),
        ("exit_reason", _u32),
        ("ready_for_interrupt_injection", _u8),
        ("if_flag", _u8),
        ("flags", _u16),
        ("cr8", _u64),
        ("apic_base", _u64),
        ("exit", _ExitInfo),
    ]


def _io(nr: int) -> int:
    return 0xAE00 | nr


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return (1 << 30) | (ctypes.sizeof(struct) << 16) | 0xAE00 | nr


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return (2 << 30) | (ctypes.sizeof(struct) << 16) | 0xAE00 | nr


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, _MemoryRegion)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _Regs)
KVM_SET_REGS = _iow(0x82, _Regs)
KVM_GET_SREGS = _ior(0x83, _Sregs)
KVM_SET_SREGS = _iow(0x84, _Sregs)
KVM_API_VERSION = 12

KVM_EXIT_MMIO = 6
_EXIT_NAMES = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    16: "NMI",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
    37: "NOTIFY",
}
_INTERNAL_NAMES = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}

_libc = ctypes.CDLL(None, use_errno=True)
# Foreign calls through ctypes release the GIL, so a vCPU blocked in KVM_RUN on a userfault
# leaves the rest of the process (possibly the fault server) running.
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value


def _ioctl(fd: int, request: int, arg: int = 0, what: str = "ioctl") -> int:
    """ioctl that raises OSError naming the request, since bare errnos from KVM say little."""
    result = _libc.ioctl(fd, request, arg)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _mmap(length: int, fd: int, what: str) -> int:
    """Map length bytes shared from fd, or anonymous private memory when fd is -1."""
    flags = mmap.MAP_SHARED if fd >= 0 else mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if addr in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap {what}: {os.strerror(err)}")
    return addr


def kvm_available() -> bool:
    """Whether /dev/kvm opens and speaks the stable KVM API, so the tests can run a guest."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _libc.ioctl(fd, KVM_GET_API_VERSION, 0) == KVM_API_VERSION
    finally:
        os.close(fd)


def expected_checksum(data: bytes | memoryview) -> tuple[int, int]:
    """The pair the guest computes, from host-side data, for tests to compare against.

    Works in chunks so a multi-GiB image does not need twice its size in uint64 temporaries.
    """
    words = np.frombuffer(data, dtype="<u4")
    a = b = 0
    chunk = 1 << 22
    for start in range(0, len(words), chunk):
        running = np.cumsum(words[start : start + chunk], dtype=np.uint64) + np.uint64(a)
        b = (b + int(running.sum(dtype=np.uint64))) & _MASK
        a = int(running[-1]) & _MASK
    return a, b


def _flat_segment(selector: int, type_: int) -> _Segment:
    """A flat user-mode (DPL 3) segment; type 0xB is 64-bit code, 0x3 is data."""
    code = type_ == 0xB
    return _Segment(
        limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=3, db=int(not code), s=1,
        l=int(code), g=1,
    )  # fmt: skip


def _boot_image() -> bytes:
    """The program page followed by page tables identity-mapping 4 GiB for user mode."""
    tables = np.zeros((_TABLE_PAGES, 512), np.uint64)
    table_gpa = BOOT_GPA + PAGE + PAGE * np.arange(_TABLE_PAGES, dtype=np.uint64)
    tables[0, 0] = table_gpa[1] | _PT_TABLE
    tables[1, :4] = table_gpa[2:] | _PT_TABLE
    tables[2:] = ((np.arange(4 * 512, dtype=np.uint64) << 21) | _PT_LARGE).reshape(4, 512)
    return _PROGRAM.ljust(PAGE, b"\0") + tables.astype("<u8").tobytes()


def _build_vm(host_addr: int, size: int, stack: contextlib.ExitStack) -> tuple[int, _KvmRun]:
    """Create the VM and its vCPU ready to run the program; stack releases everything."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    stack.callback(os.close, kvm)
    version = _ioctl(kvm, KVM_GET_API_VERSION, what="KVM_GET_API_VERSION")
    if version != KVM_API_VERSION:
        raise RuntimeError(f"/dev/kvm speaks KVM API {version}, expected {KVM_API_VERSION}")
    vm = _ioctl(kvm, KVM_CREATE_VM, what="KVM_CREATE_VM")
    stack.callback(os.close, vm)

    boot = _mmap(_BOOT_SIZE, -1, "guest boot pages")
    stack.callback(_libc.munmap, boot, _BOOT_SIZE)
    image = _boot_image()
    ctypes.memmove(boot, image, len(image))
    slots = ((0, BOOT_GPA, _BOOT_SIZE, boot), (1, GUEST_BASE, size, host_addr))
    for slot, gpa, length, addr in slots:
        region = _MemoryRegion(slot, 0, gpa, length, addr)
        _ioctl(vm, KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region),
               what=f"KVM_SET_USER_MEMORY_REGION slot {slot}")  # fmt: skip

    vcpu = _ioctl(vm, KVM_CREATE_VCPU, 0, what="KVM_CREATE_VCPU")
    stack.callback(os.close, vcpu)
    run_size = _ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, what="KVM_GET_VCPU_MMAP_SIZE")
    run_addr = _mmap(run_size, vcpu, "kvm_run")
    stack.callback(_libc.munmap, run_addr, run_size)

    sregs = _Sregs()
    _ioctl(vcpu, KVM_GET_SREGS, ctypes.addressof(sregs), what="KVM_GET_SREGS")
    sregs.cs = _flat_segment(0x1B, 0xB)  # selectors with RPL 3, as the DPL requires
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _flat_segment(0x23, 0x3))
    sregs.cr3 = BOOT_GPA + PAGE
    sregs.cr4 = _CR4_PAE
    sregs.cr0 |= _CR0_PE | _CR0_PG
    sregs.efer = _EFER_LME | _EFER_LMA
    _ioctl(vcpu, KVM_SET_SREGS, ctypes.addressof(sregs), what="KVM_SET_SREGS")

    regs = _Regs(rip=BOOT_GPA, rflags=0x2, rsi=GUEST_BASE, rcx=size // 4, rdi=REPORT_GPA)
    _ioctl(vcpu, KVM_SET_REGS, ctypes.addressof(regs), what="KVM_SET_REGS")
    return vcpu, _KvmRun.from_address(run_addr)


def _describe_exit(vcpu: int, run: _KvmRun) -> str:
    """An unexpected exit, with the reason's details and where the program was, for debugging
    a guest that has no other way to say what went wrong."""
    reason = run.exit_reason
    regs = _Regs()
    _ioctl(vcpu, KVM_GET_REGS, ctypes.addressof(regs), what="KVM_GET_REGS")
    text = (
        f"KVM guest stopped with KVM_EXIT_{_EXIT_NAMES.get(reason, '?')} ({reason})"
        f" at rip {regs.rip:#x}, reading {regs.rsi:#x}"
    )
    if reason == KVM_EXIT_MMIO:
        mmio = run.exit.mmio
        text += f", {'write' if mmio.is_write else 'read'} of {mmio.len} at {mmio.phys_addr:#x}"
    elif reason == 0:
        text += f", hardware exit reason {run.exit.hardware_exit_reason:#x}"
    elif reason == 9:
        text += (
            f", hardware entry failure reason "
            f"{run.exit.fail_entry.hardware_entry_failure_reason:#x}"
        )
    elif reason == 17:
        internal = run.exit.internal
        sub = internal.suberror
        data = ", ".join(f"{d:#x}" for d in internal.data[: min(internal.ndata, 16)])
        text += f", suberror {_INTERNAL_NAMES.get(sub, '?')} ({sub}), data [{data}]"
    return text


def _run_vcpu(vcpu: int, run: _KvmRun, stop: threading.Event) -> tuple[int, int]:
    """Run the vCPU until the program has stored A and B at REPORT_GPA; return them."""
    stored: dict[int, int] = {}
    while not stop.is_set():
        if _libc.ioctl(vcpu, KVM_RUN, 0) < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue  # a kick (the loop test sees stop) or some unrelated signal
            raise OSError(err, f"KVM_RUN: {os.strerror(err)}")
        mmio = run.exit.mmio
        if (
            run.exit_reason != KVM_EXIT_MMIO
            or not mmio.is_write
            or mmio.len != 4
            or mmio.phys_addr not in (REPORT_GPA, REPORT_GPA + 4)
        ):
            raise RuntimeError(_describe_exit(vcpu, run))
        stored[mmio.phys_addr] = int.from_bytes(bytes(mmio.data[:4]), "little")
        if len(stored) == 2:
            return stored[REPORT_GPA], stored[REPORT_GPA + 4]
    raise TimeoutError("vCPU stopped by timeout")


_KICK_SIGNAL = signal.SIGRTMIN + 3


def _kick(worker: threading.Thread) -> bool:
    """Signal the vCPU thread out of KVM_RUN (or a userfault wait); whether it has exited.

    A signal only interrupts KVM_RUN if it has a handler; Python can install one only from the
    main thread, where it is a no-op that stays in place for the kick and is restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        return not worker.is_alive()
    previous = signal.signal(_KICK_SIGNAL, lambda _sig, _frame: None)
    try:
        deadline = time.monotonic() + _KICK_GRACE
        while worker.is_alive() and time.monotonic() < deadline:
            if worker.ident is not None:
                signal.pthread_kill(worker.ident, _KICK_SIGNAL)
            worker.join(0.05)
    finally:
        signal.signal(_KICK_SIGNAL, previous)
    return not worker.is_alive()


def guest_checksum(host_addr: int, size: int, timeout: float = 60.0) -> tuple[int, int]:
    """Checksum [host_addr, host_addr + size) by reading it from a KVM vCPU, as a guest would.

    Returns (A, B): A is the sum of the little-endian dwords mod 2**32, B the sum of the running
    values of A mod 2**32 (see expected_checksum). The range is never touched from Python, so it
    may be registered with a userfaultfd served elsewhere; the reads then block in KVM_RUN.
    """
    if host_addr % PAGE or size <= 0 or size % PAGE or size > MAX_SIZE:
        raise ValueError(
            f"guest_checksum needs a page-aligned address and a size that is a positive multiple"
            f" of {PAGE} up to {MAX_SIZE:#x}, got address {host_addr:#x} size {size:#x}"
        )
    with contextlib.ExitStack() as stack:
        vcpu, run = _build_vm(host_addr, size, stack)
        stop = threading.Event()
        outcome: list[tuple[int, int] | BaseException] = []

        def work() -> None:
            try:
                outcome.append(_run_vcpu(vcpu, run, stop))
            except BaseException as exc:  # handed to the caller's thread
                outcome.append(exc)

        worker = threading.Thread(target=work, name="kvm-vcpu", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            stop.set()
            run.immediate_exit = 1  # KVM_RUN entered after the kick returns at once
            if not _kick(worker):
                stack.pop_all()  # the stuck thread still uses the fds and mappings: leak them
            raise RuntimeError(
                f"KVM guest did not finish checksumming {size:#x} bytes at {host_addr:#x}"
                f" within {timeout} s (is a userfaultfd on the range not being served?)"
            )
        result = outcome[0]
        if isinstance(result, RuntimeError):
            raise result
        if isinstance(result, BaseException):
            raise RuntimeError(f"KVM guest failed: {result}") from result
        return result
