"""The memfile.header byte format, compatible with E2B's and Wrenn's V3 header (docs/FORMAT.md §3).

Little-endian, no padding, no record count: 64 bytes of metadata, then 40-byte mapping records to
the end of the file.
"""

from __future__ import annotations

import bisect
import os
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular

NIL = uuid.UUID(int=0)
PAGE = 4096
BLOCK_SIZES = (4096, 2 << 20)
READ_VERSIONS = (1, 2, 3)
WRITE_VERSION = 3

METADATA = struct.Struct("<QQQQ16s16s")
MAPPING = struct.Struct("<QQ16sQ")


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


def parse_header(data: bytes, source: str = "header") -> Header:
    """Parse and validate header bytes; every problem raises HeaderError naming it."""
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
    if version not in READ_VERSIONS:
        hint = " (E2B's compressed/columnar header, not supported yet)" if version in (4, 5) else ""
        raise HeaderError(f"{source}: unsupported header version {version}{hint}")
    meta = Metadata(
        version, block_size, size, generation, uuid.UUID(bytes=build_raw), uuid.UUID(bytes=base_raw)
    )
    mappings = tuple(
        Mapping(off, length, uuid.UUID(bytes=bid), 0 if bid == NIL.bytes else storage)
        for off, length, bid, storage in MAPPING.iter_unpack(memoryview(data)[METADATA.size :])
    )
    if not mappings and size > 0:
        # E2B and Wrenn read a header without records as one run of its own build.
        mappings = (Mapping(0, size, meta.build_id, 0),)
    header = Header(meta, mappings)
    validate(header, source)
    return header


def validate(header: Header, source: str = "header") -> None:
    """Check the rules of docs/FORMAT.md §3.3; raise HeaderError on the first broken one."""
    meta = header.metadata
    if meta.block_size not in BLOCK_SIZES:
        raise HeaderError(f"{source}: block size {meta.block_size} is neither 4 KiB nor 2 MiB")
    if meta.size == 0 or meta.size % PAGE:
        raise HeaderError(f"{source}: memory size {meta.size} is not a positive multiple of 4096")
    for i, m in enumerate(header.mappings):
        where = f"{source}: mapping {i} (offset {m.offset:#x}, length {m.length:#x})"
        if m.length == 0:
            raise HeaderError(f"{where}: zero length")
        if m.offset % PAGE or m.length % PAGE or m.storage_offset % PAGE:
            raise HeaderError(f"{where}: offset, length or storage offset not 4096-aligned")
        if i and m.offset < header.mappings[i - 1].offset:
            raise HeaderError(f"{where}: unsorted (mappings must ascend by offset)")
    expected = 0
    for i, m in enumerate(header.mappings):
        where = f"{source}: mapping {i} (offset {m.offset:#x}, length {m.length:#x})"
        if m.offset < expected:
            raise HeaderError(f"{where}: overlapping (previous mapping ends at {expected:#x})")
        if m.offset > expected:
            raise HeaderError(f"{where}: leaves a gap [{expected:#x}, {m.offset:#x})")
        expected = m.end
    if expected != meta.size:
        raise HeaderError(
            f"{source}: mappings cover [0, {expected:#x}), not the memory size {meta.size:#x}"
        )


def dump_header(header: Header) -> bytes:
    """Serialize in version 3 layout; nil mappings get storage offset 0."""
    meta = header.metadata
    out = [
        METADATA.pack(
            meta.version,
            meta.block_size,
            meta.size,
            meta.generation,
            meta.build_id.bytes,
            meta.base_build_id.bytes,
        )
    ]
    out += [
        MAPPING.pack(m.offset, m.length, m.build_id.bytes, 0 if m.is_zero else m.storage_offset)
        for m in header.mappings
    ]
    return b"".join(out)


def load_header(path: str | os.PathLike[str]) -> Header:
    """Read a header file; a directory means its memfile.header (unless it is one itself)."""
    p = Path(path)
    if p.is_dir() and p.name != "memfile.header":
        p = p / "memfile.header"
    return parse_header(read_regular(p, "header"), str(p))
