"""Reading stored bytes: one build's diff file, and a whole generation through its header."""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fcsnap.errors import FcsnapError
from fcsnap.header import Header, load_header
from fcsnap.store.format.hashes import DIGEST_SIZE, digest, read_hashes
from fcsnap.store.format.layout import DIFF_ZSTD, HASHES, build_path, diff_path, store_of
from fcsnap.store.format.seekable import FrameCache, SeekableReader

if TYPE_CHECKING:
    import numpy as np


class DiffFile:
    """A build's diff, raw (also mmapped, so restore can copy pages straight from the mapping)
    or seekable zstd (decompressed per frame through a bounded cache). With `check_frames`,
    each frame is checked against its seek-table checksum, as zstd decodes many corruptions
    to wrong bytes without a word; a reader that hashes every block itself can skip it."""

    def __init__(
        self, build_dir: Path, cache_bytes: int = 64 << 20, check_frames: bool = False,
        frame_cache: FrameCache | None = None,
    ) -> None:
        self.path = diff_path(build_dir)
        self.build_dir = build_dir
        self.compressed = self.path.name == DIFF_ZSTD
        self.map: mmap.mmap | None = None
        self.zstd: SeekableReader | None = None
        self.fd = -1
        if not self.path.exists():
            raise FcsnapError(f"build {build_dir.name}: diff file missing in {build_dir}")
        if not self.path.is_file():  # a FIFO, say: opening it would wait for a writer
            raise FcsnapError(f"cannot read diff {self.path}: not a regular file")
        if self.compressed:
            self.zstd = SeekableReader(
                self.path, cache_bytes=cache_bytes, verify_checksums=check_frames,
                cache=frame_cache,
            )
            self.size = self.zstd.size
            return
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            self.size = os.fstat(self.fd).st_size
            if self.size:
                self.map = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
        except OSError as e:
            self.close()
            raise FcsnapError(f"cannot open {self.path}: {e.strerror or e}") from e

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise FcsnapError(
                f"{self.path}: read [{offset:#x}, {offset + length:#x}) beyond its "
                f"{self.size:#x} bytes"
            )
        if self.zstd is not None:
            return self.zstd.read(offset, length)
        # pread, not the mmap: a file truncated under us is an error here, not a SIGBUS.
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise FcsnapError(f"{self.path}: truncated (short read at {offset:#x})")
        return data

    def check_size(self) -> None:
        """Raise unless the raw file still has the size it had when opened. Restore copies
        pages straight from the mapping: past a truncation the kernel copy fails, and the page
        holding the cut reads zeros after it, which would be installed as guest memory."""
        size = os.fstat(self.fd).st_size
        if size != self.size:
            raise FcsnapError(
                f"{self.path}: changed size while being served ({size} bytes, was "
                f"{self.size}): truncated?"
            )

    def close(self) -> None:
        if self.zstd is not None:
            self.zstd.close()
        if self.map is not None:
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# (build directory, frame cache budget, a shared frame cache or None) -> the diff
DiffOpener = Callable[[Path, int, "FrameCache | None"], "DiffFile"]
_openers: dict[Path, DiffOpener] = {}
# (head header, store, frame cache budget, shared frame cache) -> every diff it reads, or
# None where the head is not the opener's to open
LineageOpener = Callable[
    [Header, Path, int, "FrameCache | None"], "dict[uuid.UUID, DiffFile] | None"
]
_lineage_openers: dict[Path, LineageOpener] = {}


def open_diffs_with(store: Path, opener: DiffOpener) -> None:
    """Have open_diffs open the builds of `store` (the local mirror of a store in object
    storage) with `opener`: their diffs are read through the host chunk cache
    (fcsnap/store/backends/chunk_cache.py), not from files."""
    _openers[store.resolve()] = opener


def open_lineages_with(store: Path, opener: LineageOpener) -> None:
    """Have open_diffs open every lineage of `store` with `opener`, which opens all the diffs
    a head reads at once (E2B/Wrenn stores: a build's data object is found through the head's
    builds section, not through its own directory alone)."""
    _lineage_openers[store.resolve()] = opener


def open_diffs(
    header: Header, store: Path, cache_bytes: int = 64 << 20,
    frame_cache: FrameCache | None = None,
) -> dict[uuid.UUID, DiffFile]:
    """Open every build the header reads, checking each diff covers what the mappings use;
    zstd frames are checked against their checksums as they are read (restore, unpack, squash
    and diff trust what these return). `frame_cache`: one cache shared with other readers
    (a daemon's), instead of one of `cache_bytes` per zstd diff."""
    lineage = _lineage_openers.get(store.resolve())
    found = None if lineage is None else lineage(header, store, cache_bytes, frame_cache)
    if found is not None:
        return found
    diffs: dict[uuid.UUID, DiffFile] = {}
    opener = _openers.get(store.resolve())
    try:
        for build_id, end in header.storage_ends().items():
            build_dir = build_path(store, build_id)
            if not build_dir.is_dir():
                raise FcsnapError(f"build {build_id} referenced by the header is not in {store}")
            diff = (
                opener(build_dir, cache_bytes, frame_cache) if opener is not None
                else DiffFile(build_dir, cache_bytes, check_frames=True, frame_cache=frame_cache)
            )
            diffs[build_id] = diff
            if diff.size < end:
                raise FcsnapError(
                    f"build {build_id}: diff file {diff.path} holds {diff.size} bytes but the "
                    f"header maps up to {end}"
                )
    except BaseException:
        for diff in diffs.values():
            diff.close()
        raise
    return diffs


class GenerationReader:
    """The guest memory of one generation, read through its header. Every stored block read is
    checked against its digest in its build's hash sidecar: what squash, unpack and diff copy
    out of a store is what was stored, or an error."""

    def __init__(self, build_dir: Path, cache_bytes: int = 64 << 20) -> None:
        self.header = load_header(build_dir)
        self.block_size = self.header.metadata.block_size
        self.diffs = open_diffs(self.header, store_of(build_dir), cache_bytes)
        try:
            self.tables = {
                build_id: self._table(diff) for build_id, diff in self.diffs.items()
            }
        except BaseException:
            self.close()
            raise

    def _table(self, diff: DiffFile) -> np.ndarray:
        block_size, table = read_hashes(diff.build_dir / HASHES)
        if block_size != self.block_size:
            raise FcsnapError(
                f"build {diff.build_dir.name}: hash sidecar is for block size {block_size}, "
                f"not {self.block_size}"
            )
        return table

    def stored(self, build_id: uuid.UUID, storage: int, length: int) -> bytes:
        """`length` bytes of build_id's diff at `storage`, read as whole blocks and checked."""
        bs = self.block_size
        lo = storage - storage % bs
        hi = -(-(storage + length) // bs) * bs
        diff = self.diffs[build_id]
        data = diff.read(lo, hi - lo)
        first, count = lo // bs, (hi - lo) // bs
        table = self.tables[build_id]
        if first + count > len(table):
            raise FcsnapError(
                f"build {build_id}: header maps block {first + count - 1} but its hash sidecar "
                f"holds {len(table)}"
            )
        got = b"".join(digest(data[i * bs : (i + 1) * bs]) for i in range(count))
        if got != table[first : first + count].tobytes():
            import numpy as np

            got_rows = np.frombuffer(got, np.uint8).reshape(count, DIGEST_SIZE)
            bad = first + int(np.argmax((got_rows != table[first : first + count]).any(axis=1)))
            raise FcsnapError(
                f"build {build_id}: block {bad} (storage offset {bad * bs:#x}) of "
                f"{diff.path.name} does not match its hash"
            )
        if lo == storage and hi == storage + length:
            return data
        return data[storage - lo : storage - lo + length]

    @property
    def size(self) -> int:
        return self.header.metadata.size

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bytes | None]]:
        """(offset, length, data or None for zeros) pieces covering [offset, offset+length)."""
        end = offset + length
        i = self.header.mapping_index(offset)
        while offset < end:
            m = self.header.mappings[i]
            take = min(m.end, end) - offset
            if m.is_zero:
                yield offset, take, None
            else:
                storage = m.storage_offset + (offset - m.offset)
                yield offset, take, self.stored(m.build_id, storage, take)
            offset += take
            i += 1

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(data or bytes(n) for _, n, data in self.runs(offset, length))

    def close(self) -> None:
        for diff in self.diffs.values():
            diff.close()

    def __enter__(self) -> GenerationReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
