"""Generation 0 (pack, squash, an import's first build): no parent to compare with, so each
block is zero, a copy of a block stored earlier in this build, or new.

Without a parent's layout to lay runs over, the layout is built as the blocks come (in
ascending order): each new block extends the last data run when it continues it in guest
memory and in storage. No numpy: starting it is a quarter of a whole `fcsnap pack`. The build
is the one the lineage-aware builder (generation.py) writes for the same input, byte for byte.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Protocol

from fcsnap.files import writing
from fcsnap.header import NIL, WRITE_VERSION, Metadata, encode
from fcsnap.header.format import MAPPING
from fcsnap.store.format.hashes import digest, dump_hashes
from fcsnap.store.format.layout import HASHES, HEADER
from fcsnap.store.format.manifest import Stats
from fcsnap.store.operations.blockscan import nonzero_blocks


class Sink(Protocol):
    """Where a build's stored blocks go, in storage order (builder.DiffSink)."""

    stored: int  # bytes taken

    def write(self, pieces: list[memoryview]) -> None: ...

    def close(self) -> int: ...


class FreshBuilder:
    """Accumulates a generation 0's blocks; `finish` writes header and hashes."""

    def __init__(
        self, stage: Path, build_id: uuid.UUID, size: int, block_size: int, sink: Sink,
        store_label: str,
    ) -> None:
        self.stage = stage
        self.store_label = store_label
        self.build_id = build_id
        self.size = size
        self.bs = block_size
        self.blocks = size // block_size
        self.sink = sink
        self.own: dict[bytes, int] = {}  # digest -> slot in this build's diff
        self.digests: list[bytes] = []  # of stored blocks, in storage order
        self.deduplicated = 0
        self.runs: list[tuple[int, int, int]] = []  # (first block, count, first slot), closed
        self.run = (0, 0, 0)  # the run being extended
        self.ancestors_read: list[uuid.UUID] = []  # a generation 0 reads no other build

    def add(self, offset: int, chunk: bytes | memoryview) -> None:
        """Take whole blocks starting at `offset` (block aligned), in ascending order."""
        bs = self.bs
        data = memoryview(chunk)
        found = nonzero_blocks(data, bs)
        if not found:
            return
        first = offset // bs
        own, digests, runs = self.own, self.digests, self.runs
        start, count, slot0 = self.run
        stored = len(digests)
        pieces: list[memoryview] = []
        lo = hi = -1  # the piece of `data` being gathered for the sink: blocks [lo, hi)
        for j in found:
            key = digest(data[j * bs : (j + 1) * bs])
            slot = own.get(key)
            if slot is None:
                slot = own[key] = len(digests)
                digests.append(key)
                if j != hi:
                    if hi >= 0:
                        pieces.append(data[lo * bs : hi * bs])
                    lo = j
                hi = j + 1
            block = first + j
            if block == start + count and slot == slot0 + count and count:
                count += 1
            else:
                if count:
                    runs.append((start, count, slot0))
                start, count, slot0 = block, 1, slot
        self.run = (start, count, slot0)
        self.deduplicated += len(found) - (len(digests) - stored)
        if hi >= 0:
            pieces.append(data[lo * bs : hi * bs])
            self.sink.write(pieces)

    def finish(self, holes_are_zero: bool) -> tuple[Metadata, Stats]:
        """Blocks never added are zeros (a generation 0 has nothing to leave unchanged)."""
        del holes_are_zero  # the same either way
        written = self.sink.close()
        if self.run[1]:
            self.runs.append(self.run)
        bs, own_id = self.bs, self.build_id.bytes
        records: list[bytes] = []
        pos = data_blocks = 0
        for start, count, slot in self.runs:
            if start > pos:
                records.append(MAPPING.pack(pos * bs, (start - pos) * bs, NIL.bytes, 0))
            records.append(MAPPING.pack(start * bs, count * bs, own_id, slot * bs))
            pos = start + count
            data_blocks += count
        if pos < self.blocks:
            records.append(MAPPING.pack(pos * bs, (self.blocks - pos) * bs, NIL.bytes, 0))
        meta = Metadata(WRITE_VERSION, bs, self.size, 0, self.build_id, self.build_id)
        write_sidecars(self.stage, self.store_label, meta, b"".join(records),
                       b"".join(self.digests))
        stored = len(self.digests)
        stats = Stats(
            blocks_total=self.blocks,
            blocks_stored=stored,
            blocks_zero=self.blocks - data_blocks,
            blocks_deduplicated=self.deduplicated,
            blocks_inherited=0,
            bytes_stored=self.sink.stored,
            bytes_written=written,
        )
        return meta, stats


def write_sidecars(stage: Path, store: str, meta: Metadata, records: bytes, digests: bytes) -> None:
    """The new build's header (`records`: its mappings) and hash sidecar, in `stage`."""
    with writing(f"{HEADER} of the new build in store {store}"):
        (stage / HEADER).write_bytes(encode(meta, records))
    with writing(f"{HASHES} of the new build in store {store}"):
        (stage / HASHES).write_bytes(dump_hashes(meta.block_size, digests))
