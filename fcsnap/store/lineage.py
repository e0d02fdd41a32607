"""What a new generation needs to know of its parent, from the header and hash sidecars only.

A diff never reads the parent's diff data to decide what changed: each block's digest comes from
the sidecar of the build that stores it, found through the parent's header.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.header import Header, load_header
from fcsnap.store.hashes import DIGEST_SIZE, read_hashes, zero_digest
from fcsnap.store.layout import HASHES, build_path
from fcsnap.store.manifest import Manifest, read_manifest


def as_keys(digests: np.ndarray) -> np.ndarray:
    """(n, 16) uint8 digests as a 1-d array of 16-byte keys that sort and compare as a whole."""
    return np.ascontiguousarray(digests).view(f"S{DIGEST_SIZE}").ravel()


class DedupIndex:
    """Every block stored anywhere in a set of builds, searchable by digest in batches."""

    def __init__(self, tables: dict[uuid.UUID, np.ndarray], block_size: int) -> None:
        self.build_ids = list(tables)
        self.block_size = block_size
        keys = [as_keys(t) for t in tables.values()]
        if keys:
            all_keys = np.concatenate(keys)
            owner = np.concatenate([np.full(len(k), i, np.int32) for i, k in enumerate(keys)])
            slot = np.concatenate([np.arange(len(k), dtype=np.int64) for k in keys])
        else:
            all_keys = np.empty(0, f"S{DIGEST_SIZE}")
            owner = np.empty(0, np.int32)
            slot = np.empty(0, np.int64)
        order = np.argsort(all_keys, kind="stable")
        self.keys = all_keys[order]
        self.owner = owner[order]
        self.slot = slot[order]

    def find(self, keys: np.ndarray) -> list[tuple[uuid.UUID, int] | None]:
        """For each key, (build id, storage offset) of a stored copy, or None."""
        if not len(self.keys) or not len(keys):
            return [None] * len(keys)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[pos] == keys
        return [
            (self.build_ids[self.owner[p]], int(self.slot[p]) * self.block_size) if h else None
            for p, h in zip(pos.tolist(), hit.tolist(), strict=True)
        ]


class Parent:
    """A build seen as the base of a diff: its header, manifest, per-block digests, lineage."""

    def __init__(self, build_dir: Path) -> None:
        self.dir = build_dir
        self.store = build_dir.parent
        self.header: Header = load_header(build_dir)
        self.manifest: Manifest = read_manifest(build_dir)
        meta = self.header.metadata
        if (meta.build_id, meta.size, meta.block_size) != (
            self.manifest.build_id, self.manifest.size, self.manifest.block_size
        ):
            raise FcsnapError(f"{build_dir}: build.json and memfile.header disagree")
        self.block_size = bs = meta.block_size
        self.blocks = meta.size // bs
        tables = {b: self._table(b) for b in self.header.build_ids()}
        self.index = DedupIndex(tables, bs)
        self.digests = np.empty((self.blocks, DIGEST_SIZE), np.uint8)
        self.digests[:] = np.frombuffer(zero_digest(bs), np.uint8)
        self.has_data = np.zeros(self.blocks, bool)
        for m in self.header.mappings:
            if m.offset % bs or m.length % bs or m.storage_offset % bs:
                raise FcsnapError(
                    f"{build_dir}: mapping at {m.offset:#x} is not aligned to the block size {bs}"
                )
            if m.is_zero:
                continue
            first, count, slot = m.offset // bs, m.length // bs, m.storage_offset // bs
            table = tables[m.build_id]
            if slot + count > len(table):
                raise FcsnapError(
                    f"build {m.build_id}: header maps block {slot + count - 1} but its hash "
                    f"sidecar holds {len(table)}"
                )
            self.digests[first : first + count] = table[slot : slot + count]
            self.has_data[first : first + count] = True

    def _table(self, build_id: uuid.UUID) -> np.ndarray:
        path = build_path(self.store, build_id) / HASHES
        if not path.parent.is_dir():
            raise FcsnapError(f"build {build_id} referenced by {self.dir.name} is not in the store")
        block_size, table = read_hashes(path)
        if block_size != self.block_size:
            raise FcsnapError(f"{path}: block size {block_size}, lineage uses {self.block_size}")
        return table
