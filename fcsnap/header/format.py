"""The memfile.header byte format, compatible with E2B's and Wrenn's V3 header (docs/FORMAT.md §3).

Little-endian, no padding, no record count: 64 bytes of metadata, then 40-byte mapping records to
the end of the file.

One path for each job: `decode` reads bytes (checked by `check`) into metadata and a numpy
record array, which the store works on directly; `parse_header` makes those a `Header` of
Mapping objects for lookups; `encode` is the only writer, and checks what it writes.
"""

from __future__ import annotations

import bisect
import os
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.units import BLOCK_SIZES, PAGE

NIL = uuid.UUID(int=0)
ZEROS = -1
"""Where builds are numbered (numpy owner arrays), the number standing for NIL: zeros."""
READ_VERSIONS = (1, 2, 3)
WRITE_VERSION = 3
MAX_SIZE = 1 << 62
"""Memory sizes stop below this, so that offset + length never wraps in 64 bits."""

METADATA = struct.Struct("<QQQQ16s16s")
MAPPING = struct.Struct("<QQ16sQ")
# One mapping record (docs/FORMAT.md §3.1) as a numpy dtype: the same 40 bytes, no padding.
RECORD = np.dtype([("offset", "<u8"), ("length", "<u8"), ("build_id", "V16"), ("storage", "<u8")])
assert RECORD.itemsize == MAPPING.size


class HeaderError(FcsnapError):
    """The header bytes break the format; the message names the rule and the record."""


@dataclass(frozen=True, slots=True)
class Mapping:
    """Guest bytes [offset, offset+length) are bytes [storage_offset, ...) of build_id's diff."""

    offset: int
    length: int
    build_id: uuid.UUID
    storage_offset: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        return self.build_id == NIL


@dataclass(frozen=True, slots=True)
class Metadata:
    version: int
    block_size: int
    size: int
    generation: int
    build_id: uuid.UUID
    base_build_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Lookup:
    """Where one guest byte lives: storage_offset is of that exact byte, remaining runs to the end
    of its mapping. build_id is NIL for zeros."""

    offset: int
    build_id: uuid.UUID
    storage_offset: int
    remaining: int


@dataclass(frozen=True)
class Header:
    metadata: Metadata
    mappings: tuple[Mapping, ...]
    _starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", [m.offset for m in self.mappings])

    def lookup(self, offset: int) -> Lookup:
        """Binary search for the mapping holding `offset` (O(log n))."""
        if not 0 <= offset < self.metadata.size:
            raise FcsnapError(
                f"offset {offset:#x} is outside guest memory [0, {self.metadata.size:#x})"
            )
        m = self.mappings[bisect.bisect_right(self._starts, offset) - 1]
        delta = offset - m.offset
        storage = 0 if m.is_zero else m.storage_offset + delta
        return Lookup(offset, m.build_id, storage, m.length - delta)

    def mapping_index(self, offset: int) -> int:
        """Index of the mapping that holds `offset` (which must be inside guest memory)."""
        return bisect.bisect_right(self._starts, offset) - 1

    def build_ids(self) -> list[uuid.UUID]:
        """Builds whose diff files this generation reads, in order of first appearance."""
        return list(dict.fromkeys(m.build_id for m in self.mappings if not m.is_zero))

    def storage_ends(self) -> dict[uuid.UUID, int]:
        """For each build this generation reads, how many bytes of its diff the mappings use:
        a diff shorter than that is damaged."""
        ends: dict[uuid.UUID, int] = {}
        for m in self.mappings:
            if not m.is_zero:
                ends[m.build_id] = max(ends.get(m.build_id, 0), m.storage_offset + m.length)
        return ends


def to_records(mappings: Iterable[Mapping]) -> np.ndarray:
    """Mappings as a RECORD array, for headers composed in Python (fixtures, tests)."""
    return np.array(
        [(m.offset, m.length, m.build_id.bytes, m.storage_offset) for m in mappings], RECORD
    )


def is_nil(records: np.ndarray) -> np.ndarray:
    """Which records map zeros."""
    return records["build_id"] == np.void(NIL.bytes)


def decode(data: bytes, source: str = "header") -> tuple[Metadata, np.ndarray]:
    """Header bytes as metadata and a (read-only) RECORD array, checked by `check`."""
    if len(data) < METADATA.size:
        raise HeaderError(
            f"{source}: too short: {len(data)} bytes, the metadata alone is {METADATA.size}"
        )
    rest = len(data) - METADATA.size
    if rest % MAPPING.size:
        raise HeaderError(
            f"{source}: {rest} bytes after the metadata is not a whole number of "
            f"{MAPPING.size}-byte mapping records"
        )
    version, block_size, size, generation, build_raw, base_raw = METADATA.unpack_from(data)
    meta = Metadata(
        version, block_size, size, generation, uuid.UUID(bytes=build_raw), uuid.UUID(bytes=base_raw)
    )
    records = np.frombuffer(data, RECORD, offset=METADATA.size)
    if not len(records) and size > 0:
        # E2B and Wrenn read a header without records as one run of its own build.
        records = np.array([(0, size, build_raw, 0)], RECORD)
    check(meta, records, source)
    return meta, records


def check(meta: Metadata, records: np.ndarray, source: str = "header") -> None:
    """The rules of docs/FORMAT.md §3.3: a known version and block size, and aligned, non-empty
    mappings that tile [0, size) in ascending order. Raise HeaderError naming the first broken
    rule. Vector operations only: a header late in a lineage has tens of thousands of mappings."""
    if meta.version not in READ_VERSIONS:
        hint = (
            " (E2B's compressed/columnar header, not supported yet)"
            if meta.version in (4, 5) else ""
        )
        raise HeaderError(f"{source}: unsupported header version {meta.version}{hint}")
    if meta.block_size not in BLOCK_SIZES:
        raise HeaderError(f"{source}: block size {meta.block_size} is neither 4 KiB nor 2 MiB")
    if meta.size == 0 or meta.size % PAGE:
        raise HeaderError(f"{source}: memory size {meta.size} is not a positive multiple of 4096")
    if meta.size >= MAX_SIZE:
        raise HeaderError(f"{source}: memory size {meta.size:#x} is beyond what fcsnap handles")
    offset, length = records["offset"], records["length"]
    storage = np.where(is_nil(records), 0, records["storage"])

    def where(i: int) -> str:
        return f"{source}: mapping {i} (offset {int(offset[i]):#x}, length {int(length[i]):#x})"

    empty = length == 0
    unaligned = ((offset | length | storage) % PAGE) != 0
    unsorted = np.zeros(len(records), bool)
    unsorted[1:] = offset[1:] < offset[:-1]
    broken = empty | unaligned | unsorted
    if broken.any():
        i = int(np.argmax(broken))
        if empty[i]:
            raise HeaderError(f"{where(i)}: zero length")
        if unaligned[i]:
            raise HeaderError(f"{where(i)}: offset, length or storage offset not 4096-aligned")
        raise HeaderError(f"{where(i)}: unsorted (mappings must ascend by offset)")
    if len(records) and max(int(offset.max()), int(length.max())) >= MAX_SIZE:
        offset, length = offset.astype(object), length.astype(object)  # exact, never wraps
    end = offset + length
    expected = np.zeros_like(end)
    expected[1:] = end[:-1]
    wrong = offset != expected
    if wrong.any():
        i = int(np.argmax(wrong))
        at, want = int(offset[i]), int(expected[i])
        if at < want:
            raise HeaderError(f"{where(i)}: overlapping (previous mapping ends at {want:#x})")
        raise HeaderError(f"{where(i)}: leaves a gap [{want:#x}, {at:#x})")
    covered = int(end[-1]) if len(records) else 0
    if covered != meta.size:
        raise HeaderError(
            f"{source}: mappings cover [0, {covered:#x}), not the memory size {meta.size:#x}"
        )


def encode(meta: Metadata, records: np.ndarray) -> bytes:
    """The header bytes of `meta` and `records` (a RECORD array), checked like any header read
    back: the one writer of headers."""
    check(meta, records, "new header")
    return (
        METADATA.pack(
            meta.version, meta.block_size, meta.size, meta.generation, meta.build_id.bytes,
            meta.base_build_id.bytes,
        )
        + np.ascontiguousarray(records, RECORD).tobytes()
    )


def parse_header(data: bytes, source: str = "header") -> Header:
    """Parse and check header bytes into a Header; every problem raises HeaderError naming it."""
    meta, records = decode(data, source)
    ids = {NIL.bytes: NIL}  # a lineage has few builds: one UUID object each

    def build_id(raw: bytes) -> uuid.UUID:
        found = ids.get(raw)
        if found is None:
            found = ids[raw] = uuid.UUID(bytes=raw)
        return found

    mappings = tuple(
        Mapping(offset, length, build_id(raw), 0 if raw == NIL.bytes else storage)
        for offset, length, raw, storage in MAPPING.iter_unpack(records.tobytes())
    )
    return Header(meta, mappings)


def load_header(path: str | os.PathLike[str]) -> Header:
    """Read a header file; a directory means its memfile.header (unless it is one itself)."""
    p = Path(path)
    if p.is_dir() and p.name != "memfile.header":
        p = p / "memfile.header"
    return parse_header(read_regular(p, "header"), str(p))
