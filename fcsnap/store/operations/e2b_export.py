"""`fcsnap export`: a lineage of fcsnap builds written as an E2B store (docs/FORMAT.md §10.3).

Each build of BUILD's lineage becomes `<build_id>/memfile.header` (version 4: the same
metadata and mappings, and a builds section with each build's size, SHA-256 and frame table)
beside its packed diff: `memfile`, or `memfile.zstd` as independent zstd frames with E2B's
local backend's `.uncompressed-size` file. fcsnap's diff is already E2B's packed diff (its
own blocks back to back), so the bytes and the mappings carry over unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import fsync_path, writing
from fcsnap.header import load_header
from fcsnap.header.e2b import BuildInfo, Frame, encode_v4_body
from fcsnap.header.format import METADATA, parse_header
from fcsnap.store.format.hashes import DIGEST_SIZE, digest, read_hashes
from fcsnap.store.format.layout import HASHES, HEADER, build_path, store_of
from fcsnap.store.format.lineage import header_records
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.format.source import DiffFile

FRAME_BYTES = 2 << 20
"""Uncompressed bytes per zstd frame: E2B's default."""
READ_BYTES = 8 << 20
Progress = Callable[[int], None]


def _noop(_n: int) -> None:
    pass


def lineage_dirs(build_dir: Path) -> list[Path]:
    """BUILD and its ancestors (through `parent_build_id`), oldest first."""
    store = store_of(build_dir)
    chain = [build_dir]
    while (parent := read_manifest(chain[-1]).parent_build_id) is not None:
        chain.append(build_path(store, parent))
    return chain[::-1]


def _own_diff(build_dir: Path, out: Path, compression: str, level: int,
              progress: Progress) -> BuildInfo:
    """Write a build's diff as E2B's data object, every block checked against its hash
    sidecar as it is read; returns its builds entry."""
    bs, table = read_hashes(build_dir / HASHES)
    size = len(table) * bs
    sha = hashlib.sha256()
    frames: list[Frame] = []
    if not size:  # no frames: E2B names the object of an entry without a table `memfile`
        compression = "none"
    name = "memfile" + (".zstd" if compression == "zstd" else "")
    step = FRAME_BYTES if compression == "zstd" else READ_BYTES
    diff = DiffFile(build_dir) if size else None
    try:
        import zstandard

        packer = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                          write_content_size=True)
        with writing(f"{out / name}"), open(out / name, "wb") as f:
            written = 0
            for pos in range(0, size, step):
                assert diff is not None
                data = diff.read(pos, min(step, size - pos))
                got = np.frombuffer(b"".join(digest(data[i : i + bs])
                                             for i in range(0, len(data), bs)), np.uint8)
                first = pos // bs
                if not np.array_equal(got.reshape(-1, DIGEST_SIZE),
                                      table[first : first + len(data) // bs]):
                    raise FcsnapError(f"build {build_dir.name}: a block at or after storage "
                                      f"offset {pos:#x} does not match its hash")
                sha.update(data)
                if compression == "zstd":
                    data_c = packer.compress(data)
                    frames.append(Frame(pos, written, len(data), len(data_c)))
                    data = data_c
                f.write(data)
                written += len(data)
                progress(min(step, size - pos))
            f.flush()
            os.fsync(f.fileno())
        if compression == "zstd":
            with writing(f"{out / name}.uncompressed-size"):
                (out / f"{name}.uncompressed-size").write_text(str(size))
    finally:
        if diff is not None:
            diff.close()
    return BuildInfo(uuid.UUID(build_dir.name), size, sha.digest(), compression, tuple(frames))


def _v4_header(build_dir: Path, entries: dict[uuid.UUID, BuildInfo]) -> bytes:
    """A build's header as version 4: its metadata and mappings, and the entries of every
    build it reads (its own first); read back by fcsnap's E2B reader before it is kept."""
    meta, records = header_records(build_dir / HEADER)
    me = meta.build_id
    read = [b for b in load_header(build_dir / HEADER).build_ids() if b != me]
    section = [entries[me], *(entries[b] for b in read)]
    data = METADATA.pack(4, meta.block_size, meta.size, meta.generation, me.bytes,
                         meta.base_build_id.bytes) + encode_v4_body(section, records.tobytes())
    back = parse_header(data, f"exported header of {me}")
    if back.mappings != load_header(build_dir / HEADER).mappings:
        raise FcsnapError(f"build {me}: its version-4 header does not read back the same")
    return data


def export_e2b(build_dir: Path, out: Path, compression: str = "none", level: int = 3,
               progress: Progress = _noop) -> list[Path]:
    """Write BUILD's lineage into the directory `out` as an E2B store; returns the build
    directories written, oldest first. Everything is assembled in a hidden directory in `out`
    and moved into place at the end; builds already in `out` are refused before any write."""
    out.mkdir(parents=True, exist_ok=True)
    with open_lineage(build_dir):
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
                entries[uuid.UUID(b.name)] = _own_diff(b, stage / b.name, compression, level,
                                                       progress)
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
