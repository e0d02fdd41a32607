"""Reading a Firecracker memory file in block-aligned chunks, skipping holes.

Holes (lseek SEEK_DATA/SEEK_HOLE) cost nothing to skip. What a hole means is the caller's choice:
in a Full snapshot it is zeros; in a Diff snapshot it is "unchanged since the parent".
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fcsnap.errors import FcsnapError
from fcsnap.files import open_regular
from fcsnap.header import PAGE
from fcsnap.units import format_block_size

if TYPE_CHECKING:
    import numpy as np

CHUNK = 32 << 20
# Bytes a pack or diff reads at a time: small enough that the scan that follows each read (zero
# check, hashes, the write of what is stored) finds the bytes still in the CPU's cache, large
# enough that the per-chunk work of the scan is paid rarely.
SCAN_CHUNK = 1 << 20
PREFETCH_BYTES = 64 << 20
FIRST_BATCH = 4 << 20  # bytes of working-set blocks handed to the builder at a time


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """[start, end) ranges holding data; the whole file if the filesystem cannot tell."""
    ranges: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(0, size)] if size else []
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        pos = end
    return ranges


def block_aligned(
    ranges: list[tuple[int, int]], block_size: int
) -> list[tuple[int, int, int]]:
    """Widen each range to whole blocks and join those that touch: (start, end, data bytes)."""
    out: list[tuple[int, int, int]] = []
    for start, end in ranges:
        lo = start - start % block_size
        hi = -(-end // block_size) * block_size
        if out and lo <= out[-1][1]:
            prev_lo, prev_hi, covered = out[-1]
            out[-1] = (prev_lo, max(prev_hi, hi), covered + end - start)
        else:
            out.append((lo, hi, end - start))
    return out


def consecutive_runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(first, count) of each run of consecutive integers in `values`, in their order (which
    need not be ascending: a run is a value followed by its successor)."""
    import numpy as np  # here and below, not by the module: a pack does not load numpy

    if not len(values):
        return []
    cut = np.flatnonzero(np.diff(values) != 1) + 1
    at = np.concatenate(([0], cut))
    return list(zip(values[at].tolist(), np.diff(at, append=len(values)).tolist(), strict=True))


class MemoryFile:
    """A memory file opened for a pack or diff; checks its size against the block size."""

    def __init__(self, path: Path, block_size: int) -> None:
        self.path = path
        if path.is_dir():
            raise FcsnapError(f"{path} is a directory, not a memory file")
        self.fd = open_regular(path, "memory file")
        self.size = os.fstat(self.fd).st_size
        if self.size == 0:
            self.close()
            raise FcsnapError(f"{path} is empty: not a memory file")
        if self.size % block_size:
            self.close()
            hint = "a Firecracker memory file is whole pages" if block_size == PAGE else (
                "use --block-size 4K for a guest whose memory is not whole 2M hugepages"
            )
            raise FcsnapError(
                f"{path}: size {self.size} is not a multiple of the block size "
                f"{format_block_size(block_size)} ({hint})"
            )
        self.block_size = block_size
        self.nowait = os.RWF_NOWAIT  # read flags; 0 where the filesystem does not support it
        self.ranges = data_ranges(self.fd, self.size)
        self.data_bytes = sum(end - start for start, end in self.ranges)
        # All data by lseek, yet fewer bytes allocated: a filesystem that cannot tell holes
        # (Linux's generic SEEK_DATA: NFSv3, 9p, older FUSE), whose holes read as zeros.
        self.allocated = os.fstat(self.fd).st_blocks * 512
        self.holes_hidden = self.ranges == [(0, self.size)] and self.allocated < self.size

    def hole_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """(first block, count) of each run of blocks holding any hole byte: what a Full
        snapshot has as zeros and a Diff snapshot as unchanged."""
        import numpy as np

        bs = self.block_size
        covered = np.array(self.ranges, np.int64).reshape(-1, 2)
        lo, hi = -(-covered[:, 0] // bs), covered[:, 1] // bs  # blocks wholly in data
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        start = np.concatenate(([0], hi))
        count = np.concatenate((lo, [self.size // bs])) - start
        return start[count > 0], count[count > 0]

    def chunks(
        self,
        fill_holes: Callable[[int, int], bytes] | None = None,
        chunk_bytes: int = SCAN_CHUNK,
    ) -> Iterator[tuple[int, memoryview]]:
        """Yield (offset, bytes) for every block that holds data, in ascending order.

        A block only partly covered by data gets its hole parts from fill_holes(offset, length)
        when given (Diff snapshots: the parent's bytes), else zeros. The yielded memoryview is
        reused: consume it before the next iteration.
        """
        bs = self.block_size
        aligned = block_aligned(self.ranges, bs)
        chunk_bytes = max(bs, chunk_bytes - chunk_bytes % bs)
        # No bigger than the largest range: a sparse Diff file's ranges are often one page.
        chunk_bytes = min(chunk_bytes, max((hi - lo for lo, hi, _ in aligned), default=0))
        view = memoryview(bytearray(chunk_bytes))
        asked = 0  # data before this offset has been asked for (see _read)
        for lo, hi, covered in aligned:
            partial = covered < hi - lo
            for start in range(lo, hi, chunk_bytes):
                part = view[: min(chunk_bytes, hi - start)]
                asked = self._read(part, start, aligned, asked)
                if partial and fill_holes is not None:
                    self._fill(part, start, fill_holes)
                yield start, part

    def working_set(
        self, offsets: np.ndarray, fill_holes: Callable[[int, int], bytes] | None = None
    ) -> Iterator[tuple[np.ndarray, memoryview]]:
        """The blocks holding the guest pages at `offsets` (a working set, in fault order),
        in that order, each block once (its first page decides where): batches of (block
        numbers, their bytes), for a build that stores them first and contiguously.

        Blocks wholly in holes are left out: a hole is zeros or "unchanged", never stored, and
        the memory-order pass decides which. Partly covered blocks are completed as `chunks`
        does. Each batch's reads are announced (WILLNEED) first, so a cold file serves these
        scattered blocks in parallel. The yielded memoryview is reused, as in `chunks`.
        """
        import numpy as np

        if not self.ranges:
            return
        bs = self.block_size
        blocks = np.asarray(offsets, np.int64) // bs
        _, first = np.unique(blocks, return_index=True)
        blocks = blocks[np.sort(first)]
        starts, ends = np.array(self.ranges, np.int64).reshape(-1, 2).T
        i = np.searchsorted(ends, blocks * bs, "right")  # the first range ending after it
        inside = i < len(ends)
        i = np.minimum(i, len(ends) - 1)
        has_data = inside & (starts[i] < (blocks + 1) * bs)
        whole = (starts[i] <= blocks * bs) & (ends[i] >= (blocks + 1) * bs)
        blocks, whole = blocks[has_data], whole[has_data]
        per_batch = max(1, FIRST_BATCH // bs)
        view = memoryview(bytearray(min(len(blocks), per_batch) * bs))
        for lo in range(0, len(blocks), per_batch):
            batch = blocks[lo : lo + per_batch]
            runs = consecutive_runs(batch)
            for start, count in runs:
                os.posix_fadvise(self.fd, start * bs, count * bs, os.POSIX_FADV_WILLNEED)
            pos = 0
            for start, count in runs:
                part = view[pos * bs : (pos + count) * bs]
                if os.preadv(self.fd, [part], start * bs) != len(part):
                    raise FcsnapError(f"{self.path}: short read at {start * bs:#x} (file changed?)")
                pos += count
            if fill_holes is not None:
                for j in np.flatnonzero(~whole[lo : lo + per_batch]).tolist():
                    self._fill(view[j * bs : (j + 1) * bs], int(batch[j]) * bs, fill_holes)
            yield batch, view[: len(batch) * bs]

    def blocks(self, offsets: np.ndarray) -> Iterator[tuple[np.ndarray, memoryview]]:
        """The blocks holding the pages at `offsets` (a written set), ascending, in batches of
        (block numbers, their bytes) of at most CHUNK bytes, runs of neighbours in one read: a
        diff of them reads what the guest wrote, not the whole file. A Full memory file's
        holes read as the zeros they stand for. Reads are tried on the page cache alone
        first; at the first it cannot serve, the rest of the batch is announced (WILLNEED),
        so a cold file serves the scattered blocks in parallel. The memoryview is reused."""
        import numpy as np

        bs = self.block_size
        blocks = np.sort(np.asarray(offsets, np.int64) // bs)
        if not len(blocks):
            return
        blocks = blocks[np.append(True, blocks[1:] != blocks[:-1])]  # distinct, no np.unique
        per_batch = max(1, CHUNK // bs)
        view = memoryview(bytearray(min(len(blocks), per_batch) * bs))
        for lo in range(0, len(blocks), per_batch):
            batch = blocks[lo : lo + per_batch]
            runs = consecutive_runs(batch)
            pos = 0
            announced = False
            for k, (start, count) in enumerate(runs):
                part = view[pos * bs : (pos + count) * bs]
                got = self._cached(part, start * bs)
                if got < len(part):
                    if not announced:
                        for s, n in runs[k:]:
                            os.posix_fadvise(self.fd, s * bs, n * bs, os.POSIX_FADV_WILLNEED)
                        announced = True
                    got += os.preadv(self.fd, [part[got:]], start * bs + got)
                if got != len(part):
                    raise FcsnapError(f"{self.path}: short read at {start * bs:#x} (file changed?)")
                pos += count
            yield batch, view[: len(batch) * bs]

    def _cached(self, part: memoryview, start: int) -> int:
        """Bytes of `part` read from `start` without waiting for the disk: what the page
        cache holds (all of it where the filesystem cannot tell: plain reads from then on)."""
        try:
            return os.preadv(self.fd, [part], start, self.nowait)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self.nowait = 0
            return 0

    def _read(
        self, part: memoryview, start: int, aligned: list[tuple[int, int, int]], asked: int
    ) -> int:
        """Fill `part` from `start`; returns the new `asked`.

        A read the page cache can serve is one syscall. One that it cannot (a cold file) first
        asks the kernel for the data ranges ahead (WILLNEED starts the reads and returns), so
        the scattered pages of a Diff snapshot come in parallel rather than one disk round trip
        each; at most PREFETCH_BYTES are asked for ahead of the reads.
        """
        got = self._cached(part, start)
        if got < len(part):
            pos = start + got
            if asked < pos + PREFETCH_BYTES // 2:
                asked = self._prefetch(aligned, max(pos, asked))
            got += os.preadv(self.fd, [part[got:]], pos)
        if got != len(part):
            raise FcsnapError(f"{self.path}: short read at {start:#x} (file changed?)")
        return asked

    def _prefetch(self, aligned: list[tuple[int, int, int]], start: int) -> int:
        """WILLNEED for PREFETCH_BYTES of data from `start`; returns where the request ends."""
        budget = PREFETCH_BYTES
        first = max(0, bisect.bisect_right(aligned, start, key=lambda r: r[0]) - 1)
        for lo, hi, _ in aligned[first:]:
            lo = max(lo, start)
            if lo < hi:
                n = min(hi - lo, budget)
                os.posix_fadvise(self.fd, lo, n, os.POSIX_FADV_WILLNEED)
                budget -= n
                if not budget:
                    return lo + n
        return aligned[-1][1]

    def _fill(self, part: memoryview, start: int, fill: Callable[[int, int], bytes]) -> None:
        """Replace the hole parts of a chunk (they read as zeros) with the caller's bytes."""
        end = start + len(part)
        pos = start
        first = max(0, bisect.bisect_right(self.ranges, (start, start)) - 1)
        for r_start, r_end in self.ranges[first:]:
            if r_start >= end:
                break
            if r_end <= start:
                continue
            if r_start > pos:
                part[pos - start : r_start - start] = fill(pos, r_start - pos)
            pos = max(pos, r_end)
        if pos < end:
            part[pos - start :] = fill(pos, end - pos)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
