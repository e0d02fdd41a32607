"""Copy sources in a raw diff, with the server's memory bounded while it serves a big guest.

Raw diffs are mmapped so that UFFDIO_COPY copies straight from the page cache. But every page
copied that way stays mapped in the server and counts in its RSS, and the kernel maps the page
cache's folios whole (up to 2 MiB for one 4 KiB copy) or with fault-around. Left alone,
serving a 4 GiB guest would grow the server by its whole diff. So:

- the 2 MiB chunks of the mapping that copies used since the last drop are counted, and once
  the diff's share of the budget (`restore --cache-mb`, the memory the server may spend on
  diff data) is in use, the whole mapping is dropped (MADV_DONTNEED: our page table entries
  go, the page cache stays; unmapped ranges cost next to nothing to drop). A diff that fits
  in its share is simply mapped: nothing to count, nothing to drop;
- a copy of up to READ_BELOW bytes from a chunk not mapped is read with pread into a buffer
  instead, unless it continues a recent read: a guest's scattered faults would otherwise map,
  and soon unmap again, a folio for each, which measured slower than the extra copy, while
  streaming copies (a guest reading in order, populate, a working-set prefetch) are worth
  mapping.

Installs are synchronous, so when the next source is asked for, earlier copies are done and
the mapping (or the buffer) can be reused. The state is kept in arrays that the compiled fault
path (csrc/fastpath.c, `diff_source`) reads and updates the same way.
"""

from __future__ import annotations

import mmap
import os
from array import array

from fcsnap.errors import FcsnapError
from fcsnap.store.format.source import DiffFile
from fcsnap.uffd import abi

CHUNK_SHIFT = 21  # 2 MiB: the largest folio the kernel maps for a file page
READ_BELOW = 256 << 10  # scattered copies up to this size are read, not mapped
RECENT_ENDS = 8  # where recent reads ended: a copy starting at one of them is streaming


class MappedDiff:
    """One raw diff being served: hands out source addresses for UFFDIO_COPY, keeping at
    most `budget_bytes` (rounded up to a 2 MiB chunk) of the diff mapped."""

    def __init__(self, diff: DiffFile, budget_bytes: int) -> None:
        assert diff.map is not None
        self.diff = diff
        self.map = diff.map
        self.base = abi.buffer_address(diff.map)
        self.limit = max(1, -(-budget_bytes >> CHUNK_SHIFT))
        self.fits = (diff.size - 1) >> CHUNK_SHIFT < self.limit  # every chunk at once
        # Plain arrays, which C updates in place.
        self.chunks = array("B", bytes(((diff.size - 1) >> CHUNK_SHIFT) + 1))  # since the drop
        self.counters = array("q", [0, 0])  # [chunks in use, next slot in `ends`]
        self.ends = array("q", [-1] * RECENT_ENDS)  # where recent reads ended
        # Resident only once used (a daemon has one per VM and raw diff).
        self.buffer = mmap.mmap(-1, READ_BELOW, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.buffer)
        self.buffer_address = abi.buffer_address(self.buffer)

    def source(self, storage: int, length: int) -> int:
        """The address holding diff bytes [storage, storage+length), valid until the next
        call; raises FcsnapError if the file was truncated under us (a copy out of the
        mapping past the cut would install zeros; a short read says so itself)."""
        first, last = storage >> CHUNK_SHIFT, (storage + length - 1) >> CHUNK_SHIFT
        chunks = self.chunks
        if self.fits or (chunks[first] and chunks[last] and last - first <= 1):
            self.diff.check_size()
            return self.base + storage
        if length <= READ_BELOW and storage not in self.ends:
            slot = int(self.counters[1])
            self.ends[slot] = storage + length
            self.counters[1] = (slot + 1) % RECENT_ENDS
            return self._read(storage, length)
        self.diff.check_size()
        self._reserve(first, last)
        return self.base + storage

    def window(self, lo: int, hi: int) -> int | None:
        """The mapping's base address, for copies out of diff bytes [lo, hi) (a batch), or
        None if that range spans more chunks than may be mapped at once."""
        first, last = lo >> CHUNK_SHIFT, (hi - 1) >> CHUNK_SHIFT
        if last - first >= self.limit:
            return None
        self.diff.check_size()
        if not self.fits:
            self._reserve(first, last)
        return self.base

    def _reserve(self, first: int, last: int) -> None:
        """Chunks first..last are about to be copied from: drop the mapping first if they
        would bring more than the budget into use."""
        chunks = memoryview(self.chunks)  # writes through: C holds the same buffer
        if self.counters[0] + chunks[first : last + 1].tolist().count(0) > self.limit:
            self.map.madvise(mmap.MADV_DONTNEED)
            chunks[:] = bytes(len(chunks))
            self.counters[0] = 0
        self.counters[0] += chunks[first : last + 1].tolist().count(0)
        chunks[first : last + 1] = b"\x01" * (last + 1 - first)

    def _read(self, storage: int, length: int) -> int:
        if os.preadv(self.diff.fd, [self.view[:length]], storage) != length:
            raise FcsnapError(f"{self.diff.path}: truncated (short read at {storage:#x})")
        return self.buffer_address
