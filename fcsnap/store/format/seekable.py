"""The zstd seekable format (facebook/zstd contrib/seekable_format; docs/FORMAT.md §4.2).

A seekable file is a series of independent zstd frames followed by one skippable frame holding
the seek table, so plain `zstd -d` decompresses it while a reader can decompress any one frame on
its own. Layout of the seek-table frame (little-endian):

    magic u32 0x184D2A5E | content size u32 | entries | frame count u32 | descriptor u8 | magic
    u32 0x8F92EAB1

Each entry is compressed size u32, decompressed size u32 and, when descriptor bit 7 is set, the
low 32 bits of XXH64 (seed 0) of the frame's decompressed data. Descriptor bits 2-6 are reserved
for breaking changes and must be zero; bits 0-1 are for non-breaking changes and, as the format
asks, are ignored on reading and written as zero.
"""

from __future__ import annotations

import bisect
import itertools
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Self

import xxhash
import zstandard

from fcsnap.errors import FcsnapError

BytesLike = bytes | bytearray | memoryview

SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
CHECKSUM_FLAG = 0x80
RESERVED_BITS = 0x7C
# The reference implementation's limits; anything beyond them is corruption, not data.
MAX_FRAMES = 0x8000000
MAX_FRAME_SIZE = 1 << 30
# zstd cannot expand more than this: every block has a 3-byte header and yields at most
# 128 KiB (an RLE block: 4 bytes for 128 KiB). A table entry claiming more is corrupt.
MAX_EXPANSION = (128 << 10) // 4
# A frame is decompressed in one call into a buffer of its full size only when its own header
# declares that size and its compressed bytes could plausibly hold it; any other frame is
# streamed, so memory follows what zstd actually produces rather than what a table claims.
ONE_SHOT_EXPANSION = 256
STREAM_CHUNK = 1 << 20

SKIPPABLE_HEAD = struct.Struct("<II")
FOOTER = struct.Struct("<IBI")
ENTRY = struct.Struct("<II")
ENTRY_CHECKSUM = struct.Struct("<III")

# Bytes compressed per multi-threaded batch: enough frames to keep every core busy, little
# enough to keep the pending buffer small.
BATCH_BYTES = 32 << 20
MAX_BATCH_FRAMES = 64


@dataclass(frozen=True, slots=True)
class Frame:
    compressed_offset: int
    compressed_size: int
    decompressed_offset: int
    decompressed_size: int
    checksum: int | None


def frame_checksum(data: BytesLike) -> int:
    """The seek table's checksum: low 32 bits of XXH64 with seed 0."""
    return xxhash.xxh64_intdigest(data) & 0xFFFFFFFF


def seek_table_size(footer: bytes) -> int:
    """Size of the whole seek-table frame, from the file's last 9 bytes.

    Lets a reader fetch exactly the table without trusting any count before it is checked.
    """
    if len(footer) < FOOTER.size:
        raise FcsnapError(
            f"too short for a seek table footer ({len(footer)} bytes, {FOOTER.size} needed)"
        )
    count, descriptor, magic = FOOTER.unpack_from(footer, len(footer) - FOOTER.size)
    if magic != SEEKABLE_MAGIC:
        raise FcsnapError(f"not a zstd seekable file (footer magic {magic:#010x})")
    if descriptor & RESERVED_BITS:
        raise FcsnapError(f"seek table descriptor {descriptor:#04x} sets reserved bits")
    if count > MAX_FRAMES:
        raise FcsnapError(f"seek table claims {count} frames (at most {MAX_FRAMES})")
    entry = ENTRY_CHECKSUM if descriptor & CHECKSUM_FLAG else ENTRY
    return SKIPPABLE_HEAD.size + count * entry.size + FOOTER.size


def parse_seek_table(tail: bytes, file_size: int) -> list[Frame]:
    """The frames of a seekable file of `file_size` bytes whose last bytes are `tail`.

    Every field is checked against the others and against the file size, so a reader never
    seeks or allocates on the word of a corrupt table.
    """
    if len(tail) > file_size:
        raise FcsnapError(f"seek table tail ({len(tail)} bytes) is longer than the file")
    table_size = seek_table_size(tail)
    if table_size > file_size:
        raise FcsnapError(
            f"seek table needs {table_size} bytes but the file has only {file_size}: truncated?"
        )
    if table_size > len(tail):
        raise FcsnapError(f"seek table needs {table_size} bytes, only {len(tail)} given")
    start = len(tail) - table_size
    count, descriptor, _ = FOOTER.unpack_from(tail, len(tail) - FOOTER.size)
    magic, content_size = SKIPPABLE_HEAD.unpack_from(tail, start)
    if magic != SKIPPABLE_MAGIC:
        raise FcsnapError(
            f"no seek table frame where the footer's count of {count} frames puts it "
            f"(magic {magic:#010x})"
        )
    if content_size != table_size - SKIPPABLE_HEAD.size:
        raise FcsnapError(
            f"seek table frame size {content_size} does not match its frame count "
            f"({table_size - SKIPPABLE_HEAD.size} expected)"
        )
    checksums = bool(descriptor & CHECKSUM_FLAG)
    entry = ENTRY_CHECKSUM if checksums else ENTRY
    entries = memoryview(tail)[start + SKIPPABLE_HEAD.size : len(tail) - FOOTER.size]
    data_size = file_size - table_size
    frames: list[Frame] = []
    coffset = doffset = 0
    for index, fields in enumerate(entry.iter_unpack(entries)):
        csize, dsize = fields[0], fields[1]
        if csize == 0 or dsize == 0:
            raise FcsnapError(f"seek table frame {index} has size zero")
        if dsize > MAX_FRAME_SIZE:
            raise FcsnapError(
                f"seek table frame {index} claims {dsize} decompressed bytes "
                f"(at most {MAX_FRAME_SIZE})"
            )
        if dsize > csize * MAX_EXPANSION:
            raise FcsnapError(
                f"seek table frame {index} claims {dsize} decompressed bytes from {csize} "
                f"compressed, more than zstd can expand ({MAX_EXPANSION}:1)"
            )
        frames.append(Frame(coffset, csize, doffset, dsize, fields[2] if checksums else None))
        coffset += csize
        doffset += dsize
    if coffset != data_size:
        raise FcsnapError(
            f"seek table frames hold {coffset} compressed bytes but the file has {data_size} "
            "before the table"
        )
    return frames


class SeekableWriter:
    """Writes a seekable file: frames of `frame_size` bytes compressed in batches on `threads`
    threads, then the seek table on close().

    Offsets in `frames` count from the first byte this writer wrote to `out`. The caller owns
    `out` and closes it. As a context manager the table is written only when the block succeeds,
    so an aborted write never looks like a complete file.
    """

    def __init__(
        self,
        out: BinaryIO,
        frame_size: int,
        level: int = 3,
        checksums: bool = True,
        threads: int = 2,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        """`batch_bytes`: how much is compressed at once. A writer streaming to object storage
        passes a small batch, so the upload starts early and little is left to compress (and
        send) once its input ends."""
        if not 0 < frame_size <= MAX_FRAME_SIZE:
            raise FcsnapError(
                f"zstd frame size {frame_size} is out of range (1 byte to {MAX_FRAME_SIZE >> 20} "
                "MiB)"
            )
        if threads < 1:
            raise FcsnapError(f"compression threads must be at least 1, not {threads}")
        self._out = out
        self._frame_size = frame_size
        self._checksums = checksums
        self._threads = threads
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._batch_frames = min(MAX_BATCH_FRAMES, max(2 * threads, batch_bytes // frame_size))
        self._batch_bytes = self._batch_frames * frame_size
        # One batch of staging space, allocated once and reused: growing a fresh buffer per batch
        # costs more in page faults than the copy itself.
        self._pending = bytearray(self._batch_bytes)
        self._filled = 0
        self._frames: list[Frame] = []
        self._accepted = 0
        self._decompressed = 0
        self._written = 0
        self._closed = False
        self._abandoned = False

    def abandon(self) -> None:
        """Compress nothing more (from any thread): the file is being thrown away after a
        failure or a signal, and its owner should not wait for batches nobody will read."""
        self._abandoned = True

    @property
    def uncompressed_size(self) -> int:
        """Bytes accepted by write() so far."""
        return self._accepted

    @property
    def compressed_size(self) -> int:
        """Bytes written to `out` so far (the seek table included once closed)."""
        return self._written

    @property
    def frames(self) -> list[Frame]:
        return list(self._frames)

    def write(self, data: BytesLike) -> None:
        """Compress whole frames straight from `data` when it is large; copy only remainders."""
        if self._closed:
            raise ValueError("write to a closed SeekableWriter")
        view = memoryview(data).cast("B")
        self._accepted += len(view)
        filled = self._filled
        if filled + len(view) < self._batch_bytes:
            self._pending[filled : filled + len(view)] = view
            self._filled += len(view)
            return
        # Complete the pending partial frame; batches end on frame boundaries, so the check
        # above guarantees `view` holds enough for that.
        head = -filled % self._frame_size
        self._pending[filled : filled + head] = view[:head]
        view = view[head:]
        whole = len(view) - len(view) % self._frame_size
        staged = memoryview(self._pending)[: filled + head]
        self._compress(self._split(staged) + self._split(view[:whole]))
        rest = len(view) - whole
        self._pending[:rest] = view[whole:]
        self._filled = rest

    def close(self) -> int:
        """Compress what is pending, append the seek table; the total bytes written to `out`."""
        if self._closed:
            return self._written
        self._compress(self._split(memoryview(self._pending)[: self._filled]))
        self._filled = 0
        if len(self._frames) > MAX_FRAMES:
            raise FcsnapError(f"{len(self._frames)} zstd frames exceed the seekable format's limit")
        entry = ENTRY_CHECKSUM if self._checksums else ENTRY
        fields = (
            (f.compressed_size, f.decompressed_size, f.checksum)
            if self._checksums
            else (f.compressed_size, f.decompressed_size)
            for f in self._frames
        )
        entries = b"".join(entry.pack(*f) for f in fields)
        descriptor = CHECKSUM_FLAG if self._checksums else 0
        footer = FOOTER.pack(len(self._frames), descriptor, SEEKABLE_MAGIC)
        head = SKIPPABLE_HEAD.pack(SKIPPABLE_MAGIC, len(entries) + len(footer))
        self._emit(head + entries + footer)
        self._closed = True
        return self._written

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()

    def _split(self, view: memoryview) -> list[memoryview]:
        size = self._frame_size
        return [view[i : i + size] for i in range(0, len(view), size)]

    def _compress(self, chunks: list[memoryview]) -> None:
        step = self._batch_frames
        for first in range(0, len(chunks), step):
            if self._abandoned:
                return
            batch = chunks[first : first + step]
            # multi_compress_to_buffer splits the batch across threads that run without the GIL.
            result = self._compressor.multi_compress_to_buffer(batch, threads=self._threads)
            for chunk, compressed in zip(batch, result, strict=True):
                checksum = frame_checksum(chunk) if self._checksums else None
                self._frames.append(
                    Frame(self._written, len(compressed), self._decompressed, len(chunk), checksum)
                )
                self._decompressed += len(chunk)
                self._emit(compressed)

    def _emit(self, data: BytesLike) -> None:
        """Write all of `data`: a raw (unbuffered) file may take less per call."""
        view = memoryview(data)
        self._written += len(view)
        while view:
            view = view[self._out.write(view) :]


_owners = itertools.count(1)


def new_owner() -> int:
    """A reader's key in a shared FrameCache, never given out twice in the process (not the
    reader's id(), which a later reader may get once it is freed: a frame of a closed reader
    landing late from a fetch ahead would then be served to that other reader's VM)."""
    return next(_owners)


class FrameCache:
    """Decompressed frames kept under one byte budget, least recently used first out.

    One per reader by default; a daemon gives every reader of every build the same one, so
    that 100 clones of a template decompress each frame once and one budget (`--cache-mb`)
    is evicted across builds. Keys are (reader, frame index; for a diff in object storage,
    the index of a group of frames, fcsnap/store/backends/cached_zstd.py), the reader's
    from new_owner(). Thread-safe.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.hits = 0
        self.misses = 0
        self.cached = 0
        self._frames: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._frames.get(key)
            if data is None:
                self.misses += 1
                return None
            self._frames.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.budget:
            return
        with self._lock:
            if key in self._frames:
                return
            self._frames[key] = data
            self.cached += len(data)
            while self.cached > self.budget:
                self.cached -= len(self._frames.popitem(last=False)[1])

    def drop(self, owner: int) -> None:
        """Forget every frame of one reader (it closed)."""
        with self._lock:
            for key in [k for k in self._frames if k[0] == owner]:
                self.cached -= len(self._frames.pop(key))


class SeekableReader:
    """Random access to a seekable file: pread, decompress one frame, keep recent frames.

    Safe to share between threads: the cache sits behind a lock, each thread decompresses with
    its own context, and decompression happens outside the lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        cache_bytes: int = 64 << 20,
        verify_checksums: bool = False,
        cache: FrameCache | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.verify_checksums = verify_checksums
        self.cache = cache if cache is not None else FrameCache(cache_bytes)
        self._key = new_owner()  # this reader's frames in a shared cache
        self._local = threading.local()
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise FcsnapError(f"cannot open {self.path}: {e.strerror or e}") from e
        try:
            self.frames: list[Frame] = self._load_table()
        except BaseException as e:
            os.close(self._fd)
            if isinstance(e, FcsnapError | OSError):
                raise FcsnapError(f"{self.path}: {e}") from e
            raise
        self._starts = [f.decompressed_offset for f in self.frames]
        last = self.frames[-1] if self.frames else None
        self.size: int = last.decompressed_offset + last.decompressed_size if last else 0

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def misses(self) -> int:
        return self.cache.misses

    @property
    def cached_bytes(self) -> int:
        """Decompressed bytes held by the cache now (never more than cache_bytes)."""
        return self.cache.cached

    def frame_index(self, offset: int) -> int:
        if not 0 <= offset < self.size:
            raise FcsnapError(f"{self.path}: offset {offset} is outside [0, {self.size})")
        return bisect.bisect_right(self._starts, offset) - 1

    def read_frame(self, index: int) -> bytes:
        """Frame `index` decompressed, from the cache when it is there."""
        if not 0 <= index < len(self.frames):
            raise FcsnapError(f"{self.path}: no frame {index} ({len(self.frames)} frames)")
        data = self.cache.get((self._key, index))
        if data is None:
            data = self._decompress(index)
            self.cache.put((self._key, index), data)
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Decompressed bytes [offset, offset+length), which may span frames."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FcsnapError(
                f"{self.path}: read of {length} bytes at {offset} is outside [0, {self.size})"
            )
        if length == 0:
            return b""
        index = self.frame_index(offset)
        data = self.read_frame(index)
        start = offset - self.frames[index].decompressed_offset
        if start == 0 and length == len(data):
            return data
        if start + length <= len(data):
            return data[start : start + length]
        parts = [memoryview(data)[start:]]
        remaining = length - len(parts[0])
        while remaining:
            index += 1
            data = self.read_frame(index)
            parts.append(memoryview(data)[:remaining])
            remaining -= len(parts[-1])
        return b"".join(parts)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.cache.drop(self._key)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _load_table(self) -> list[Frame]:
        file_size = os.fstat(self._fd).st_size
        if file_size < FOOTER.size:
            raise FcsnapError(f"too short for a zstd seekable file ({file_size} bytes)")
        table_size = seek_table_size(self._pread(FOOTER.size, file_size - FOOTER.size))
        if table_size > file_size:
            raise FcsnapError(
                f"seek table needs {table_size} bytes but the file has only {file_size}: truncated?"
            )
        return parse_seek_table(self._pread(table_size, file_size - table_size), file_size)

    def _pread(self, size: int, offset: int) -> bytes:
        """Exactly `size` bytes at `offset`; errors leave naming the file to the caller."""
        if self._fd < 0:
            raise ValueError(f"read from a closed SeekableReader ({self.path})")
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as e:
            raise FcsnapError(f"read error: {e.strerror or e}") from e
        if len(data) != size:
            raise FcsnapError(f"short read ({len(data)} of {size} bytes at {offset}): truncated?")
        return data

    def _decompress(self, index: int) -> bytes:
        frame = self.frames[index]
        try:
            return self._decompress_frame(frame)
        except FcsnapError as e:
            where = f"{self.path}: frame {index} (at byte {frame.compressed_offset})"
            raise FcsnapError(f"{where}: {e}") from e

    def _decompress_frame(self, frame: Frame) -> bytes:
        raw = self._pread(frame.compressed_size, frame.compressed_offset)
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return decompress_frame(dctx, raw, frame, self.verify_checksums)


def decompress_frame(
    dctx: zstandard.ZstdDecompressor, raw: BytesLike, frame: Frame, verify_checksum: bool
) -> bytes:
    """One frame's compressed bytes `raw` decompressed, exactly the size the seek table says
    (and its checksum checked, with `verify_checksum`), or an FcsnapError."""
    size = frame.decompressed_size
    try:
        # A declared content size is what decompress() would allocate: check it first.
        declared = zstandard.frame_content_size(raw)
        if declared not in (-1, size):
            raise FcsnapError(f"frame header says {declared} bytes, seek table says {size}")
        if declared == size and size <= len(raw) * ONE_SHOT_EXPANSION:
            data = dctx.decompress(raw, max_output_size=size, allow_extra_data=False)
        else:
            data = _stream(dctx, raw, size)
    except zstandard.ZstdError as e:
        raise FcsnapError(f"corrupt zstd frame: {e}") from e
    if len(data) > size:  # the stream stopped one byte past the table's size
        raise FcsnapError(f"decompresses to more than the {size} bytes the seek table says")
    if len(data) < size:
        raise FcsnapError(f"decompressed to {len(data)} bytes, seek table says {size}")
    if verify_checksum and frame.checksum is not None:
        actual = frame_checksum(data)
        if actual != frame.checksum:
            raise FcsnapError(
                f"checksum {actual:#010x} does not match the seek table's "
                f"{frame.checksum:#010x}"
            )
    return data


def _stream(dctx: zstandard.ZstdDecompressor, raw: BytesLike, size: int) -> bytes:
    """Decompress `raw` in chunks, stopping one byte past `size`.

    decompress() with max_output_size allocates that many bytes up front when the frame does
    not declare its size, so a corrupt table entry of 1 GiB over a few bytes would allocate
    1 GiB; here memory grows only with the bytes the frame really yields.
    """
    parts: list[bytes] = []
    got = 0
    with dctx.stream_reader(raw, read_across_frames=False) as reader:
        while got <= size:
            chunk = reader.read(min(STREAM_CHUNK, size + 1 - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
