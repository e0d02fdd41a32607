"""E2B and Wrenn build directories read as they are, read-only (docs/FORMAT.md §10.1).

Their bucket layout: `<build_id>/memfile.header` beside the build's packed diff, `memfile`
uncompressed, or `memfile.zstd` / `memfile.lz4`: independent frames back to back, which only
the headers' frame tables describe (E2B's local storage backend adds an
`<object>.uncompressed-size` file, which the builds section makes unnecessary). There is no
build.json and no per-block hash, so what can be checked is what they carry: the header's
rules, every object's presence and sizes, every frame's decoding (with its codec's checksums)
and length, and the SHA-256 the builds section records where it records one. `verify`,
`unpack` and `inspect` accept such a directory, and such a bucket (e2b_remote.py).
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.files import open_regular
from fcsnap.header import Header, load_header
from fcsnap.header.e2b import BodyError, BuildInfo, Frame, decompress
from fcsnap.options import E2B_MAX_FRAME
from fcsnap.store.format.layout import FCSNAP_FILES, HEADER

SUFFIXES = {"none": "", "zstd": ".zstd", "lz4": ".lz4"}
DATA = "memfile"
MAX_FRAME = E2B_MAX_FRAME
"""A frame table's frame larger than this is refused before it is read (E2B's are 2 MiB by
default): decoding holds one frame in memory."""
Progress = Callable[[int], None]


def _noop(_n: int) -> None:
    pass


_HEADERS: contextvars.ContextVar[dict[str, tuple[tuple[int, ...], Header]] | None] = (
    contextvars.ContextVar("e2b_headers", default=None))


@contextlib.contextmanager
def headers_read_once() -> Iterator[None]:
    """Within the block each header file is parsed once (an import meets every header of a
    lineage several times); one whose inode, size or mtime changed is parsed anew."""
    if _HEADERS.get() is not None:
        yield
        return
    token = _HEADERS.set({})
    try:
        yield
    finally:
        _HEADERS.reset(token)


def read_header(path: Path) -> Header:
    """load_header, through the cache of an enclosing headers_read_once."""
    cache = _HEADERS.get()
    if cache is None:
        return load_header(path)
    try:
        st = os.stat(path)
    except OSError:
        return load_header(path)  # which says what is wrong with it
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    hit = cache.get(str(path))
    if hit is None or hit[0] != key:
        hit = cache[str(path)] = (key, load_header(path))
    return hit[1]


def e2b_build_dir(
    build: str | os.PathLike[str], store: str | os.PathLike[str] | None
) -> Path | None:
    """BUILD as an E2B/Wrenn build directory (a header and none of fcsnap's own files), or
    None: a directory given as such, or `<store>/<build>` of a local store laid out as their
    buckets are. An fcsnap build that lost its build.json is not one: fcsnap says so."""
    candidates = [Path(build)]
    if store is not None and not str(store).startswith("s3://"):
        candidates.append(Path(store) / str(build))
    for path in candidates:
        if path.is_dir() and (path / HEADER).is_file() and not any(
            (path / name).exists() for name in FCSNAP_FILES
        ):
            return path
    return None


@dataclass
class BuildData:
    """One build's data object as a lineage reads it: where it is, its compression, its
    uncompressed size and the frames known for it."""

    build_id: uuid.UUID
    path: Path
    compression: str
    size: int
    frames: tuple[Frame, ...]
    checksum: bytes | None
    """The SHA-256 of the whole uncompressed diff, where a builds section records it."""
    full_table: bool
    """The frames cover [0, size) without gaps (a build's own header's table)."""
    _fd: int = field(default=-1, repr=False)
    _cache: dict[int, bytes] = field(default_factory=dict, repr=False)

    def open(self) -> None:
        self._fd = open_regular(self.path, "data object")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def where(self) -> str:
        """The object as errors name it."""
        return str(self.path)

    @property
    def object_size(self) -> int:
        return os.fstat(self._fd).st_size

    @property
    def cache_key(self) -> str:
        """The name of this object's pieces in the host chunk cache."""
        return f"e2b-{self.build_id}-{self.compression}-{self.object_size}"

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise FcsnapError(f"{self.where}: ends at {offset + len(data)}, before byte "
                              f"{offset + length} the header maps")
        return data

    def frame_index(self, storage_offset: int) -> int:
        """The frame holding an uncompressed offset (FcsnapError where no frame does)."""
        i = bisect.bisect_right(self.frames, storage_offset, key=lambda f: f.start_u) - 1
        if i < 0 or storage_offset >= self.frames[i].end_u:
            raise FcsnapError(f"build {self.build_id}: no frame in its table holds uncompressed "
                              f"offset {storage_offset:#x}")
        return i

    def frame(self, i: int) -> bytes:
        """Frame i decoded, checked against its codec's checksums and the table's length."""
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        f = self.frames[i]
        where = f"{self.where}: frame {i} (compressed bytes {f.start_c}..{f.end_c})"
        check_frame_size(self, i)
        out = decode_frame(self.compression, self._pread(f.start_c, f.size_c), f.size_u, where)
        if len(self._cache) >= 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[i] = out
        return out

    def read(self, storage_offset: int, length: int) -> bytes:
        """Bytes [storage_offset, +length) of the uncompressed diff."""
        if self.compression == "none":
            return self._pread(storage_offset, length)
        parts = []
        end = storage_offset + length
        pos = storage_offset
        while pos < end:
            i = self.frame_index(pos)
            f = self.frames[i]
            data = self.frame(i)
            take = min(end, f.end_u) - pos
            parts.append(data[pos - f.start_u : pos - f.start_u + take])
            pos += take
        return b"".join(parts)


def decode_frame(compression: str, raw: bytes, size: int, where: str) -> bytes:
    """One frame of a compressed object, checked: exactly `size` bytes, its codec's checksums
    (zstd's content checksum, LZ4's block and content checksums) verified as it decodes."""
    if compression == "zstd":
        return _zstd_frame(raw, size, where)
    try:
        return decompress(raw, size)
    except BodyError as e:
        raise FcsnapError(f"{where}: {e}") from None


_local = threading.local()  # one zstd decompression context per thread, reused


def _zstd_frame(raw: bytes, size: int, where: str) -> bytes:
    """One zstd frame of exactly `size` bytes, nothing after it; its content checksum is
    checked by zstd as it decodes. The frame's declared content size (E2B's frames carry it)
    must be the table's: it is what the one-shot decode allocates."""
    import zstandard

    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    try:
        declared = zstandard.frame_content_size(raw)
        if declared != size:
            raise FcsnapError(f"{where}: zstd frame says {declared} bytes, the frame table "
                              f"{size}")
        out = dctx.decompress(raw, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FcsnapError(f"{where}: damaged zstd frame ({e})") from None
    if len(out) != size:
        raise FcsnapError(f"{where}: not one zstd frame of {size} bytes")
    return out


def _own_entry(store: Path, build_id: uuid.UUID) -> BuildInfo | None:
    """A build's entry in its own header's builds section (its whole frame table), if any."""
    path = store / str(build_id) / HEADER
    if not path.is_file():
        return None
    section = read_header(path).builds_section
    return section.builds.get(build_id) if section else None


def _local_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def build_data(store: Path, header: Header, build_id: uuid.UUID,
               object_size: Callable[[Path], int] = _local_size) -> BuildData:
    """How a lineage reads `build_id`. The head's builds entry says the compression (E2B's
    rule); where it has none, the build's own header does (E2B resolves it the same way); with
    neither, the object is uncompressed. The build's own header holds its whole frame table
    (the head keeps only the frames it reads), which must agree with the head's."""
    section = header.builds_section
    mine = section.builds.get(build_id) if section else None
    own = mine if build_id == header.metadata.build_id else _own_entry(store, build_id)
    entry = mine or own
    compression = entry.compression if entry else "none"
    path = store / str(build_id) / (DATA + SUFFIXES[compression])
    frames = entry.frames if entry else ()
    if own and own.compression == compression and own.frames:
        if mine and not set(mine.frames) <= set(own.frames):
            raise FcsnapError(f"{header.metadata.build_id}'s frame table of build {build_id} "
                              "disagrees with that build's own header")
        frames = own.frames
    if entry and entry.size:
        size = entry.size
    elif compression == "none":  # a V3 build: the object's own size
        size = object_size(path)
    else:
        size = frames[-1].end_u if frames else 0
    contiguous = all(a.end_u == b.start_u for a, b in zip(frames, frames[1:], strict=False))
    full_table = compression == "none" or bool(
        frames and frames[0].start_u == 0 and contiguous and frames[-1].end_u == size)
    checksum = next((e.checksum for e in (own, mine) if e and e.checksum_known), None)
    return BuildData(build_id, path, compression, size, frames, checksum, full_table)


@dataclass
class E2BLineage:
    """A head header and the data objects of every build it reads, opened and checked for
    size and frame coverage before a byte is served."""

    build_dir: Path
    header: Header
    builds: dict[uuid.UUID, BuildData]

    def close(self) -> None:
        for data in self.builds.values():
            data.close()

    def __enter__(self) -> E2BLineage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_e2b(build_dir: Path) -> E2BLineage:
    """The lineage of an E2B/Wrenn build directory, its store being the directory above."""
    header = read_header(build_dir / HEADER)
    if build_dir.name != str(header.metadata.build_id):
        raise FcsnapError(f"{build_dir}: directory name is not its build id "
                          f"{header.metadata.build_id}")
    return E2BLineage(build_dir, header, open_builds(build_dir.parent, header))


def open_builds(store: Path, header: Header) -> dict[uuid.UUID, BuildData]:
    """The data object of every build `header` reads, opened and checked for size and frame
    coverage (FcsnapError naming the first that falls short; none left open then)."""
    builds: dict[uuid.UUID, BuildData] = {}
    try:
        for build_id, end in header.storage_ends().items():
            if not (store / str(build_id)).is_dir():
                raise FcsnapError(f"build {build_id} read by {header.metadata.build_id} is not "
                                  f"in {store}")
            data = build_data(store, header, build_id)
            data.open()
            builds[build_id] = data
            check_coverage(header, data, end)
    except BaseException:
        for data in builds.values():
            data.close()
        raise
    return builds


def check_coverage(header: Header, data: BuildData, end: int) -> None:
    """The object holds every byte the mappings read: an uncompressed one is long enough; a
    compressed one has a frame for every mapped byte, inside the object."""
    if data.size < end:
        raise FcsnapError(f"{data.where}: {data.size} bytes uncompressed, the header maps "
                          f"up to {end}")
    if data.compression == "none":
        if data.object_size < end:
            raise FcsnapError(f"{data.where}: {data.object_size} bytes, the header maps up "
                              f"to {end}")
        return
    if data.frames and data.frames[-1].end_c > data.object_size:
        raise FcsnapError(f"{data.where}: {data.object_size} bytes, its frame table ends at "
                          f"{data.frames[-1].end_c}")
    for m in header.mappings:
        if m.build_id == data.build_id:
            pos = m.storage_offset
            while pos < m.storage_offset + m.length:
                i = data.frame_index(pos)
                check_frame_size(data, i)
                pos = data.frames[i].end_u


def check_frame_size(data: BuildData, i: int) -> None:
    """Refuse frame i of `data` if it is larger uncompressed than MAX_FRAME: decoding holds
    a whole frame in memory (a fault server's too), so it is refused before it is read."""
    f = data.frames[i]
    if f.size_u > MAX_FRAME:
        raise FcsnapError(f"{data.where}: frame {i} (compressed bytes {f.start_c}..{f.end_c}): "
                          f"{f.size_u} bytes uncompressed is beyond {MAX_FRAME}")


def unpack_e2b(build_dir: Path, output: Path, force: bool = False,
               progress: Progress = _noop) -> int:
    """The full memory of an E2B/Wrenn build directory at `output` (unpack_lineage); an
    output that cannot be written is refused before the lineage is opened."""
    from fcsnap.store.operations.ops import check_output

    check_output(output, force)
    return unpack_lineage(open_e2b(build_dir), output, force, progress)


def unpack_lineage(lineage: E2BLineage, output: Path, force: bool = False,
                   progress: Progress = _noop) -> int:
    """The full memory of an E2B/Wrenn lineage at `output`, as `unpack` writes fcsnap's: every
    frame read decoded and checked; there are no block hashes to check the bytes against.
    Closes the lineage."""
    from fcsnap.store.operations.ops import write_memory

    with lineage:
        return write_memory(
            output, force, lineage.header.metadata.size, lineage.header.mappings,
            lambda build_id, offset, n: lineage.builds[build_id].read(offset, n), progress,
        )


@dataclass(frozen=True)
class E2BVerification:
    """What `verify` could check of an E2B/Wrenn build (docs/FORMAT.md §10.1)."""

    build_id: uuid.UUID
    generation: int
    builds_checked: int
    frames_decoded: int
    sha256_checked: list[str]
    sha256_unchecked: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "build_id": str(self.build_id),
            "generation": self.generation,
            "format": "e2b",
            "builds_checked": self.builds_checked,
            "frames_decoded": self.frames_decoded,
            "sha256_checked": self.sha256_checked,
            "sha256_unchecked": self.sha256_unchecked,
            "block_hashes": False,
        }

    def summary(self) -> str:
        unchecked = "".join(f"; {b}: SHA-256 not checked ({why})"
                            for b, why in self.sha256_unchecked.items())
        return (f"ok: E2B build {self.build_id} (generation {self.generation}): "
                f"{self.builds_checked} builds' objects and sizes, {self.frames_decoded} frames "
                f"decoded, SHA-256 of {len(self.sha256_checked)} checked{unchecked}; no "
                "per-block hashes exist, so served pages cannot be checked (restore --verify)")


def verify_e2b(build_dir: Path, progress: Progress = _noop) -> E2BVerification:
    """verify_lineage of an E2B/Wrenn build directory."""
    return verify_lineage(open_e2b(build_dir), progress)


def verify_lineage(lineage: E2BLineage, progress: Progress = _noop) -> E2BVerification:
    """Check what an E2B/Wrenn build carries: the header, every object the lineage reads, its
    sizes, every frame decoded, and each build's SHA-256 where one is recorded and the whole
    diff can be read (a full frame table, or an uncompressed object). Closes the lineage."""
    with lineage:
        frames = 0
        checked: list[str] = []
        unchecked: dict[str, str] = {}
        for build_id, data in lineage.builds.items():
            whole = data.compression == "none" or data.full_table
            digest = hashlib.sha256() if data.checksum and whole else None
            if data.compression == "none":
                for pos in range(0, data.size if digest else 0, 1 << 22):
                    block = data.read(pos, min(1 << 22, data.size - pos))
                    if digest:
                        digest.update(block)
                    progress(len(block))
            else:
                for i in (range(len(data.frames)) if whole else _all_mapped_frames(lineage, data)):
                    block = data.frame(i)
                    data._cache.clear()
                    frames += 1
                    if digest:
                        digest.update(block)
                    progress(len(block))
            if digest is not None:
                if digest.digest() != data.checksum:
                    raise FcsnapError(f"{data.where}: SHA-256 {digest.hexdigest()} is not the "
                                      f"{data.checksum.hex()} its header records")
                checked.append(str(build_id))
            elif not data.checksum:
                unchecked[str(build_id)] = "the header records none"
            else:
                unchecked[str(build_id)] = "its frame table here covers only the frames used"
        meta = lineage.header.metadata
        return E2BVerification(meta.build_id, meta.generation, len(lineage.builds), frames,
                               checked, unchecked)


def _all_mapped_frames(lineage: E2BLineage, data: BuildData) -> list[int]:
    """Indexes of the frames of `data` that the head's mappings read."""
    used: set[int] = set()
    for m in lineage.header.mappings:
        if m.build_id == data.build_id:
            pos = m.storage_offset
            while pos < m.storage_offset + m.length:
                i = data.frame_index(pos)
                used.add(i)
                pos = data.frames[i].end_u
    return sorted(used)
