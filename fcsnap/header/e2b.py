"""E2B's version 4 and 5 header bodies (docs/FORMAT.md §3.7), read as E2B's
`packages/shared/pkg/storage/header` reads them.

After the 64 bytes of metadata both carry a flags byte, the uncompressed size of what follows
(u32) and one LZ4 frame holding a builds section (per build: file size, SHA-256, frame table)
and the mappings: 40-byte records in V4, columns of varints in V5. `decode_body` turns either
into the V3 record bytes the rest of fcsnap reads, plus the builds section; every broken rule
raises HeaderError with one line.
"""

from __future__ import annotations

import bisect
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.units import PAGE

PREFIX = struct.Struct("<BI")
"""flags, then the size of the LZ4 frame's content."""
FLAG_INCOMPLETE = 0x01
"""Set on headers a peer sends while the build's upload is still under way."""
MAX_BODY = 256 << 20
"""E2B's cap on the decompressed body (a decompression-bomb guard)."""
BUILD_INFO = struct.Struct("<16sq32s")
FRAME_TABLE = struct.Struct("<II")
FRAME = struct.Struct("<qqii")
MAX_FRAMES = 1 << 20
COMPRESSIONS = {0: "none", 1: "zstd", 2: "lz4"}
COUNT = struct.Struct("<I")
RECORD = struct.Struct("<QQ16sQ")
"""§3.1's mapping record, what both versions are turned into."""
RECORD_DTYPE = [("offset", "<u8"), ("length", "<u8"), ("build_id", "S16"), ("storage", "<u8")]
RECORD_SIZE = RECORD.size
MAX_BLOCK_INDEX = (1 << 32) - 1
"""E2B keeps offsets, lengths and storage offsets as 32-bit counts of 4 KiB pages."""
MAX_COLUMN_BUILDS = 0xFFFF
MAX_COLUMN_ENTRIES = 8 << 20
MAX_I64 = (1 << 63) - 1


class BodyError(FcsnapError):
    """The body breaks the format; format.py adds the header's name."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One independently compressed frame: bytes [start_u, start_u+size_u) of the build's
    uncompressed diff are bytes [start_c, start_c+size_c) of its compressed object."""

    start_u: int
    start_c: int
    size_u: int
    size_c: int

    @property
    def end_u(self) -> int:
        return self.start_u + self.size_u

    @property
    def end_c(self) -> int:
        return self.start_c + self.size_c


def _start_u(frame: Frame) -> int:
    return frame.start_u


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """A builds-section entry. `frames` is empty and `compression` "none" for an uncompressed
    build; a child header keeps only the frames its mappings use. A zero checksum means
    unknown."""

    build_id: uuid.UUID
    size: int
    checksum: bytes
    compression: str
    frames: tuple[Frame, ...]

    @property
    def checksum_known(self) -> bool:
        return any(self.checksum)

    def frame_at(self, storage_offset: int) -> Frame | None:
        """The frame holding an uncompressed offset, or None (uncompressed, or not kept)."""
        i = bisect.bisect_right(self.frames, storage_offset, key=_start_u) - 1
        if i >= 0 and storage_offset < self.frames[i].end_u:
            return self.frames[i]
        return None


@dataclass(frozen=True, slots=True)
class BuildsSection:
    flags: int
    builds: dict[uuid.UUID, BuildInfo]

    @property
    def incomplete(self) -> bool:
        return bool(self.flags & FLAG_INCOMPLETE)


class _Reader:
    """Bounds-checked reads from the decompressed body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise BodyError(f"truncated: {what} needs {n} bytes, {self.left} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct, what: str) -> tuple:
        return fmt.unpack(self.take(fmt.size, what))


def decompress(payload: bytes, size: int) -> bytes:
    """The LZ4 frame after the prefix, which must hold exactly `size` bytes and end the file.
    Block and content checksums are verified by the LZ4 library."""
    import lz4.frame

    if size > MAX_BODY:
        raise BodyError(f"body of {size} bytes exceeds the {MAX_BODY}-byte cap")
    reader = lz4.frame.LZ4FrameDecompressor()
    try:
        out = reader.decompress(payload, max_length=size + 1)
    except RuntimeError as e:  # the library's one exception type for a damaged frame
        raise BodyError(f"LZ4 frame is damaged ({' '.join(str(e).split())})") from None
    if len(out) > size:
        raise BodyError(f"LZ4 frame holds more than the {size} bytes announced")
    if not reader.eof:
        raise BodyError(f"LZ4 frame is truncated after {len(out)} of {size} bytes")
    if reader.unused_data:
        raise BodyError(f"{len(reader.unused_data)} bytes after the LZ4 frame")
    if len(out) != size:
        raise BodyError(f"LZ4 frame holds {len(out)} bytes, the prefix announces {size}")
    return out


def _frame_table(r: _Reader, build_id: uuid.UUID) -> tuple[str, tuple[Frame, ...]]:
    where = f"frame table of build {build_id}"
    kind, count = r.unpack(FRAME_TABLE, where)
    if kind == 0 and count:
        raise BodyError(f"{where}: compression type 0 but {count} frames")
    if kind == 0 or count == 0:
        return "none", ()
    if kind not in COMPRESSIONS:
        raise BodyError(f"{where}: unknown compression type {kind}")
    if count > MAX_FRAMES:
        raise BodyError(f"{where}: {count} frames exceeds the maximum {MAX_FRAMES}")
    raw = r.take(count * FRAME.size, f"{where} ({count} frames)")
    frames = tuple(Frame(*f) for f in FRAME.iter_unpack(raw))
    prev = None
    for i, f in enumerate(frames):
        if f.size_u <= 0 or f.size_c <= 0:
            raise BodyError(f"{where}: frame {i} has size {f.size_u}/{f.size_c} (must be > 0)")
        if f.start_u < 0 or f.start_c < 0 or f.end_u > MAX_I64 or f.end_c > MAX_I64:
            raise BodyError(f"{where}: frame {i} starts at {f.start_u}/{f.start_c}, "
                            "outside 0..2^63")
        if prev is not None and f.start_u < prev.end_u:
            raise BodyError(f"{where}: frame {i} starts at uncompressed {f.start_u}, before the "
                            f"previous frame ends ({prev.end_u}): out of order or overlapping")
        if prev is not None and f.start_c < prev.end_c:
            raise BodyError(f"{where}: frame {i} starts at compressed {f.start_c}, before the "
                            f"previous frame ends ({prev.end_c}): out of order or overlapping")
        prev = f
    return COMPRESSIONS[kind], frames


def _builds(r: _Reader) -> dict[uuid.UUID, BuildInfo]:
    (count,) = r.unpack(COUNT, "build count")
    least = BUILD_INFO.size + FRAME_TABLE.size
    if count > r.left // least:
        raise BodyError(f"build count {count} exceeds what the {r.left} bytes left can hold")
    builds: dict[uuid.UUID, BuildInfo] = {}
    for _ in range(count):
        raw_id, size, checksum = r.unpack(BUILD_INFO, "build entry")
        build_id = uuid.UUID(bytes=raw_id)
        if size < 0:
            raise BodyError(f"build {build_id}: negative file size {size}")
        compression, frames = _frame_table(r, build_id)
        builds[build_id] = BuildInfo(build_id, size, checksum, compression, frames)
    return builds


def _record_mappings(r: _Reader) -> bytes:
    """V4: a count, then that many 40-byte records (V3's layout)."""
    (count,) = r.unpack(COUNT, "mapping count")
    if count > r.left // RECORD_SIZE:
        raise BodyError(f"mapping count {count} exceeds what the {r.left} bytes left can hold")
    records = r.take(count * RECORD_SIZE, "mappings")
    storage = struct.unpack(f"<{len(records) // 8}Q", records)[4::5]
    if storage and max(storage) // PAGE > MAX_BLOCK_INDEX:
        i = next(i for i, s in enumerate(storage) if s // PAGE > MAX_BLOCK_INDEX)
        raise BodyError(f"mapping {i}: storage offset {storage[i]:#x} beyond E2B's 32-bit "
                        "page index")
    return records


def _varints(data: bytes, start: int, count: int, what: str) -> tuple[Any, int]:
    """`count` unsigned LEB128 varints (Go's binary.Uvarint) from data[start:] as a uint64
    array, and the position after them. A varint longer than 10 bytes, or whose 10th byte
    exceeds 1, overflows 64 bits."""
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8, offset=start)
    ends = np.flatnonzero(raw < 0x80)[:count]
    if len(ends) < count:
        raise BodyError(f"truncated: {what} needs {count} varints, {len(ends)} are whole")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    bad = np.flatnonzero((lengths > 10) | ((lengths == 10) & (raw[ends] > 1)))
    if len(bad):
        raise BodyError(f"{what}: varint {int(bad[0])} overflows 64 bits")
    stop = int(ends[-1]) + 1
    shift = (np.arange(stop) - np.repeat(starts, lengths)).astype(np.uint64) * np.uint64(7)
    parts = (raw[:stop].astype(np.uint64) & np.uint64(0x7F)) << shift
    return np.bitwise_or.reduceat(parts, starts), start + stop


def _first(rules: list[tuple[Any, Callable[[int], str]]]) -> None:
    """Raise for the earliest entry that breaks a rule: (array of bools per entry, the message
    for entry i)."""
    import numpy as np

    found = [(int(np.argmax(broken)), message) for broken, message in rules if broken.any()]
    if found:
        i, message = min(found, key=lambda f: f[0])
        raise BodyError(f"entry {i}: {message(i)}")


def _column_mappings(r: _Reader, size: int) -> bytes:
    """V5: a build-id table, then offset deltas, lengths, storage deltas (signed) and build
    indexes, one varint column each, in 4 KiB pages; gaps between entries are zeros. Decoded
    column-wise with numpy: a page-granular header has millions of entries."""
    import numpy as np

    pages = -(-size // PAGE)
    if pages > MAX_BLOCK_INDEX:
        raise BodyError(f"memory of {pages} pages exceeds E2B's 32-bit page index")
    (nbuilds,) = r.unpack(COUNT, "mapping build count")
    if nbuilds > MAX_COLUMN_BUILDS:
        raise BodyError(f"mapping build count {nbuilds} exceeds the maximum {MAX_COLUMN_BUILDS}")
    if nbuilds > r.left // 16:
        raise BodyError(f"mapping build count {nbuilds} exceeds what the {r.left} bytes left "
                        "can hold")
    ids = r.take(16 * nbuilds, "mapping build ids")
    (n,) = r.unpack(COUNT, "mapping count")
    if n > MAX_COLUMN_ENTRIES:
        raise BodyError(f"mapping count {n} exceeds the maximum {MAX_COLUMN_ENTRIES}")
    if n == 0:  # all zeros
        return RECORD.pack(0, pages * PAGE, bytes(16), 0) if pages else b""
    if n > r.left // 4:
        raise BodyError(f"mapping count {n} exceeds what the {r.left} bytes left can hold")
    pos = r.pos
    deltas, pos = _varints(r.data, pos, n, "offset deltas")
    lengths, pos = _varints(r.data, pos, n, "lengths")
    zigzag, pos = _varints(r.data, pos, n, "storage deltas")
    indexes, pos = _varints(r.data, pos, n, "build indexes")
    r.pos = pos
    limit = np.uint64(MAX_BLOCK_INDEX)
    huge = deltas > limit  # summed only below the limit: no wrap-around
    offsets = np.cumsum(np.where(huge, limit, deltas))
    signed = (zigzag >> np.uint64(1)).astype(np.int64) ^ -(zigzag & np.uint64(1)).astype(np.int64)
    with np.errstate(over="ignore"):  # Go's int64 sum wraps the same way
        storage = np.cumsum(signed)
    ends = offsets + np.minimum(lengths, limit)
    previous = np.concatenate(([0], ends[:-1])).astype(np.uint64)
    _first([
        (huge | (offsets > limit), lambda i: "offset beyond E2B's 32-bit page index"),
        (lengths > limit, lambda i: f"length of {lengths[i]} pages beyond E2B's 32-bit index"),
        ((storage < 0) | (storage > MAX_BLOCK_INDEX),
         lambda i: f"storage offset of {storage[i]} pages out of range"),
        (indexes >= nbuilds,
         lambda i: f"build index {indexes[i]} out of range ({nbuilds} builds)"),
        (lengths == 0, lambda i: "zero length"),
        (offsets < previous, lambda i: f"page {offsets[i]} overlaps the previous entry, which "
                                       f"ends at page {previous[i]}"),
        (ends > np.uint64(pages),
         lambda i: f"ends at page {ends[i]}, beyond the memory's {pages} pages"),
    ])
    gap = offsets > previous
    tail = int(ends[-1]) < pages
    at = np.arange(n) + np.cumsum(gap)
    records = np.zeros(n + int(gap.sum()) + tail, dtype=RECORD_DTYPE)
    records["offset"][at] = offsets * np.uint64(PAGE)
    records["length"][at] = lengths * np.uint64(PAGE)
    records["build_id"][at] = np.frombuffer(ids, dtype="S16")[indexes.astype(np.intp)]
    records["storage"][at] = storage.astype(np.uint64) * np.uint64(PAGE)
    holes = at[gap] - 1
    records["offset"][holes] = previous[gap] * np.uint64(PAGE)
    records["length"][holes] = (offsets[gap] - previous[gap]) * np.uint64(PAGE)
    if tail:
        records[-1] = (ends[-1] * np.uint64(PAGE), (pages - ends[-1]) * np.uint64(PAGE), b"", 0)
    return records.tobytes()


def decode_body(version: int, body: bytes, size: int) -> tuple[bytes, BuildsSection]:
    """V4/V5 bytes after the metadata as V3 mapping records and the builds section. V4's empty
    mapping list means what V3's does (one run of the header's own build), so it is returned
    empty; V5's means zeros and comes back as one nil record."""
    if len(body) < PREFIX.size:
        raise BodyError(f"{len(body)} bytes after the metadata; flags and size need "
                        f"{PREFIX.size}")
    flags, length = PREFIX.unpack_from(body)
    r = _Reader(decompress(body[PREFIX.size :], length))
    builds = _builds(r)
    records = _record_mappings(r) if version == 4 else _column_mappings(r, size)
    return records, BuildsSection(flags, builds)


KINDS = {name: kind for kind, name in COMPRESSIONS.items()}


def encode_v4_body(builds: list[BuildInfo], records: bytes, flags: int = 0) -> bytes:
    """The V4 bytes after the metadata (the inverse of `decode_body` for version 4): the flags,
    the body's size and one LZ4 frame of the builds section and the 40-byte records."""
    import lz4.frame

    parts = [COUNT.pack(len(builds))]
    for b in builds:
        parts.append(BUILD_INFO.pack(b.build_id.bytes, b.size, b.checksum))
        kind = KINDS[b.compression] if b.frames else 0
        parts.append(FRAME_TABLE.pack(kind, len(b.frames)))
        parts += [FRAME.pack(f.start_u, f.start_c, f.size_u, f.size_c) for f in b.frames]
    parts += [COUNT.pack(len(records) // RECORD_SIZE), records]
    body = b"".join(parts)
    return PREFIX.pack(flags, len(body)) + lz4.frame.compress(body, content_checksum=True)
