"""The store operations behind the CLI: pack, diff, squash, unpack, verify."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.store.builder import BuildOptions, build_generation
from fcsnap.store.hashes import DIGEST_SIZE, digest, read_hashes
from fcsnap.store.layout import HASHES, build_path, store_of
from fcsnap.store.lineage import Parent
from fcsnap.store.manifest import Manifest, read_manifest
from fcsnap.store.scan import CHUNK, MemoryFile, block_aligned
from fcsnap.store.source import DiffFile, GenerationReader
from fcsnap.workingset import read_working_set

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


def pack(
    memfile: Path, store: Path, options: BuildOptions, progress: Progress = _noop
) -> tuple[Manifest, Path]:
    """Generation 0 of a new lineage."""
    with MemoryFile(memfile, options.block_size) as source:
        options = replace(options, source=memfile.name)
        return build_generation(
            store, _tracked(source.chunks(), progress), source.size, options,
            first=_working_set(source, options),
        )


def _working_set(
    source: MemoryFile, options: BuildOptions, fill_holes: Callable[[int, int], bytes] | None = None
) -> Iterator[tuple[np.ndarray, memoryview]] | tuple[()]:
    """The blocks of --working-set, to be stored first; read (and its size checked) now."""
    if options.working_set is None:
        return ()
    return source.working_set(read_working_set(options.working_set, source.size), fill_holes)


def diff(
    memfile: Path,
    base_dir: Path,
    store: Path,
    options: BuildOptions,
    sparse_diff: bool = False,
    progress: Progress = _noop,
) -> tuple[Manifest, Path]:
    """Generation N+1 over base_dir. With sparse_diff (a Firecracker Diff snapshot), holes mean
    "unchanged"; otherwise the file is Full and holes are zeros."""
    parent = Parent(base_dir)
    if store_of(base_dir).resolve() != store.resolve():
        raise FcsnapError(f"base build {base_dir} is not in store {store}")
    options = replace(options, block_size=parent.block_size, source=memfile.name)
    with MemoryFile(memfile, parent.block_size) as source:
        if source.size != parent.size:
            raise FcsnapError(
                f"{memfile}: {source.size} bytes, but base build {parent.manifest.build_id} "
                f"is {parent.size} bytes of guest memory"
            )
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
    build_dir: Path, store: Path, name: str | None = None, progress: Progress = _noop,
) -> tuple[Manifest, Path]:
    """A generation 0 with the same content as build_dir and no ancestors, stored the way
    build_dir is (block size, compression, level, frame size); `name` points vms/NAME at it."""
    options = replace(
        BuildOptions.of_build(read_manifest(build_dir)), name=name,
        source=f"squash of {build_dir.name}",
    )
    with GenerationReader(build_dir) as reader:
        return build_generation(
            store, _tracked(generation_chunks(reader), progress), reader.size, options
        )


def unpack(build_dir: Path, output: Path, force: bool = False, progress: Progress = _noop) -> int:
    """Rebuild the full memory file, sparse where zero; returns bytes of data written."""
    if output.exists() and not force:
        raise FcsnapError(f"{output} exists (use --force to replace it)")
    if output.is_dir():
        raise FcsnapError(f"{output} is a directory")
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}.partial"
    written = 0
    with GenerationReader(build_dir) as reader:
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as e:  # named after the output: the temporary name means nothing
                raise FcsnapError(f"cannot create {output}: {e.strerror or e}") from e
            try:
                os.ftruncate(fd, reader.size)
                for m in reader.header.mappings:
                    if m.is_zero:
                        continue
                    diff_file = reader.diffs[m.build_id]
                    for pos in range(0, m.length, CHUNK):
                        n = min(CHUNK, m.length - pos)
                        data = diff_file.read(m.storage_offset + pos, n)
                        if os.pwrite(fd, data, m.offset + pos) != n:
                            raise FcsnapError(f"{output}: short write")
                        written += n
                        progress(n)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, output)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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
    for build_id, end in needed.items():
        blocks += verify_build_data(build_path(store, build_id), meta.block_size, end, progress)
    return {
        "build_id": str(meta.build_id),
        "generation": meta.generation,
        "builds_checked": len(needed),
        "blocks_checked": blocks,
        "ok": True,
    }


def verify_build_data(build_dir: Path, block_size: int, mapped_end: int, progress: Progress) -> int:
    """One build's files against each other and every stored block against its hash."""
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
