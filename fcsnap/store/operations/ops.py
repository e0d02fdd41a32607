"""The store operations behind the CLI: pack, diff, squash, unpack, verify."""

from __future__ import annotations

import fcntl
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.errors import FcsnapError, UsageError
from fcsnap.files import read_regular
from fcsnap.header import Mapping, load_header
from fcsnap.store.backends.stores import Store, local_path
from fcsnap.store.format.hashes import DIGEST_SIZE, digest, read_hashes
from fcsnap.store.format.layout import HASHES, build_path, store_of
from fcsnap.store.format.locks import stop_point, try_remove_staging
from fcsnap.store.format.manifest import Manifest, read_manifest
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.operations.builder import BuildOptions, Head, build_generation
from fcsnap.store.operations.scan import CHUNK, MemoryFile, block_aligned

if TYPE_CHECKING:
    import numpy as np

    from fcsnap.store.format.lineage import Parent
    from fcsnap.store.format.source import GenerationReader

# Imported where used, not here: numpy, the lineage, the stored generation's reader and the
# output machinery, none of which a pack needs (its start-up is a good part of its time).

Progress = Callable[[int], None]
"""Called with the number of bytes just processed."""


def _noop(_: int) -> None:
    pass


def _tracked(
    chunks: Iterator[tuple[int, bytes | memoryview]], progress: Progress
) -> Iterator[tuple[int, bytes | memoryview]]:
    for offset, chunk in chunks:
        yield offset, chunk
        progress(len(chunk))


def _tracked_batches(
    batches: Iterator[tuple[np.ndarray, memoryview]], progress: Progress
) -> Iterator[tuple[np.ndarray, memoryview]]:
    for blocks, data in batches:
        yield blocks, data
        progress(len(data))


def pack(
    memfile: Path, store: Store, options: BuildOptions, progress: Progress = _noop
) -> tuple[Manifest, Path | str]:
    """Generation 0 of a new lineage."""
    with MemoryFile(memfile, options.block_size) as source:
        options = replace(options, source=memfile.name)
        return build_generation(
            store, _tracked(source.chunks(), progress), source.size, options,
            first=_working_set(source, options),
        )


def _working_set(
    source: MemoryFile, options: BuildOptions, fill_holes: Callable[[int, int], bytes] | None = None
) -> Iterator[tuple[np.ndarray, memoryview]] | None:
    """The blocks of --working-set, to be stored first; read (and its size checked) now."""
    if options.working_set is None:
        return None
    from fcsnap.workingset import read_working_set

    return source.working_set(read_working_set(options.working_set, source.size), fill_holes)


def diff(
    memfile: Path,
    base_dir: Path,
    store: Store,
    options: BuildOptions,
    sparse_diff: bool = False,
    progress: Progress = _noop,
    written: Path | None = None,
    *,
    holes_are_zeros: bool = False,
) -> tuple[Manifest, Path | str]:
    """Generation N+1 over base_dir (in a remote store: in its mirror). With sparse_diff (a
    Firecracker Diff snapshot), holes mean "unchanged"; with holes_are_zeros the file is Full
    and holes are zeros; with neither, holes over the base's data are refused (see
    _refuse_holes_over_data). With `written` (restore --written: the pages the guest wrote
    since base_dir was served), only those pages of the Full file are read; the rest is
    unchanged."""
    if sparse_diff and holes_are_zeros:
        raise UsageError("--sparse-diff and --holes-are-zeros contradict each other: give one")
    if store_of(base_dir).resolve() != local_path(store).resolve():
        raise FcsnapError(f"base build {base_dir} is not in store {store}")
    with open_lineage(base_dir):  # the base's lineage stays what it is until we are done
        if written is not None:
            return _diff_written(memfile, base_dir, store, options, written, progress)
        return _diff(memfile, base_dir, store, options, sparse_diff, holes_are_zeros, progress)


def _refuse_holes_over_data(source: MemoryFile, parent: Parent) -> None:
    """Firecracker writes Full snapshots whole and Diff snapshots as holes over the pages that
    did not change, and the file cannot say which it is. Holes over blocks the base holds as
    data most likely mean a Diff snapshot given without --sparse-diff: read as zeros, every
    unchanged page of the VM would become a zero page. Holes over the base's zeros are the
    same either way, so a sparse copy of a Full snapshot that only zeroes zeros passes."""
    start, count = source.hole_blocks()
    over = parent.runs.data_blocks_in(start, count)
    if over:
        raise UsageError(
            f"{source.path} has holes over {over} blocks (of {parent.size // parent.block_size})"
            f" that the base holds as data: for a Firecracker Diff snapshot give --sparse-diff "
            f"(holes are unchanged pages); for a sparse copy of a Full snapshot give "
            f"--holes-are-zeros"
        )


def _diff_written(
    memfile: Path, base_dir: Path, store: Store, options: BuildOptions, written: Path,
    progress: Progress,
) -> tuple[Manifest, Path | str]:
    from fcsnap.store.format.lineage import Parent
    from fcsnap.workingset import parse_page_set

    parent = Parent(base_dir)
    options = replace(options, block_size=parent.block_size, source=memfile.name)
    with MemoryFile(memfile, parent.block_size) as source:
        _check_size(memfile, source, parent)
        recorded, offsets, against = parse_page_set(read_regular(written, "written set"),
                                                    str(written))
        if recorded != parent.size:
            raise FcsnapError(f"{written}: a written set of {recorded} bytes of guest memory, "
                              f"but base build {parent.manifest.build_id} is {parent.size}")
        if against is not None and against != parent.manifest.build_id:
            raise FcsnapError(
                f"{written}: a written set of a VM restored from build {against}, not from "
                f"base build {parent.manifest.build_id} (--base: the build restored, or the "
                "restore's last checkpoint)")
        return build_generation(store, (), source.size, options, parent, holes_are_zero=False,
                                first=_tracked_batches(source.blocks(offsets), progress))


def _check_size(memfile: Path, source: MemoryFile, parent: Parent) -> None:
    if source.size != parent.size:
        raise FcsnapError(
            f"{memfile}: {source.size} bytes, but base build {parent.manifest.build_id} "
            f"is {parent.size} bytes of guest memory"
        )


def _diff(
    memfile: Path, base_dir: Path, store: Store, options: BuildOptions, sparse_diff: bool,
    holes_are_zeros: bool, progress: Progress,
) -> tuple[Manifest, Path | str]:
    from fcsnap.store.format.lineage import Parent
    from fcsnap.store.format.source import GenerationReader

    parent = Parent(base_dir)
    options = replace(options, block_size=parent.block_size, source=memfile.name)
    with MemoryFile(memfile, parent.block_size) as source:
        _check_size(memfile, source, parent)
        if source.holes_hidden and not holes_are_zeros:
            raise FcsnapError(
                f"{memfile}: its filesystem cannot tell its holes (lseek finds no hole, yet "
                f"{source.allocated} of its {source.size} bytes are allocated): a Diff "
                "snapshot's unchanged pages would read as zeros; have Firecracker write it to "
                "a filesystem that reports holes (ext4, xfs, btrfs, tmpfs), or give "
                "--holes-are-zeros for a Full snapshot"
            )
        if not sparse_diff and not holes_are_zeros:
            _refuse_holes_over_data(source, parent)
        reader: list[GenerationReader] = []

        def base_bytes(offset: int, length: int) -> bytes:
            if not reader:
                reader.append(GenerationReader(base_dir))
            return reader[0].read(offset, length)

        fill = base_bytes if sparse_diff else None
        try:
            chunks = source.chunks(fill_holes=fill)
            return build_generation(
                store, _tracked(chunks, progress), source.size, options, parent,
                holes_are_zero=not sparse_diff, first=_working_set(source, options, fill),
            )
        finally:
            for r in reader:
                r.close()


def generation_chunks(reader: GenerationReader) -> Iterator[tuple[int, bytes]]:
    """The data blocks of a stored generation, in order (zero runs skipped)."""
    bs = reader.header.metadata.block_size
    data = [(m.offset, m.end) for m in reader.header.mappings if not m.is_zero]
    for lo, hi, _ in block_aligned(data, bs):
        for start in range(lo, hi, CHUNK):
            yield start, reader.read(start, min(CHUNK, hi - start))


def squash(
    build_dir: Path, store: Store, name: str | None = None,
    name_expected: uuid.UUID | None | Head = Head.AT_START, progress: Progress = _noop,
    verb: str = "squash",
) -> tuple[Manifest, Path | str]:
    """A generation 0 with the same content as build_dir and no ancestors, stored the way
    build_dir is (block size, compression, level, frame size); `name` points vms/NAME at it
    if it still points at `name_expected` (BuildOptions.name_expected). `verb` names the
    command in messages."""
    from fcsnap.store.format.source import GenerationReader

    options = replace(
        BuildOptions.of_build(read_manifest(build_dir)), name=name, name_expected=name_expected,
        verb=verb, source=f"squash of {build_dir.name}",
    )
    with open_lineage(build_dir), GenerationReader(build_dir) as reader:
        return build_generation(
            store, _tracked(generation_chunks(reader), progress), reader.size, options
        )


PARTIAL_PREFIX = ".fcsnap-unpack-"
PARTIAL_SUFFIX = ".partial"


def check_output(output: Path, force: bool) -> None:
    """Only a regular file (with --force) or nothing is replaced by unpack's output; a symlink
    is replaced as a link (never followed), with --force."""
    from fcsnap import outputs

    try:
        mode = os.lstat(output).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise FcsnapError(f"cannot write {output}: {e.strerror or e}") from e
    if stat.S_ISLNK(mode):
        if not force:
            raise FcsnapError(f"{output} is a symbolic link (use --force to replace the link)")
    elif stat.S_ISDIR(mode):
        raise FcsnapError(f"{output} is a directory: give the memory file to write")
    elif not stat.S_ISREG(mode):
        raise FcsnapError(
            f"{output} is {outputs.kind_of(mode)}: only a regular file can be replaced"
        )
    elif not force:
        raise FcsnapError(f"{output} exists (use --force to replace it)")


def remove_stale_partials(directory: Path) -> None:
    """Remove the temporary files of unpacks that were killed: those no process holds locked."""
    for entry in directory.glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"):
        try_remove_staging(entry)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """A short write (the disk filling up) is retried: the retry says why it cannot go on."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _partial_name() -> str:
    return f"{PARTIAL_PREFIX}{uuid.uuid4().hex}{PARTIAL_SUFFIX}"


def locked_partial(dir_fd: int, name: str) -> int:
    """Create the temporary `name` exclusively (private: it holds guest memory) and hold
    LOCK_EX on it, so that another unpack's cleanup leaves it alone; FileExistsError (try
    another name) if a cleanup removed it before it was locked."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else holds it
    try:
        still_there = os.lstat(name, dir_fd=dir_fd).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        still_there = False
    if not still_there:
        os.close(fd)
        raise FileExistsError(name)
    return fd


def unpack(build_dir: Path, output: Path, force: bool = False, progress: Progress = _noop) -> int:
    """Rebuild the full memory file, sparse where zero, every block checked against its hash;
    returns bytes of data written. The file is written under a temporary name, locked while
    being written, and renamed over `output` only once complete (fcsnap/outputs.py)."""
    from fcsnap.store.format.source import GenerationReader

    check_output(output, force)
    with open_lineage(build_dir), GenerationReader(build_dir) as reader:
        return write_memory(output, force, reader.size, reader.header.mappings, reader.stored,
                            progress)


def write_memory(
    output: Path, force: bool, size: int, mappings: Iterable[Mapping],
    stored: Callable[[uuid.UUID, int, int], bytes], progress: Progress = _noop,
) -> int:
    """Write guest memory of `size` bytes at `output`, sparse where zero, each mapping's bytes
    from `stored(build, storage_offset, length)`; returns bytes of data written. The file is
    written under a temporary name, locked while being written, and renamed over `output`
    only once complete."""
    from fcsnap import outputs

    check_output(output, force)
    remove_stale_partials(output.parent)
    written = 0
    with outputs.output(
        output, "", in_place=False, temp_name=_partial_name, create=locked_partial,
        recheck=lambda: check_output(output, force),  # it may have changed while we wrote
    ) as fd:
        stop_point("unpacking")
        os.ftruncate(fd, size)
        for m in mappings:
            if m.is_zero:
                continue
            for pos in range(0, m.length, CHUNK):
                n = min(CHUNK, m.length - pos)
                _pwrite_all(fd, stored(m.build_id, m.storage_offset + pos, n), m.offset + pos)
                written += n
                progress(n)
    return written


def verify(build_dir: Path, progress: Progress = _noop) -> dict[str, Any]:
    """Check a build and every build it reads; raise FcsnapError naming the first problem."""
    header = load_header(build_dir)
    manifest = read_manifest(build_dir)
    meta = header.metadata
    if (manifest.build_id, manifest.size, manifest.block_size, manifest.generation) != (
        meta.build_id, meta.size, meta.block_size, meta.generation
    ):
        raise FcsnapError(f"{build_dir}: build.json disagrees with memfile.header")
    if build_dir.name != str(meta.build_id):
        raise FcsnapError(f"{build_dir}: directory name is not its build id {meta.build_id}")
    store = store_of(build_dir)
    needed = header.storage_ends()
    blocks = 0
    with open_lineage(build_dir) as lineage:
        for build_id, end in needed.items():
            blocks += verify_build_data(
                build_path(store, build_id), meta.block_size, end, progress
            )
    return {
        "build_id": str(meta.build_id),
        "generation": meta.generation,
        "builds_checked": len(needed),
        "blocks_checked": blocks,
        "pinned": lineage.pinned,
        "ok": True,
    }


def verify_build_data(build_dir: Path, block_size: int, mapped_end: int, progress: Progress) -> int:
    """One build's files against each other and every stored block against its hash."""
    import numpy as np

    from fcsnap.store.format.source import DiffFile

    name = build_dir.name
    if not build_dir.is_dir():
        raise FcsnapError(f"build {name} is missing from the store")
    manifest = read_manifest(build_dir)
    if manifest.block_size != block_size:
        raise FcsnapError(f"build {name}: block size {manifest.block_size}, expected {block_size}")
    hashed_block_size, table = read_hashes(build_dir / HASHES)
    if hashed_block_size != block_size:
        raise FcsnapError(
            f"build {name}: hash sidecar is for block size {hashed_block_size}, not {block_size}"
        )
    diff_file = DiffFile(build_dir, cache_bytes=0)
    try:
        expected = manifest.stats.bytes_stored
        if diff_file.size != expected or len(table) * block_size != expected:
            raise FcsnapError(
                f"build {name}: diff holds {diff_file.size} bytes, hashes cover "
                f"{len(table) * block_size}, build.json says {expected}"
            )
        if mapped_end > diff_file.size:
            raise FcsnapError(f"build {name}: header maps past the end of {diff_file.path}")
        per_chunk = max(1, CHUNK // block_size)
        for first in range(0, len(table), per_chunk):
            count = min(per_chunk, len(table) - first)
            data = diff_file.read(first * block_size, count * block_size)
            got = b"".join(
                digest(data[i * block_size : (i + 1) * block_size]) for i in range(count)
            )
            bad = np.flatnonzero(
                (np.frombuffer(got, np.uint8).reshape(count, DIGEST_SIZE)
                 != table[first : first + count]).any(axis=1)
            )
            if len(bad):
                block = first + int(bad[0])
                raise FcsnapError(
                    f"build {name}: block {block} (storage offset {block * block_size:#x}) "
                    f"of {diff_file.path.name} does not match its hash"
                )
            progress(count * block_size)
    finally:
        diff_file.close()
    return len(table)
