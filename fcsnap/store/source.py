"""Reading stored bytes: one build's diff file, and a whole generation through its header."""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.header import Header, load_header
from fcsnap.store.layout import DIFF_ZSTD, build_path, diff_path, store_of
from fcsnap.store.seekable import SeekableReader


class DiffFile:
    """A build's diff, raw (also mmapped, so restore can copy pages straight from the mapping)
    or seekable zstd (decompressed per frame through a bounded cache). With `check_frames`,
    each frame is checked against its seek-table checksum, as zstd decodes many corruptions
    to wrong bytes without a word; a reader that hashes every block itself can skip it."""

    def __init__(
        self, build_dir: Path, cache_bytes: int = 64 << 20, check_frames: bool = False
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
                self.path, cache_bytes=cache_bytes, verify_checksums=check_frames
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


def open_diffs(
    header: Header, store: Path, cache_bytes: int = 64 << 20
) -> dict[uuid.UUID, DiffFile]:
    """Open every build the header reads, checking each diff covers what the mappings use;
    zstd frames are checked against their checksums as they are read (restore, unpack, squash
    and diff trust what these return)."""
    diffs: dict[uuid.UUID, DiffFile] = {}
    try:
        for build_id, end in header.storage_ends().items():
            build_dir = build_path(store, build_id)
            if not build_dir.is_dir():
                raise FcsnapError(f"build {build_id} referenced by the header is not in {store}")
            diff = DiffFile(build_dir, cache_bytes, check_frames=True)
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
    """The guest memory of one generation, read through its header."""

    def __init__(self, build_dir: Path, cache_bytes: int = 64 << 20) -> None:
        self.header = load_header(build_dir)
        self.diffs = open_diffs(self.header, store_of(build_dir), cache_bytes)

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
                yield offset, take, self.diffs[m.build_id].read(storage, take)
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
