"""Writing one generation: scan blocks, drop zeros, dedup, store what changed, publish atomically.

pack (generation 0), diff (generation N+1) and squash (a flat generation 0 of an existing
generation) are the same pipeline fed from different sources.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fcsnap.errors import FcsnapError
from fcsnap.files import writing
from fcsnap.options import DEFAULT_FRAME_SIZE, DEFAULT_LEVEL
from fcsnap.scratch import scratch_dir
from fcsnap.store.backends.stores import current_head, is_remote
from fcsnap.store.format.layout import (
    DIFF_RAW,
    DIFF_ZSTD,
    HASHES,
    HEADER,
    MANIFEST,
    SNAPFILE,
    staged_build,
)
from fcsnap.store.format.locks import publish_name, stop_point
from fcsnap.store.format.manifest import Manifest, write_manifest
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.operations.fresh import FreshBuilder
from fcsnap.threads import block_signals
from fcsnap.units import PAGE
from fcsnap.version import __version__

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np

    from fcsnap.store.backends.remote import RemoteStore
    from fcsnap.store.format.lineage import Parent
    from fcsnap.store.format.seekable import SeekableWriter
    from fcsnap.store.operations.generation import GenerationBuilder


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


WRITEBACK_BYTES = 4 << 20
SMALL_WRITE = 256 << 10  # a direct sink gathers writes smaller than this
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
        self.zstd: SeekableWriter | None = None
        if options.compression == "zstd":  # zstandard is loaded by the builds that compress
            from fcsnap.store.format.seekable import BATCH_BYTES, SeekableWriter

            self.zstd = SeekableWriter(
                self.file, options.frame_size, options.level,
                batch_bytes=BATCH_BYTES if local else STREAM_BATCH_BYTES,
            )
        self.stored = 0
        self.written = 0  # bytes handed to `out`
        self.synced = 0  # bytes of the file whose writeback has been started
        self.direct = local and self.zstd is None  # written by the caller's thread (write)
        self.worker = None if self.direct else threads(1, "fcsnap-sink")
        self.in_flight: list[Future[None]] = []
        self.handoff = (WRITEBACK_BYTES if self.direct else HANDOFF_BYTES) if local else (
            STREAM_BATCH_BYTES
        )
        self.gathered: list[bytes] = []  # copies not yet written or handed to the worker
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
        once). A direct sink writes large writes at once and gathers small ones (the blocks
        of a sparse file's short data ranges), so that each write call carries megabytes."""
        if self.direct and sum(map(len, pieces)) >= SMALL_WRITE:
            self._hand_off()
            with writing(self.what):
                done = write_all(self.file.fileno(), pieces)
                self.stored += done
                self.written += done
                self._writeback()
            return
        data = b"".join(pieces)
        self.stored += len(data)
        self.gathered.append(data)
        self.gathered_bytes += len(data)
        if self.gathered_bytes >= self.handoff:
            self._hand_off()

    def _hand_off(self) -> None:
        """Write the gathered bytes (direct), or queue them for the worker once at most
        IN_FLIGHT - 1 batches wait."""
        if not self.gathered:
            return
        batch, self.gathered, self.gathered_bytes = self.gathered, [], 0
        if self.direct:
            with writing(self.what):
                self.written += write_all(self.file.fileno(), [memoryview(d) for d in batch])
                self._writeback()
            return
        self._wait(IN_FLIGHT - 1)
        assert self.worker is not None  # only a direct sink has none
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
    first: Iterable[tuple[np.ndarray, memoryview]] | None = None,
    build_id: uuid.UUID | None = None,
) -> tuple[Manifest, Path | str]:
    """Run the pipeline and publish the build; returns its manifest and directory (its URL in
    a remote store). `first` (MemoryFile.working_set) is taken before `chunks`: its stored
    blocks lead the diff (MemoryFile.blocks: a written set's blocks, all that is read).
    `build_id`: the new build's id (import keeps E2B's); a fresh UUID by default."""
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
    if is_remote(store):
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
    first: Iterable[tuple[np.ndarray, memoryview]] | None

    def assemble(self, stage: Path, sink: DiffSink, store: str) -> Manifest:
        options, parent = self.options, self.parent
        builder: FreshBuilder | GenerationBuilder
        if parent is None and self.first is None:
            builder = FreshBuilder(stage, self.build_id, self.size, options.block_size, sink,
                                   store)
        else:
            from fcsnap.store.operations.generation import GenerationBuilder

            builder = GenerationBuilder(
                stage, self.build_id, self.size, parent, options.block_size, sink, store
            )
        try:
            for blocks, data in self.first or ():
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
    from fcsnap.store.backends.remote import build_key

    options = work.options
    stage = scratch_dir("stage")
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
