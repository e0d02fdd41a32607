"""The compiled fault path: the serving loop's common case in C (csrc/fastpath.c).

A fault costs a few microseconds of kernel work; in Python the work around it (reading and
parsing the event, finding the region and the mapping, choosing the source, the ioctl, the
bookkeeping) cost more than the kernel's part. The C loop does all of it with the GIL released,
so the sessions of other VMs in the same process run meanwhile on other cores.

The reactor (reactor.py) waits on every session's fds at once in C (fp_wait), which pumps the
ready uffds of compiled sessions there and returns only with what needs Python.

It works on the installer's own state (the present/removed/wanted arrays, the mapping arrays,
each raw diff's MappedDiff state), so it and the Python installer can take turns fault by
fault. It serves 4 KiB pages of raw builds, mapped whole (local) or chunk by chunk (read
through the host chunk cache: a fault on a chunk not mapped yet comes back to Python, which
fetches and maps it); the rest comes back to Python untouched:
REMOVE and other events, removed pages, huge pages, an EAGAIN to retry. A fault handed back
keeps its WRITE and WP flags in its address's low bits (writes.fault_token). In regions
registered for write-protect it installs as the installer does (writes.py), and keeps the
pre-image of a page a background checkpoint has yet to copy before unprotecting it
(preimage.py). Under --record-ws it
records the pages faulted, in order, in a buffer Python empties after every call. A server
under --verify, or with a zstd build in its lineage, serves everything in Python.

The module is compiled at install time (setup.py's cffi_modules). When it is missing (no C
compiler at install) or FCSNAP_PURE_PYTHON=1 is set, the server runs the pure-Python path,
which gives the same results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fcsnap.errors import FcsnapError
from fcsnap.options import ADAPTIVE, PURE_PYTHON_ENV
from fcsnap.uffd import abi, latency, preimage, writes
from fcsnap.uffd.faultaround import ADAPTIVE_MAX, STREAMS
from fcsnap.uffd.installer import Installer, InstallStats
from fcsnap.uffd.mapped import READ_BELOW
from fcsnap.uffd.preimage import Preimages
from fcsnap.units import PAGE

try:
    from fcsnap.uffd._fastpath import ffi, lib
except ImportError:  # not compiled: no C compiler when fcsnap was installed
    ffi = lib = None

assert lib is None or lib.FP_STREAMS == STREAMS, "csrc/fastpath.h and faultaround.py disagree"
assert lib is None or lib.FP_LATENCY_BUCKETS == latency.BUCKETS, "fastpath.h and latency.py"
assert lib is None or (lib.FP_WRITTEN, lib.FP_REMOVED) == (writes.WRITTEN, writes.REMOVED)
assert lib is None or lib.FP_FLAGS == writes.FAULT_FLAGS, "fastpath.h and writes.py"
assert lib is None or (lib.FP_KEPT, lib.FP_KEEP_ERRNO) == (preimage.KEPT, preimage.KEEP_ERRNO)
CAPACITY = 256  # messages read at once
RECORD_CAPACITY = 1 << 16  # faulted pages recorded between two returns to Python (--record-ws)


def compiled() -> bool:
    """The compiled path is there and not turned off by FCSNAP_PURE_PYTHON=1."""
    return lib is not None and os.environ.get(PURE_PYTHON_ENV, "") != "1"


@dataclass(slots=True)
class Batch:
    """What a call into the C loop left for Python, in arrival order."""

    status: int  # one of lib.FP_*
    events: list[abi.Event]  # FP_EVENTS: the messages read, none of them served
    retry: list[int]  # faults that met EAGAIN: retry after the next drain
    defer: list[int]  # faults for the Python installer

    @property
    def gone(self) -> bool:
        """An install met ESRCH: the VM has exited."""
        return self.status == lib.FP_GONE


class FastPath:
    """The C loop's state for one installer; build it with `for_installer`."""

    def __init__(self, installer: Installer) -> None:
        assert lib is not None and ffi is not None
        self.installer = installer
        pages = installer.pages
        keep: list[object] = []  # every buffer the C state points into

        def pointer(ctype: str, array: object) -> object:
            p = ffi.from_buffer(ctype, array, require_writable=True)
            keep.append(p)
            return p

        ctx = ffi.new("struct fp_ctx *")
        regions = installer.regions.regions  # sorted by base, as the C search needs
        c_regions = ffi.new("struct fp_region[]", len(regions))
        for c_region, region in zip(c_regions, regions, strict=True):
            state = installer.states[region.base]
            c_region.base, c_region.size = region.base, region.size
            c_region.offset, c_region.page_size = region.offset, region.page_size
            c_region.pages = state.pages
            c_region.present = pointer("uint8_t[]", state.present)
            c_region.removed = pointer("uint8_t[]", state.removed)
            c_region.wanted = pointer("uint8_t[]", state.wanted)
            c_region.streams = pointer("int64_t[]", state.streams)
            c_region.wp = state.wp
            c_region.pending = pointer("uint8_t[]", state.pending)
            if installer.tracking.recorded:
                c_region.written = pointer("uint8_t[]", state.written)
        starts, storage, owner = pages.mapping_arrays()
        c_diffs = ffi.new("struct fp_diff[]", max(1, len(pages.builds)))
        for c_diff, build in zip(c_diffs, pages.builds, strict=False):
            cached = pages.cached.get(build)
            if cached is not None:  # copies from its chunks' mappings, as they are mapped
                c_diff.size, c_diff.fd = cached.size, -1
                c_diff.chunk_maps = pointer("uint64_t[]", cached.chunk_maps)
                c_diff.chunk_shift = cached.chunk_shift
                continue
            mapped = pages.mapped[build]
            c_diff.base, c_diff.size = mapped.base, mapped.diff.size
            c_diff.fd, c_diff.fits, c_diff.limit = mapped.diff.fd, mapped.fits, mapped.limit
            c_diff.nchunks, c_diff.recent = len(mapped.chunks), len(mapped.ends)
            c_diff.chunks = pointer("uint8_t[]", mapped.chunks)
            c_diff.counters = pointer("int64_t[]", mapped.counters)
            c_diff.ends = pointer("int64_t[]", mapped.ends)
            c_diff.read_buffer, c_diff.read_below = mapped.buffer_address, READ_BELOW
        self.per_owner = ffi.new("int64_t[]", max(1, len(pages.builds)))
        self.messages = abi.ffi.new("struct uffd_msg[]", CAPACITY)
        self.retry = ffi.new("uint64_t[]", CAPACITY)
        self.defer = ffi.new("uint64_t[]", CAPACITY)
        ctx.uffd = installer.uffd
        ctx.nregions, ctx.regions = len(regions), c_regions
        ctx.nmappings = len(starts)
        ctx.starts = pointer("int64_t[]", starts)
        ctx.storage = pointer("int64_t[]", storage)
        ctx.owner = pointer("int64_t[]", owner)
        ctx.memory_size = pages.header.metadata.size
        ctx.diffs, ctx.per_owner = c_diffs, self.per_owner
        recording = installer.recorded is not None
        if installer.fault_around == ADAPTIVE and not recording:
            ctx.adaptive_max = max(1, ADAPTIVE_MAX // PAGE)  # the C loop serves 4 KiB pages
        elif installer.fault_around != ADAPTIVE:
            ctx.fault_around = installer.fault_around
        # else: recording with the default: one page per fault (Installer.window)
        self.record = ffi.new("uint64_t[]", RECORD_CAPACITY if recording else 1)
        ctx.record = self.record
        ctx.record_capacity = RECORD_CAPACITY if recording else 0
        ctx.messages = ffi.cast("void *", abi.buffer_address(abi.ffi.buffer(self.messages)))
        ctx.capacity = CAPACITY
        ctx.retry, ctx.defer = self.retry, self.defer
        ctx.latency = pointer("int64_t[]", installer.stats.latency)  # counted in place
        ctx.zeros = installer.zeros_addr
        ctx.zeros_len = len(installer.zeros) // PAGE * PAGE
        self.ctx = ctx
        self.handed_back = 0  # faults read in C and served by Python
        self._preimage_counts: object = None
        self._keep = (keep, c_regions, c_diffs)

    @classmethod
    def for_installer(cls, installer: Installer) -> FastPath | None:
        """The C loop for this installer, or None where Python must serve (see the module
        docstring for when)."""
        pages = installer.pages
        if not compiled() or pages.hashes is not None:
            return None
        if any(b not in pages.mapped and b not in pages.cached for b in pages.builds):
            return None  # a zstd (or empty) diff: its frames are decompressed in Python
        return cls(installer)

    def keep_preimages(self, preimages: Preimages | None, pid: int = 0) -> None:
        """Keep pre-images in the C loop too while a background checkpoint copies (into
        `preimages`, read from the VM `pid`); None: it ended. On the reactor's thread, between
        two calls into the loop."""
        ctx = self.ctx
        if preimages is None:
            ctx.preimages, ctx.vm_pid, ctx.preimage_counts = 0, 0, ffi.NULL
            self._preimage_counts = None
            return
        counts = ffi.from_buffer("int64_t[]", preimages.counts, require_writable=True)
        self._preimage_counts = counts  # kept alive while the loop writes through it
        ctx.preimages, ctx.vm_pid, ctx.preimage_counts = preimages.address, pid, counts

    def pump(self) -> Batch:
        """Read and serve what is pending on the uffd now; the stats are current afterwards."""
        return self._batch(lib.fp_pump(self.ctx))

    def collect(self) -> Batch:
        """What the reactor's wait (fp_wait, reactor.py) left from its last pump of this
        uffd; the stats are current afterwards."""
        self.ctx.pumped = 0
        status, self.ctx.status = self.ctx.status, lib.FP_DONE
        return self._batch(status)

    def _batch(self, status: int) -> Batch:
        ctx = self.ctx
        retry = ffi.unpack(self.retry, ctx.nretry) if ctx.nretry else []
        defer = ffi.unpack(self.defer, ctx.ndefer) if ctx.ndefer else []
        ctx.nretry = ctx.ndefer = 0  # handed back once
        self.handed_back += len(retry) + len(defer)
        self.settle()  # before Python serves what was handed back: the order stays
        events = []
        if status == lib.FP_EVENTS:
            events = abi.parse_events(self.messages, ctx.nmessages)
        elif status < 0:
            raise OSError(-status, f"reading the uffd: {os.strerror(-status)}")
        elif status == lib.FP_ERROR:
            self._raise_error()
        return Batch(status, events, retry, defer)

    def settle(self) -> None:
        """Bring the installer's record of faulted pages and its stats up to date."""
        ctx = self.ctx
        if ctx.nrecord:
            assert self.installer.recorded is not None
            self.installer.recorded.extend(ffi.unpack(self.record, ctx.nrecord))
            ctx.nrecord = 0
        self.add_stats(self.installer.stats)

    def _raise_error(self) -> None:
        """An install failed for a reason that is not transient: the same error as Python's."""
        ctx = self.ctx
        pages = self.installer.pages
        build = pages.builds[ctx.error_owner] if ctx.error_owner >= 0 else None
        if ctx.error_errno == 0:  # the diff changed size, or a read of it came up short
            assert build is not None
            diff = pages.diffs[build]
            diff.check_size()
            raise FcsnapError(f"{diff.path}: truncated (short read serving {ctx.error_dst:#x})")
        raise self.installer.install_error(ctx.error_dst, build, ctx.error_errno)

    def add_stats(self, stats: InstallStats) -> None:
        """Fold what the C loop counted since the last call into `stats`."""
        ctx = self.ctx
        counts = ctx.stats
        stats.faults += counts[lib.FP_FAULTS]
        stats.compiled_faults += counts[lib.FP_FAULTS] - self.handed_back
        stats.pages_served += counts[lib.FP_PAGES]
        stats.bytes_served += counts[lib.FP_PAGES] * PAGE
        stats.zero_pages += counts[lib.FP_ZERO_PAGES]
        stats.installs += counts[lib.FP_INSTALLS]
        stats.already_present += counts[lib.FP_ALREADY]
        stats.wp_faults += counts[lib.FP_WP_FAULTS]
        for i, build in enumerate(self.installer.pages.builds):
            if self.per_owner[i]:
                stats.per_build_pages[build] += self.per_owner[i]
        if ctx.first_fault_ns:
            first = ctx.first_fault_ns / 1e9 - stats.started  # both CLOCK_MONOTONIC
            if stats.first_fault_s is None or first < stats.first_fault_s:
                stats.first_fault_s = first
        for i in range(8):
            counts[i] = 0
        for i in range(len(self.installer.pages.builds)):
            self.per_owner[i] = 0
        ctx.first_fault_ns = 0
        self.handed_back = 0
