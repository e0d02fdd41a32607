"""The Python API: everything the command line does, for platforms that embed fcsnap.

The CLI is a thin layer over these functions (one code path per job). Every foreseen failure
raises FcsnapError (UsageError for an argument that can never work); builds come back as typed
objects. Heavy modules (numpy, zstandard, cffi) are imported by the call that needs them, so
`import fcsnap` stays cheap.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fcsnap.options import (
    DEFAULT_FRAME_SIZE,
    parse_block_size,
    parse_cache_size,
    parse_compression,
    parse_frame_size,
    parse_offset,
)

if TYPE_CHECKING:
    from fcsnap.header import Header
    from fcsnap.store.backends.stores import Store as StoreTarget
    from fcsnap.store.format.manifest import Manifest, Stats
    from fcsnap.store.operations.builder import BuildOptions
    from fcsnap.store.operations.e2b import E2BLineage, E2BVerification
    from fcsnap.store.operations.e2b_remote import BucketHeaders
    from fcsnap.uffd.firecracker_api import Response
    from fcsnap.uffd.installer import InstallStats

T = TypeVar("T")
PathLike = str | os.PathLike[str]
BuildRef = PathLike | uuid.UUID
"""A build: its directory, its build id, or a VM name (the newest build of that name)."""

Progress = Callable[[int, int], None]
"""Called as work goes on with (bytes just processed, total bytes the job will process)."""


@dataclass(frozen=True)
class Build:
    """A build in a store: one generation of a lineage, as its build.json describes it."""

    build_id: uuid.UUID
    path: Path | str  # the build directory, or its URL in an S3 store
    generation: int
    parent_build_id: uuid.UUID | None
    base_build_id: uuid.UUID  # generation 0 of the lineage
    size: int
    block_size: int
    compression: str
    stats: Stats
    manifest: Manifest

    @classmethod
    def from_manifest(cls, manifest: Manifest, path: Path | str) -> Build:
        return cls(
            manifest.build_id, path, manifest.generation, manifest.parent_build_id,
            manifest.base_build_id, manifest.size, manifest.block_size, manifest.compression,
            manifest.stats, manifest,
        )

    def to_json(self) -> dict[str, Any]:
        """build.json's fields plus `path`: what `--json` prints."""
        return {**self.manifest.to_json(), "path": str(self.path)}


@dataclass(frozen=True)
class Verification:
    """What `verify` checked: every build the generation reads, every stored block's hash."""

    build_id: uuid.UUID
    generation: int
    builds_checked: int
    blocks_checked: int
    pinned: bool  # False: a build written before lineage pins, its ancestors trusted by id

    def to_json(self) -> dict[str, Any]:
        return {
            "build_id": str(self.build_id),
            "generation": self.generation,
            "builds_checked": self.builds_checked,
            "blocks_checked": self.blocks_checked,
            "pinned": self.pinned,
            "ok": True,
        }


@dataclass(frozen=True)
class Inspection:
    """A header's report: metadata, the builds it reads, and (on request) mappings, lookups.
    `report` is the JSON object `inspect --json` prints; the fields are its headline."""

    build_id: uuid.UUID
    path: Path  # the header file
    generation: int
    parent_build_id: uuid.UUID | None  # from build.json; None for generation 0 or no build.json
    base_build_id: uuid.UUID
    report: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.report


@dataclass(frozen=True)
class Served:
    """How one restore ended: the exit status `fcsnap restore` would return, and its stats."""

    status: int
    exit_reason: str
    stats: InstallStats


def _open(store: PathLike | StoreTarget | None) -> StoreTarget | None:
    """A store as commands take it: a directory (Path), or a store in object storage for an
    `s3://BUCKET/PREFIX` text (fcsnap/store/backends/stores.py)."""
    if store is None or not isinstance(store, str | os.PathLike):
        return store
    from fcsnap.store.backends.stores import open_store

    return open_store(str(store))


def _dir(
    build: BuildRef, store: PathLike | StoreTarget | None, *, data: bool = False,
    lazy: bool = False,
) -> Path:
    """BUILD as a local build directory (in an S3 store: in its local mirror; `data`: with
    its lineage's diffs downloaded; `lazy`: read through a private chunk cache)."""
    from fcsnap.store.backends.stores import resolve

    return resolve(str(build), _open(store), data=data, lazy=lazy)


def _e2b_dir(build: BuildRef, store: PathLike | StoreTarget | None) -> Path | None:
    """BUILD as a local E2B/Wrenn build directory (no build.json beside its header), or None."""
    from fcsnap.store.operations.e2b import e2b_build_dir

    if store is not None and not isinstance(store, str | os.PathLike):
        return None  # a store object: fcsnap's own
    return e2b_build_dir(str(build), store)


def _e2b_bucket(
    build: BuildRef, store: PathLike | StoreTarget | None
) -> tuple[BucketHeaders, uuid.UUID] | None:
    """BUILD as an E2B/Wrenn build in an S3 store (a header, no build.json): the bucket's
    headers, to be mirrored, and the build's id; None otherwise."""
    if store is None or isinstance(store, str | os.PathLike) and not str(store).startswith(
            "s3://"):
        return None  # a local store: nothing of S3 imported
    from fcsnap.store.backends.remote import RemoteStore
    from fcsnap.store.backends.stores import LAZY_FETCH_TIMEOUT
    from fcsnap.store.operations.e2b_remote import BucketHeaders, e2b_in_bucket

    target = _open(store)
    if not isinstance(target, RemoteStore):
        return None
    build_id = e2b_in_bucket(target, str(build))
    return None if build_id is None else (BucketHeaders(target, LAZY_FETCH_TIMEOUT), build_id)


def _e2b_bucket_source(src: str) -> tuple[Path, Callable[[uuid.UUID], E2BLineage]]:
    """import's `s3://BUCKET/PREFIX/BUILD_ID`: the head's directory in the mirror with every
    header of its lineage, and the opener of a lineage by id in that bucket."""
    from fcsnap.errors import FcsnapError

    store, _, build = src.rstrip("/").rpartition("/")
    bucket = _e2b_bucket(build, store)
    if bucket is None:
        raise FcsnapError(f"{src} is not an E2B/Wrenn build in a bucket "
                          "(s3://BUCKET/PREFIX/<build_id>/memfile.header, no build.json)")
    headers, build_id = bucket
    return headers.mirror_lineage(build_id), headers.lineage


def _e2b_in_bucket(
    build: str, store: StoreTarget, cache_dir: PathLike | None, cache_size: int,
    fetch_timeout: float, lazy_fetch: bool, verify: bool,
) -> tuple[Path, Any] | None:
    """An E2B/Wrenn build in an S3 store, ready to serve through the host chunk cache (its
    build directory in the mirror, the fetch statistics), or None for an fcsnap build."""
    from fcsnap.store.backends.chunk_cache import ChunkCache, default_cache_dir
    from fcsnap.store.operations.e2b_remote import e2b_in_bucket, serve_e2b_in_bucket

    if e2b_in_bucket(store, build) is None:  # type: ignore[arg-type]  (a RemoteStore)
        return None
    cache = ChunkCache(Path(cache_dir) if cache_dir else default_cache_dir(), cache_size,
                       fetch_rest=not lazy_fetch)
    return serve_e2b_in_bucket(build, store, cache, fetch_timeout, verify)  # type: ignore[arg-type]


def _tracker(progress: Progress | None, total: int) -> Callable[[int], None]:
    """The ops' `advance(bytes)` callback, calling `progress` with the total: once with 0
    bytes right away, so that a progress bar knows its length before the work starts."""
    if progress is None:
        return lambda _n: None
    progress(0, total)
    return lambda n: progress(n, total)


def _data_bytes(header: Header) -> int:
    """Bytes of guest memory a build's own or ancestors' diffs hold (zero runs left out)."""
    return sum(m.length for m in header.mappings if not m.is_zero)


def _build_options(
    *, block_size: int | str, compress: str | None, frame_size: int | str, name: str | None,
    vmstate: PathLike | None, working_set: PathLike | None,
) -> BuildOptions:
    from fcsnap.store.format.names import check_vm_name
    from fcsnap.store.operations.builder import BuildOptions

    if name is not None:
        check_vm_name(name)  # before anything else: a bad name costs nothing
    compression, level = parse_compression(compress)
    return BuildOptions(
        parse_block_size(block_size), compression, level, parse_frame_size(frame_size), name,
        None if vmstate is None else Path(vmstate),
        working_set=None if working_set is None else Path(working_set),
    )


def _size_of(memfile: Path) -> int:
    return memfile.stat().st_size if memfile.is_file() else 0


def _built(result: tuple[Manifest, Path | str]) -> Build:
    manifest, path = result
    return Build.from_manifest(manifest, path)


class Store:
    """A store directory: builds by id, `vms/NAME` pointers to the newest build of a VM.

    `Store(path)` opens an existing store when first used: a directory (or S3 prefix) that is
    not one raises FcsnapError saying to create it with `Store.init` (`fcsnap init`). With
    `create=True` (`pack --init`) a missing or empty one becomes a store with the first build
    written to it."""

    def __init__(self, path: PathLike, *, create: bool = False) -> None:
        self.path = path if isinstance(path, str) and "://" in path else Path(path)
        self.create = create
        self._target: StoreTarget | None = None

    @classmethod
    def init(cls, path: PathLike) -> Store:
        """Create the store at `path` (a new or empty directory, or an empty S3 prefix) and
        open it. A store is opened as it is (an older fcsnap's gets its marker); a directory
        holding anything else is refused (FcsnapError)."""
        from fcsnap.store.backends.stores import make_store

        store = cls(path)
        store._target = make_store(str(store.path))[0]
        return store

    @property
    def target(self) -> StoreTarget:
        """What the store operations take: the directory, or the object store (opened once)."""
        if self._target is None:
            from fcsnap.store.backends.stores import open_store

            self._target = open_store(str(self.path), create=self.create)
        assert self._target is not None
        return self._target

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def build(self, build: BuildRef) -> Build:
        """The build a directory, id or VM name stands for."""
        from fcsnap.store.format.manifest import read_manifest

        path = _dir(build, self.target)
        return Build.from_manifest(read_manifest(path), path)

    def pack(
        self, memfile: PathLike, *, name: str | None = None, compress: str | None = None,
        block_size: int | str = 4096, frame_size: int | str = DEFAULT_FRAME_SIZE,
        vmstate: PathLike | None = None, working_set: PathLike | None = None,
        progress: Progress | None = None,
    ) -> Build:
        """Pack a Firecracker memory file as generation 0 of a new lineage. `compress` is
        None/'none', 'zstd' or 'zstd:LEVEL'; `name` points vms/NAME at the new build."""
        from fcsnap.store.operations import ops

        options = _build_options(
            block_size=block_size, compress=compress, frame_size=frame_size, name=name,
            vmstate=vmstate, working_set=working_set,
        )
        options = replace(options, name_expected=self._head(name), verb="pack")
        memfile = Path(memfile)
        advance = _tracker(progress, _size_of(memfile))
        return self._made(_built(ops.pack(memfile, self.target, options, advance)))

    def diff(
        self, memfile: PathLike, *, base: BuildRef, name: str | None = None,
        compress: str | None = None, block_size: int | str | None = None,
        frame_size: int | str = DEFAULT_FRAME_SIZE, sparse: bool = False,
        holes_are_zeros: bool = False, vmstate: PathLike | None = None,
        working_set: PathLike | None = None, written: PathLike | None = None,
        progress: Progress | None = None,
    ) -> Build:
        """Store what changed in `memfile` since `base` (the parent) as the next generation.
        With sparse=True the file is a Firecracker Diff snapshot: holes are unchanged pages;
        with holes_are_zeros=True holes are zeros. With neither, holes over pages the base
        holds as data are refused (UsageError): the file cannot say which it is. With
        `written` (restore --written of a VM served `base`), `memfile` is a Full snapshot of
        which only the pages in that written set are read."""
        from fcsnap.errors import FcsnapError, UsageError
        from fcsnap.store.format.manifest import read_manifest
        from fcsnap.store.operations import ops
        from fcsnap.units import format_block_size

        if written is not None and (sparse or working_set is not None):
            raise UsageError("--written takes no --sparse-diff or --working-set: the written "
                             "set says which pages changed")
        wanted = None if block_size is None else parse_block_size(block_size)
        options = _build_options(
            block_size=wanted or 4096, compress=compress, frame_size=frame_size, name=name,
            vmstate=vmstate, working_set=working_set,
        )
        base_dir = _dir(base, self.target, lazy=sparse)
        base_block_size = read_manifest(base_dir).block_size
        if wanted is not None and wanted != base_block_size:
            raise FcsnapError(
                f"block size {format_block_size(wanted)} differs from the base build's "
                f"{format_block_size(base_block_size)}"
            )
        options = replace(options, name_expected=self._head(name, base, base_dir), verb="diff")
        memfile = Path(memfile)
        advance = _tracker(progress, _size_of(memfile))
        if written is not None:  # the progress is over what is read: the written set's blocks
            from fcsnap.workingset import HEAD

            written = Path(written)
            pages = max(0, _size_of(written) - HEAD.size) // 8
            advance = _tracker(progress, min(pages * base_block_size, _size_of(memfile)))
        return self._made(_built(ops.diff(
            memfile, base_dir, self.target, options, sparse, advance, written,
            holes_are_zeros=holes_are_zeros,
        )))

    def squash(
        self, build: BuildRef, *, name: str | None = None, progress: Progress | None = None
    ) -> Build:
        """A new generation 0 with the same content as `build` and no ancestors (same block
        size and compression)."""
        from fcsnap.header import load_header
        from fcsnap.store.format.names import check_vm_name
        from fcsnap.store.operations import ops

        if name is not None:
            check_vm_name(name)  # before anything else: a bad name costs nothing
        build_dir = _dir(build, self.target, lazy=True)
        advance = _tracker(progress, _data_bytes(load_header(build_dir)))
        return self._made(_built(ops.squash(
            build_dir, self.target, name=name, progress=advance,
            name_expected=self._head(name, build, build_dir),
        )))

    def import_e2b(
        self, src: PathLike, *, name: str | None = None, compress: str | None = None,
        progress: Progress | None = None,
    ) -> list[Build]:
        """Import the E2B/Wrenn lineage whose newest build is the directory `src` (in a local
        directory laid out as their buckets), or `s3://BUCKET/PREFIX/BUILD_ID` (in a bucket
        laid out so): one build per generation with E2B's build ids, oldest first; `name`
        points vms/NAME at `src`'s. Builds imported before are reused."""
        from fcsnap.errors import FcsnapError
        from fcsnap.store.operations.e2b import headers_read_once
        from fcsnap.store.operations.e2b_import import Opener, import_e2b, own_bytes

        options = _build_options(block_size=4096, compress=compress,
                                 frame_size=DEFAULT_FRAME_SIZE, name=name, vmstate=None,
                                 working_set=None)
        if not isinstance(self.target, Path):
            raise FcsnapError(f"import writes to a local store directory, not {self.path}")
        options = replace(options, name_expected=self._head(name), verb="import")
        opener: Opener | None = None
        with headers_read_once():
            if str(src).startswith("s3://"):
                src, opener = _e2b_bucket_source(str(src))
            src = Path(src)
            advance = _tracker(progress, own_bytes(src))
            built = [_built(result)
                     for result in import_e2b(src, self.target, options, advance, opener)]
        self._made(None)
        return built

    def export_e2b(
        self, build: BuildRef, output: PathLike, *, compress: str | None = None,
        frame_size: int | str = "2M", progress: Progress | None = None,
    ) -> list[Path]:
        """Write `build`'s lineage into the directory `output` as an E2B store (version-4
        headers, `memfile` or `memfile.zstd` / `memfile.lz4` frames of `frame_size`
        uncompressed bytes); returns the build directories written."""
        from fcsnap.options import parse_e2b_compression, parse_e2b_frame_size
        from fcsnap.store.format.hashes import read_hashes
        from fcsnap.store.format.layout import HASHES
        from fcsnap.store.operations.e2b_export import Codec, export_e2b, lineage_dirs

        compression, level = parse_e2b_compression(compress)
        codec = Codec(compression, level, parse_e2b_frame_size(frame_size))
        build_dir = _dir(build, self.target, data=True)
        total = 0
        for b in lineage_dirs(build_dir):
            bs, table = read_hashes(b / HASHES)
            total += bs * len(table)
        advance = _tracker(progress, total)
        return export_e2b(build_dir, Path(output), codec, advance)

    def _made(self, result: T) -> T:
        """After a write: a store opened with `create` gets its marker now that it holds
        what the command wrote (a command that failed before left no store behind)."""
        if self.create:
            from fcsnap.store.backends.stores import mark

            mark(self.target)
            self.create = False
        return result

    def _head(
        self, name: str | None, build_arg: BuildRef | None = None, build_dir: Path | None = None
    ) -> uuid.UUID | None:
        """The build `name` points at as the command starts (None: no such name): publishing
        the name at the end is a compare-and-swap against it. When the command's BUILD
        argument is that same name, it is the build the argument resolved to, not a second
        look (the name may have moved in between)."""
        from fcsnap.store.backends.stores import current_head

        if name is None:
            return None
        if build_arg == name and build_dir is not None:
            return uuid.UUID(build_dir.name)
        return current_head(self.target, name)

    def unpack(
        self, build: BuildRef, output: PathLike, *, force: bool = False,
        progress: Progress | None = None,
    ) -> Path:
        return unpack(build, output, store=self.target, force=force, progress=progress)

    def verify(
        self, build: BuildRef, *, progress: Progress | None = None
    ) -> Verification | E2BVerification:
        return verify(build, store=self.target, progress=progress)

    def inspect(
        self, build: BuildRef, *, mappings: bool = False, at: Iterable[int | str] = ()
    ) -> Inspection:
        return inspect(build, store=self.target, mappings=mappings, at=at)

    def restore(self, build: BuildRef, socket: PathLike, **options: Any) -> Served:
        return restore(build, socket, store=self.target, **options)

    def tag(self, build: BuildRef, name: str) -> Build:
        """Point `name` at an existing build, as `diff(name=...)` points it at a new one: a
        compare-and-swap (NameMoved when another writer moves the name meanwhile)."""
        from fcsnap.store.operations.tagging import tag

        build_id, _ = tag(self.target, str(build), name)
        return self.build(str(build_id))

    def ls(self, name: str | None = None, *, builds: bool = False) -> dict[str, Any]:
        """What `fcsnap ls --json` prints: the names and their heads (or with `builds`, every
        build; with `name`, that name's lineage), the bytes they hold, and a summary."""
        from fcsnap.store.backends.stores import scan_store
        from fcsnap.store.operations import listing

        view = scan_store(self.target)
        if name is not None:
            return listing.lineage_report(view, name)
        return listing.builds_report(view) if builds else listing.names_report(view)

    def rm(self, *names: str) -> list[dict[str, Any]]:
        """Remove names (never builds): all of them, or none when one does not exist. Returns
        `{"name", "head"}` for each, as `fcsnap rm --json` prints them."""
        from fcsnap.store.operations.gc import remove_names

        return remove_names(self.target, list(names))

    def gc(
        self, *, grace: float | str = "1h", dry_run: bool = False,
        repack_below: float | None = None,
    ) -> dict[str, Any]:
        """Delete the builds no name's head reads once older than `grace` (seconds, or
        '90s', '30m', '1h', '2d'), as `fcsnap gc --json` reports it. `repack_below`: first
        squash every name whose head reads less than this fraction of its lineage's bytes."""
        from fcsnap.errors import UsageError
        from fcsnap.store.operations.gc import collect
        from fcsnap.units import parse_duration

        seconds = parse_duration(grace, "grace") if isinstance(grace, str) else float(grace)
        if not 0 <= seconds < float("inf"):
            raise UsageError(f"grace {grace!r}: a duration of 0 or more")
        if repack_below is not None and not 0 < repack_below <= 1:
            raise UsageError(f"repack_below {repack_below:g}: a fraction in (0, 1]")
        return collect(self.target, seconds, dry_run, repack_below)

    def push(self, build: BuildRef, to: PathLike | Store) -> dict[str, Any]:
        """Copy `build` and every build it reads to the store `to` (a NAME is published there
        too), as `fcsnap push --json` reports it."""
        from fcsnap.store.operations.transfer import copy_lineage

        dest = to if isinstance(to, Store) else Store(to)
        report = copy_lineage(str(build), self.target, dest.target, "push")
        dest._made(None)
        return report

    def pull(self, build: BuildRef, source: PathLike | Store) -> dict[str, Any]:
        """Copy `build` and every build it reads from the store `source` into this one, as
        `fcsnap pull --json` reports it."""
        from fcsnap.store.operations.transfer import copy_lineage

        origin = source if isinstance(source, Store) else Store(source)
        report = copy_lineage(str(build), origin.target, self.target, "pull")
        self._made(None)
        return report


def unpack(
    build: BuildRef, output: PathLike, *, store: PathLike | StoreTarget | None = None,
    force: bool = False, progress: Progress | None = None,
) -> Path:
    """Rebuild the full memory file of `build` at `output` (sparse where zero)."""
    from fcsnap.header import load_header
    from fcsnap.store.operations import ops

    foreign = _e2b_dir(build, store)
    if foreign is not None:
        from fcsnap.store.operations.e2b import unpack_e2b

        advance = _tracker(progress, _data_bytes(load_header(foreign)))
        unpack_e2b(foreign, Path(output), force, advance)
        return Path(output)
    bucket = _e2b_bucket(build, store)
    if bucket is not None:
        from fcsnap.store.operations.e2b import unpack_lineage

        ops.check_output(Path(output), force)  # before a byte is fetched
        lineage = bucket[0].lineage(bucket[1])
        advance = _tracker(progress, _data_bytes(lineage.header))
        unpack_lineage(lineage, Path(output), force, advance)
        return Path(output)
    build_dir = _dir(build, store, lazy=True)
    advance = _tracker(progress, _data_bytes(load_header(build_dir)))
    ops.unpack(build_dir, Path(output), force, advance)
    return Path(output)


def verify(
    build: BuildRef, *, store: PathLike | StoreTarget | None = None,
    progress: Progress | None = None,
) -> Verification | E2BVerification:
    """Check `build` and every build it reads: files, sizes, and every block's hash. An E2B or
    Wrenn build is checked with what it carries (E2BVerification says what that was)."""
    from fcsnap.header import load_header
    from fcsnap.store.format.layout import build_path, store_of
    from fcsnap.store.format.manifest import read_manifest
    from fcsnap.store.operations import ops

    foreign = _e2b_dir(build, store)
    if foreign is not None:
        from fcsnap.store.operations.e2b import verify_e2b

        return verify_e2b(foreign, _tracker(progress, _data_bytes(load_header(foreign))))
    bucket = _e2b_bucket(build, store)
    if bucket is not None:
        from fcsnap.store.operations.e2b import verify_lineage

        lineage = bucket[0].lineage(bucket[1])
        return verify_lineage(lineage, _tracker(progress, _data_bytes(lineage.header)))
    build_dir = _dir(build, store, data=True)
    builds = [build_path(store_of(build_dir), b) for b in load_header(build_dir).build_ids()]
    total = sum(read_manifest(b).stats.bytes_stored for b in builds if b.is_dir())
    result = ops.verify(build_dir, _tracker(progress, total))
    return Verification(
        uuid.UUID(result["build_id"]), result["generation"], result["builds_checked"],
        result["blocks_checked"], result["pinned"],
    )


def inspect(
    target: BuildRef, *, store: PathLike | StoreTarget | None = None, mappings: bool = False,
    at: Iterable[int | str] = (),
) -> Inspection:
    """Report on a build (directory, id, VM name) or a bare header file (any E2B/Wrenn
    memfile.header): which builds serve which share of memory; `at` looks offsets up."""
    from fcsnap.header import load_header
    from fcsnap.inspection import inspect_report
    from fcsnap.store.format.layout import HEADER

    offsets = [parse_offset(value) for value in at]
    path = Path(target) if not isinstance(target, uuid.UUID) else None
    if path is not None and path.exists() and not path.is_dir():
        # A header file, whatever its name; in a store when it sits in a build directory.
        header_path = path
        around = path.parent.parent if path.name == HEADER else None
    elif (bucket := _e2b_bucket(target, store)) is not None:
        header_path = bucket[0].mirror(bucket[1]) / HEADER  # with the headers it reads
        around = header_path.parent.parent
    else:
        header_path = _dir(target, store) / HEADER
        around = header_path.parent.parent
    header = load_header(header_path)
    report = inspect_report(header, around, mappings, offsets, header_path.parent)
    meta = report["metadata"]
    parent = meta["parent_build_id"]
    return Inspection(
        header.metadata.build_id, header_path, header.metadata.generation,
        None if parent is None else uuid.UUID(parent), header.metadata.base_build_id, report,
    )


def _stopped_while_opening(stats_path: PathLike | None) -> Served:
    """restore's end when SIGTERM/SIGINT came before its build was open: no VM was served
    (a queued one is killed, opening.py); --stats holds the counters and the exit reason."""
    import json

    from fcsnap.outputs import write_output
    from fcsnap.uffd.installer import InstallStats
    from fcsnap.uffd.session import stats_json

    served = Served(0, "stopped before a VM was served", InstallStats())
    if stats_path is not None:
        document = stats_json(served.stats, {"exit_reason": served.exit_reason})
        write_output(Path(stats_path), (json.dumps(document, indent=2) + "\n").encode(),
                     "--stats")
    return served


def restore(
    build: BuildRef, socket: PathLike, *, store: PathLike | StoreTarget | None = None,
    firecracker_api: PathLike | None = None, vmstate: PathLike | None = None,
    track_dirty_pages: bool = False, api_timeout: float = 30.0,
    cache_dir: PathLike | None = None, cache_size: int | str = "10G",
    fetch_timeout: float = 30.0, lazy_fetch: bool = False,
    on_listening: Callable[[Path], None] | None = None,
    on_loaded: Callable[[Response], None] | None = None, **options: Any,
) -> Served:
    """Serve `build`'s memory to one Firecracker VM connecting to `socket`, until the VM
    exits (status 0) or SIGTERM/SIGINT arrives (0). Blocks; installs its signal handlers,
    so call it from the main thread. The socket listens before the build is opened (a VM may
    connect meanwhile; it is killed if the build cannot be served); `on_listening(build_dir)`
    is called once the build is open too. `options` are ServeOptions fields (verify, stats_path,
    fault_around, cache_bytes, prefetch_ws, populate, eager, track_writes, written, ...).
    With `firecracker_api`, Firecracker's API socket is asked to load the snapshot from us
    once the build is open; a load it refuses raises FcsnapError (the VM is killed if it
    connected). A build in an S3 store is served through the host chunk cache at
    `cache_dir` (at most `cache_size`), each fetch allowed `fetch_timeout` seconds with its
    retries; the rest of what it reads of raw diffs is fetched in the background unless
    `lazy_fetch`."""
    from fcsnap.restore_options import DEFAULT_HANDSHAKE_TIMEOUT, check_restore
    from fcsnap.uffd.opening import Opening, Stopped
    from fcsnap.uffd.serve_options import ServeOptions

    checked = check_restore(  # fault_around: a size ("256K", 0) or "adaptive", as typed
        fault_around=options.get("fault_around", "adaptive"),
        handshake_timeout=options.get("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        firecracker_api=firecracker_api, vmstate=vmstate, track_dirty_pages=track_dirty_pages,
        api_timeout=api_timeout, access=options.get("access"),
    )
    options.update(fault_around=checked.fault_around, access=checked.access,
                   handshake_timeout=checked.handshake_timeout)
    if isinstance(store, str | os.PathLike) and str(store).startswith("s3://"):
        from fcsnap.store.backends.leases import lease_expiry

        lease_expiry()  # a bad FCSNAP_S3_LEASE_EXPIRY is refused before the store is read
    size = parse_cache_size(cache_size)
    socket = Path(socket)
    serving = ServeOptions(socket=socket, **options)
    serving.check_outputs()
    # Listening from here on, so that Firecracker starts while the build is opened: the
    # server's modules and the build's pins, lock and header (opening.py).
    try:
        with Opening(socket, checked.access) as opening:
            from fcsnap.store.backends.remote import RemoteStore
            from fcsnap.store.backends.stores import open_store, serve_source
            from fcsnap.uffd.server import FaultServer

            if isinstance(store, str | os.PathLike):
                store = open_store(str(store), fetch_timeout)
            verify = bool(options.get("verify"))
            if (store is None or isinstance(store, Path)) and _e2b_dir(build, store) is not None:
                from fcsnap.store.operations.e2b_serve import e2b_to_serve  # served as it is

                e2b_to_serve(str(build), store, verify)
            foreign = None if store is None or isinstance(store, Path) else _e2b_in_bucket(
                str(build), store, cache_dir, size, fetch_timeout, lazy_fetch, verify)
            build_dir, fetched = foreign or serve_source(
                str(build), store, None if cache_dir is None else Path(cache_dir), size,
                fetch_timeout, lazy_fetch,
            )
            load = checked.snapshot_load(build_dir, socket)

            def listening() -> None:
                if on_listening is not None:
                    on_listening(build_dir)
                if load is not None:  # in the background: Firecracker answers after our accept
                    load.start(server.fail, on_loaded or (lambda _response: None))

            serving.on_listening, serving.listener = listening, opening.listener
            serving.watchdog = opening.watchdog  # guarding the socket already
            if fetched is not None:
                serving.more_stats = fetched.as_dict  # the fetch counters in --stats
            opening.server = server = FaultServer(
                build_dir, serving, store if isinstance(store, RemoteStore) else None)
            status = server.run(handle_signals=False)
    except Stopped:  # SIGTERM/SIGINT before the server could take it
        return _stopped_while_opening(serving.stats_path)
    if load is not None and (error := load.finish()) is not None:
        raise error
    assert server.exit_reason is not None  # run() returns once serving has ended
    return Served(status, server.exit_reason, server.stats)
