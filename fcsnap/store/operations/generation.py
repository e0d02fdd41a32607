"""A generation over a parent (diff, a checkpoint, an import's later builds), or a generation 0
laid out with a working set first: scan blocks, drop zeros, dedup against the lineage, store
what changed.

Blocks are classified in batches with numpy (the parent's layout and digests are arrays: a
parent late in a lineage has tens of thousands of mappings, and a 1%-dirty sparse diff has to
cost a small fraction of a full scan). A plain generation 0 is fresh.py's job, without numpy.
"""

from __future__ import annotations

import uuid
from itertools import compress
from pathlib import Path

import numpy as np

from fcsnap.header import WRITE_VERSION, ZEROS, Metadata
from fcsnap.store.format.hashes import DIGEST_SIZE, digest
from fcsnap.store.format.lineage import Parent, Runs
from fcsnap.store.format.manifest import Stats
from fcsnap.store.operations.blockscan import nonzero_blocks
from fcsnap.store.operations.fresh import Sink, write_sidecars
from fcsnap.store.operations.scan import consecutive_runs

# Chunks smaller than this (the data ranges of a sparse Diff file, often one page each) are
# gathered into batches, so numpy's fixed cost per call is paid per batch, not per range.
GATHER_BELOW = 256 << 10
GATHER_BYTES = 4 << 20


class GenerationBuilder:
    """Accumulates one generation's blocks; `finish` writes header, hashes and manifest.

    Only blocks that differ from the parent are recorded (block, owner, slot arrays); at the end
    their runs are laid over the parent's, so the cost follows the changes and the parent's
    mapping count, not the size of guest memory.
    """

    def __init__(
        self, stage: Path, build_id: uuid.UUID, size: int, parent: Parent | None,
        block_size: int, sink: Sink, store_label: str,
    ) -> None:
        self.stage = stage
        self.store_label = store_label
        self.build_id = build_id
        self.size = size
        self.parent = parent
        self.bs = block_size
        self.blocks = size // self.bs
        self.sink = sink
        self.build_ids = [*parent.build_ids, build_id] if parent else [build_id]
        self.me = len(self.build_ids) - 1
        empty = np.zeros(0, np.int64)
        self.changes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(empty, empty, empty)]
        self.spans: list[tuple[int, int]] = []  # (offset, length) of every chunk added
        self.own: dict[bytes, int] = {}  # digest -> slot in this build's diff
        self.digests: list[bytes] = []  # of stored blocks, in storage order
        self.deduplicated = 0
        # np.empty, not bytearray: only the pages that small chunks use get touched.
        self.gather = memoryview(np.empty(GATHER_BYTES, np.uint8))
        self.filled = 0
        self.gather_from = 0  # spans[gather_from:] are in `gather`
        self.taken: np.ndarray | None = None  # blocks `add_first` classified, if it was used
        self.ancestors_read: list[uuid.UUID] = []  # other builds the header reads (by finish)

    def add_first(self, blocks: np.ndarray, data: memoryview) -> None:
        """Take `blocks` (any order, held in that order by `data`) before the memory-order
        pass: those this build stores get the next storage slots in this order, so a working
        set added here first is laid out contiguously in fault order. `add` then passes over
        them (they still count for the chunks it covers, so holes keep their meaning)."""
        if self.taken is None:
            self.taken = np.zeros(self.blocks, bool)
        self._scan(blocks, data)
        self.taken[blocks] = True

    def add(self, offset: int, chunk: bytes | memoryview) -> None:
        """Take whole blocks starting at `offset` (block aligned), in ascending order."""
        n = len(chunk)
        if n >= GATHER_BELOW:
            self._flush()
            self.spans.append((offset, n))
            self.gather_from = len(self.spans)
            first = offset // self.bs
            self._scan(np.arange(first, first + n // self.bs), memoryview(chunk))
            return
        if self.filled + n > GATHER_BYTES:
            self._flush()
        self.gather[self.filled : self.filled + n] = chunk
        self.filled += n
        self.spans.append((offset, n))

    def _flush(self) -> None:
        """Scan the gathered chunks (spans[gather_from:]) as one batch."""
        if self.filled:
            spans = np.array(self.spans[self.gather_from :], np.int64) // self.bs
            first, count = spans[:, 0], spans[:, 1]
            blocks = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(count.sum())
            self._scan(blocks, self.gather[: self.filled])
            self.filled = 0
        self.gather_from = len(self.spans)

    def _scan(self, blocks: np.ndarray, data: memoryview) -> None:
        """Classify the blocks `blocks`, held in order by `data`: unchanged, zero, found in the
        lineage or earlier in this build (deduplicated), or new (stored)."""
        bs = self.bs
        parent = self.parent
        nonzero = np.zeros(len(blocks), bool)
        nonzero[nonzero_blocks(data, bs)] = True
        zero = ~nonzero
        if self.taken is not None:  # classified already by add_first
            fresh_blocks = ~self.taken[blocks]
            nonzero &= fresh_blocks
            zero &= fresh_blocks
        if parent is not None:  # zeros change something only where the parent has data
            zeros = blocks[zero]
            self._record(zeros[parent.owners(zeros) != ZEROS], ZEROS, 0)
        pos = np.flatnonzero(nonzero)
        keys = [digest(data[j * bs : (j + 1) * bs]) for j in pos.tolist()]
        if parent is not None and keys:
            new = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, DIGEST_SIZE)
            changed = (new != parent.digests(blocks[pos])).any(axis=1)
            owner, slot = parent.index.find(new[changed])
            found = owner != ZEROS
            self._record(blocks[pos[changed][found]], owner[found], slot[found])
            self.deduplicated += int(found.sum())
            fresh = changed.copy()
            fresh[changed] = ~found
            pos = pos[fresh]
            keys = list(compress(keys, fresh.tolist()))
        if not keys:
            return
        # setdefault hands a digest not seen before the next free slot, a known one its slot.
        before = len(self.own)
        slots = np.array([self.own.setdefault(k, len(self.own)) for k in keys], np.int64)
        self._record(blocks[pos], self.me, slots)
        # Slots are handed out in increasing order, so a slot's first use is where it exceeds
        # every slot before it (and `before - 1`, the last slot of earlier batches).
        first_use = np.flatnonzero(slots > np.maximum.accumulate(np.append(before - 1, slots))[:-1])
        self.deduplicated += len(keys) - len(first_use)
        if len(first_use):
            self.digests.extend(keys[i] for i in first_use.tolist())
            runs = consecutive_runs(pos[first_use])
            self.sink.write([data[a * bs : (a + n) * bs] for a, n in runs])

    def _record(self, blocks: np.ndarray, owner: int | np.ndarray, slot: int | np.ndarray) -> None:
        """Blocks `blocks` now hold block `slot` of build number `owner`."""
        n = len(blocks)
        if n:
            self.changes.append((blocks, np.broadcast_to(owner, n), np.broadcast_to(slot, n)))

    def finish(self, holes_are_zero: bool) -> tuple[Metadata, Stats]:
        """Blocks never added are zeros (Full snapshot) or unchanged (Diff snapshot)."""
        self._flush()
        written = self.sink.close()
        parent = self.parent
        layout = parent.runs if parent else Runs.zeros(self.blocks)
        if holes_are_zero and parent:
            layout = self._holes().over(layout, self.blocks)
        blocks, owner, slot = (np.concatenate(c) for c in zip(*self.changes, strict=True))
        order = np.argsort(blocks)
        layout = Runs.of_blocks(blocks[order], owner[order], slot[order]).over(layout, self.blocks)
        meta = Metadata(
            WRITE_VERSION, self.bs, self.size,
            parent.metadata.generation + 1 if parent else 0,
            self.build_id,
            parent.metadata.base_build_id if parent else self.build_id,
        )
        write_sidecars(self.stage, self.store_label, meta,
                       layout.records(self.build_ids, self.bs).tobytes(), b"".join(self.digests))
        # np.flatnonzero(np.bincount()), not np.unique: numpy's unique imports numpy.ma.
        used = np.flatnonzero(np.bincount(layout.owner[layout.owner >= 0])).tolist()
        self.ancestors_read = [self.build_ids[i] for i in used if i != self.me]
        stored = len(self.digests)
        zero_blocks = int(layout.count[layout.owner == ZEROS].sum())
        stats = Stats(
            blocks_total=self.blocks,
            blocks_stored=stored,
            blocks_zero=zero_blocks,
            blocks_deduplicated=self.deduplicated,
            blocks_inherited=self.blocks - stored - self.deduplicated - zero_blocks,
            bytes_stored=self.sink.stored,
            bytes_written=written,
        )
        return meta, stats

    def _holes(self) -> Runs:
        """Zero runs over the gaps between the chunks added."""
        spans = np.array(self.spans, np.int64).reshape(-1, 2) // self.bs
        start = np.concatenate(([0], spans[:, 0] + spans[:, 1]))
        count = np.concatenate((spans[:, 0], [self.blocks])) - start
        start, count = start[count > 0], count[count > 0]
        return Runs(start, count, np.full(len(start), ZEROS, np.int32), np.zeros_like(start))
