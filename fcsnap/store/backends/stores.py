"""`--store` as a store: a directory, or `s3://BUCKET/PREFIX` (fcsnap/store/backends/s3.py).

The CLI turns its --store text into a store here and nowhere else; commands get a `Path` (a
local store, its own protocol of renames and flock locks) or a `RemoteStore`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias, TypeGuard

from fcsnap.errors import FcsnapError
from fcsnap.options import S3_SCHEME
from fcsnap.scratch import scratch_dir
from fcsnap.store.format.layout import DIFF_RAW, SNAPFILE, resolve_build
from fcsnap.store.format.marker import State, local_state, mark_local, not_a_store
from fcsnap.store.format.names import read_vm_pointer

if TYPE_CHECKING:
    from fcsnap.store.backends.chunk_cache import ChunkCache, FetchStats
    from fcsnap.store.backends.remote import RemoteStore
    from fcsnap.store.backends.usage import StoreView

# The S3 modules (and hashlib, which they load) are imported only for a store in S3: a command
# on a local store does without them.
Store: TypeAlias = "Path | RemoteStore"


def is_remote(store: Store | None) -> TypeGuard[RemoteStore]:
    return store is not None and not isinstance(store, Path)


def open_store(text: str, timeout: float | None = None, *, create: bool = False) -> Store:
    """The store `text` names, which must be one (FcsnapError naming it and `fcsnap init`
    otherwise). `create` (pack --init): a missing or empty directory or prefix is taken too;
    the command marks it once its build is written (mark), so one that fails leaves no
    store behind. `timeout`: for a store in S3, the most seconds a request may
    take with its retries."""
    store = _store_at(text, timeout)
    state = state_of(store)
    if state is State.FOREIGN and create:
        raise not_empty(store)
    if state not in (State.MARKED, State.UNMARKED) and not create:
        raise not_a_store(store, state)
    return store


def not_empty(store: Store) -> FcsnapError:
    return FcsnapError(f"cannot make {store} a store: it holds other files (a store is made "
                       "in a new or empty directory)")


def make_store(text: str, timeout: float | None = None) -> tuple[Store, State]:
    """`fcsnap init`: the store `text` names, made one if need be (init_store), and what
    was found there."""
    store = _store_at(text, timeout)
    return store, init_store(store)


def _store_at(text: str, timeout: float | None) -> Store:
    from fcsnap.options import check_store_text

    check_store_text(text)
    if text.startswith(S3_SCHEME):
        from fcsnap.store.backends.remote import RemoteStore
        from fcsnap.store.backends.s3 import S3Objects, parse_s3_url

        return RemoteStore(S3Objects(parse_s3_url(text), timeout), scratch_dir("mirror"))
    return Path(text)


def state_of(store: Store) -> State:
    return store.state() if is_remote(store) else local_state(store)


def init_store(store: Store) -> State:
    """Make `store` a store: a missing or empty directory (or prefix) gets the marker, an old
    store is adopted, a store is left as it is; anything else is refused. Returns the state
    found."""
    state = state_of(store)
    if state is State.FOREIGN:
        raise not_empty(store)
    if state is State.MISSING:
        assert isinstance(store, Path)
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FcsnapError(f"cannot create store {store}: {e.strerror or e}") from e
    if state is not State.MARKED:
        mark(store)
    return state


def mark(store: Store) -> None:
    """Write the marker of a store that has none (a new store's, or an older fcsnap's)."""
    if is_remote(store):
        store.write_marker()
    else:
        mark_local(store)


def open_optional(text: str | None) -> Store | None:
    return None if text is None else open_store(text)


LAZY_FETCH_TIMEOUT = 60.0  # seconds a chunk fetch of unpack, squash or diff may take


def resolve(arg: str, store: Store | None, data: bool = False, lazy: bool = False) -> Path:
    """A BUILD argument as a local build directory: in a local store, or in the mirror of a
    remote one. With `data`, the diffs of its lineage are downloaded too (verify reads them
    as files); with `lazy`, its readers fetch the chunks they read, into a cache private to
    this process (fcsnap/store/backends/chunk_cache.py)."""
    if not is_remote(store):
        return resolve_build(arg, store)
    head = store.mirror_lineage(store.resolve(arg), data)
    if lazy:
        from fcsnap.store.backends.chunk_cache import ChunkCache

        cache = ChunkCache(scratch_dir("chunks"), limit_bytes=1 << 62)
        read_through(store, head, cache, LAZY_FETCH_TIMEOUT)
    return head


def current_head(store: Store, name: str) -> uuid.UUID | None:
    """The build a name points at now (None: no such name)."""
    if is_remote(store):
        return store.read_pointer(name)[0]
    return read_vm_pointer(store, name)


def local_path(store: Store) -> Path:
    """Where the store's builds are found on this host (a remote store's mirror)."""
    return store.mirror if is_remote(store) else store


def squash_source(store: Store, build_dir: Path) -> Path:
    """A build to squash (gc --repack-below): in place in a local store; in a remote one, its
    mirror, whose diffs are read through a chunk cache (only what the squash reads)."""
    if not is_remote(store):
        return build_dir
    return resolve(build_dir.name, store, lazy=True)


def build_bytes(store: Store, build_id: uuid.UUID) -> int:
    """Bytes a build holds in the store: its files, or its objects."""
    if is_remote(store):
        return sum(info.size for info in store.build_objects(build_id).values())
    from fcsnap.store.backends.usage import directory_bytes
    from fcsnap.store.format.layout import build_path

    return directory_bytes(build_path(store, build_id))


def scan_store(store: Store) -> StoreView:
    """What `ls` shows: a local store as it is, a remote one through its mirror (headers and
    manifests of every committed build; diff sizes from the listing)."""
    from fcsnap.store.backends.usage import scan

    if not is_remote(store):
        return scan(store)
    for build_id in store.committed():
        store.mirror_build(build_id)
    store.mirror_names()
    view = scan(store.mirror)
    view.store = store.url  # type: ignore[assignment]  (named in messages only)
    for name in view.names.values():  # a damaged pointer is named as the bucket's object
        if name.error is not None:
            name.error = name.error.replace(str(store.mirror), store.url)
    return view


def serve_source(
    arg: str, store: Store | None, cache_dir: Path | None, cache_size: int,
    fetch_timeout: float, lazy_fetch: bool = False,
) -> tuple[Path, FetchStats | None]:
    """restore's BUILD: a local build, or a build in object storage whose diffs are read on
    demand through the host chunk cache (raw in 4 MiB chunks, zstd in groups of frames
    holding whole blocks: frame by frame with 4 KiB blocks). Returns the build directory and
    the fetch statistics to report."""
    from fcsnap.store.backends.chunk_cache import ChunkCache, default_cache_dir

    if not is_remote(store):
        return resolve(arg, store), None
    from fcsnap.store.backends.leases import lease_expiry

    lease_expiry()  # a bad FCSNAP_S3_LEASE_EXPIRY is refused before any work
    head = mirror_for_serving(store, arg)
    cache = ChunkCache(cache_dir or default_cache_dir(), cache_size, fetch_rest=not lazy_fetch)
    read_through(store, head, cache, fetch_timeout, serving=True)
    return head, cache.stats


def mirror_for_serving(store: RemoteStore, arg: str) -> Path:
    """A build to serve, in the mirror: its lineage's headers and sidecars (not its diffs),
    and its snapfile, which Firecracker loads (the real bytes, not a placeholder)."""
    head = store.mirror_lineage(store.resolve(arg))
    if (head / SNAPFILE).exists():
        store.download(f"{head.name}/{SNAPFILE}", head / SNAPFILE)
    return head


def read_through(
    store: RemoteStore, head: Path, cache: ChunkCache, fetch_timeout: float,
    serving: bool = False,
) -> None:
    """Have every reader of the mirror's diffs (restore, and GenerationReader: unpack, squash,
    diff --sparse-diff) read diffs through `cache`, fetching only the chunks (raw) or groups
    of frames holding whole blocks (zstd) they read.
    `serving`: for a fault server, which copies pages straight from the chunks' mappings
    (CachedDiff.chunk_maps) and never waits on the network (FetchPending); it leases the
    builds it serves in the store (hold_builds, fcsnap/store/backends/holds.py)."""
    from fcsnap.store.backends.cached_zstd import CachedZstd
    from fcsnap.store.backends.chunk_cache import CachedDiff, with_deadline
    from fcsnap.store.format.layout import DIFF_ZSTD
    from fcsnap.store.format.seekable import FrameCache
    from fcsnap.store.format.source import DiffFile, open_diffs_with

    def opener(build_dir: Path, cache_bytes: int, frames: FrameCache | None) -> DiffFile:
        objects = store.build_objects(uuid.UUID(build_dir.name))
        name = DIFF_ZSTD if DIFF_ZSTD in objects else DIFF_RAW
        key = f"{build_dir.name}/{name}"
        info = objects.get(name)

        def read_range(start: int, length: int) -> bytes:
            fetch = with_deadline(
                lambda: store.objects.get_range(key, start, length), fetch_timeout,
                f"{store.url}/{key}",
            )
            return fetch()

        if name == DIFF_ZSTD:
            assert info is not None
            diff = CachedZstd.open(build_dir, cache, info.size, read_range, frames, cache_bytes)
            diff.nonblocking = serving
            return diff  # type: ignore[return-value]  (DiffFile's reading interface)
        raw = CachedDiff(build_dir, cache, info.size if info else None, read_range)
        raw.serving = serving
        if build_dir.name == head.name:
            raw.fetch_start()
        return raw  # type: ignore[return-value]  (DiffFile's reading interface)

    open_diffs_with(store.mirror, opener)
