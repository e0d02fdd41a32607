"""Where the bytes of a guest page come from: a build's diff, assembled pieces, or zeros.

The fault server asks for a source address to hand to UFFDIO_COPY. Raw diffs are mmapped, so a
page that lies in one mapping is copied by the kernel straight from the page cache (mapped.py
keeps what that costs in server memory within `map_budget`, restore's --cache-mb).

With --verify (`hashes` given) the mapping is never a source: every install reads its blocks
into a private buffer, checks each against its hash and installs from that same buffer, so a
diff file changed after a check (a deduplicated block served again, a fault-around window)
cannot slip bytes past it.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.header import NIL, ZEROS, Header
from fcsnap.store.format.hashes import digest, read_hashes
from fcsnap.store.format.layout import HASHES
from fcsnap.store.format.source import DiffFile
from fcsnap.uffd import abi
from fcsnap.uffd.mapped import MappedDiff
from fcsnap.units import PAGE

SPAN_BYTES = 4 << 20  # the most `span_base` decompresses for one batch


class VerifyError(FcsnapError):
    """A stored block does not match its hash: the page must not be installed."""


@dataclass(slots=True)
class Source:
    """Bytes for one install: address is None for zeros; keep holds the buffer alive;
    build_id is the build that supplied the page (most of it, for an assembled one)."""

    address: int | None
    build_id: uuid.UUID | None
    keep: object = None


class PageSource:
    """Finds the bytes of guest pages through the header, checking hashes with --verify."""

    def __init__(
        self,
        header: Header,
        diffs: dict[uuid.UUID, DiffFile],
        hashes: dict[uuid.UUID, np.ndarray] | None = None,
        map_budget: int = 64 << 20,
        shared_arrays: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.header = header
        self.mappings = header.mappings
        self.diffs = diffs
        self.hashes = hashes
        self.block_size = header.metadata.block_size
        raw = {b: d for b, d in diffs.items() if d.map}  # each gets a share of map_budget
        self.mapped = {b: MappedDiff(d, map_budget // max(1, len(raw))) for b, d in raw.items()}
        # diffs read through the host chunk cache, copied from from their chunks' mappings
        self.cached = {b: d for b, d in diffs.items() if getattr(d, "serving", False)}
        self.builds = list(diffs)  # `where` numbers builds by their place here
        self._spans: list[bytes] = []  # decompressed bytes `span_base` handed out
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._shared_arrays = shared_arrays  # a shared build's, made once for every session

    def locate(self, offset: int, length: int) -> Source:
        """Source for guest bytes [offset, offset+length)."""
        m = self.mappings[self.header.mapping_index(offset)]
        if offset + length > m.end:
            return self._assemble(offset, length)
        if m.is_zero:
            return Source(None, None)
        storage = m.storage_offset + (offset - m.offset)
        if self.hashes is not None:
            data = self._checked(m.build_id, storage, length, offset)
            return Source(abi.buffer_address(data), m.build_id, data)
        mapped = self.mapped.get(m.build_id)
        if mapped is not None:
            return Source(mapped.source(storage, length), m.build_id)
        cached = self.cached.get(m.build_id)
        if cached is not None and (address := cached.source(storage, length)) is not None:
            return Source(address, m.build_id)
        data = self.diffs[m.build_id].read(storage, length)
        return Source(abi.buffer_address(data), m.build_id, data)

    def mapping_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The mappings' offsets, storage offsets and owners as arrays, for `where`. Made on
        first use (a server that never prefetches does not pay for them); a prefetching
        server asks before the handshake, so the guest does not wait for them."""
        if self._arrays is None:
            if self._shared_arrays is not None:
                self._arrays = self._shared_arrays()
            else:
                self._arrays = mapping_arrays(self.header, self.builds)
        return self._arrays

    def where(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, storage offset) of each 4 KiB guest page at `offsets`: owner indexes
        `builds`, or is ZEROS."""
        starts, storage, owner = self.mapping_arrays()
        i = np.searchsorted(starts, offsets, "right") - 1
        return owner[i], storage[i] + (offsets - starts[i])

    def span_base(self, owner: int, lo: int, hi: int) -> int | None:
        """An address A such that A + s holds byte s of build `owner`'s diff, for every s in
        [lo, hi), valid until `release_spans`; None where that is not cheap (a range wider
        than its budget, or --verify, which checks pages one by one through `locate`)."""
        if self.hashes is not None:
            return None
        build = self.builds[owner]
        mapped = self.mapped.get(build)
        if mapped is not None:
            return mapped.window(lo, hi)
        cached = self.cached.get(build)
        if cached is not None and (address := cached.source(lo, hi - lo)) is not None:
            return address - lo
        if hi - lo > SPAN_BYTES:
            return None
        data = self.diffs[build].read(lo, hi - lo)
        self._spans.append(data)
        return abi.buffer_address(data) - lo

    def span_sources(self, owner: int, storage: np.ndarray) -> np.ndarray | None:
        """Source addresses of the 4 KiB pages at `storage` in build `owner`'s diff, for a
        batch (valid until `release_spans`), or None as for `span_base`. A diff read
        through the host cache gives addresses in its chunks' mappings: runs are cut where
        the addresses do not follow on (prefetch.py)."""
        cached = self.cached.get(self.builds[owner])
        if cached is not None and self.hashes is None:
            return cached.addresses(storage)
        base = self.span_base(owner, int(storage.min()), int(storage.max()) + PAGE)
        return None if base is None else base + storage

    def fetch_ahead(self, offsets: np.ndarray) -> None:
        """Start fetching what the guest pages at `offsets` (a working set about to be
        prefetched) need from builds in object storage, before the VM connects."""
        fetchers = [getattr(self.diffs[b], "fetch_extent", None) for b in self.builds]
        if not any(fetchers):
            return  # every build is local
        owner, storage = self.where(offsets)
        for number, fetch in enumerate(fetchers):
            mine = owner == number
            if fetch is not None and mine.any():
                fetch(storage[mine])

    def release_spans(self) -> None:
        self._spans.clear()

    def _assemble(self, offset: int, length: int) -> Source:
        """A page spanning several mappings (a 2 MiB page over 4 KiB blocks): copy it together."""
        buf = bytearray(length)
        pos = offset
        supplied: Counter[uuid.UUID] = Counter()
        i = self.header.mapping_index(offset)
        while pos < offset + length:
            m = self.mappings[i]
            take = min(m.end, offset + length) - pos
            if not m.is_zero:
                storage = m.storage_offset + (pos - m.offset)
                at = pos - offset
                if self.hashes is not None:
                    buf[at : at + take] = self._checked(m.build_id, storage, take, pos)
                else:
                    buf[at : at + take] = self.diffs[m.build_id].read(storage, take)
                supplied[m.build_id] += take
            pos += take
            i += 1
        if not supplied:
            return Source(None, None)
        return Source(abi.buffer_address(buf), supplied.most_common(1)[0][0], buf)

    def _checked(self, build_id: uuid.UUID, storage: int, length: int, offset: int) -> memoryview:
        """Diff bytes [storage, storage+length), read once with the whole blocks around them
        and checked block by block in that private copy: the bytes returned are the bytes
        that matched their hashes, whatever happens to the file afterwards."""
        assert self.hashes is not None
        bs = self.block_size
        table = self.hashes[build_id]
        first, last = storage // bs, -(-(storage + length) // bs)
        data = memoryview(self.diffs[build_id].read(first * bs, (last - first) * bs))
        for block in range(first, last):
            at = (block - first) * bs
            if block >= len(table) or digest(data[at : at + bs]) != table[block].tobytes():
                raise VerifyError(
                    f"build {build_id}: block {block} (storage offset {block * bs:#x}, serving "
                    f"guest offset {offset:#x}) does not match its hash; not installed"
                )
        start = storage - first * bs
        return data[start : start + length]


def mapping_arrays(
    header: Header, builds: list[uuid.UUID]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mappings' offsets, storage offsets and owners (index into `builds`, or ZEROS). The
    compiled loop only reads them, so sessions of one build share one set."""
    mappings = header.mappings
    n = len(mappings)
    # Iterated in C (a header late in a lineage has a hundred thousand mappings, and a VM's
    # first fault may wait for these): each distinct build id object is looked up once.
    ids = list(map(attrgetter("build_id"), mappings))
    number = {b: i for i, b in enumerate(builds)}
    owner_of = {id(b): ZEROS if b == NIL else number[b] for b in {id(b): b for b in ids}.values()}
    return (
        np.fromiter(map(attrgetter("offset"), mappings), np.int64, n),
        np.fromiter(map(attrgetter("storage_offset"), mappings), np.int64, n),
        np.fromiter(map(owner_of.__getitem__, map(id, ids)), np.int64, n),
    )


def hash_tables(diffs: dict[uuid.UUID, DiffFile]) -> dict[uuid.UUID, np.ndarray]:
    """The hash sidecar of every build being served (for --verify)."""
    return {b: read_hashes(d.build_dir / HASHES)[1] for b, d in diffs.items()}
