"""A seekable-zstd diff in object storage, read frame by frame through the host chunk cache.

Opening fetches the seek table only (the object's last bytes); a read fetches each frame it
needs whole (one range GET of its compressed bytes), decompresses it and checks every block
it holds against the build's hash sidecar (pinned by the head) before the frame is cached on
the host or used: remote data is untrusted, and zstd decodes many corruptions to wrong bytes
without a word. Checked frames are kept compressed in the host cache (shared by every restore
on the host, as raw chunks are) and decompressed in the process's FrameCache (the daemon's is
shared by all its builds). A read that needs frames not yet fetched starts their fetches at
once, and a frame fetched starts the fetch of the few after it, so a sequential reader (a
working set laid out first, fault-around, populate) finds them in flight.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zstandard

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.store.chunk_cache import Buffer, ChunkCache, ReaderFetches
from fcsnap.store.hashes import DIGEST_SIZE, digest, read_hashes, sidecar_pin
from fcsnap.store.layout import DIFF_ZSTD, HASHES
from fcsnap.store.manifest import read_manifest
from fcsnap.store.seekable import (
    FOOTER,
    Frame,
    FrameCache,
    decompress_frame,
    parse_seek_table,
    seek_table_size,
)

AHEAD_FRAMES = 8  # frames fetched ahead of a reader in order, or reading widely
WIDE_FRAMES = 16  # frames read (and an eighth of the diff's) before a reader reads widely
TAIL_GUESS = 16 << 10  # bytes read at the object's end for its seek table (1,300 frames)
SEEK_TABLE = "seektable"  # the seek table's name in the host cache


def frames_fit_blocks(frames: list[Frame], block_size: int) -> bool:
    """Every frame holds whole blocks (always so for 4 KiB blocks: frames are whole pages),
    so each can be checked against the sidecar on its own."""
    return all(f.decompressed_offset % block_size == 0 for f in frames)


class CachedZstd:
    """What DiffFile is to a local zstd diff (`read`, `size`), for a diff in object storage.

    `nonblocking` (a fault server's reads): a frame neither decompressed nor in the host
    cache is fetched on a thread for readers and the read raises FetchPending (as
    CachedDiff's do); a failed fetch is reported to the next read of that frame."""

    def __init__(
        self, build_dir: Path, cache: ChunkCache, object_size: int,
        read_range: Callable[[int, int], bytes], frames: list[Frame],
        frame_cache: FrameCache | None = None, cache_bytes: int = 64 << 20,
    ) -> None:
        self.build_dir = build_dir
        self.path = build_dir / DIFF_ZSTD
        self.compressed = True
        self.map = None
        self.fd = -1
        self.cache = cache
        self.read_range = read_range
        self.frames = frames
        self.starts = [f.decompressed_offset for f in frames]  # bisect: cheap per fault
        self.size = frames[-1].decompressed_offset + frames[-1].decompressed_size if frames else 0
        self.decompressed = frame_cache if frame_cache is not None else FrameCache(cache_bytes)
        self.block_size, self.table = read_hashes(build_dir / HASHES)
        self.key = cache_key(build_dir)
        self._id = id(self)  # this reader's frames in a shared FrameCache
        self._local = threading.local()
        self._started: set[int] = set()  # frames whose fetch ahead was started
        self._read = bytearray(len(frames))  # frames read here (a fetch ahead: not yet)
        self._frames_read = 0
        self._lock = threading.Lock()
        self.nonblocking = False
        self._for_reader = ReaderFetches(cache)  # frames nonblocking reads wait on

    @classmethod
    def open(cls, build_dir: Path, cache: ChunkCache, object_size: int,
             read_range: Callable[[int, int], bytes], frame_cache: FrameCache | None = None,
             cache_bytes: int = 64 << 20) -> CachedZstd | None:
        """The diff, its seek table fetched (or found in the host cache); None when its frames
        do not hold whole blocks (2 MiB blocks: the caller downloads it whole)."""
        manifest = read_manifest(build_dir)
        frames = seek_table(build_dir, cache, object_size, read_range, manifest.stats.bytes_stored)
        block_size, _ = read_hashes(build_dir / HASHES)
        if not frames_fit_blocks(frames, block_size):
            return None
        return cls(build_dir, cache, object_size, read_range, frames, frame_cache, cache_bytes)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FcsnapError(
                f"build {self.build_dir.name}: read [{offset:#x}, {offset + length:#x}) beyond "
                f"its {self.size:#x} bytes"
            )
        if length == 0:
            return b""
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_right(self.starts, offset + length - 1, lo=first) - 1
        for index in range(first + 1, last + 1):  # in flight while the first is read
            self._fetch_ahead(index)
        parts = []
        for index in range(first, last + 1):
            frame = self.frames[index]
            data = self.read_frame(index)
            lo = max(offset, frame.decompressed_offset) - frame.decompressed_offset
            hi = min(offset + length, frame.decompressed_offset + frame.decompressed_size)
            hi -= frame.decompressed_offset
            parts.append(data if lo == 0 and hi == len(data) else data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fetch_extent(self, storage: np.ndarray) -> None:
        """Start fetching, in this order, the frames holding the bytes at `storage` (a
        working set about to be prefetched), as many in flight as the host cache allows."""
        frames = np.searchsorted(np.array(self.starts, np.int64), storage, "right") - 1
        _, first = np.unique(frames, return_index=True)
        for index in frames[np.sort(first)].tolist():
            self._fetch_ahead(index)

    def read_frame(self, index: int) -> bytes:
        """Frame `index` decompressed: from the FrameCache, or from the host cache, or
        fetched and checked first. A fetch for a reader in order (the frame before was read
        too), or for one that has read an eighth of the frames already (a guest touching much
        of its memory), starts the fetches of the next AHEAD_FRAMES; a reader of a few
        scattered pages fetches only the frames it reads."""
        streaming = index > 0 and self._read[index - 1]
        if not self._read[index]:
            self._read[index] = 1
            self._frames_read += 1
        # a reader all over the diff (a guest touching much of its memory) wants most frames
        wide = self._frames_read >= max(WIDE_FRAMES, len(self.frames) // 8)
        data = self.decompressed.get((self._id, index))
        if data is not None:
            return data
        cached = self.cache.lookup(self.key, index) if self.nonblocking else None
        if self.nonblocking and cached is None:
            self._fetch_for_reader(index, streaming or wide)
            raise FetchPending(f"zstd frame {index} of build {self.build_dir.name}")
        data, fetched = self._load(index, cached)
        if fetched and (streaming or wide):
            self._read_ahead(index)
        return data

    def _read_ahead(self, index: int) -> None:
        for later in range(index + 1, min(index + 1 + AHEAD_FRAMES, len(self.frames))):
            self._fetch_ahead(later)

    def _fetch_for_reader(self, index: int, ahead: bool) -> None:
        """Fetch frame `index` for a nonblocking read, once; raise what its fetch failed
        with. `ahead`: then the frames after it too (see read_frame)."""
        if self._for_reader.ask(index, lambda: self._load(index)) and ahead:
            self._read_ahead(index)

    def _load(self, index: int, cached: Buffer | None = None) -> tuple[bytes, bool]:
        """Frame `index` from the host cache (`cached`: mapped from it already), or fetched
        and checked (then True), decompressed and kept in the FrameCache."""
        frame = self.frames[index]
        checked: list[bytes] = []
        raw = cached if cached is not None else self.cache.get(
            self.key, index,
            lambda: self.read_range(frame.compressed_offset, frame.compressed_size),
            lambda fetched: checked.append(self._checked(index, fetched)),
        )
        # a frame from the host cache was checked block by block when fetched (by a fetch
        # ahead, which may have decompressed it already): from then on it is trusted as a
        # local store's diff is (written whole or not at all; --verify re-hashes each block)
        data = (checked[0] if checked else self.decompressed.get((self._id, index))
                or self._decompress(index, raw, verify_checksum=False))
        self.decompressed.put((self._id, index), data)
        return data, bool(checked)

    def _fetch_ahead(self, index: int) -> None:
        with self._lock:
            if index in self._started or self.decompressed.get((self._id, index)) is not None:
                return
            self._started.add(index)

        def fetch() -> None:
            if self.cache.holds(self.key, index):
                return  # nothing to fetch: decompressing it here too would race its reader
            with contextlib.suppress(FcsnapError):  # its reader fetches again and says why
                self._load(index)

        self.cache.prefetch(fetch)

    def _decompress(self, index: int, raw: bytes, verify_checksum: bool) -> bytes:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            return decompress_frame(dctx, raw, self.frames[index], verify_checksum)
        except FcsnapError as e:
            raise FcsnapError(
                f"build {self.build_dir.name}: zstd frame {index} fetched from the store is "
                f"corrupt ({e}); not installed"
            ) from None

    def _checked(self, index: int, raw: bytes) -> bytes:
        """Frame `index` decompressed, every block it holds matching the sidecar."""
        data = self._decompress(index, raw, verify_checksum=False)
        bs = self.block_size
        first, count = self.frames[index].decompressed_offset // bs, -(-len(data) // bs)
        view = memoryview(data)
        got = np.frombuffer(
            b"".join(digest(view[i * bs:(i + 1) * bs]) for i in range(count)), np.uint8
        ).reshape(count, DIGEST_SIZE)
        want = self.table[first:first + count]
        bad = np.flatnonzero((got != want).any(axis=1)) if len(want) == count else [0]
        if len(bad):
            raise FcsnapError(
                f"build {self.build_dir.name}: block {first + int(bad[0])} fetched from the "
                "store does not match its hash; not installed"
            )
        return data

    def check_size(self) -> None:
        pass

    def close(self) -> None:
        self.decompressed.drop(self._id)


def cache_key(build_dir: Path) -> str:
    """The build's pieces in the host cache: its id and its sidecar's hash."""
    sidecar = (build_dir / HASHES).read_bytes()
    return f"{build_dir.name}-{sidecar_pin(sidecar)[7:39]}"


def seek_table(build_dir: Path, cache: ChunkCache, object_size: int,
               read_range: Callable[[int, int], bytes], stored: int) -> list[Frame]:
    """The diff's frames, from the seek table at the object's end (fetched once per host):
    checked to describe exactly the `stored` bytes build.json says the diff holds. The
    frames' bytes are checked against the sidecar as they are fetched."""

    def fetch() -> bytes:
        tail = read_range(object_size - min(object_size, TAIL_GUESS), min(object_size, TAIL_GUESS))
        need = seek_table_size(tail[-FOOTER.size:]) if len(tail) >= FOOTER.size else 0
        if need > len(tail) and need <= object_size:
            tail = read_range(object_size - need, need)
        return tail

    frames: list[Frame] = []

    def check(tail: bytes) -> None:
        frames.extend(parse_seek_table(bytes(tail), object_size))

    name = uuid.UUID(build_dir.name)
    try:
        tail = cache.get(cache_key(build_dir), SEEK_TABLE, fetch, check)
        if not frames:
            check(tail)
    except FcsnapError as e:
        raise FcsnapError(f"build {name}: the seek table of its zstd diff: {e}") from None
    size = frames[-1].decompressed_offset + frames[-1].decompressed_size if frames else 0
    if size != stored:
        raise FcsnapError(
            f"build {name}: its zstd diff's seek table describes {size} bytes, build.json says "
            f"{stored}"
        )
    return frames
