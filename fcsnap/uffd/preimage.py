"""A background checkpoint's view of guest memory as it was at the pause.

A background checkpoint takes the written set while the VM is paused, write-protects those
pages again, marks the ones present `pending` (RegionState.pending) and lets the VM resume at
once; the pages are then copied from the running guest (guestread.py), off the serving thread.
A write to a pending page meets its protection and waits on a write-protect fault; the server
keeps the page's content (its pre-image: nobody has written it since the pause) in a private
anonymous mapping before lifting the protection (the compiled loop's keep_preimage in
csrc/fastpath.c; Installer._keep_preimage in Python, e.g. for huge pages). No memfd, no
second copy of memory: the mapping is reserved at the size of guest memory and only the pages
kept in it take memory.

Who is right about a page: the server clears `pending` only after the pre-image is kept, and
lifts the protection only after that. So a copy of a page read from the guest is its content
at the pause if the page is still pending once the read has returned (nothing could have
written it meanwhile); otherwise its pre-image is kept, and taken instead. Pending pages stay
pending until the whole copy ends (a huge page is read in parts, and a part read before the
page was written must still be right), so a write during the copy to a page already copied
keeps a pre-image too; either copy is right.

A page in the written set that was not present at the pause (a balloon took it back) read
zeros then: it is not read, since the guest may have faulted and written it since. A balloon
taking back a pending page during the copy loses its pre-image: the checkpoint fails.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Iterable

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.uffd import abi
from fcsnap.uffd.guestread import GuestMemory
from fcsnap.uffd.regions import Region
from fcsnap.units import PAGE

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value, as Python 3.11 lacks it
KEPT, KEEP_ERRNO = 0, 1  # Preimages.counts (csrc/fastpath.h FP_KEPT, FP_KEEP_ERRNO)


class Preimages:
    """The pre-images kept during one background copy, by memory-file offset. `keep` runs on
    the serving thread; everything else on the copier's."""

    def __init__(self, memory: GuestMemory, size: int) -> None:
        self.memory = memory
        self._shadow = mmap.mmap(-1, max(size, PAGE),
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self._view = memoryview(self._shadow)
        self.address = abi.buffer_address(self._shadow)
        # [pages kept, the first errno of a read refused], counted in place by the compiled
        # loop (csrc/fastpath.c keep_preimage) and by `keep`
        self.counts = np.zeros(2, np.int64)
        self.failure: str | None = None  # why the copy can no longer be right
        self._lock = threading.Lock()

    def keep(self, region: Region, page: int) -> None:
        """Keep the content of `region`'s page `page` (still write-protected: it is as at the
        pause). A read the kernel refuses fails the checkpoint, never the VM."""
        size = region.page_size
        try:
            self.memory.read_span(region.base + page * size, size,
                                  self.address + region.offset + page * size)
        except FcsnapError as e:
            self.fail(str(e))
            return
        self.counts[KEPT] += size // PAGE

    @property
    def kept(self) -> int:
        """4 KiB pages whose pre-image was kept."""
        return int(self.counts[KEPT])

    def fail(self, why: str) -> None:
        """Note that the copy cannot be right (the first reason is kept)."""
        with self._lock:
            self.failure = self.failure or why

    def check(self) -> None:
        """FcsnapError (one line) if the copy can no longer be right."""
        if err := int(self.counts[KEEP_ERRNO]):  # a pre-image the compiled loop could not read
            self.fail(self.memory.refusal(err))
        if self.failure is not None:
            raise FcsnapError(f"the checkpoint's background copy failed: {self.failure}")

    def preimage(self, offset: int) -> memoryview:
        return self._view[offset:offset + PAGE]


class PausedMemory:
    """Reads of guest memory as it was at the pause (the module docstring), in the interface
    guest_blocks reads with; at most `rate` bytes a second from the guest (0: no limit)."""

    def __init__(self, preimages: Preimages, pending: Iterable[tuple[Region, np.ndarray]],
                 live: np.ndarray, rate: int = 0) -> None:
        """`pending`: each region and its pending flags; `live`: the ascending offsets of the
        written set's pages present at the pause (the rest read zeros then)."""
        self.preimages = preimages
        self.pending = sorted(pending, key=lambda p: p[0].offset)
        self.live = np.asarray(live, np.int64)
        self.rate = rate
        self._read = 0
        self._started = time.monotonic()

    def read_pages(self, offsets: np.ndarray, into: memoryview, at: int) -> None:
        offsets = np.asarray(offsets, np.int64)
        is_live = np.isin(offsets, self.live, assume_unique=True)
        live = offsets[is_live]
        self._pace(len(live) * PAGE)
        self.preimages.memory.read_pages(live, into, at)
        for offset in live[~self._still_pending(live)].tolist():
            into[offset - at:offset - at + PAGE] = self.preimages.preimage(offset)
        for offset in offsets[~is_live].tolist():
            into[offset - at:offset - at + PAGE] = bytes(PAGE)
        self.preimages.check()

    def check_alive(self) -> None:
        self.preimages.memory.check_alive()
        self.preimages.check()

    def _still_pending(self, offsets: np.ndarray) -> np.ndarray:
        """Per offset: its page is still pending (read after the reads returned)."""
        still = np.zeros(len(offsets), bool)
        for region, flags in self.pending:
            inside = (offsets >= region.offset) & (offsets < region.offset + region.size)
            if inside.any():
                pages = (offsets[inside] - region.offset) // region.page_size
                still[inside] = flags[pages] != 0
        return still

    def _pace(self, length: int) -> None:
        """Wait until reading `length` more bytes keeps within the rate."""
        self._read += length
        if self.rate > 0:
            due = self._started + self._read / self.rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
