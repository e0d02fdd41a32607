"""E2B/Wrenn builds served as they are by restore and the daemon (docs/restore.md).

A fault server reads a build's diffs through open_diffs; for a store registered here the
diffs of a head are its E2B data objects: an uncompressed `memfile` mapped as a raw diff is
(pages copied straight from the page cache), a `memfile.zstd` / `memfile.lz4` read frame by
frame as the head's frame tables say, each frame decoded and checked (its codec's checksums,
its length) when first read and kept decompressed in the server's frame cache. Nothing is
locked, pinned or leased: fcsnap never removes or writes builds of such a store.

There are no per-block hashes, so restore --verify cannot apply; the builds section's SHA-256
covers a whole object and is checked by `verify`, not while serving.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fcsnap.errors import FcsnapError, FetchPending, UsageError
from fcsnap.files import open_regular
from fcsnap.header import Header
from fcsnap.header.e2b import Frame
from fcsnap.header.format import METADATA
from fcsnap.store.backends.chunk_cache import Buffer, ChunkCache, ReaderFetches
from fcsnap.store.backends.holds import hold_nothing_in
from fcsnap.store.format.layout import HEADER, MANIFEST
from fcsnap.store.format.seekable import FrameCache, new_owner
from fcsnap.store.format.source import DiffFile, open_lineages_with
from fcsnap.store.operations.e2b import BuildData, decode_frame, e2b_build_dir, open_builds

if TYPE_CHECKING:
    import numpy as np

RAW_PIECE = 4 << 20
"""An uncompressed object in S3 is fetched and cached in pieces of this size."""
NO_VERIFY = ("--verify checks each page against its block hash, and an E2B/Wrenn build has "
             "none (verify checks what it carries)")


class RawObject(DiffFile):
    """An uncompressed `memfile`: served as fcsnap's raw diffs are (mmapped, its size checked
    before copies out of the mapping). It takes over the fd `data` opened."""

    def __init__(self, data: BuildData) -> None:
        self.path = data.path
        self.build_dir = data.path.parent
        self.compressed = False
        self.zstd = None
        self.map: mmap.mmap | None = None
        self.fd, data._fd = data._fd, -1
        self.size = os.fstat(self.fd).st_size
        try:
            if self.size:
                self.map = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)
        except OSError as e:
            self.close()
            raise FcsnapError(f"cannot map {self.path}: {e.strerror or e}") from e


class FramedObject:
    """A compressed data object read frame by frame: what DiffFile is to a local zstd diff
    (`read`, `size`). A frame is decoded and checked once, then served from the frame cache
    (the daemon's one budget, or this object's own). With a host chunk cache (`host`, a
    store in S3) frames are fetched through it, kept there compressed (named by their offset
    in the object: heads' trimmed tables number an ancestor's frames differently) and checked
    again on every load; `nonblocking` (a fault server's reads) raises FetchPending instead of
    waiting for a fetch, as fcsnap's own builds in S3 do."""

    def __init__(self, data: BuildData, frame_cache: FrameCache | None, cache_bytes: int,
                 host: ChunkCache | None = None) -> None:
        self.data = data
        self.path = data.path
        self.build_dir = data.path.parent
        self.compressed = True
        self.map = None
        self.zstd = None
        self.fd = -1
        self.size = data.size
        self.table = raw_frames(data.size) if data.compression == "none" else data.frames
        self.starts = [f.start_u for f in self.table]
        self.frames = frame_cache if frame_cache is not None else FrameCache(cache_bytes)
        self.cache = host
        self.key = data.cache_key
        self.nonblocking = False
        self._for_reader = None if host is None else ReaderFetches(host)
        self._asked: set[int] = set()  # frames whose fetch ahead was asked for
        self._id = new_owner()

    def _decoded(self, index: int, raw: Buffer) -> bytes:
        f = self.table[index]
        where = f"{self.data.where}: frame {index} (compressed bytes {f.start_c}..{f.end_c})"
        if self.data.compression == "none":
            if len(raw) != f.size_u:
                raise FcsnapError(f"{where}: {len(raw)} bytes, not {f.size_u}")
            return bytes(raw)
        return decode_frame(self.data.compression, bytes(raw), f.size_u, where)

    def _load(self, index: int) -> bytes:
        """Frame `index` decoded and checked (fetched through the host cache, if any)."""
        f = self.table[index]
        if self.cache is None:
            out = self._decoded(index, self.data._pread(f.start_c, f.size_c))
        else:
            decoded: list[bytes] = []
            self.cache.get(self.key, f.start_c, lambda: self.data._pread(f.start_c, f.size_c),
                          lambda raw: decoded.append(self._decoded(index, raw)), f.size_c)
            out = decoded[-1]
        self.frames.put((self._id, index), out)
        return out

    def frame(self, index: int) -> bytes:
        found = self.frames.get((self._id, index))
        if found is not None:
            return found
        if self.nonblocking and self.cache is not None and self._for_reader is not None:
            f = self.table[index]
            decoded: list[bytes] = []
            if self.cache.lookup(self.key, f.start_c, f.size_c,
                                lambda raw: decoded.append(self._decoded(index, raw))) is None:
                self._for_reader.ask(index, lambda: self._load(index))
                raise FetchPending(f"frame {index} of {self.path}")
            self.frames.put((self._id, index), decoded[-1])
            return decoded[-1]
        return self._load(index)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FcsnapError(f"{self.path}: read [{offset:#x}, {offset + length:#x}) beyond "
                              f"its {self.size:#x} bytes")
        parts = []
        pos, end = offset, offset + length
        while pos < end:
            index = bisect.bisect_right(self.starts, pos) - 1
            f = self.table[index] if index >= 0 else None
            if f is None or pos >= f.end_u:
                raise FcsnapError(f"build {self.data.build_id}: no frame in its table holds "
                                  f"uncompressed offset {pos:#x}")
            take = min(end, f.end_u) - pos
            data = self.frame(index)
            parts.append(data[pos - f.start_u : pos - f.start_u + take])
            pos += take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fetch_extent(self, storage: np.ndarray) -> None:
        """Start fetching, in this order, the frames holding the pages at `storage` (a working
        set about to be prefetched) into the host cache."""
        import numpy as np
        indexes = np.searchsorted(np.array(self.starts, np.int64), storage, "right") - 1
        _, first = np.unique(indexes, return_index=True)
        for index in indexes[np.sort(first)].tolist():
            self._ahead(index, background=False)

    def fetch_rest(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Queue every frame holding bytes [starts[i], ends[i]) (what the served memory maps
        to) for fetching in the background, behind every other fetch, as fcsnap's raw diffs
        are (CachedDiff.fetch_rest): not with --lazy-fetch, nor more than half the cache."""
        import numpy as np

        if self.cache is None or not (self.nonblocking and self.cache.fetch_rest):
            return
        bounds = np.array(self.starts, np.int64)
        first = np.searchsorted(bounds, starts, "right") - 1
        last = np.searchsorted(bounds, ends - 1, "right") - 1
        needed = sorted({i for a, b in zip(first.tolist(), last.tolist(), strict=True)
                         for i in range(max(a, 0), b + 1)})
        if sum(self.table[i].size_c for i in needed) > self.cache.limit_bytes // 2:
            return
        for index in needed:
            self._ahead(index, background=True)

    def _ahead(self, index: int, background: bool) -> None:
        """Have frame `index` fetched, checked and put in the host cache on a fetch thread
        (not decoded into the frame cache: the guest may never read it); once."""
        cache = self.cache
        if cache is None or index in self._asked:
            return
        self._asked.add(index)
        f = self.table[index]

        def fetch() -> None:
            if cache.holds(self.key, f.start_c):
                return
            with contextlib.suppress(FcsnapError):  # its reader fetches again and says why
                cache.get(self.key, f.start_c, lambda: self.data._pread(f.start_c, f.size_c),
                          lambda raw: self._decoded(index, raw), f.size_c)

        cache.prefetch(fetch, background)

    def check_size(self) -> None:
        pass

    def close(self) -> None:
        self.frames.drop(self._id)
        self.data.close()


def raw_frames(size: int) -> tuple[Frame, ...]:
    """An uncompressed object cut into RAW_PIECE pieces: what is fetched and cached whole."""
    return tuple(Frame(start, start, min(RAW_PIECE, size - start), min(RAW_PIECE, size - start))
                 for start in range(0, size, RAW_PIECE))


def open_e2b_diffs(header: Header, store: Path, cache_bytes: int,
                   frame_cache: FrameCache | None) -> dict[uuid.UUID, DiffFile] | None:
    """The diffs of an E2B/Wrenn head (None for an fcsnap build: open_diffs opens it)."""
    if (store / str(header.metadata.build_id) / MANIFEST).exists():
        return None
    check_complete(header)
    builds = open_builds(store, header)
    diffs: dict[uuid.UUID, DiffFile] = {}
    try:
        for build_id, data in builds.items():
            if data.compression == "none":
                diffs[build_id] = RawObject(data)
            else:
                diffs[build_id] = FramedObject(  # type: ignore[assignment]  (DiffFile's reads)
                    data, frame_cache, cache_bytes)
    except BaseException:
        for data in builds.values():
            data.close()
        for diff in diffs.values():
            diff.close()
        raise
    return diffs


def check_complete(header: Header) -> None:
    """Refuse a header marked incomplete: E2B sends one between peers while the build's data
    is still being uploaded, so its objects may not be whole yet."""
    if header.builds_section is not None and header.builds_section.incomplete:
        raise FcsnapError(f"build {header.metadata.build_id}: its header is marked incomplete "
                          "(upload pending); serve it once the upload has finished")


def serve_e2b_store(store: Path) -> None:
    """Have fault servers of this process open the E2B/Wrenn builds of `store` as they are."""
    open_lineages_with(store, open_e2b_diffs)
    hold_nothing_in(store)


def e2b_to_serve(build: str, store: str | Path | None, verify: bool) -> Path | None:
    """BUILD as an E2B/Wrenn build directory ready to serve (its store registered), or None
    for an fcsnap build. UsageError for --verify, which cannot apply."""
    build_dir = e2b_build_dir(build, store)
    if build_dir is None:
        return None
    if verify:
        raise UsageError(NO_VERIFY)
    check_named(build_dir)
    serve_e2b_store(build_dir.parent)
    return build_dir


def check_named(build_dir: Path) -> None:
    """Refuse a build directory not named by its header's build id (a copy under another
    name): the head's data object is found by that id, so another directory's would be
    served. Only the metadata is read; the header is parsed and checked when opened."""
    fd = open_regular(build_dir / HEADER, "header")
    try:
        meta = os.pread(fd, METADATA.size, 0)
    finally:
        os.close(fd)
    if len(meta) == METADATA.size:  # shorter: the header's reading says what is wrong
        build_id = uuid.UUID(bytes=METADATA.unpack(meta)[4])
        if build_dir.resolve().name != str(build_id):  # a symlink to it is that directory
            raise FcsnapError(f"{build_dir}: directory name is not its build id {build_id}")
