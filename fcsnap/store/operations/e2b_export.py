"""`fcsnap export`: a lineage of fcsnap builds written as an E2B store (docs/FORMAT.md §10.3).

Each build of BUILD's lineage becomes `<build_id>/memfile.header` (version 4: the same
metadata and mappings, and a builds section with each build's size, SHA-256 and frame table)
beside its packed diff: `memfile`, or `memfile.zstd` / `memfile.lz4` as independent frames
with E2B's local backend's `.uncompressed-size` file. fcsnap's diff is already E2B's packed
diff (its own blocks back to back), so the bytes and the mappings carry over unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import fsync_path, read_regular, writing
from fcsnap.header import load_header
from fcsnap.header.e2b import RECORD_SIZE, BuildInfo, Frame, encode_v4_body
from fcsnap.header.format import METADATA, NIL, decode, decode_full
from fcsnap.store.format.hashes import digest, read_hashes
from fcsnap.store.format.layout import HASHES, HEADER, build_path, store_of
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.format.source import DiffFile

FRAME_BYTES = 2 << 20
"""Uncompressed bytes per frame by default: E2B's default."""
READ_BYTES = 8 << 20
SUFFIX = {"none": "", "zstd": ".zstd", "lz4": ".lz4"}
Progress = Callable[[int], None]


def _noop(_n: int) -> None:
    pass


def lineage_dirs(build_dir: Path) -> list[Path]:
    """BUILD and its ancestors (through `parent_build_id`) as far as the store holds them, and
    every build one of those whose reads are all there reads, oldest first. gc removes what no
    head reads: an ancestor it removed ends the walk, and a build reading one (`whole` is
    False) is exported without its header."""
    store = store_of(build_dir)
    todo = [build_dir]
    while (parent := read_manifest(todo[-1]).parent_build_id) is not None and (
            build_path(store, parent).is_dir()):
        todo.append(build_path(store, parent))
    found: dict[str, Path] = {}
    while todo:
        path = todo.pop()
        if path.name not in found:
            found[path.name] = path
            if whole(path):
                todo += [build_path(store, b) for b in load_header(path).build_ids()]
    return sorted(found.values(), key=lambda p: read_manifest(p).generation)


def whole(build_dir: Path) -> bool:
    """Whether every build the header of `build_dir` reads is in its store."""
    store = store_of(build_dir)
    return all(build_path(store, b).is_dir() for b in load_header(build_dir).build_ids())


@dataclass(frozen=True)
class Codec:
    """How export writes data objects: E2B's compression type, zstd's level, frame size."""

    compression: str = "none"
    level: int = 3
    frame_size: int = FRAME_BYTES

    def packer(self) -> Callable[[memoryview], bytes]:
        """A function compressing one frame; one per thread (zstd's compressors are not
        shared between threads). zstd frames carry their content size and checksum, LZ4
        frames their size and block and content checksums."""
        if self.compression == "zstd":
            import zstandard

            zc = zstandard.ZstdCompressor(level=self.level, write_checksum=True,
                                          write_content_size=True)
            return zc.compress
        import lz4.frame

        def lz4_frame(data: memoryview) -> bytes:
            return lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                                      block_checksum=True, content_checksum=True,
                                      store_size=True)

        return lz4_frame


class _Framer:
    """Compresses frames on a pool of threads (zstd and LZ4 release the GIL; the frames are
    independent), handing them back in order so they are written back to back."""

    def __init__(self, codec: Codec, sink: BinaryIO) -> None:
        self.local = threading.local()
        self.codec = codec
        self.sink = sink
        self.workers = max(1, min(4, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(self.workers)
        self.pending: deque[tuple[int, int, Future[bytes]]] = deque()
        self.frames: list[Frame] = []
        self.written = 0

    def _compress(self, data: memoryview) -> bytes:
        pack = getattr(self.local, "pack", None)
        if pack is None:
            pack = self.local.pack = self.codec.packer()
        return pack(data)

    def add(self, pos: int, data: memoryview) -> None:
        self.pending.append((pos, len(data), self.pool.submit(self._compress, data)))
        while len(self.pending) > 2 * self.workers:
            self._write_one()

    def _write_one(self) -> None:
        pos, size, future = self.pending.popleft()
        packed = future.result()
        self.sink.write(packed)
        self.frames.append(Frame(pos, self.written, size, len(packed)))
        self.written += len(packed)

    def finish(self) -> tuple[Frame, ...]:
        while self.pending:
            self._write_one()
        return tuple(self.frames)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _check_blocks(build_dir: Path, data: bytes, table: np.ndarray, first: int, bs: int,
                  pos: int) -> None:
    """Every block of `data` (blocks `first`... of the diff) against the hash sidecar."""
    view = memoryview(data)
    got = b"".join([digest(view[i : i + bs]) for i in range(0, len(data), bs)])
    want = table[first : first + len(data) // bs]
    if got != want.tobytes():
        raise FcsnapError(f"build {build_dir.name}: a block at or after storage offset "
                          f"{pos:#x} does not match its hash")


def _own_diff(build_dir: Path, out: Path, codec: Codec, progress: Progress) -> BuildInfo:
    """Write a build's diff as E2B's data object, every block checked against its hash
    sidecar as it is read once; returns its builds entry. The SHA-256 and the block hashes
    run here while the frames read before are compressed on other threads."""
    bs, table = read_hashes(build_dir / HASHES)
    size = len(table) * bs
    sha = hashlib.sha256()
    if not size:  # no frames: E2B names the object of an entry without a table `memfile`
        codec = Codec()
    name = "memfile" + SUFFIX[codec.compression]
    step = max(READ_BYTES // codec.frame_size, 1) * codec.frame_size
    frames: tuple[Frame, ...] = ()
    diff = DiffFile(build_dir) if size else None
    try:
        with writing(f"{out / name}"), open(out / name, "wb", buffering=0) as f:
            framer = _Framer(codec, f) if codec.compression != "none" else None
            try:
                for pos in range(0, size, step):
                    assert diff is not None
                    data = diff.read(pos, min(step, size - pos))
                    if framer is not None:
                        view = memoryview(data)
                        for at in range(0, len(data), codec.frame_size):
                            framer.add(pos + at, view[at : at + codec.frame_size])
                    _check_blocks(build_dir, data, table, pos // bs, bs, pos)
                    sha.update(data)
                    if framer is None:
                        f.write(data)
                    progress(len(data))
                if framer is not None:
                    frames = framer.finish()
            finally:
                if framer is not None:
                    framer.close()
            os.fsync(f.fileno())
        if codec.compression != "none":
            with writing(f"{out / name}.uncompressed-size"):
                (out / f"{name}.uncompressed-size").write_text(str(size))
    finally:
        if diff is not None:
            diff.close()
    return BuildInfo(uuid.UUID(build_dir.name), size, sha.digest(), codec.compression, frames)


def _trimmed(entry: BuildInfo, rows: np.ndarray) -> BuildInfo:
    """An ancestor's entry with only the frames this header's mapping records read, as E2B
    writes a child's header (the ancestor's own header keeps the whole table)."""
    if not entry.frames:
        return entry
    mine = rows[(rows[:, 16:32] == np.frombuffer(entry.build_id.bytes, np.uint8)).all(axis=1)]
    length = mine[:, 8:16].copy().view("<u8").ravel()
    start = mine[:, 32:40].copy().view("<u8").ravel()
    starts_u = np.array([f.start_u for f in entry.frames], np.uint64)
    ends_u = np.array([f.end_u for f in entry.frames], np.uint64)
    first = np.searchsorted(ends_u, start, side="right")  # the first frame ending after start
    past = np.searchsorted(starts_u, start + length, side="left")  # frames from here start after
    some = first < past
    marks = np.zeros(len(entry.frames) + 1, np.int64)
    np.add.at(marks, first[some], 1)
    np.add.at(marks, past[some], -1)
    keep = np.cumsum(marks)[:-1] > 0
    return replace(entry, frames=tuple(f for f, k in zip(entry.frames, keep.tolist(),
                                                         strict=True) if k))


def _v4_header(build_dir: Path, entries: dict[uuid.UUID, BuildInfo]) -> bytes:
    """A build's header as version 4: its metadata and mapping records, and the entries of
    every build it reads (its own first); read back by fcsnap's E2B reader, which must give
    the same records, before it is kept."""
    meta, records = decode(read_regular(build_dir / HEADER, "header"), str(build_dir / HEADER))
    me = meta.build_id
    ids = np.frombuffer(records, np.uint8).reshape(-1, RECORD_SIZE)[:, 16:32]
    _, first = np.unique(ids.copy().view("V16").ravel(), return_index=True)
    read = [b for b in (uuid.UUID(bytes=ids[i].tobytes()) for i in sorted(first.tolist()))
            if b not in (me, NIL)]
    rows = np.frombuffer(records, np.uint8).reshape(-1, RECORD_SIZE)
    section = [entries[me], *(_trimmed(entries[b], rows) for b in read)]
    data = METADATA.pack(4, meta.block_size, meta.size, meta.generation, me.bytes,
                         meta.base_build_id.bytes) + encode_v4_body(section, records)
    _, back, _ = decode_full(data, f"exported header of {me}")
    if back != records:
        raise FcsnapError(f"build {me}: its version-4 header does not read back the same")
    return data


def export_e2b(build_dir: Path, out: Path, codec: Codec = Codec(),
               progress: Progress = _noop) -> list[Path]:
    """Write BUILD's lineage into the directory `out` as an E2B store; returns the build
    directories written, oldest first. Everything is assembled in a hidden directory in `out`
    and moved into place at the end; builds already in `out` are refused before any write."""
    out.mkdir(parents=True, exist_ok=True)
    with open_lineage(build_dir):
        if not whole(build_dir):
            raise FcsnapError(f"build {build_dir.name} reads a build that is not in its store")
        chain = lineage_dirs(build_dir)
        for b in chain:
            if (out / b.name).exists():
                raise FcsnapError(f"{out / b.name} already exists: export into another "
                                  "directory")
        stage = out / f".fcsnap-export-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            entries: dict[uuid.UUID, BuildInfo] = {}
            for b in chain:
                (stage / b.name).mkdir()
                entries[uuid.UUID(b.name)] = _own_diff(b, stage / b.name, codec, progress)
                if whole(b):  # else its data only, which its descendants' headers describe
                    with writing(f"{stage / b.name / HEADER}"):
                        (stage / b.name / HEADER).write_bytes(_v4_header(b, entries))
                fsync_path(stage / b.name)
            done: list[Path] = []
            try:
                for b in chain:
                    (stage / b.name).rename(out / b.name)
                    done.append(out / b.name)
                fsync_path(out)
            except BaseException:
                for path in done:
                    shutil.rmtree(path, ignore_errors=True)
                raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return done
