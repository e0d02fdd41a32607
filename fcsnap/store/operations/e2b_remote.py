"""E2B/Wrenn builds in S3, served as they are: `s3://BUCKET/PREFIX/<build_id>/memfile.header`
beside `memfile`, `memfile.zstd` or `memfile.lz4`, as E2B lays out its bucket (docs/s3.md).

The headers of the lineage are brought into the store's local mirror; the data objects stay in
the bucket and are read frame by frame (an uncompressed object in 4 MiB pieces) through the
host chunk cache, each frame checked as it is fetched and again when another process's copy
is loaded. `inspect`, `verify`, `unpack` and `import` read the same mirror, and the objects by
range GET as e2b.py reads a directory's (BucketHeaders.lineage). Nothing is written into the
bucket: no leases (fcsnap's gc never removes E2B builds, and E2B's own cleanup does not read
fcsnap's leases).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.header import Header, load_header
from fcsnap.store.backends.chunk_cache import ChunkCache, FetchStats, with_deadline
from fcsnap.store.backends.holds import hold_nothing_in
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.format.layout import HEADER, MANIFEST, SNAPFILE, parse_build_id
from fcsnap.store.format.seekable import FrameCache
from fcsnap.store.format.source import DiffFile, open_lineages_with
from fcsnap.store.operations.e2b import (
    FCSNAP_FILES,
    BuildData,
    E2BLineage,
    build_data,
    check_coverage,
)
from fcsnap.store.operations.e2b_serve import (
    NO_VERIFY,
    RAW_PIECE,
    FramedObject,
    check_complete,
)


@dataclass
class RemoteData(BuildData):
    """A build's data object in the bucket: its size from the listing, its bytes by range GET
    (with the fetch deadline and retries)."""

    store: RemoteStore | None = field(default=None, repr=False)
    listed: int = -1  # the object's size in the listing; -1: not there
    timeout: float = 30.0

    @property
    def key(self) -> str:
        return f"{self.build_id}/{self.path.name}"

    @property
    def where(self) -> str:
        return f"{self.store.url if self.store else ''}/{self.key}"

    def open(self) -> None:
        if self.listed < 0:
            raise FcsnapError(f"{self.where}: data object missing")

    def close(self) -> None:
        pass

    @property
    def object_size(self) -> int:
        return self.listed

    @property
    def cache_key(self) -> str:
        """BuildData's, and the store's endpoint and URL: the host cache is shared by every
        store, and another bucket may hold other bytes under the same build id and size
        (nothing checks an uncompressed piece's bytes, and any valid frame decodes)."""
        assert self.store is not None
        where = f"{getattr(self.store.objects, 'endpoint', '')}\n{self.store.url}"
        return f"{super().cache_key}-{hashlib.sha256(where.encode()).hexdigest()[:16]}"

    def _pread(self, offset: int, length: int) -> bytes:
        assert self.store is not None
        store = self.store
        if offset + length > self.listed:
            raise FcsnapError(f"{store.url}/{self.key}: ends at {self.listed}, before byte "
                              f"{offset + length} the header maps")
        return with_deadline(lambda: store.objects.get_range(self.key, offset, length),
                             self.timeout, f"{store.url}/{self.key}")()

    def read(self, storage_offset: int, length: int) -> bytes:
        """As BuildData.read; an uncompressed object is fetched in the RAW_PIECE pieces the
        server fetches, the last few kept, so that unpack and verify cost one GET a piece."""
        if self.compression != "none":
            return super().read(storage_offset, length)
        parts = []
        pos, end = storage_offset, storage_offset + length
        while pos < end:
            index, start = divmod(pos, RAW_PIECE)
            piece = self._cache.get(index)
            if piece is None:
                base = index * RAW_PIECE
                piece = self._pread(base, min(RAW_PIECE, self.listed - base))
                if len(self._cache) >= 4:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[index] = piece
            take = min(end - pos, len(piece) - start)
            if take <= 0:
                raise FcsnapError(f"{self.where}: ends at {self.listed}, before byte {end} "
                                  "the header maps")
            parts.append(piece[start : start + take])
            pos += take
        return b"".join(parts)


def e2b_in_bucket(store: RemoteStore, arg: str) -> uuid.UUID | None:
    """BUILD as the id of an E2B/Wrenn build in the bucket (a header and none of fcsnap's own
    objects), or None: an fcsnap build whose writer died before its build.json is not one,
    as e2b_build_dir says of a directory."""
    build_id = parse_build_id(arg)
    if build_id is None:
        return None
    objects = store.build_objects(build_id)
    foreign = HEADER in objects and not any(name in objects for name in FCSNAP_FILES)
    return build_id if foreign else None


class BucketHeaders:
    """The headers of E2B/Wrenn lineages in one bucket, brought into its mirror, and their
    builds' objects as the listing shows them."""

    def __init__(self, store: RemoteStore, timeout: float) -> None:
        self.store = store
        self.timeout = timeout
        self.listed: dict[uuid.UUID, dict[str, int]] = {}

    def mirror(self, build_id: uuid.UUID) -> Path:
        """The head's directory in the mirror: its header, its snapfile if the bucket has one,
        and the headers of the builds it reads (their builds entries hold whole frame
        tables); each build's objects listed."""
        head = self._mirror_one(build_id, snapfile=True)
        header = load_header(head / HEADER)
        for other in header.storage_ends():
            if other != build_id:
                self._mirror_one(other, snapfile=False)
        return head

    def mirror_lineage(self, build_id: uuid.UUID) -> Path:
        """mirror, and the header of every build the lineage reaches through the builds each
        header reads (as import walks a directory's)."""
        head = self.mirror(build_id)
        seen = {build_id}
        todo = [build_id]
        while todo:
            path = self.store.mirror / str(todo.pop()) / HEADER
            if not path.is_file():
                continue
            for other in load_header(path).build_ids():
                if other not in seen:
                    seen.add(other)
                    if other not in self.listed:
                        self._mirror_one(other, snapfile=False)
                    todo.append(other)
        return head

    def _mirror_one(self, build_id: uuid.UUID, snapfile: bool) -> Path:
        objects = self.store.build_objects(build_id)
        self.listed[build_id] = {name: info.size for name, info in objects.items()}
        target = self.store.mirror / str(build_id)
        target.mkdir(mode=0o700, exist_ok=True)
        for name in (HEADER, SNAPFILE) if snapfile else (HEADER,):
            if name in objects:
                self.store.download(objects[name].key, target / name)
        return target

    def data(self, header: Header, build_id: uuid.UUID) -> RemoteData:
        """How `header` reads `build_id`'s object in the bucket, checked for size and frame
        coverage against the listing before a byte is fetched."""
        mirror = self.store.mirror
        if not (mirror / str(build_id)).is_dir():
            raise FcsnapError(f"build {build_id} read by {header.metadata.build_id} is "
                              f"not in {self.store.url}")
        listed = self.listed.get(build_id, {})
        plain = build_data(mirror, header, build_id, lambda p: listed.get(p.name, 0))
        data = RemoteData(**{k: getattr(plain, k) for k in (
            "build_id", "path", "compression", "size", "frames", "checksum", "full_table")},
            store=self.store, listed=listed.get(plain.path.name, -1), timeout=self.timeout)
        data.open()
        check_coverage(header, data, header.storage_ends()[build_id])
        return data

    def lineage(self, build_id: uuid.UUID) -> E2BLineage:
        """The lineage whose head is `build_id`, read as open_e2b reads a directory's (its
        headers mirrored now unless they were before)."""
        head = (self.store.mirror / str(build_id) if build_id in self.listed
                else self.mirror(build_id))
        header = load_header(head / HEADER)
        if header.metadata.build_id != build_id:
            raise FcsnapError(f"{self.store.url}/{build_id}/{HEADER}: its build id is "
                              f"{header.metadata.build_id}")
        return E2BLineage(head, header, {b: self.data(header, b)
                                         for b in header.storage_ends()})


class RemoteLineages(BucketHeaders):
    """Opens the E2B/Wrenn lineages of one bucket's mirror with their objects read through
    one host chunk cache."""

    def __init__(self, store: RemoteStore, cache: ChunkCache, timeout: float,
                 serving: bool) -> None:
        super().__init__(store, timeout)
        self.cache = cache
        self.serving = serving

    def open(self, header: Header, mirror: Path, cache_bytes: int,
             frame_cache: FrameCache | None) -> dict[uuid.UUID, DiffFile] | None:
        """open_diffs's opener for the mirror: every build the head reads, checked for sizes
        and frame coverage against the listing before a byte is fetched."""
        if (mirror / str(header.metadata.build_id) / MANIFEST).exists():
            return None
        check_complete(header)
        diffs: dict[uuid.UUID, DiffFile] = {}
        for build_id in header.storage_ends():
            diff = FramedObject(self.data(header, build_id), frame_cache, cache_bytes,
                                self.cache)
            diff.nonblocking = self.serving
            diffs[build_id] = diff  # type: ignore[assignment]  (DiffFile's reading interface)
        return diffs


_serving: dict[Path, RemoteLineages] = {}
"""The one opener of each mirror's E2B/Wrenn lineages: a daemon resolves one request's build
while another's, resolved before, is still to be opened, and each must find its objects'
listing there."""


def serve_e2b_in_bucket(
    arg: str, store: RemoteStore, cache: ChunkCache, timeout: float, verify: bool,
    serving: bool = True,
) -> tuple[Path, FetchStats] | None:
    """restore's BUILD when it is an E2B/Wrenn build in the bucket: its directory in the
    mirror (its readers registered) and the fetch statistics; None for an fcsnap build."""
    from fcsnap.errors import UsageError

    build_id = e2b_in_bucket(store, arg)
    if build_id is None:
        return None
    if verify:
        raise UsageError(NO_VERIFY)
    lineages = _serving.get(store.mirror)
    if lineages is None or lineages.store is not store or lineages.cache is not cache:
        lineages = _serving[store.mirror] = RemoteLineages(store, cache, timeout, serving)
        open_lineages_with(store.mirror, lineages.open)
    head = lineages.mirror(build_id)
    hold_nothing_in(store.mirror)
    return head, cache.stats

