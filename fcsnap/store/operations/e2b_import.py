"""`fcsnap import`: an E2B/Wrenn lineage turned into fcsnap builds (docs/FORMAT.md §10.2).

SRC is an E2B/Wrenn build directory in a local directory laid out as their buckets (or, in
one laid out so in S3, its head brought into the mirror with its lineage's headers). Its lineage
is every build whose header SRC's header reaches through the builds its mappings read; each
such build with a header becomes one fcsnap build with the same build id, stacked oldest
first, through the same builder `diff` uses (hash sidecars, pins, build.json). A generation's
blocks are fed to it only where its mapping differs from the previous generation's, so each
build's data object is read once, frame by frame, when its own generation is built.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.header import Header
from fcsnap.store.backends.stores import current_head
from fcsnap.store.format.layout import HEADER, MANIFEST, build_path
from fcsnap.store.format.lineage import Parent
from fcsnap.store.format.locks import lock_dir, publish_name
from fcsnap.store.format.manifest import Manifest, read_manifest
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.operations.builder import BuildOptions, build_generation
from fcsnap.store.operations.e2b import (
    E2BLineage,
    e2b_build_dir,
    headers_read_once,
    open_e2b,
    read_header,
)
from fcsnap.store.operations.scan import CHUNK, consecutive_runs

SOURCE = "import of E2B build "
"""build.json's `source` of an imported build, followed by its id: a later import of a child
finds the ancestors imported already by it."""
Progress = Callable[[int], None]
Opener = Callable[[uuid.UUID], E2BLineage]


def _noop(_n: int) -> None:
    pass


def lineage_headers(src: Path) -> list[Header]:
    """The headers of SRC's lineage, oldest first: SRC's and, through the builds each one
    reads, every ancestor's found beside it. Generations must be distinct, and every header
    must describe the same memory size and block size as SRC's."""
    head = read_header(src / HEADER)
    store = src.parent
    found = {head.metadata.build_id: head}
    todo = [head]
    while todo:
        for build_id in todo.pop().build_ids():
            path = store / str(build_id) / HEADER
            if build_id in found or not path.is_file():
                continue
            header = found[build_id] = read_header(path)
            todo.append(header)
    for build_id, header in found.items():
        if header.builds_section and header.builds_section.incomplete:
            raise FcsnapError(f"build {build_id}: its header is marked incomplete (upload "
                              "pending): import it once its upload has finished")
    by_generation: dict[int, Header] = {}
    want = (head.metadata.size, head.metadata.block_size)
    for build_id, header in found.items():
        meta = header.metadata
        if meta.build_id != build_id:
            raise FcsnapError(f"{store / str(build_id) / HEADER}: its header is build "
                              f"{meta.build_id}'s")
        if (meta.size, meta.block_size) != want:
            raise FcsnapError(f"build {build_id}: {meta.size} bytes in {meta.block_size}-byte "
                              f"blocks, its descendant {head.metadata.build_id} {want[0]} in "
                              f"{want[1]}-byte blocks")
        other = by_generation.setdefault(meta.generation, header)
        if other is not header:
            raise FcsnapError(f"builds {other.metadata.build_id} and {build_id} are both "
                              f"generation {meta.generation} of one lineage")
    if max(by_generation) != head.metadata.generation:
        raise FcsnapError(f"build {head.metadata.build_id} (generation "
                          f"{head.metadata.generation}) reads a later generation")
    return [by_generation[g] for g in sorted(by_generation)]


def own_bytes(src: Path) -> int:
    """Bytes of the data objects an import of SRC reads (for a progress bar; 0 where SRC is
    not readable: the import says why)."""
    try:
        headers = lineage_headers(src)
    except (FcsnapError, OSError):
        return 0
    return sum(m.length for h in headers for m in h.mappings
               if m.build_id == h.metadata.build_id)


def _block_map(header: Header, ids: dict[uuid.UUID, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per block of guest memory: which build serves it (-1: zeros) and its block number in
    that build's packed diff."""
    meta = header.metadata
    bs = meta.block_size
    if meta.size % bs:
        raise FcsnapError(f"build {meta.build_id}: memory size {meta.size} is not a whole "
                          f"number of {bs}-byte blocks")
    owner = np.full(meta.size // bs, -1, np.int32)
    slot = np.zeros(meta.size // bs, np.int64)
    for m in header.mappings:
        if (m.offset | m.length | (0 if m.is_zero else m.storage_offset)) % bs:
            raise FcsnapError(f"build {meta.build_id}: mapping at {m.offset:#x} is not "
                              f"aligned to its {bs}-byte blocks")
    data = [m for m in header.mappings if not m.is_zero]
    if not data:
        return owner, slot
    build = np.array([ids.setdefault(m.build_id, len(ids)) for m in data], np.int32)
    counts = np.array([m.length for m in data], np.int64) // bs
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    blocks = np.repeat(np.array([m.offset for m in data], np.int64) // bs, counts) + within
    owner[blocks] = np.repeat(build, counts)
    stored = np.array([m.storage_offset for m in data], np.int64) // bs
    slot[blocks] = np.repeat(stored, counts) + within
    return owner, slot


def _changed_chunks(
    lineage: E2BLineage, ids: list[uuid.UUID], now: tuple[np.ndarray, np.ndarray],
    before: tuple[np.ndarray, np.ndarray], progress: Progress,
) -> Iterator[tuple[int, bytes]]:
    """The bytes of every block whose mapping differs from the previous generation's, in
    ascending order: a build's own blocks come from its data object, read front to back;
    zeros are made, not read."""
    owner, slot = now
    bs = lineage.header.metadata.block_size
    changed = (owner != before[0]) | ((owner >= 0) & (slot != before[1]))
    for first, count in consecutive_runs(np.flatnonzero(changed)):
        o, s = owner[first : first + count], slot[first : first + count]
        cut = np.flatnonzero((o[1:] != o[:-1]) | ((o[1:] >= 0) & (s[1:] != s[:-1] + 1))) + 1
        for a, b in zip(np.concatenate(([0], cut)).tolist(),
                        np.append(cut, count).tolist(), strict=True):
            build = int(o[a])
            for pos in range(a * bs, b * bs, CHUNK):
                n = min(CHUNK, b * bs - pos)
                if build < 0:
                    data = bytes(n)
                else:
                    data = lineage.builds[ids[build]].read(int(s[a]) * bs + pos - a * bs, n)
                    progress(n)
                yield (first * bs + pos, data)


def _imported_already(store: Path, build_id: uuid.UUID) -> Path | None:
    """An earlier import of `build_id` in the store (reused as it is), or None; any other
    build by that id is refused."""
    path = build_path(store, build_id)
    if not path.exists():
        return None
    manifest = read_manifest(path) if (path / MANIFEST).exists() else None
    if manifest is None or manifest.source != f"{SOURCE}{build_id}":
        raise FcsnapError(f"build {build_id} already exists in {store} and is not an import "
                          "of E2B's build by that id")
    return path


def import_e2b(
    src: Path, store: Path, options: BuildOptions, progress: Progress = _noop,
    opener: Opener | None = None,
) -> list[tuple[Manifest, Path]]:
    """Import SRC's lineage into the local store `store`, oldest first; `options.name` is
    pointed at SRC's build. Returns the builds of the lineage (imported now or before). On
    failure the builds this call wrote are removed again: nothing of the import is left.
    `opener` opens a build's lineage by id (a bucket's: SRC is then its head in the mirror,
    every header of the lineage beside it); by default, the directory beside SRC's."""
    with headers_read_once():
        return _import_lineage(src, store, options, progress, opener)


def _import_lineage(
    src: Path, store: Path, options: BuildOptions, progress: Progress,
    opener: Opener | None = None,
) -> list[tuple[Manifest, Path]]:
    build_dir = e2b_build_dir(src, None)
    if build_dir is None:
        raise FcsnapError(f"{src} is not an E2B/Wrenn build directory (<build_id>/{HEADER} "
                          "beside its memfile)")
    if options.name is not None:
        check_vm_name(options.name)

    def beside(build_id: uuid.UUID) -> E2BLineage:
        return open_e2b(build_dir.parent / str(build_id))

    opener = opener or beside
    headers = lineage_headers(build_dir)
    for header in headers:  # every object present, long and framed enough, before a write
        with opener(header.metadata.build_id):
            pass
    ids: dict[uuid.UUID, int] = {}
    blocks = headers[0].metadata.size // headers[0].metadata.block_size
    before = (np.full(blocks, -1, np.int32), np.zeros(blocks, np.int64))  # all zeros
    parent_dir: Path | None = None
    made: list[Path] = []
    result: list[tuple[Manifest, Path]] = []
    try:
        for header in headers:
            meta = header.metadata
            now = _block_map(header, ids)
            done = _imported_already(store, meta.build_id)
            head = header is headers[-1]
            if done is None:
                done = _import_one(opener, store, header, ids, now, before, parent_dir,
                                   options if head else replace(options, name=None), progress)
                made.append(done)
            elif head and options.name is not None:
                publish_name(store, options.name, meta.build_id,
                             current_head(store, options.name), "import")
            result.append((read_manifest(done), done))
            before, parent_dir = now, done
    except BaseException:
        _undo(store, made)
        raise
    return result


def _undo(store: Path, made: list[Path]) -> None:
    """Remove the builds this import published, newest first, except those another command
    took up meanwhile (a concurrent import reuses what it finds imported): one a name's head
    or another build reads, or a process holds. Nothing is removed when what the store's
    other builds read cannot be told."""
    from fcsnap.store.backends.usage import scan

    mine = {uuid.UUID(path.name) for path in made}
    try:
        view = scan(store)
    except (FcsnapError, OSError):
        return  # the import's own error is the one to report
    users = [b for b in view.builds.values() if b.build_id not in mine]
    if any(b.reads is None for b in users):
        return
    taken = view.reachable().union(*(b.reads or () for b in users))
    for path in reversed(made):
        if uuid.UUID(path.name) in taken:
            continue
        try:
            lock = lock_dir(path, exclusive=True, block=False)
        except FileNotFoundError:
            continue
        if lock is None:
            continue  # in use: a concurrent import building on it
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()


def _import_one(
    opener: Opener, store: Path, header: Header, ids: dict[uuid.UUID, int],
    now: tuple[np.ndarray, np.ndarray], before: tuple[np.ndarray, np.ndarray],
    parent_dir: Path | None, options: BuildOptions, progress: Progress,
) -> Path:
    """One generation as an fcsnap build over `parent_dir` (None: the first)."""
    meta = header.metadata
    options = replace(options, block_size=meta.block_size, source=f"{SOURCE}{meta.build_id}")
    order = sorted(ids, key=ids.__getitem__)
    with opener(meta.build_id) as lineage:
        chunks = _changed_chunks(lineage, order, now, before, progress)
        if parent_dir is None:
            _, path = build_generation(store, chunks, meta.size, options, build_id=meta.build_id)
        else:
            with open_lineage(parent_dir):
                _, path = build_generation(store, chunks, meta.size, options, Parent(parent_dir),
                                           holes_are_zero=False, build_id=meta.build_id)
    assert isinstance(path, Path)
    return path
