"""The memfile.header byte format, compatible with E2B's and Wrenn's headers (docs/FORMAT.md §3).

Little-endian, no padding, no record count: 64 bytes of metadata, then 40-byte mapping records to
the end of the file (versions 1-3, and what fcsnap writes). E2B's versions 4 and 5 put a builds
section and the mappings in an LZ4 frame instead; e2b.py reads that body into the same records.

One path for each job: `decode` reads bytes (checked by `check`) into metadata and the records'
bytes, which the store views as a numpy array (store/format/lineage.py); `parse_header` makes them a
`Header` of Mapping objects for lookups; `encode` is the only writer, and checks what it writes.
"""

from __future__ import annotations

import bisect
import functools
import operator
import os
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import compress, count, repeat
from pathlib import Path
from typing import TYPE_CHECKING

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.units import BLOCK_SIZES, PAGE

if TYPE_CHECKING:
    from fcsnap.header.e2b import BuildsSection

NIL = uuid.UUID(int=0)
ZEROS = -1
"""Where builds are numbered (numpy owner arrays), the number standing for NIL: zeros."""
READ_VERSIONS = (1, 2, 3, 4, 5)
RECORD_VERSIONS = (1, 2, 3)
"""The versions whose mappings are §3.1's records to the end of the file: what encode writes."""
WRITE_VERSION = 3
VERSION_MASK = 0xFFFF
"""E2B reads the format version from the low 16 bits of the version field; so does fcsnap."""
MAX_SIZE = 1 << 62
"""Memory sizes stop below this, so that offset + length never wraps in 64 bits."""

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
    builds_section: BuildsSection | None = None
    """E2B's V4/V5 builds section and flags; None for versions 1-3."""
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
        return list(self._ends)

    def storage_ends(self) -> dict[uuid.UUID, int]:
        """For each build this generation reads, how many bytes of its diff the mappings use:
        a diff shorter than that is damaged."""
        return dict(self._ends)

    @functools.cached_property
    def _ends(self) -> dict[uuid.UUID, int]:
        """storage_ends, in order of first appearance, worked out once: the mappings are
        immutable, and a lineage asks of each header many times."""
        ends: dict[uuid.UUID, int] = {}
        for m in self.mappings:
            if not m.is_zero:
                ends[m.build_id] = max(ends.get(m.build_id, 0), m.storage_offset + m.length)
        return ends


def to_records(mappings: Iterable[Mapping]) -> bytes:
    """Mappings as record bytes, for headers composed in Python (fixtures, tests)."""
    return b"".join(
        MAPPING.pack(m.offset, m.length, m.build_id.bytes, m.storage_offset) for m in mappings
    )


def decode(data: bytes, source: str = "header") -> tuple[Metadata, bytes]:
    """Header bytes as metadata and the mapping records' bytes, checked by `check`."""
    meta, records, _ = decode_full(data, source)
    return meta, records


def decode_full(
    data: bytes, source: str = "header"
) -> tuple[Metadata, bytes, BuildsSection | None]:
    """`decode`, plus E2B's builds section of a V4/V5 header (None for versions 1-3)."""
    if len(data) < METADATA.size:
        raise HeaderError(
            f"{source}: too short: {len(data)} bytes, the metadata alone is {METADATA.size}"
        )
    version, block_size, size, generation, build_raw, base_raw = METADATA.unpack_from(data)
    meta = Metadata(
        version, block_size, size, generation, uuid.UUID(bytes=build_raw), uuid.UUID(bytes=base_raw)
    )
    section = None
    rest = len(data) - METADATA.size
    if version & VERSION_MASK in (4, 5):
        from fcsnap.header.e2b import BodyError, decode_body  # E2B's headers only

        if block_size not in BLOCK_SIZES:  # before the body: E2B's V5 reader divides by it
            check(meta, b"", source)
        try:
            records, section = decode_body(
                version & VERSION_MASK, bytes(memoryview(data)[METADATA.size :]), size
            )
        except BodyError as e:
            raise HeaderError(f"{source}: version {version & VERSION_MASK} body: {e}") from None
    elif rest % MAPPING.size:
        raise HeaderError(
            f"{source}: {rest} bytes after the metadata is not a whole number of "
            f"{MAPPING.size}-byte mapping records"
        )
    else:
        records = bytes(memoryview(data)[METADATA.size :])
    if not records and size > 0:
        # E2B and Wrenn read a header without records as one run of its own build.
        records = MAPPING.pack(0, size, build_raw, 0)
    check(meta, records, source)
    return meta, records, section


def _first(flags: Iterable[object]) -> int:
    """Index of the first true flag, or -1."""
    return next(compress(count(), flags), -1)


def check(meta: Metadata, records: bytes, source: str = "header") -> None:
    """The rules of docs/FORMAT.md §3.3: a known version and block size, and aligned, non-empty
    mappings that tile [0, size) in ascending order. Raise HeaderError naming the first broken
    rule. Each rule is one pass of C-level list operations, not Python work per mapping (a
    header late in a lineage has tens of thousands), and without numpy, which `inspect` and
    restore's start-up do not load."""
    if meta.version & VERSION_MASK not in READ_VERSIONS:
        raise HeaderError(f"{source}: unsupported header version {meta.version}")
    if meta.block_size not in BLOCK_SIZES:
        raise HeaderError(f"{source}: block size {meta.block_size} is neither 4 KiB nor 2 MiB")
    if meta.size == 0 or meta.size % PAGE:
        raise HeaderError(f"{source}: memory size {meta.size} is not a positive multiple of 4096")
    if meta.size >= MAX_SIZE:
        raise HeaderError(f"{source}: memory size {meta.size:#x} is beyond what fcsnap handles")
    words = struct.unpack(f"<{len(records) // 8}Q", records)
    offset, length, id_lo, id_hi, storage = (list(words[k::5]) for k in range(5))

    def where(i: int) -> str:
        return f"{source}: mapping {i} (offset {offset[i]:#x}, length {length[i]:#x})"

    low = repeat(PAGE - 1)
    unaligned = map(
        operator.or_,
        map(operator.and_, map(operator.or_, offset, length), low),
        map(operator.mul, map(operator.and_, storage, low), map(operator.or_, id_lo, id_hi)),
    )  # nil mappings (id 0) may carry any storage offset
    firsts = [
        length.index(0) if 0 in length else -1,
        _first(unaligned),
        _first(map(operator.lt, offset[1:], offset)) + 1 or -1,
    ]
    broken = [i for i in firsts if i >= 0]
    if broken:
        i = min(broken)
        if length[i] == 0:
            raise HeaderError(f"{where(i)}: zero length")
        if firsts[1] == i:
            raise HeaderError(f"{where(i)}: offset, length or storage offset not 4096-aligned")
        raise HeaderError(f"{where(i)}: unsorted (mappings must ascend by offset)")
    end = list(map(operator.add, offset, length))
    expected = [0, *end[:-1]]
    if offset != expected:
        i = _first(map(operator.ne, offset, expected))
        if offset[i] < expected[i]:
            raise HeaderError(
                f"{where(i)}: overlapping (previous mapping ends at {expected[i]:#x})"
            )
        raise HeaderError(f"{where(i)}: leaves a gap [{expected[i]:#x}, {offset[i]:#x})")
    covered = end[-1] if end else 0
    if covered != meta.size:
        raise HeaderError(
            f"{source}: mappings cover [0, {covered:#x}), not the memory size {meta.size:#x}"
        )


def encode(meta: Metadata, records: bytes) -> bytes:
    """The header bytes of `meta` and `records` (40-byte mapping records), checked like any
    header read back: the one writer of headers."""
    check(meta, records, "new header")
    if meta.version & VERSION_MASK not in RECORD_VERSIONS:
        raise HeaderError(f"new header: version {meta.version} is not written as 40-byte records")
    return (
        METADATA.pack(
            meta.version, meta.block_size, meta.size, meta.generation, meta.build_id.bytes,
            meta.base_build_id.bytes,
        )
        + records
    )


def parse_header(data: bytes, source: str = "header") -> Header:
    """Parse and check header bytes into a Header; every problem raises HeaderError naming it."""
    meta, records, section = decode_full(data, source)
    # Column by column, iterated in C: restore parses its header before it listens, and a
    # header late in a lineage has a hundred thousand mappings.
    words = struct.unpack(f"<{len(records) // 8}Q", records)
    raws = [records[i : i + 16] for i in range(16, len(records), MAPPING.size)]
    ids = {raw: uuid.UUID(bytes=raw) for raw in set(raws)}  # a lineage has few builds
    ids[NIL.bytes] = NIL
    storage = map(operator.mul, words[4::5], map(operator.ne, raws, repeat(NIL.bytes)))
    mappings = tuple(map(Mapping, words[0::5], words[1::5], map(ids.__getitem__, raws), storage))
    return Header(meta, mappings, section)


def load_header(path: str | os.PathLike[str]) -> Header:
    """Read a header file; a directory means its memfile.header (unless it is one itself)."""
    p = Path(path)
    if p.is_dir() and p.name != "memfile.header":
        p = p / "memfile.header"
    return parse_header(read_regular(p, "header"), str(p))
