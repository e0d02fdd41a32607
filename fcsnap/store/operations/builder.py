"""Writing one generation: scan blocks, drop zeros, dedup, store what changed, publish atomically.

pack (generation 0), diff (generation N+1) and squash (a flat generation 0 of an existing
generation) are the same pipeline fed from different sources.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import writing
from fcsnap.header import WRITE_VERSION, ZEROS, Metadata, encode
from fcsnap.options import DEFAULT_FRAME_SIZE, DEFAULT_LEVEL
from fcsnap.store.backends.remote import RemoteStore, build_key
from fcsnap.store.backends.stores import current_head
from fcsnap.store.format.hashes import DIGEST_SIZE, digest, dump_hashes
from fcsnap.store.format.layout import (
    DIFF_RAW,
    DIFF_ZSTD,
    HASHES,
    HEADER,
    MANIFEST,
    SNAPFILE,
    staged_build,
)
from fcsnap.store.format.lineage import Parent, Runs
from fcsnap.store.format.locks import publish_name, stop_point
from fcsnap.store.format.manifest import Manifest, Stats, write_manifest
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.format.seekable import BATCH_BYTES, SeekableWriter
from fcsnap.store.operations.scan import consecutive_runs
from fcsnap.threads import block_signals
from fcsnap.units import PAGE
from fcsnap.version import __version__

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor


class Head(Enum):
    AT_START = "the head of the name as the build starts"


@dataclass(frozen=True)
class BuildOptions:
    block_size: int = PAGE
    compression: str = "none"  # "none" or "zstd"
    level: int = DEFAULT_LEVEL
    frame_size: int = DEFAULT_FRAME_SIZE
    name: str | None = None
    vmstate: Path | None = None
    source: str = ""
    working_set: Path | None = None  # store these pages' blocks first (restore --record-ws)
    # The build `name` pointed to when the command started (None: no such name): the name is
    # moved only if it still points there (see locks.publish_name). By default, the build it
    # points to as this build starts.
    name_expected: uuid.UUID | None | Head = Head.AT_START
    verb: str = "pack"  # the command, for messages

    @classmethod
    def of_build(cls, manifest: Manifest) -> BuildOptions:
        """The options `manifest`'s build was stored with, for a build that rewrites it."""
        return cls(
            block_size=manifest.block_size,
            compression=manifest.compression,
            level=manifest.compression_level or cls.level,
            frame_size=manifest.frame_size or cls.frame_size,
        )


# Chunks smaller than this (the data ranges of a sparse Diff file, often one page each) are
# gathered into batches, so numpy's fixed cost per call is paid per batch, not per range.
GATHER_BELOW = 256 << 10
GATHER_BYTES = 4 << 20
WRITEBACK_BYTES = 4 << 20
IN_FLIGHT = 2  # batches handed to the sink's worker and not yet written
# Bytes gathered before a batch goes to the worker: the scan reads small chunks, and a worker
# compressing a batch of frames must have the next batch queued by then, not a few pages.
HANDOFF_BYTES = 8 << 20
# zstd input compressed at once when the diff streams to object storage: small, so the first
# parts go up while the scan has barely started and little is left to compress at its end
# (the upload, not the disk, is then what the build waits for).
STREAM_BATCH_BYTES = 2 << 20


IOV_MAX = os.sysconf("SC_IOV_MAX")


def write_all(fd: int, pieces: list[memoryview]) -> int:
    """Write `pieces` in order with writev (at most IOV_MAX at a time); a short write (the
    disk filling up) is retried, and the retry says why it cannot go on. Returns the bytes."""
    total = 0
    for first in range(0, len(pieces), IOV_MAX):
        todo = pieces[first : first + IOV_MAX]
        while todo:
            done = os.writev(fd, todo)
            total += done
            while todo and done >= len(todo[0]):
                done -= len(todo[0])
                todo = todo[1:]
            if done:
                todo[0] = todo[0][done:]
    return total


class DiffSink:
    """The diff file being written: raw, or zstd seekable frames compressed on both cores.

    Compressing, and writing to object storage, happen on a worker thread a batch or two
    behind the scan, so the two overlap. A raw local file is written at once, straight from
    the scan's buffer: the write is one copy into the page cache, no dearer than the copy a
    hand-over to a worker would take. Writeback is started as data arrives, so the disk works
    during the scan and the fsync at publication has little left to wait for.
    """

    def __init__(self, out: BinaryIO, what: str, options: BuildOptions, local: bool) -> None:
        """`out`: the diff file (unbuffered), or an object writer streaming to object storage
        (`local` False: no writeback hints)."""
        self.what = what
        self.file = out
        self.local = local
        self.zstd = (
            SeekableWriter(
                self.file, options.frame_size, options.level,
                batch_bytes=BATCH_BYTES if local else STREAM_BATCH_BYTES,
            )
            if options.compression == "zstd"
            else None
        )
        self.stored = 0
        self.written = 0  # bytes handed to `out`
        self.synced = 0  # bytes of the file whose writeback has been started
        self.direct = local and self.zstd is None  # written by the caller's thread (write)
        self.worker = None if self.direct else threads(1, "fcsnap-sink")
        self.in_flight: list[Future[None]] = []
        self.handoff = HANDOFF_BYTES if local else STREAM_BATCH_BYTES
        self.gathered: list[bytes] = []  # copies not yet handed to the worker
        self.gathered_bytes = 0
        self.committing: Future[None] | None = None  # an object writer's commit, under way
        self.closed = False

    @classmethod
    def local_file(cls, stage: Path, options: BuildOptions) -> DiffSink:
        name = diff_name(options)
        # Unbuffered: batches are large, and the SeekableWriter writes whole frames.
        out = open(stage / name, "wb", buffering=0)  # noqa: SIM115 (close())
        return cls(out, f"{name} of the new build in store {stage.parent}", options, local=True)

    def write(self, pieces: list[memoryview]) -> None:
        """Append `pieces` in order (written or copied: the caller may reuse their memory at
        once)."""
        if self.direct:
            with writing(self.what):
                self.stored += write_all(self.file.fileno(), pieces)
                self.written = self.stored
                self._writeback()
            return
        data = b"".join(pieces)
        self.stored += len(data)
        self.gathered.append(data)
        self.gathered_bytes += len(data)
        if self.gathered_bytes >= self.handoff:
            self._hand_off()

    def _hand_off(self) -> None:
        """Queue the gathered bytes for the worker, once at most IN_FLIGHT - 1 batches wait."""
        if not self.gathered:
            return
        batch, self.gathered, self.gathered_bytes = self.gathered, [], 0
        self._wait(IN_FLIGHT - 1)
        assert self.worker is not None  # only a direct sink has none, and it gathers nothing
        self.in_flight.append(self.worker.submit(self._write, batch))

    def _write(self, batch: list[bytes]) -> None:
        for data in batch:
            if self.zstd is not None:
                self.zstd.write(data)
            else:
                view = memoryview(data)
                while view:
                    view = view[self.file.write(view) :]
            self.written += len(data) if self.zstd is None else 0
        self._writeback()

    def _writeback(self) -> None:
        end = self.size_written()
        if self.local and end - self.synced >= WRITEBACK_BYTES:
            # On Linux, DONTNEED starts writeback of the range's dirty pages and returns; pages
            # under writeback stay cached.
            os.posix_fadvise(
                self.file.fileno(), self.synced, end - self.synced, os.POSIX_FADV_DONTNEED
            )
            self.synced = end

    def size_written(self) -> int:
        return self.zstd.compressed_size if self.zstd is not None else self.written

    def _wait(self, pending: int = 0) -> None:
        """Wait until at most `pending` batches are in flight; their errors are raised here."""
        while len(self.in_flight) > pending:
            with writing(self.what):
                self.in_flight.pop(0).result()

    def close(self) -> int:
        """Finish the file; returns its size. A local file is closed here; an object writer's
        commit (its last parts, then completing the upload) is started on the worker, so the
        build's small files go up meanwhile: `committed` waits for it."""
        self._hand_off()
        self._wait()
        if self.zstd is not None:
            with writing(self.what):
                self.zstd.close()
        written = self.size_written()
        self.closed = True
        if self.local:
            if self.worker is not None:
                self.worker.shutdown()
            with writing(self.what):
                self.file.close()
        else:
            assert self.worker is not None
            self.committing = self.worker.submit(self.file.close)
            self.worker.shutdown(wait=False)
        return written

    def committed(self) -> None:
        """Wait until the object is complete (it exists whole); its errors are raised here."""
        if self.committing is not None:
            with writing(self.what):
                self.committing.result()

    def discard(self) -> None:
        """Stop the worker and drop the file (all that is left to do after a failure): an
        object writer is aborted, so no object appears. (After close, see `committed`.)"""
        if self.closed:
            return
        self.closed = True
        if self.zstd is not None:
            self.zstd.abandon()  # the batch being compressed is its last
        if self.worker is not None:
            self.worker.shutdown(cancel_futures=True)
        if self.local:
            self.file.close()
        else:
            self.file.abort()


class GenerationBuilder:
    """Accumulates one generation's blocks; `finish` writes header, hashes and manifest.

    Only blocks that differ from the parent are recorded (block, owner, slot arrays); at the end
    their runs are laid over the parent's, so the cost follows the changes and the parent's
    mapping count, not the size of guest memory.
    """

    def __init__(
        self, stage: Path, build_id: uuid.UUID, size: int, parent: Parent | None,
        options: BuildOptions, sink: DiffSink, store_label: str,
    ) -> None:
        self.stage = stage
        self.store_label = store_label
        self.build_id = build_id
        self.size = size
        self.parent = parent
        self.bs = options.block_size
        self.blocks = size // self.bs
        self.sink = sink
        self.build_ids = [*parent.build_ids, build_id] if parent else [build_id]
        self.me = len(self.build_ids) - 1
        empty = np.zeros(0, np.int64)
        self.changes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [(empty, empty, empty)]
        self.spans: list[tuple[int, int]] = []  # (offset, length) of every chunk added
        self.own: dict[bytes, int] = {}  # digest -> slot in this build's diff
        self.digests: list[bytes] = []  # of stored blocks, in storage order
        self.deduplicated = 0
        # np.empty, not bytearray: only the pages that small chunks use get touched.
        self.gather = memoryview(np.empty(GATHER_BYTES, np.uint8))
        self.filled = 0
        self.gather_from = 0  # spans[gather_from:] are in `gather`
        self.taken: np.ndarray | None = None  # blocks `add_first` classified, if it was used
        self.ancestors_read: list[uuid.UUID] = []  # other builds the header reads (by finish)

    def add_first(self, blocks: np.ndarray, data: memoryview) -> None:
        """Take `blocks` (any order, held in that order by `data`) before the memory-order
        pass: those this build stores get the next storage slots in this order, so a working
        set added here first is laid out contiguously in fault order. `add` then passes over
        them (they still count for the chunks it covers, so holes keep their meaning)."""
        if self.taken is None:
            self.taken = np.zeros(self.blocks, bool)
        self._scan(blocks, data)
        self.taken[blocks] = True

    def add(self, offset: int, chunk: bytes | memoryview) -> None:
        """Take whole blocks starting at `offset` (block aligned), in ascending order."""
        n = len(chunk)
        if n >= GATHER_BELOW:
            self._flush()
            self.spans.append((offset, n))
            self.gather_from = len(self.spans)
            first = offset // self.bs
            self._scan(np.arange(first, first + n // self.bs), memoryview(chunk))
            return
        if self.filled + n > GATHER_BYTES:
            self._flush()
        self.gather[self.filled : self.filled + n] = chunk
        self.filled += n
        self.spans.append((offset, n))

    def _flush(self) -> None:
        """Scan the gathered chunks (spans[gather_from:]) as one batch."""
        if self.filled:
            spans = np.array(self.spans[self.gather_from :], np.int64) // self.bs
            first, count = spans[:, 0], spans[:, 1]
            blocks = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(count.sum())
            self._scan(blocks, self.gather[: self.filled])
            self.filled = 0
        self.gather_from = len(self.spans)

    def _scan(self, blocks: np.ndarray, data: memoryview) -> None:
        """Classify the blocks `blocks`, held in order by `data`: unchanged, zero, found in the
        lineage or earlier in this build (deduplicated), or new (stored)."""
        bs = self.bs
        parent = self.parent
        words = np.frombuffer(data, np.uint64).reshape(len(blocks), bs // 8)
        nonzero = words.max(axis=1) != 0  # max: numpy's fastest reduction over a row
        zero = ~nonzero
        if self.taken is not None:  # classified already by add_first
            fresh_blocks = ~self.taken[blocks]
            nonzero &= fresh_blocks
            zero &= fresh_blocks
        if parent is not None:  # zeros change something only where the parent has data
            zeros = blocks[zero]
            self._record(zeros[parent.owners(zeros) != ZEROS], ZEROS, 0)
        pos = np.flatnonzero(nonzero)
        keys = [digest(data[j * bs : (j + 1) * bs]) for j in pos.tolist()]
        if parent is not None and keys:
            new = np.frombuffer(b"".join(keys), np.uint8).reshape(-1, DIGEST_SIZE)
            changed = (new != parent.digests(blocks[pos])).any(axis=1)
            owner, slot = parent.index.find(new[changed])
            found = owner != ZEROS
            self._record(blocks[pos[changed][found]], owner[found], slot[found])
            self.deduplicated += int(found.sum())
            fresh = changed.copy()
            fresh[changed] = ~found
            pos = pos[fresh]
            keys = list(compress(keys, fresh.tolist()))
        if not keys:
            return
        # setdefault hands a digest not seen before the next free slot, a known one its slot.
        before = len(self.own)
        slots = np.array([self.own.setdefault(k, len(self.own)) for k in keys], np.int64)
        self._record(blocks[pos], self.me, slots)
        # Slots are handed out in increasing order, so a slot's first use is where it exceeds
        # every slot before it (and `before - 1`, the last slot of earlier batches).
        first_use = np.flatnonzero(slots > np.maximum.accumulate(np.append(before - 1, slots))[:-1])
        self.deduplicated += len(keys) - len(first_use)
        if len(first_use):
            self.digests.extend(keys[i] for i in first_use.tolist())
            runs = consecutive_runs(pos[first_use])
            self.sink.write([data[a * bs : (a + n) * bs] for a, n in runs])

    def _record(self, blocks: np.ndarray, owner: int | np.ndarray, slot: int | np.ndarray) -> None:
        """Blocks `blocks` now hold block `slot` of build number `owner`."""
        n = len(blocks)
        if n:
            self.changes.append((blocks, np.broadcast_to(owner, n), np.broadcast_to(slot, n)))

    def finish(self, holes_are_zero: bool) -> tuple[Metadata, Stats]:
        """Blocks never added are zeros (Full snapshot) or unchanged (Diff snapshot)."""
        self._flush()
        written = self.sink.close()
        parent = self.parent
        layout = parent.runs if parent else Runs.zeros(self.blocks)
        if holes_are_zero and parent:
            layout = self._holes().over(layout, self.blocks)
        blocks, owner, slot = (np.concatenate(c) for c in zip(*self.changes, strict=True))
        order = np.argsort(blocks)
        layout = Runs.of_blocks(blocks[order], owner[order], slot[order]).over(layout, self.blocks)
        meta = Metadata(
            WRITE_VERSION, self.bs, self.size,
            parent.metadata.generation + 1 if parent else 0,
            self.build_id,
            parent.metadata.base_build_id if parent else self.build_id,
        )
        store = self.store_label
        with writing(f"{HEADER} of the new build in store {store}"):
            (self.stage / HEADER).write_bytes(
                encode(meta, layout.records(self.build_ids, self.bs).tobytes())
            )
        with writing(f"{HASHES} of the new build in store {store}"):
            (self.stage / HASHES).write_bytes(dump_hashes(self.bs, b"".join(self.digests)))
        # np.flatnonzero(np.bincount()), not np.unique: numpy's unique imports numpy.ma.
        used = np.flatnonzero(np.bincount(layout.owner[layout.owner >= 0])).tolist()
        self.ancestors_read = [self.build_ids[i] for i in used if i != self.me]
        stored = len(self.digests)
        zero_blocks = int(layout.count[layout.owner == ZEROS].sum())
        stats = Stats(
            blocks_total=self.blocks,
            blocks_stored=stored,
            blocks_zero=zero_blocks,
            blocks_deduplicated=self.deduplicated,
            blocks_inherited=self.blocks - stored - self.deduplicated - zero_blocks,
            bytes_stored=self.sink.stored,
            bytes_written=written,
        )
        return meta, stats

    def _holes(self) -> Runs:
        """Zero runs over the gaps between the chunks added."""
        spans = np.array(self.spans, np.int64).reshape(-1, 2) // self.bs
        start = np.concatenate(([0], spans[:, 0] + spans[:, 1]))
        count = np.concatenate((spans[:, 0], [self.blocks])) - start
        start, count = start[count > 0], count[count > 0]
        return Runs(start, count, np.full(len(start), ZEROS, np.int32), np.zeros_like(start))


def threads(count: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads leave signals to the main thread; concurrent.futures (and
    the logging it imports) is loaded only by the builds that hand work to threads, not by a
    raw local one."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(count, thread_name_prefix=name, initializer=block_signals)


def diff_name(options: BuildOptions) -> str:
    return DIFF_ZSTD if options.compression == "zstd" else DIFF_RAW


def build_generation(
    store: Path | RemoteStore,
    chunks: Iterable[tuple[int, bytes | memoryview]],
    size: int,
    options: BuildOptions,
    parent: Parent | None = None,
    holes_are_zero: bool = True,
    first: Iterable[tuple[np.ndarray, memoryview]] = (),
    build_id: uuid.UUID | None = None,
) -> tuple[Manifest, Path | str]:
    """Run the pipeline and publish the build; returns its manifest and directory (its URL in
    a remote store). `first` (MemoryFile.working_set) is taken before `chunks`: its stored
    blocks lead the diff. `build_id`: the new build's id (import keeps E2B's); a fresh UUID
    by default."""
    expected = options.name_expected
    if options.name is not None:
        check_vm_name(options.name)
        if expected is Head.AT_START:
            expected = current_head(store, options.name)
    if options.vmstate is not None and not options.vmstate.is_file():
        problem = "is not a regular file" if options.vmstate.exists() else "not found"
        raise FcsnapError(f"vmstate file {options.vmstate} {problem}")
    build_id = build_id or uuid.uuid4()
    work = Assembly(build_id, chunks, size, options, parent, holes_are_zero, first)
    if isinstance(store, RemoteStore):
        return build_remote(store, work, expected), f"{store.url}/{build_id}"
    with staged_build(store, build_id) as lock:
        stage = lock.path
        manifest = work.assemble(stage, DiffSink.local_file(stage, options), str(store))
    final = lock.path
    with lock:  # held until the name is published: no cleanup or gc takes the build before
        if options.name:
            try:
                publish_name(store, options.name, build_id, expected, options.verb)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)  # a failed command leaves no new build
                raise
    return manifest, final


@dataclass
class Assembly:
    """One build's inputs; `assemble` writes it into a staging directory (the diff into the
    sink given, which may stream it elsewhere)."""

    build_id: uuid.UUID
    chunks: Iterable[tuple[int, bytes | memoryview]]
    size: int
    options: BuildOptions
    parent: Parent | None
    holes_are_zero: bool
    first: Iterable[tuple[np.ndarray, memoryview]]

    def assemble(self, stage: Path, sink: DiffSink, store: str) -> Manifest:
        options, parent = self.options, self.parent
        builder = GenerationBuilder(
            stage, self.build_id, self.size, parent, options, sink, store
        )
        try:
            for blocks, data in self.first:
                builder.add_first(blocks, data)
            for offset, chunk in self.chunks:
                builder.add(offset, chunk)
            meta, stats = builder.finish(self.holes_are_zero)
        finally:
            builder.sink.discard()
        manifest = Manifest(
            build_id=self.build_id,
            parent_build_id=parent.manifest.build_id if parent else None,
            generation=meta.generation,
            base_build_id=meta.base_build_id,
            block_size=options.block_size,
            size=self.size,
            compression=options.compression,
            compression_level=options.level if options.compression == "zstd" else None,
            frame_size=options.frame_size if options.compression == "zstd" else None,
            created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            fcsnap_version=__version__,
            source=options.source,
            stats=stats,
            pins={b: parent.pins[b] for b in builder.ancestors_read} if parent else {},
        )
        with writing(f"{MANIFEST} of the new build in store {store}"):
            write_manifest(stage, manifest)
        if options.vmstate is not None:
            with writing(f"{SNAPFILE} of the new build in store {store}"):
                shutil.copyfile(options.vmstate, stage / SNAPFILE)
        return manifest


def build_remote(store: RemoteStore, work: Assembly, expected: uuid.UUID | None) -> Manifest:
    """A build into object storage (docs/FORMAT.md §8.5): the diff streams up as a multipart
    upload while it is produced; the small files are assembled in a local temporary directory
    and uploaded while the diff's upload completes, build.json last (the commit) once every
    other object exists; then the name by compare-and-swap. Whatever fails, the objects
    written are deleted, build.json first."""
    options = work.options
    stage = Path(tempfile.mkdtemp(prefix="fcsnap-stage-"))
    diff_key = build_key(work.build_id, diff_name(options))
    written: list[str] = [diff_key]
    sink: DiffSink | None = None
    try:
        sink = DiffSink(store.objects.writer(diff_key), f"{diff_key} in {store.url}", options,
                        local=False)
        manifest = work.assemble(stage, sink, store.url)
        small = [name for name in (HEADER, HASHES, SNAPFILE) if (stage / name).exists()]
        written += [build_key(work.build_id, name) for name in small]
        with threads(len(small), "fcsnap-upload") as pool:
            uploads = [
                pool.submit(store.objects.upload, build_key(work.build_id, name), stage / name)
                for name in small
            ]
            for upload in uploads:
                upload.result()
        sink.committed()
        stop_point("commit")
        written.append(build_key(work.build_id, MANIFEST))
        store.objects.upload(written[-1], stage / MANIFEST)
        if options.name:
            store.publish_name(options.name, work.build_id, expected, options.verb)
    except BaseException:
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.committed()  # a commit under way ends before its object is deleted
        for key in reversed(written):  # build.json first: the build is invisible at once
            with contextlib.suppress(FcsnapError):
                store.objects.delete(key)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest
