"""Working-set files (docs/FORMAT.md §7): the guest pages a restore faulted, in order.

`restore --record-ws` writes one; `restore --prefetch-ws` installs those pages right after the
handshake; `pack`/`diff --working-set` store those blocks first and contiguously, so prefetch
reads sequentially. Layout (little-endian): magic b"FCWS", version u16, reserved u16 (0),
memory size u64, count u64, in version 2 the id of the build the pages differ from (16 bytes:
a written set, §7.1), then `count` u64 guest offsets (4096-aligned, distinct).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.outputs import write_output
from fcsnap.units import PAGE

MAGIC = b"FCWS"
VERSION = 1  # a working set
WRITTEN_VERSION = 2  # a written set: version 1's head and the build the pages differ from
HEAD = struct.Struct("<4sHHQQ")
BASE = struct.Struct("<16s")  # after the head in version 2: the build id (uuid.UUID.bytes)


def dump_working_set(size: int, offsets: Iterable[int], base: uuid.UUID | None = None) -> bytes:
    """The file's bytes; with `base`, a written set of the pages that differ from that build."""
    body = np.asarray(list(offsets), dtype="<u8")
    if base is None:
        return HEAD.pack(MAGIC, VERSION, 0, size, len(body)) + body.tobytes()
    head = HEAD.pack(MAGIC, WRITTEN_VERSION, 0, size, len(body))
    return head + BASE.pack(base.bytes) + body.tobytes()


def parse_working_set(data: bytes, source: str = "working set") -> tuple[int, np.ndarray]:
    """(memory size, guest offsets in fault order); FcsnapError on anything malformed."""
    size, offsets, _ = parse_page_set(data, source)
    return size, offsets


def parse_page_set(data: bytes, source: str) -> tuple[int, np.ndarray, uuid.UUID | None]:
    """(memory size, guest offsets, the build a written set was taken against: None in a
    version 1 file); FcsnapError on anything malformed."""
    if len(data) < HEAD.size:
        raise FcsnapError(f"{source}: too short for a working-set file ({len(data)} bytes)")
    magic, version, reserved, size, count = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise FcsnapError(f"{source}: not a working-set file (bad magic {magic!r})")
    if version not in (VERSION, WRITTEN_VERSION) or reserved:
        raise FcsnapError(f"{source}: unsupported working-set version {version}")
    start = HEAD.size + (BASE.size if version == WRITTEN_VERSION else 0)
    if len(data) < start:
        raise FcsnapError(f"{source}: too short for a written-set file ({len(data)} bytes)")
    base = uuid.UUID(bytes=data[HEAD.size:start]) if version == WRITTEN_VERSION else None
    if len(data) - start != count * 8:
        raise FcsnapError(
            f"{source}: says {count} pages but holds {len(data) - start} bytes of offsets"
        )
    if size % PAGE or size >= 1 << 63:
        raise FcsnapError(f"{source}: memory size {size:#x} is not a page multiple below 2**63")
    # Checked as stored (u64) before the int64 conversion, which would wrap large ones negative.
    stored = np.frombuffer(data, dtype="<u8", offset=start)
    if count and (stored.max() >= size or (stored % PAGE).any()):
        raise FcsnapError(f"{source}: offsets not page-aligned or beyond {size:#x} bytes")
    offsets = stored.astype(np.int64)
    ordered = np.sort(offsets)  # (np.unique would import numpy.ma: a quarter second)
    if (ordered[1:] == ordered[:-1]).any():
        raise FcsnapError(f"{source}: a page is listed twice")
    return size, offsets, base


def read_working_set(path: Path, size: int) -> np.ndarray:
    """The offsets of a working-set file recorded for guest memory of `size` bytes."""
    recorded, offsets = parse_working_set(read_regular(path, "working set"), str(path))
    if recorded != size:
        raise FcsnapError(
            f"{path}: recorded for {recorded} bytes of guest memory, this build has {size}"
        )
    return offsets


def write_working_set(path: Path, size: int, offsets: Iterable[int], what: str = "",
                      root: Path | None = None, base: uuid.UUID | None = None) -> None:
    """Write the file safely (fcsnap/outputs.py); OutputError naming `what` and `path`. With
    `base`: a written set, of the pages that differ from that build."""
    write_output(path, dump_working_set(size, offsets, base), what, root)


def merge_working_sets(
    recordings: list[tuple[str, int, np.ndarray]], min_runs: int
) -> tuple[int, np.ndarray]:
    """(memory size, offsets) of the pages seen in at least `min_runs` of the recorded runs
    given as (name, memory size, offsets): `min_runs` = all is their intersection. A page's
    place is its mean position across the runs that saw it (0 = faulted first, 1 = last),
    so pages every run needs early stay early; ties go by guest offset."""
    if not recordings:
        raise FcsnapError("no working sets to merge")
    if not 1 <= min_runs <= len(recordings):
        raise FcsnapError(f"--min-runs must be between 1 and {len(recordings)}, the number of "
                          f"working sets given (got {min_runs})")
    first_name, size, _ = recordings[0]
    for name, other, _ in recordings[1:]:
        if other != size:
            raise FcsnapError(f"{name}: recorded for {other} bytes of guest memory, "
                              f"{first_name} for {size}: not runs of the same guest")
    offsets = np.concatenate([o for _, _, o in recordings])
    positions = np.concatenate([np.arange(len(o)) / max(1, len(o)) for _, _, o in recordings])
    pages, index, runs = np.unique(offsets, return_inverse=True, return_counts=True)
    mean = np.bincount(index, weights=positions, minlength=len(pages)) / runs
    keep = np.flatnonzero(runs >= min_runs)
    order = np.lexsort((pages[keep], mean[keep]))
    return size, pages[keep][order]


def merge_working_set_files(paths: list[Path], min_runs: int | None, out: Path) -> int:
    """`fcsnap ws merge`: read every file (all checked before anything is written), merge,
    write `out`; the number of pages written. min_runs None: all of them."""
    recordings = []
    for path in paths:
        size, offsets = parse_working_set(read_regular(path, "working set"), str(path))
        recordings.append((str(path), size, offsets))
    size, merged = merge_working_sets(recordings, len(paths) if min_runs is None else min_runs)
    write_working_set(out, size, merged.tolist())
    return len(merged)
