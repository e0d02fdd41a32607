"""Installing guest pages: fault-around, batched prefetch/populate, and residency tracking.

Every fault round trip is expensive on these machines (tens of microseconds across cores), so
the wins come from fewer, larger installs. The installer knows which pages are present (it put
them there) and which a balloon REMOVE emptied, so it never installs a page twice and never
fault-arounds over a removed range (those pages serve zeros, one at a time, when touched).

In a region registered for write-protect (writes.py) every install goes in protected but the
page a write fault asked for, and a write-protect fault lifts the protection of its page; both
note the page written. While a background checkpoint copies (preimage.py), a write-protect
fault on a page it has yet to copy keeps the page's pre-image before lifting the protection.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import mmap
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.options import ADAPTIVE
from fcsnap.uffd import abi, latency, writes
from fcsnap.uffd.faultaround import (
    ADAPTIVE_MAX,
    adaptive_window,
    fixed_window,
    new_streams,
)
from fcsnap.uffd.pages import PageSource
from fcsnap.uffd.preimage import Preimages
from fcsnap.uffd.regions import Region, RegionMap
from fcsnap.units import HUGE_PAGE, PAGE


class Outcome(enum.Enum):
    """What became of a fault or an install."""

    DONE = "done"  # installed (or already there), the waiting thread woken
    RETRY = "retry"  # EAGAIN: events must be read first; retry after the next drain
    GONE = "gone"  # ESRCH: the VM has exited


DONE, RETRY, GONE = Outcome.DONE, Outcome.RETRY, Outcome.GONE
_OUTCOME_OF_ERRNO = {errno.EAGAIN: RETRY, errno.ESRCH: GONE}


class SpanResult(NamedTuple):
    """What `install_span` did: pages installed, and where to resume (None: it finished)."""

    installed: int
    resume: int | None


@dataclass
class InstallStats:
    faults: int = 0
    pages_served: int = 0
    bytes_served: int = 0
    zero_pages: int = 0
    remove_events: int = 0
    retries: int = 0
    already_present: int = 0
    installs: int = 0  # UFFDIO_COPY/ZEROPAGE calls that installed something
    wp_faults: int = 0  # write-protect faults resolved (the guest wrote a page it had read)
    compiled_faults: int = 0  # faults the compiled path served (fastpath.py)
    prefetched_pages: int = 0
    populated_pages: int = 0
    per_build_pages: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    first_fault_s: float | None = None
    prefetch_s: float | None = None  # from the handshake to the end of the prefetch
    latency: latency.Histogram = field(default_factory=latency.new_histogram)  # faults served


class RegionState:
    """Per-page flags of one region: present (installed by us), removed (balloon), wanted
    (in the working set being prefetched), written (writes.WRITTEN, writes.REMOVED) and
    pending (a background checkpoint has yet to copy it); its adaptive fault-around streams;
    whether it is registered for write-protect (`wp`)."""

    def __init__(self, region: Region, wp: bool = False) -> None:
        self.region = region
        self.pages = region.size // region.page_size
        self.present = np.zeros(self.pages, bool)
        self.removed = np.zeros(self.pages, bool)
        self.wanted = np.zeros(self.pages, bool)
        self.written = np.zeros(self.pages, np.uint8)
        self.pending = np.zeros(self.pages, np.uint8)
        self.streams = new_streams()  # the adaptive fault-around's recent streams
        self.wp = wp


class Installer:
    def __init__(
        self, uffd: int, regions: RegionMap, pages: PageSource, stats: InstallStats,
        fault_around: int = 0, tracking: writes.Tracking | None = None,
    ) -> None:
        self.uffd = uffd
        self.regions = regions
        self.pages = pages
        self.stats = stats
        self.fault_around = fault_around
        self.tracking = tracking or writes.Tracking(frozenset(), False, False)
        protected = self.tracking.protected
        self.states = {r.base: RegionState(r, r.base in protected) for r in regions.regions}
        largest = max([fault_around, 2 << 20, *(r.page_size for r in regions.regions)])
        # hugetlb ranges cannot take UFFDIO_ZEROPAGE. A private anonymous mapping, not a
        # bytearray: read (by the kernel's copy) it maps the shared zero page and costs no
        # memory; a bytearray would hold 2 MiB per VM in a daemon.
        self.zeros = mmap.mmap(-1, largest, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.zeros_addr = abi.buffer_address(self.zeros)
        self.recorded: list[int] | None = None  # guest offsets faulted, in order
        self.preimages: Preimages | None = None  # a background checkpoint's, while it copies

    # -- events ----------------------------------------------------------------------------

    def remove(self, start: int, end: int) -> None:
        """A REMOVE event: those pages are gone and serve zeros from now on."""
        self.stats.remove_events += 1
        for state in self.states.values():
            r = state.region
            lo, hi = max(start, r.base), min(end, r.end)
            if lo < hi:
                first = (lo - r.base) // r.page_size
                last = -(-(hi - r.base) // r.page_size)
                state.present[first:last] = False
                state.removed[first:last] = True
                state.written[first:last] = writes.REMOVED  # reads zeros, was not written
                if self.preimages is not None and state.pending[first:last].any():
                    state.pending[first:last] = 0  # their content at the pause is gone
                    self.preimages.fail("a balloon took back guest memory before the "
                                        "checkpoint had copied it")

    def fault(self, address: int, since: int | None = None) -> Outcome:
        """Serve one fault, timed into the latency histogram once it is done (a retry is
        timed when it succeeds, as the compiled loop does; one that waited on a fetch, from
        `since`, when it was first read). FetchPending: its bytes are being fetched; asked
        again (`since` given), it is served one page, its window chosen the first time."""
        began = since or time.monotonic_ns()
        outcome = self._serve_fault(address, asked_again=since is not None)
        if outcome is DONE:
            latency.observe(self.stats.latency, time.monotonic_ns() - began)
        return outcome

    def _serve_fault(self, token: int, asked_again: bool) -> Outcome:
        flags = token & writes.FAULT_FLAGS
        address = token - flags
        region = self.regions.find(address)
        if region is None:
            raise FcsnapError(f"fault at {address:#x} is outside every region the VM sent")
        state = self.states[region.base]
        page = (address - region.base) // region.page_size
        if flags & abi.UFFD_PAGEFAULT_FLAG_WP and state.wp:
            if state.pending[page]:
                self._keep_preimage(state, page)
            return self._unprotect(state, page)
        writable = bool(flags & abi.UFFD_PAGEFAULT_FLAG_WRITE) and state.wp
        if state.removed[page]:
            return self._written(state, page, self._install(state, page, page + 1,
                                                            writable=writable), writable)
        if state.present[page]:
            return self._refault(state, page)
        # (asked again: choosing once more would take another adaptive stream each time)
        w_lo, w_hi = (page, page + 1) if asked_again else self.window(state, page)
        lo, hi = self._source_bounds(state, page, w_lo, w_hi)
        if writable or (state.wp and self._zeros(state, page)):
            # its own page writable, the rest of the window protected as sides; zeros alone
            lo, hi = page, page + 1
        if hi - lo > 1:  # the free pages around the faulting one
            blocked = (state.present[lo:hi] | state.removed[lo:hi]).tobytes()
            left = blocked.rfind(b"\1", 0, page - lo)
            right = blocked.find(b"\1", page - lo + 1)
            lo, hi = lo + left + 1, (hi if right < 0 else lo + right)
        if w_hi - w_lo > 1:
            # The rest of the window (other source runs) first, without waking anyone: a
            # few more ioctls now cost far less than the fault round trips they spare, and
            # the guest, woken once by its own page, finds the window whole. Woken earlier,
            # it would take the CPU from the server at once and fault again in the part not
            # yet installed (on a shared core that made 16 KiB windows 4x slower per fault).
            # A vCPU waiting elsewhere in the window is woken when its fault is read.
            # Bytes still being fetched (object storage) hold up only the faulting page.
            for side_lo, side_hi in ((w_lo, lo), (hi, w_hi)):
                with contextlib.suppress(FetchPending):
                    self.install_span(region, side_lo, side_hi, zeros=not state.wp)
        result = self._written(state, page, self._install(state, lo, hi, needed=page,
                                                          writable=writable), writable)
        if result is not DONE:
            return result
        if self.recorded is not None:  # the page the guest faulted, not the window
            at = region.offset + page * region.page_size
            self.recorded.extend(range(at, at + region.page_size, PAGE))
        return DONE

    def window(self, state: RegionState, page: int) -> tuple[int, int]:
        """The pages [lo, hi) to install for a fault on `page`: one page of the working set
        being prefetched (the prefetch brings the rest) or while recording one with the
        adaptive default (so that the recording holds what the guest touched); otherwise the
        fixed or adaptive window (faultaround.py)."""
        r = state.region
        one = (page, page + 1)
        if state.wanted[page]:
            return one
        if self.fault_around == ADAPTIVE:
            if self.recorded is not None:
                return one
            return adaptive_window(state.streams, page, state.pages,
                                   max(1, ADAPTIVE_MAX // r.page_size))
        window = self.fault_around // r.page_size
        return one if window <= 1 else fixed_window(page, state.pages, window)

    # -- batches ---------------------------------------------------------------------------

    def install_span(self, region: Region, lo: int, hi: int, zeros: bool = True
                     ) -> SpanResult:
        """Install the missing, not removed pages of [lo, hi) with DONTWAKE (the caller wakes
        once per batch, or the fault's own install does), its zero runs only with `zeros`.
        An EAGAIN stops early, since events must be read before anything installs.

        A fault-around window in write-protected memory leaves zero runs out: zeros go in
        protected only as a copy (a page allocated and filled for each, where UFFDIO_ZEROPAGE
        maps the shared zero page), tens of times the cost of UFFDIO_ZEROPAGE over a window,
        and a zero page is mostly written when the guest first uses it, which then is one
        write fault on a missing page rather than a copy now and a write-protect fault
        later."""
        state = self.states[region.base]
        # One look at the flags, then byte searches: a small window costs about what one
        # page does, not a round of array work per run. Pages past each install are not
        # touched by it, so the look stays true for what is left.
        blocked = (state.present[lo:hi] | state.removed[lo:hi]).tobytes()
        installed = 0
        at = 0
        while (at := blocked.find(b"\0", at)) >= 0:
            end = blocked.find(b"\1", at)
            end = len(blocked) if end < 0 else end
            seg_lo, seg_hi = self._source_bounds(state, lo + at, lo + at, lo + end)
            if not zeros and self._zeros(state, seg_lo):
                at = seg_hi - lo
                continue
            result = self._install(state, seg_lo, seg_hi, wake=False)
            installed += int(np.count_nonzero(state.present[seg_lo:seg_hi]))
            if result is not DONE:
                return SpanResult(installed, seg_lo)
            at = seg_hi - lo
        return SpanResult(installed, None)

    def note_installed(
        self, state: RegionState, lo: int, pages: int, build: uuid.UUID | None
    ) -> None:
        """Account one install of pages [lo, lo+pages) from `build` (None: zeros)."""
        if pages:
            r = state.region
            state.present[lo : lo + pages] = True
            self.stats.installs += 1
            self.stats.pages_served += pages
            self.stats.bytes_served += pages * r.page_size
            if build is None:
                self.stats.zero_pages += pages
            else:
                self.stats.per_build_pages[build] += pages

    def fully_resident(self) -> bool:
        """Every page is in place: the VM no longer needs this server (until a balloon).
        Never where memory is write-protected: a write to a protected page waits for us."""
        return all(s.present.all() and not s.wp for s in self.states.values())

    def install_error(self, dst: int, build: uuid.UUID | None, err: int) -> FcsnapError:
        """The one-line error for an install the kernel refused for a reason that is not
        transient (both paths use it)."""
        origin = "zeros" if build is None else self.pages.diffs[build].path
        return FcsnapError(
            f"installing guest memory at {dst:#x} from {origin} failed: {os.strerror(err)} "
            "(diff file truncated or unreadable?)"
        )

    # -- internals -------------------------------------------------------------------------

    def _source_bounds(self, state: RegionState, page: int, lo: int, hi: int) -> tuple[int, int]:
        """Narrow [lo, hi) around `page` to pages served from one contiguous source run."""
        r = state.region
        size = r.page_size
        offset = r.offset + page * size
        m = self.pages.mappings[self.pages.header.mapping_index(offset)]
        if m.offset > offset or m.end < offset + size:
            return page, page + 1  # the page spans mappings: assembled on its own
        first = -(-(m.offset - r.offset) // size)
        last = (m.end - r.offset) // size
        return max(lo, first), min(hi, last)

    def _zeros(self, state: RegionState, page: int) -> bool:
        """Whether `page` reads zeros from the build (its bytes in a zero mapping)."""
        r = state.region
        offset = r.offset + page * r.page_size
        m = self.pages.mappings[self.pages.header.mapping_index(offset)]
        return m.is_zero and m.end >= offset + r.page_size

    def _written(self, state: RegionState, page: int, outcome: Outcome, writable: bool
                 ) -> Outcome:
        """Note `page` written once a write fault's install of it is done."""
        if writable and outcome is DONE:
            state.written[page] |= writes.WRITTEN
        return outcome

    def _keep_preimage(self, state: RegionState, page: int) -> None:
        """A write is about to reach a page the background checkpoint has yet to copy: keep
        its content (the writer waits on this fault), then clear pending, in that order
        (preimage.py says why)."""
        if self.preimages is not None:
            self.preimages.keep(state.region, page)
        state.pending[page] = 0

    def _unprotect(self, state: RegionState, page: int) -> Outcome:
        """A write-protect fault: the guest writes a page it had only read. Lift the
        protection (waking it) and note the page written."""
        r = state.region
        address = r.base + page * r.page_size
        try:
            abi.writeprotect(self.uffd, address, r.page_size, 0)
        except abi.UffdError as e:
            if e.errno in _OUTCOME_OF_ERRNO:
                return _OUTCOME_OF_ERRNO[e.errno]
            raise FcsnapError(f"lifting the write-protection of guest memory at {address:#x} "
                              f"failed: {os.strerror(e.errno)}") from e
        self.stats.wp_faults += 1
        state.written[page] |= writes.WRITTEN
        return DONE

    def zeros_wp(self, dst: int, length: int, mode: int) -> int:
        """Install `length` bytes of zeros write-protected (UFFDIO_ZEROPAGE has no WP mode,
        and protecting after it would let a write slip in between): copies from the zero
        buffer, a buffer at a time. Returns the bytes installed; UffdError as `abi.copy`,
        its `copied` counting from `dst`."""
        chunk = len(self.zeros) // HUGE_PAGE * HUGE_PAGE  # whole pages of either size
        whole = length <= chunk
        done = 0
        mode |= abi.UFFDIO_COPY_MODE_WP
        try:
            while done < length:
                take = min(chunk, length - done)
                abi.copy(self.uffd, dst + done, self.zeros_addr, take,
                         mode if whole else mode | abi.UFFDIO_COPY_MODE_DONTWAKE)
                done += take
        except abi.UffdError as e:
            e.copied += done
            raise
        if not whole and not mode & abi.UFFDIO_COPY_MODE_DONTWAKE:
            abi.wake(self.uffd, dst, length)
        return done

    def _refault(self, state: RegionState, page: int) -> Outcome:
        """A fault on a page we installed (a second vCPU, or one that faulted while a batch
        went in without waking): it is there, so waking the waiter is all it needs."""
        r = state.region
        self.stats.already_present += 1
        abi.wake(self.uffd, r.base + page * r.page_size, r.page_size)
        return DONE

    def _install(
        self, state: RegionState, lo: int, hi: int, needed: int | None = None,
        wake: bool = True, writable: bool = False,
    ) -> Outcome:
        """One UFFDIO_COPY/ZEROPAGE for pages [lo, hi) of one source run; write-protected in
        a region registered for it unless `writable` (the page a write fault asked for)."""
        r = state.region
        size = r.page_size
        dst = r.base + lo * size
        length = (hi - lo) * size
        mode = 0 if wake else abi.UFFDIO_COPY_MODE_DONTWAKE
        protect = state.wp and not writable
        if state.removed[lo]:
            source_addr, build = None, None
        else:
            source = self.pages.locate(r.offset + lo * size, length)
            source_addr, build = source.address, source.build_id
        try:
            if source_addr is None and protect:
                self.zeros_wp(dst, length, mode)
            elif source_addr is None and size == PAGE:
                abi.zeropage(self.uffd, dst, length, mode)
            else:
                src = self.zeros_addr if source_addr is None else source_addr
                abi.copy(self.uffd, dst, src, length,
                         mode | abi.UFFDIO_COPY_MODE_WP if protect else mode)
            done = length
            outcome = DONE
        except abi.UffdError as e:
            done = e.copied
            if e.errno == errno.EEXIST:
                self.stats.already_present += 1
                state.present[lo + done // size] = True
                outcome = DONE
                if needed is not None and not state.present[needed]:
                    outcome = self._install(state, needed, needed + 1, writable=writable)
            elif e.errno in _OUTCOME_OF_ERRNO:
                outcome = _OUTCOME_OF_ERRNO[e.errno]
            else:
                raise self.install_error(dst, build, e.errno) from e
        self.note_installed(state, lo, done // size, build)
        if outcome is RETRY and needed is not None and state.present[needed]:
            return DONE
        return outcome
