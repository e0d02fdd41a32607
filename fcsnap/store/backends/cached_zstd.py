"""A seekable-zstd diff in object storage, read group by group through the host chunk cache.

The unit fetched, checked and cached is a group: the consecutive frames that together hold
whole blocks, since a block can only be checked whole. With 4 KiB blocks every frame holds
whole pages, so a group is one frame; with 2 MiB blocks and smaller frames (256 KiB by
default) a group is the frames of one block. Frames are contiguous in the object, so a group
is one range GET.

Opening fetches the seek table only (the object's last bytes); a read fetches each group it
needs whole, decompresses its frames and checks every block against the build's hash sidecar
(pinned by the head) before the group is cached on the host or used: remote data is
untrusted, and zstd decodes many corruptions to wrong bytes without a word. Checked groups are
kept compressed in the host cache (shared by every restore on the host, as raw chunks are)
and decompressed in the process's FrameCache (the daemon's is shared by all its builds). A
read that needs groups not yet fetched starts their fetches at once, and a group fetched
starts the fetch of the few after it, so a sequential reader (a working set laid out first,
fault-around, populate) finds them in flight.
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
from fcsnap.store.backends.chunk_cache import Buffer, ChunkCache, ReaderFetches
from fcsnap.store.format.hashes import DIGEST_SIZE, digest, read_hashes, sidecar_pin
from fcsnap.store.format.layout import DIFF_ZSTD, HASHES
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.format.seekable import (
    FOOTER,
    Frame,
    FrameCache,
    decompress_frame,
    new_owner,
    parse_seek_table,
    seek_table_size,
)

AHEAD_GROUPS = 8  # groups fetched ahead of a reader in order, or reading widely
WIDE_GROUPS = 16  # groups read (and an eighth of the diff's) before a reader reads widely
TAIL_GUESS = 16 << 10  # bytes read at the object's end for its seek table (1,300 frames)
SEEK_TABLE = "seektable"  # the seek table's name in the host cache


def frame_groups(frames: list[Frame], block_size: int) -> list[range]:
    """The frames in groups holding whole blocks, each group checkable against the sidecar on
    its own: a group starts at every frame that starts at a block's start (every frame with
    4 KiB blocks: frames are whole pages) and takes the frames up to the next one."""
    starts = [i for i, f in enumerate(frames) if f.decompressed_offset % block_size == 0]
    return [range(a, b) for a, b in zip(starts, [*starts[1:], len(frames)], strict=True)]


class CachedZstd:
    """What DiffFile is to a local zstd diff (`read`, `size`), for a diff in object storage.

    Groups of frames (see the module doc) are numbered from 0: group `i` is the host cache's
    piece `i`, the FrameCache's entry `i` of this reader (a group's frames decompressed and
    joined), and what a fetch asks for.

    `nonblocking` (a fault server's reads): a group neither decompressed nor in the host
    cache is fetched on a thread for readers and the read raises FetchPending (as
    CachedDiff's do); a failed fetch is reported to the next read of that group."""

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
        self.size = frames[-1].decompressed_offset + frames[-1].decompressed_size if frames else 0
        self.decompressed = frame_cache if frame_cache is not None else FrameCache(cache_bytes)
        self.block_size, self.table = read_hashes(build_dir / HASHES)
        self.groups = frame_groups(frames, self.block_size)
        self.starts = [frames[g.start].decompressed_offset for g in self.groups]  # bisect
        self.key = cache_key(build_dir)
        self._id = new_owner()  # this reader's groups in a shared FrameCache
        self._local = threading.local()
        self._started: set[int] = set()  # groups whose fetch ahead was started
        self._read = bytearray(len(self.groups))  # groups read here (a fetch ahead: not yet)
        self._groups_read = 0
        self._lock = threading.Lock()
        self.nonblocking = False
        self._for_reader = ReaderFetches(cache)  # groups nonblocking reads wait on

    @classmethod
    def open(cls, build_dir: Path, cache: ChunkCache, object_size: int,
             read_range: Callable[[int, int], bytes], frame_cache: FrameCache | None = None,
             cache_bytes: int = 64 << 20) -> CachedZstd:
        """The diff, its seek table fetched (or found in the host cache)."""
        manifest = read_manifest(build_dir)
        frames = seek_table(build_dir, cache, object_size, read_range, manifest.stats.bytes_stored)
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
            start = self.starts[index]
            data = self.read_group(index)
            lo = max(offset, start) - start
            hi = min(offset + length, start + len(data)) - start
            parts.append(data if lo == 0 and hi == len(data) else data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fetch_extent(self, storage: np.ndarray) -> None:
        """Start fetching, in this order, the groups holding the bytes at `storage` (a
        working set about to be prefetched), as many in flight as the host cache allows."""
        groups = np.searchsorted(np.array(self.starts, np.int64), storage, "right") - 1
        _, first = np.unique(groups, return_index=True)
        for index in groups[np.sort(first)].tolist():
            self._fetch_ahead(index)

    def read_group(self, index: int) -> bytes:
        """Group `index` decompressed: from the FrameCache, or from the host cache, or
        fetched and checked first. A fetch for a reader in order (the group before was read
        too), or for one that has read an eighth of the groups already (a guest touching much
        of its memory), starts the fetches of the next AHEAD_GROUPS; a reader of a few
        scattered pages fetches only the groups it reads."""
        streaming = index > 0 and self._read[index - 1]
        if not self._read[index]:
            self._read[index] = 1
            self._groups_read += 1
        # a reader all over the diff (a guest touching much of its memory) wants most groups
        wide = self._groups_read >= max(WIDE_GROUPS, len(self.groups) // 8)
        data = self.decompressed.get((self._id, index))
        if data is not None:
            return data
        if self.nonblocking:
            data = self._from_host(index)
            if data is None:
                self._fetch_for_reader(index, streaming or wide)
                raise FetchPending(f"zstd frame group {index} of build {self.build_dir.name}")
            return data
        data, fetched = self._load(index)
        if fetched and (streaming or wide):
            self._read_ahead(index)
        return data

    def _read_ahead(self, index: int) -> None:
        for later in range(index + 1, min(index + 1 + AHEAD_GROUPS, len(self.groups))):
            self._fetch_ahead(later)

    def _fetch_for_reader(self, index: int, ahead: bool) -> None:
        """Fetch group `index` for a nonblocking read, once; raise what its fetch failed
        with. `ahead`: then the groups after it too (see read_group)."""
        if self._for_reader.ask(index, lambda: self._load(index)) and ahead:
            self._read_ahead(index)

    def _span(self, index: int) -> tuple[int, int]:
        """Where group `index`'s compressed bytes are in the object: (offset, length)."""
        group = self.groups[index]
        start = self.frames[group.start].compressed_offset
        last = self.frames[group[-1]]
        return start, last.compressed_offset + last.compressed_size - start

    def _from_host(self, index: int) -> bytes | None:
        """Group `index` from the host cache, checked and decompressed, kept in the
        FrameCache; None when the host cache does not hold it right (no fetch)."""
        checked: list[bytes] = []
        found = self.cache.lookup(self.key, index, self._span(index)[1],
                                  lambda raw: checked.append(self._checked(index, raw)))
        if found is None:
            return None
        self.decompressed.put((self._id, index), checked[0])
        return checked[0]

    def _load(self, index: int) -> tuple[bytes, bool]:
        """Group `index` from the host cache, or fetched (then True), decompressed and every
        block checked against the sidecar either way (what another process cached is checked
        by this one before use), kept in the FrameCache."""
        start, length = self._span(index)
        checked: list[bytes] = []
        fetched: list[bool] = []

        def fetch() -> bytes:
            fetched.append(True)
            return self.read_range(start, length)

        self.cache.get(self.key, index, fetch,
                       lambda raw: checked.append(self._checked(index, raw)), length)
        self.decompressed.put((self._id, index), checked[0])
        return checked[0], bool(fetched)

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

    def _decompress(self, index: int, raw: Buffer) -> bytes:
        """Group `index`'s frames, whose compressed bytes `raw` holds one after the other,
        decompressed and joined (the seek table's checksums are not checked: the blocks are,
        against the sidecar, by `_checked`)."""
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        group = self.groups[index]
        base = self.frames[group.start].compressed_offset
        view = memoryview(raw)
        parts = []
        for number in group:
            frame = self.frames[number]
            at = frame.compressed_offset - base
            try:
                parts.append(decompress_frame(
                    dctx, view[at:at + frame.compressed_size], frame, verify_checksum=False
                ))
            except FcsnapError as e:
                raise FcsnapError(
                    f"build {self.build_dir.name}: zstd frame {number} fetched from the store "
                    f"is corrupt ({e}); not installed"
                ) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _checked(self, index: int, raw: Buffer) -> bytes:
        """Group `index` decompressed, every block it holds matching the sidecar."""
        data = self._decompress(index, raw)
        bs = self.block_size
        first, count = self.starts[index] // bs, -(-len(data) // bs)
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
    name = uuid.UUID(build_dir.name)

    def check(tail: Buffer) -> None:
        """The table parses and describes exactly the bytes build.json says (a damaged copy
        in the host cache is then a miss, fetched again)."""
        found = parse_seek_table(bytes(tail), object_size)
        size = found[-1].decompressed_offset + found[-1].decompressed_size if found else 0
        if size != stored:
            raise FcsnapError(
                f"build {name}: its zstd diff's seek table describes {size} bytes, build.json "
                f"says {stored}"
            )
        frames[:] = found

    try:
        cache.get(cache_key(build_dir), SEEK_TABLE, fetch, check, None)
    except FcsnapError as e:
        if str(e).startswith(f"build {name}:"):
            raise
        raise FcsnapError(f"build {name}: the seek table of its zstd diff: {e}") from None
    return frames
