"""What a new generation needs to know of its parent, from the header and hash sidecars only.

A diff never reads the parent's diff data to decide what changed: each block's digest comes from
the sidecar of the build that stores it, found through the parent's header.

Headers are handled here as numpy arrays, not Mapping objects: a parent late in a lineage has
tens of thousands of mappings, and a 1%-dirty sparse diff has to cost a small fraction of a full
scan, so nothing may take Python work per mapping or per block of guest memory. A generation's
layout is a `Runs`: its mappings counted in blocks, with builds numbered by small integers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.header import NIL, ZEROS, Metadata, decode
from fcsnap.header.format import MAPPING
from fcsnap.store.format.hashes import DIGEST_SIZE, parse_hashes, sidecar_pin, zero_digest
from fcsnap.store.format.layout import HASHES, HEADER, build_path, store_of
from fcsnap.store.format.manifest import Manifest, read_manifest

# One mapping record (docs/FORMAT.md §3.1) as a numpy dtype: the same 40 bytes, no padding.
RECORD = np.dtype([("offset", "<u8"), ("length", "<u8"), ("build_id", "V16"), ("storage", "<u8")])
assert RECORD.itemsize == MAPPING.size


def is_nil(records: np.ndarray) -> np.ndarray:
    """Which records map zeros."""
    return records["build_id"] == np.void(NIL.bytes)


def header_records(path: Path) -> tuple[Metadata, np.ndarray]:
    """A header file's metadata and its mappings as a RECORD array (read and checked by the
    one header decoder)."""
    meta, raw = decode(read_regular(path, "header"), str(path))
    return meta, np.frombuffer(raw, RECORD)


@dataclass(frozen=True)
class Runs:
    """Runs of blocks, ascending and non-overlapping: blocks [start, start + count) are blocks
    [slot, slot + count) of the diff of build number `owner` (ZEROS: zeros, slot 0)."""

    start: np.ndarray
    count: np.ndarray
    owner: np.ndarray
    slot: np.ndarray

    @classmethod
    def of_blocks(cls, blocks: np.ndarray, owner: np.ndarray, slot: np.ndarray) -> Runs:
        """Join ascending blocks that continue each other in guest memory and in storage."""
        n = len(blocks)
        breaks = np.ones(n, bool)
        breaks[1:] = (blocks[1:] != blocks[:-1] + 1) | (owner[1:] != owner[:-1])
        breaks[1:] |= (owner[1:] != ZEROS) & (slot[1:] != slot[:-1] + 1)
        at = np.flatnonzero(breaks)
        return cls(blocks[at], np.diff(at, append=n), owner[at], slot[at])

    @classmethod
    def zeros(cls, blocks: int) -> Runs:
        return cls(np.array([0]), np.array([blocks]), np.array([ZEROS], np.int32), np.array([0]))

    def locate(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, slot) of each block; the runs must cover them."""
        i = np.searchsorted(self.start, blocks, "right") - 1
        owner = self.owner[i]
        return owner, np.where(owner == ZEROS, 0, self.slot[i] + (blocks - self.start[i]))

    def data_blocks_in(self, start: np.ndarray, count: np.ndarray) -> int:
        """How many blocks of the ranges [start, start + count) (ascending, not overlapping)
        these runs map to data, not zeros: no Python work per range or per block."""
        data = self.owner != ZEROS
        lo, n = self.start[data], self.count[data]
        if not len(lo) or not len(start):
            return 0
        before = np.concatenate(([0], np.cumsum(n)))  # data blocks ahead of each data run

        def below(x: np.ndarray) -> np.ndarray:
            """Data blocks ahead of block x."""
            i = np.searchsorted(lo, x, "right") - 1
            j = np.maximum(i, 0)
            return np.where(i >= 0, before[j] + np.clip(x - lo[j], 0, n[j]), 0)

        return int((below(start + count) - below(start)).sum())

    def over(self, below: Runs, blocks: int) -> Runs:
        """These runs laid over `below`, which covers [0, blocks): cut both at every boundary,
        take each piece from the top where it has one, then join (docs/FORMAT.md §3.4's normal
        form: same build, and for data, storage that continues)."""
        cuts = np.sort(np.concatenate((below.start, self.start, self.start + self.count)))
        cuts = cuts[np.diff(cuts, prepend=-1) > 0]  # np.unique, but faster (no hashing)
        cuts = cuts[cuts < blocks]
        owner, slot = below.locate(cuts)
        if len(self.start):
            top = np.searchsorted(self.start, cuts, "right") - 1
            on = top >= 0
            on[on] = cuts[on] < self.start[top[on]] + self.count[top[on]]
            top = top[on]
            owner[on] = self.owner[top]
            slot[on] = self.slot[top] + (cuts[on] - self.start[top])
        slot[owner == ZEROS] = 0
        count = np.diff(cuts, append=blocks)
        joins = np.zeros(len(cuts), bool)
        joins[1:] = (owner[1:] == owner[:-1]) & (
            (owner[1:] == ZEROS) | (slot[1:] == slot[:-1] + count[:-1])
        )
        at = np.flatnonzero(~joins)
        return Runs(cuts[at], np.add.reduceat(count, at), owner[at], slot[at])

    def records(self, build_ids: list[uuid.UUID], block_size: int) -> np.ndarray:
        ids = np.array([b.bytes for b in build_ids] + [NIL.bytes], "V16")  # ZEROS finds NIL
        records = np.empty(len(self.start), RECORD)
        records["offset"] = self.start * block_size
        records["length"] = self.count * block_size
        records["build_id"] = ids[self.owner]
        records["storage"] = self.slot * block_size
        return records


class DedupIndex:
    """Every block stored in a set of builds, searchable by digest in batches.

    `digests` holds the builds' sidecars one after another, build i's from row first_row[i].
    Sorted on the digests' first 8 bytes (a fast integer sort), a match confirmed on all 16: a
    prefix shared by two digests can only cost a missed dedup, never a wrong one.
    """

    def __init__(self, digests: np.ndarray, first_row: np.ndarray) -> None:
        self.digests = digests
        self.first_row = first_row
        self.order = np.argsort(_prefix(digests))
        self.prefix = _prefix(digests)[self.order]

    def find(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, slot) of a stored copy of each digest; owner is ZEROS where there is none."""
        owner = np.full(len(digests), ZEROS, np.int32)
        slot = np.zeros(len(digests), np.int64)
        if len(self.prefix) and len(digests):
            pos = np.minimum(np.searchsorted(self.prefix, _prefix(digests)), len(self.prefix) - 1)
            row = self.order[pos]
            hit = (self.digests[row] == digests).all(axis=1)
            owner[hit] = np.searchsorted(self.first_row, row[hit], "right") - 1
            slot[hit] = row[hit] - self.first_row[owner[hit]]
        return owner, slot


def _number_builds(column: np.ndarray, nil: np.ndarray) -> tuple[list[uuid.UUID], np.ndarray]:
    """The distinct build ids of a record array's build_id column, and each record's number
    among them (ZEROS for nil). np.unique does the same, several times slower."""
    words = np.ascontiguousarray(column).view("<u8").reshape(-1, 2)
    order = np.lexsort((words[:, 1], words[:, 0]))
    ordered = words[order]
    first = np.ones(len(order), bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    owner = np.empty(len(order), np.int32)
    owner[order] = np.cumsum(first) - 1
    ids = [uuid.UUID(bytes=w.tobytes()) for w in ordered[first]]
    if nil.any():  # NIL, all zero bytes, sorts first
        ids.pop(0)
        owner -= 1
    return ids, owner


def _prefix(digests: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(digests).view("<u8")[:, 0]


class Parent:
    """A build seen as the base of a diff: its metadata, manifest, runs and lineage's blocks."""

    def __init__(self, build_dir: Path) -> None:
        self.dir = build_dir
        self.store = store_of(build_dir)
        self.manifest: Manifest = read_manifest(build_dir)
        path = build_dir / HEADER
        self.metadata, records = header_records(path)
        meta = self.metadata
        if (meta.build_id, meta.size, meta.block_size) != (
            self.manifest.build_id, self.manifest.size, self.manifest.block_size
        ):
            raise FcsnapError(f"{build_dir}: build.json and memfile.header disagree")
        self.size = meta.size
        self.block_size = bs = meta.block_size
        nil = is_nil(records)
        storage = np.where(nil, 0, records["storage"])
        misaligned = (records["offset"] | records["length"] | storage) % bs != 0
        if misaligned.any():
            at = int(records["offset"][np.argmax(misaligned)])
            raise FcsnapError(
                f"{build_dir}: mapping at {at:#x} is not aligned to the block size {bs}"
            )
        self.build_ids, owner = _number_builds(records["build_id"], nil)
        self.pins: dict[uuid.UUID, str] = {}  # of the sidecars read, for the child's build.json
        tables = [self._table(b) for b in self.build_ids]
        self.runs = Runs(
            (records["offset"] // bs).astype(np.int64),
            (records["length"] // bs).astype(np.int64),
            owner,
            (storage // bs).astype(np.int64),
        )
        sizes = np.array([len(t) for t in tables] + [0])
        short = (owner != ZEROS) & (self.runs.slot + self.runs.count > sizes[owner])
        if short.any():
            i = int(np.argmax(short))
            raise FcsnapError(
                f"build {self.build_ids[owner[i]]}: header maps block "
                f"{self.runs.slot[i] + self.runs.count[i] - 1} but its hash sidecar holds "
                f"{sizes[owner[i]]}"
            )
        # Every sidecar in one table, then the zero digest: first_row ends with the row count,
        # so owner ZEROS (-1, slot 0) finds the zero digest.
        self._digests = np.concatenate(
            [*tables, np.frombuffer(zero_digest(bs), np.uint8).reshape(1, DIGEST_SIZE)]
        )
        self._first_row = np.cumsum([0, *sizes[:-1]])
        self.index = DedupIndex(self._digests[:-1], self._first_row)

    def owners(self, blocks: np.ndarray) -> np.ndarray:
        """The build number holding each block (ZEROS for zeros)."""
        return self.runs.locate(blocks)[0]

    def digests(self, blocks: np.ndarray) -> np.ndarray:
        """The (n, 16) digests of the parent's content at `blocks`."""
        owner, slot = self.runs.locate(blocks)
        return self._digests[self._first_row[owner] + slot]

    def _table(self, build_id: uuid.UUID) -> np.ndarray:
        path = build_path(self.store, build_id) / HASHES
        if not path.parent.is_dir():
            raise FcsnapError(f"build {build_id} referenced by {self.dir.name} is not in the store")
        sidecar = read_regular(path, "hash sidecar")
        self.pins[build_id] = sidecar_pin(sidecar)
        block_size, table = parse_hashes(sidecar, str(path))
        if block_size != self.block_size:
            raise FcsnapError(f"{path}: block size {block_size}, lineage uses {self.block_size}")
        return table
