"""Copy sources in a raw diff, with the server's memory bounded while it serves a big guest.

Raw diffs are mmapped so that UFFDIO_COPY copies straight from the page cache. But every page
copied that way stays mapped in the server and counts in its RSS, and the kernel maps the page
cache's large folios whole (up to 2 MiB for one 4 KiB copy) or with fault-around. Left alone,
serving a 4 GiB guest would grow the server by its whole diff. So the 2 MiB chunks of the
mapping that copies used since the last drop are counted, and once DROP_CHUNKS are in use the
whole mapping is dropped (MADV_DONTNEED: our page table entries go, the page cache stays;
dropping unmapped ranges costs next to nothing). Installs are synchronous, so when the next
source is asked for, earlier copies are done.

What this costs was measured against keeping everything mapped: the copies themselves cost the
same (a guest's scattered faults touch each source range once either way), and a drop costs
about 50-80 ns per page it unmaps, a few percent of a fault-around install. Reading scattered
small copies with pread instead of mapping them was measured too, and costs more (a syscall
of ~3 us each against well under 1 us of unmapping).
"""

from __future__ import annotations

import mmap

from fcsnap.store.source import DiffFile
from fcsnap.uffd import abi

CHUNK_SHIFT = 21  # 2 MiB: the largest folio the kernel maps for a file page
DROP_CHUNKS = 16  # chunks mapped between two drops: at most 32 MiB of diff in our RSS


class MappedDiff:
    """One raw diff being served: hands out source addresses for UFFDIO_COPY."""

    def __init__(self, diff: DiffFile) -> None:
        assert diff.map is not None
        self.diff = diff
        self.map = diff.map
        self.base = abi.buffer_address(diff.map)
        self.chunks: set[int] = set()  # chunks copied from since the last drop

    def source(self, storage: int, length: int) -> int:
        """The address holding diff bytes [storage, storage+length), for one copy; raises
        FcsnapError if the file was truncated under us (a copy out of the mapping past the
        cut would install zeros)."""
        self.diff.check_size()
        first, last = storage >> CHUNK_SHIFT, (storage + length - 1) >> CHUNK_SHIFT
        if not (first in self.chunks and last in self.chunks and last - first <= 1):
            self._reserve(first, last)
        return self.base + storage

    def window(self, lo: int, hi: int) -> int | None:
        """The mapping's base address, for copies out of diff bytes [lo, hi) (a batch), or
        None if that range spans more chunks than may be mapped at once."""
        first, last = lo >> CHUNK_SHIFT, (hi - 1) >> CHUNK_SHIFT
        if last - first >= DROP_CHUNKS:
            return None
        self.diff.check_size()
        self._reserve(first, last)
        return self.base

    def _reserve(self, first: int, last: int) -> None:
        """Chunks first..last are about to be copied from: drop the mapping first if they
        would bring more than DROP_CHUNKS into use."""
        new = [c for c in range(first, last + 1) if c not in self.chunks]
        if len(self.chunks) + len(new) > DROP_CHUNKS:
            self.map.madvise(mmap.MADV_DONTNEED)
            self.chunks.clear()
            new = list(range(first, last + 1))
        self.chunks.update(new)
