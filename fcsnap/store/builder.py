"""Writing one generation: scan blocks, drop zeros, dedup, store what changed, publish atomically.

pack (generation 0), diff (generation N+1) and squash (a flat generation 0 of an existing
generation) are the same pipeline fed from different sources.
"""

from __future__ import annotations

import datetime
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fcsnap import __version__
from fcsnap.errors import FcsnapError
from fcsnap.header import NIL, WRITE_VERSION, Header, Mapping, Metadata, merge, runs_for_blocks
from fcsnap.header.format import dump_header, validate
from fcsnap.store.hashes import DIGEST_SIZE, digest, dump_hashes, zero_digest
from fcsnap.store.layout import (
    DIFF_RAW,
    DIFF_ZSTD,
    HASHES,
    HEADER,
    SNAPFILE,
    check_vm_name,
    set_vm_pointer,
    staged_build,
)
from fcsnap.store.lineage import Parent, as_keys
from fcsnap.store.manifest import Manifest, Stats, write_manifest
from fcsnap.store.seekable import SeekableWriter

Progress = Callable[[int], None]


@dataclass(frozen=True)
class BuildOptions:
    block_size: int = 4096
    compression: str = "none"  # "none" or "zstd"
    level: int = 3
    frame_size: int = 256 << 10
    name: str | None = None
    vmstate: Path | None = None
    source: str = ""


class DiffSink:
    """The diff file being written: raw, or zstd seekable frames compressed on both cores."""

    def __init__(self, stage: Path, options: BuildOptions) -> None:
        name = DIFF_ZSTD if options.compression == "zstd" else DIFF_RAW
        self.file: BinaryIO = open(stage / name, "wb")  # noqa: SIM115 (closed in close())
        self.zstd = (
            SeekableWriter(self.file, options.frame_size, options.level)
            if options.compression == "zstd"
            else None
        )
        self.stored = 0

    def write(self, data: bytes | memoryview) -> None:
        self.stored += len(data)
        if self.zstd is not None:
            self.zstd.write(data)
        else:
            self.file.write(data)

    def close(self) -> int:
        """Finish the file; returns its size on disk."""
        if self.zstd is not None:
            self.zstd.close()
        self.file.flush()
        written = self.file.tell()
        self.file.close()
        return written


class GenerationBuilder:
    """Accumulates one generation's blocks; `finish` writes header, hashes and manifest."""

    def __init__(
        self, stage: Path, build_id: uuid.UUID, size: int, parent: Parent | None,
        options: BuildOptions,
    ) -> None:
        self.stage = stage
        self.build_id = build_id
        self.size = size
        self.parent = parent
        self.options = options
        self.bs = options.block_size
        self.blocks = size // self.bs
        self.sink = DiffSink(stage, options)
        self.zero = np.frombuffer(zero_digest(self.bs), np.uint8)
        self.digests = bytearray()  # of stored blocks, in storage order
        self.own: dict[bytes, int] = {}  # digest -> storage offset in this build
        self.entries: list[tuple[int, uuid.UUID, int]] = []  # changed blocks, ascending
        self.seen = np.zeros(self.blocks, bool)
        self.stored = 0
        self.deduplicated = 0

    def add(self, offset: int, chunk: bytes | memoryview) -> None:
        """Take whole blocks starting at `offset` (block aligned)."""
        bs = self.bs
        n = len(chunk) // bs
        first = offset // bs
        words = np.frombuffer(chunk, np.uint64).reshape(n, bs // 8)
        nonzero = np.bitwise_or.reduce(words, axis=1) != 0
        self.seen[first : first + n] = True
        data_idx = np.flatnonzero(nonzero).tolist()
        new = np.empty((n, DIGEST_SIZE), np.uint8)
        new[:] = self.zero
        if data_idx:
            found = b"".join([digest(chunk[j * bs : (j + 1) * bs]) for j in data_idx])
            new[data_idx] = np.frombuffer(found, np.uint8).reshape(-1, DIGEST_SIZE)
        if self.parent is None:
            changed = nonzero
        else:
            changed = (new != self.parent.digests[first : first + n]).any(axis=1)
        candidates = np.flatnonzero(changed & nonzero)
        keys = as_keys(new[candidates])
        in_lineage = self.parent.index.find(keys) if self.parent else [None] * len(keys)
        pieces: list[bytes | memoryview] = []
        hits = dict(zip(candidates.tolist(), in_lineage, strict=True))
        for j in np.flatnonzero(changed).tolist():
            block = first + j
            if j not in hits:
                self.entries.append((block, NIL, 0))
                continue
            key = new[j].tobytes()
            where = hits[j]
            if where is None and key in self.own:
                where = (self.build_id, self.own[key])
            if where is not None:
                self.deduplicated += 1
                self.entries.append((block, *where))
                continue
            storage = self.stored * bs
            self.own[key] = storage
            self.digests += key
            self.stored += 1
            self.entries.append((block, self.build_id, storage))
            pieces.append(chunk[j * bs : (j + 1) * bs])
        if pieces:
            self.sink.write(b"".join(pieces))

    def finish(self, holes_are_zero: bool) -> tuple[Header, Stats]:
        """Blocks never added are zeros (Full snapshot) or unchanged (Diff snapshot)."""
        if holes_are_zero and self.parent is not None:
            vanished = np.flatnonzero(~self.seen & self.parent.has_data).tolist()
            self.entries.extend((block, NIL, 0) for block in vanished)
            self.entries.sort(key=lambda e: e[0])
        written = self.sink.close()
        parent_runs = (
            self.parent.header.mappings if self.parent else [Mapping(0, self.size, NIL, 0)]
        )
        mappings = merge(parent_runs, runs_for_blocks(self.entries, self.bs))
        generation = self.parent.manifest.generation + 1 if self.parent else 0
        base = self.parent.header.metadata.base_build_id if self.parent else self.build_id
        header = Header(
            Metadata(WRITE_VERSION, self.bs, self.size, generation, self.build_id, base),
            tuple(mappings),
        )
        validate(header, "new header")
        (self.stage / HEADER).write_bytes(dump_header(header))
        (self.stage / HASHES).write_bytes(dump_hashes(self.bs, bytes(self.digests)))
        zero_blocks = sum(m.length for m in mappings if m.is_zero) // self.bs
        stats = Stats(
            blocks_total=self.blocks,
            blocks_stored=self.stored,
            blocks_zero=zero_blocks,
            blocks_deduplicated=self.deduplicated,
            blocks_inherited=self.blocks - self.stored - self.deduplicated - zero_blocks,
            bytes_stored=self.sink.stored,
            bytes_written=written,
        )
        return header, stats


def build_generation(
    store: Path,
    chunks: Iterable[tuple[int, bytes | memoryview]],
    size: int,
    options: BuildOptions,
    parent: Parent | None = None,
    holes_are_zero: bool = True,
) -> tuple[Manifest, Path]:
    """Run the pipeline and publish the build; returns its manifest and directory."""
    if options.name is not None:
        check_vm_name(options.name)
    if options.vmstate is not None and not options.vmstate.is_file():
        raise FcsnapError(f"vmstate file {options.vmstate} not found")
    build_id = uuid.uuid4()
    with staged_build(store, build_id) as stage:
        builder = GenerationBuilder(stage, build_id, size, parent, options)
        try:
            for offset, chunk in chunks:
                builder.add(offset, chunk)
            header, stats = builder.finish(holes_are_zero)
        finally:
            if not builder.sink.file.closed:
                builder.sink.file.close()
        manifest = Manifest(
            build_id=build_id,
            parent_build_id=parent.manifest.build_id if parent else None,
            generation=header.metadata.generation,
            base_build_id=header.metadata.base_build_id,
            block_size=options.block_size,
            size=size,
            compression=options.compression,
            compression_level=options.level if options.compression == "zstd" else None,
            frame_size=options.frame_size if options.compression == "zstd" else None,
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            fcsnap_version=__version__,
            source=options.source,
            stats=stats,
        )
        write_manifest(stage, manifest)
        if options.vmstate is not None:
            shutil.copyfile(options.vmstate, stage / SNAPFILE)
    final = store / str(build_id)
    if options.name:
        set_vm_pointer(store, options.name, build_id)
    return manifest, final

