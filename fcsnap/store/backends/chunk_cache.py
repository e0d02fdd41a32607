"""The host chunk cache: diffs of builds in object storage, fetched on demand in 4 MiB chunks.

A restore from S3 does not wait for whole diffs: a read fetches the chunks it needs (one range
GET each), checks every block of them against the build's hash sidecar (remote data is
untrusted; the sidecar itself is pinned by the head, docs/FORMAT.md §6.2), and only then keeps
the chunk in the cache directory and hands it out. A block that does not match is never
installed in a guest, and never cached.

The cache is shared by every restore on the host and survives restarts, so what it holds is
checked again by each process that maps it: a cache file whose size is not the chunk's, or
whose blocks do not match the sidecar, is removed and fetched again (a miss), before any of
its bytes is used. Its directories and files are private to the server's user, and a chunk
is written durably before it is visible (fcsnap/store/backends/private.py): readers see it whole or
not at all. Chunks are keyed by build id and the SHA-256 of the build's sidecar, so two stores
holding different builds under one id never share a chunk. When the cache passes its size,
the chunks least recently used (by modification time, touched on every hit) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.store.backends.private import (
    FILE_MODE,
    new_private_file,
    private_dir,
    private_dirs,
    publish,
)
from fcsnap.store.format.hashes import DIGEST_SIZE, digest, read_hashes, sidecar_pin
from fcsnap.store.format.layout import DIFF_RAW, HASHES
from fcsnap.store.format.manifest import read_manifest
from fcsnap.uffd import abi
from fcsnap.units import PAGE

CHUNK_SHIFT = 22
CHUNK = 1 << CHUNK_SHIFT
AHEAD = 4  # chunks fetched ahead of a sequential reader
IN_FLIGHT = 16  # fetches ahead of readers in flight at once (fetch threads; 16 measured best)
BACKGROUND = 2  # whole-diff fetches in flight (measured: 2 GETs at 88% of 16's pace)
FOR_READERS = 4  # fetch threads for what a fault server's reader waits on, ahead of those
MAPPED = 8  # chunks a diff keeps mapped (32 MiB of page cache)
STALE_TEMP = 3600.0  # seconds after which a temporary is a killed writer's (one takes < 1 s)
Buffer = bytes | mmap.mmap


Check = Callable[[Buffer], None]  # raises FcsnapError when a piece's bytes are not right


class Damaged(Exception):
    """A cache file that cannot be used as it is (why, in a few words)."""


def _mapped(fd: int) -> mmap.mmap:
    """A cache file mapped read-only (the mapping outlives a later eviction of the file), its
    page tables filled at once (MAP_POPULATE): the guest's scattered faults then copy from
    it without a page fault in the server each (at 4 KiB a fault, those cost more than the
    copies)."""
    return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)


DEFAULT_SIZE = 10 << 30


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "fcsnap" / "chunks"


@dataclass
class FetchStats:
    fetched_bytes: int = 0
    fetch_requests: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_discarded: int = 0  # cache files short, unreadable or failing their check

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ChunkCache:
    directory: Path
    limit_bytes: int = DEFAULT_SIZE
    stats: FetchStats = field(default_factory=FetchStats)
    in_flight: int = IN_FLIGHT
    # What a served build reads of raw diffs is fetched behind every other fetch
    # (CachedDiff.fetch_rest): the guest's later faults find its chunks here. False
    # (restore/serve --lazy-fetch): only what faults, fault-around and prefetch read.
    fetch_rest: bool = True
    counting: threading.Lock = field(default_factory=threading.Lock)  # stats and `used`

    def __post_init__(self) -> None:
        private_dirs(self.directory, "cache directory")
        self.used = self._scan()[1]
        self.ahead = FetchPool(self.in_flight)
        self.for_readers = FetchPool(FOR_READERS)

    def lookup(self, key: str, index: int, size: int, check: Check) -> Buffer | None:
        """Chunk `index` of `key` mapped from the cache and checked, or None when it is not
        cached or not right (no fetch: what a fault server may do without waiting on the
        network)."""
        return self._cached(self.directory / key / f"{index:08d}", size, check)

    def holds(self, key: str, index: int) -> bool:
        """Whether chunk `index` of `key` is in the cache (not mapped, not checked, not
        counted)."""
        return (self.directory / key / f"{index:08d}").exists()

    def get(self, key: str, index: int | str, fetch: Callable[[], bytes], check: Check,
            size: int | None) -> Buffer:
        """Chunk `index` of the diff cached under `key`, mapped from its cache file: from the
        cache when the file holds `size` bytes (None: a size `check` checks) that pass
        `check`, else fetched, checked and cached first. A named piece (`index` a name, such
        as a zstd diff's seek table) is kept outside the size accounting: it is small."""
        name = index if isinstance(index, str) else f"{index:08d}"
        path = self.directory / key / name
        data = self._cached(path, size, check)
        if data is not None:
            return data
        try:
            private_dir(path.parent)
            lock = os.open(path.parent / f".lock-{name}",
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError:  # no room for them (a full disk): the bytes are served, not cached
            return self._fetched(fetch, check)
        # One fetch per chunk on the host: the others wait for it, then map the file.
        with locked(lock):
            data = self._cached(path, size, check)
            if data is not None:
                return data
            fetched = self._fetched(fetch, check)
            data = self._store(path, fetched)
        with self.counting:
            self.used += len(fetched)
            full = self.used > self.limit_bytes
        if full:
            self._evict()
        return data

    def _fetched(self, fetch: Callable[[], bytes], check: Check) -> bytes:
        """A piece fetched from the store (counted) and checked."""
        fetched = fetch()
        self.count(cache_misses=1, fetch_requests=1, fetched_bytes=len(fetched))
        check(fetched)
        return fetched

    def _store(self, path: Path, fetched: bytes) -> Buffer:
        """Checked bytes written to the cache (durable before visible), mapped from the
        file written (not from the name, which another process may replace meanwhile); the
        bytes themselves when there is no room (a full disk costs the cache, not the VM)."""
        try:
            fd, tmp = new_private_file(path.parent)
        except OSError:
            return fetched
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(fetched)
            data = _mapped(fd) if fetched else fetched
            publish(fd, tmp, path)
            return data
        except OSError:
            tmp.unlink(missing_ok=True)
            return fetched
        finally:
            os.close(fd)

    def count(self, **counts: int) -> None:
        """Add to the stats (fetch threads count too: under a lock, none is lost)."""
        with self.counting:
            for name, n in counts.items():
                setattr(self.stats, name, getattr(self.stats, name) + n)

    def prefetch(self, work: Callable[[], object], background: bool = False) -> None:
        """Run `work` (fetching a chunk ahead of its reader) on one of `in_flight` fetch
        threads, in the order asked; `background` work only when no other is waiting."""
        self.ahead.run(work, background)

    def hold_background(self, held: bool) -> None:
        """While held (a working set going in), no background fetch starts; holds nest."""
        self.ahead.hold(held)

    def fetch_for_reader(self, work: Callable[[], object]) -> None:
        """Run `work` (fetching what a fault server waits on) on threads of its own, so it
        does not queue behind the fetches ahead."""
        self.for_readers.run(work)

    def _cached(self, path: Path, size: int | None, check: Check) -> Buffer | None:
        """The cache file at `path` mapped, once it is found to hold `size` bytes passing
        `check`; None when there is none. A file that is short, empty, not a regular file,
        unreadable or failing its check is removed (with one line on stderr): a miss."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._discard(path, None, f"cannot be read ({e.strerror})")
            return None
        try:
            found = os.fstat(fd)
            data = self._checked(fd, found, size, check)
        except Damaged as e:
            self._discard(path, found, str(e))
            return None
        finally:
            os.close(fd)
        # recently used; evicted by another thread since it was mapped: the mapping holds it
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        self.count(cache_hits=1)
        return data

    @staticmethod
    def _checked(fd: int, found: os.stat_result, size: int | None, check: Check) -> Buffer:
        """The open cache file mapped, its size and bytes checked before any is used: the
        compiled copy reads a whole chunk's mapping, so a short one must never be handed
        out."""
        if not stat.S_ISREG(found.st_mode):
            raise Damaged("is not a regular file")
        if found.st_size == 0 or (size is not None and found.st_size != size):
            raise Damaged(f"holds {found.st_size} bytes, not {size}")
        try:
            data = _mapped(fd)
        except OSError as e:
            raise Damaged(f"cannot be mapped ({e.strerror})") from None
        try:
            check(data)
        except FcsnapError:
            raise Damaged("does not match the build's hash sidecar") from None
        return data

    def _discard(self, path: Path, found: os.stat_result | None, why: str) -> None:
        """Remove a cache file that cannot be used (unless another process replaced it
        meanwhile): the caller fetches it again. Counted and said once: by whichever thread
        or process removes it."""
        try:
            now = os.lstat(path)
            if found is not None and (now.st_ino, now.st_dev) != (found.st_ino, found.st_dev):
                return  # replaced meanwhile: the caller finds the new file
            os.unlink(path)
        except FileNotFoundError:
            return  # removed first by another reader of the same chunk, which said so
        except OSError:
            pass  # cannot be removed: still a miss, and the fetched copy is renamed over it
        self.count(cache_discarded=1)
        print(f"fcsnap: warning: chunk cache file {path} {why}: removed, fetched again",
              file=sys.stderr)

    def _scan(self) -> tuple[list[tuple[float, int, Path]], int]:
        """The cached chunks (mtime, size, path) and their bytes; the temporaries of writers
        killed mid-write, which nothing else would ever remove or count, removed on the way
        (a live writer whose temporary went only loses caching that chunk)."""
        stale = time.time() - STALE_TEMP
        for temp in self.directory.glob("*/.tmp-*"):
            with contextlib.suppress(OSError):
                if temp.lstat().st_mtime < stale:
                    temp.unlink()
        chunks = []
        for entry in self.directory.glob("*/[0-9]*"):
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            chunks.append((st.st_mtime, st.st_size, entry))
        return chunks, sum(size for _, size, _ in chunks)

    def _evict(self) -> None:
        """Remove the least recently used chunks until the cache holds 90% of its limit."""
        chunks, used = self._scan()
        for _, size, path in sorted(chunks, key=lambda c: c[0]):
            if used <= self.limit_bytes * 0.9:
                break
            path.unlink(missing_ok=True)
            used -= size
        with self.counting:
            self.used = used


class ReaderFetches:
    """What a fault server's reads wait on (FetchPending): each piece fetched once, on the
    cache's threads for readers; a fetch that failed is raised to the next read that asks."""

    def __init__(self, cache: ChunkCache) -> None:
        self.cache = cache
        self.lock = threading.Lock()
        self.under_way: set[int] = set()
        self.failed: dict[int, str] = {}

    def __contains__(self, index: int) -> bool:
        with self.lock:
            return index in self.under_way

    def fail(self, index: int, error: FcsnapError) -> None:
        """A fetch of `index` failed (a reader's, or one ahead): the next read says so."""
        with self.lock:
            self.failed[index] = str(error)

    def ask(self, index: int, fetch: Callable[[], object]) -> bool:
        """Start `fetch` of piece `index` unless one is under way (True: started now); raise
        what the last fetch of it failed with."""
        with self.lock:
            failed = self.failed.pop(index, None)
            if failed is None and index in self.under_way:
                return False
            if failed is None:
                self.under_way.add(index)
        if failed is not None:
            raise FcsnapError(failed)

        def run() -> None:
            try:
                fetch()
            except FcsnapError as e:
                self.fail(index, e)
            finally:
                with self.lock:
                    self.under_way.discard(index)

        self.cache.fetch_for_reader(run)
        return True


class CachedDiff:
    """A raw diff in object storage read through the chunk cache: what DiffFile is to a local
    diff, for the readers that use `read` (no mapping of the whole diff: `map` is None).

    For a restore (`serving`), every chunk read stays mapped while the diff is open and its
    address goes into `chunk_maps` (0: not mapped yet), which the compiled fault loop
    (csrc/fastpath.c) copies from with the GIL released, handing a fault back to Python when
    its chunk is not mapped yet. The table is shared by every session of the build: an entry
    only ever goes from 0 to the address of a mapping that lives until `close` (after the
    last session), so a reader sees 0 or a valid address, never a stale one. A chunk evicted
    from the cache meanwhile stays readable through its mapping (the inode lives while
    mapped).

    While serving, a read never waits on the network: a chunk neither mapped nor in the host
    cache is fetched on a thread for readers and the read raises FetchPending; the fault
    server serves other faults meanwhile and asks again. A failed fetch is reported to the
    next read of that chunk."""

    chunk_shift = CHUNK_SHIFT

    def __init__(
        self, build_dir: Path, cache: ChunkCache, object_size: int | None,
        read_range: Callable[[int, int], bytes],
    ) -> None:
        self.build_dir = build_dir
        self.path = build_dir / DIFF_RAW
        self.compressed = False
        self.map = None
        self.zstd = None
        self.fd = -1
        self.cache = cache
        self.read_range = read_range
        manifest = read_manifest(build_dir)
        self.size = manifest.stats.bytes_stored
        if object_size != self.size:
            raise FcsnapError(
                f"build {build_dir.name}: its diff object holds {object_size} bytes, build.json "
                f"says {self.size}"
            )
        sidecar = (build_dir / HASHES).read_bytes()
        self.block_size, self.table = read_hashes(build_dir / HASHES)
        if len(self.table) * self.block_size < self.size:  # a block without a hash: unchecked
            raise FcsnapError(
                f"build {build_dir.name}: its hash sidecar holds {len(self.table)} hashes, "
                f"too few for the {self.size} bytes of its diff"
            )
        self.key = f"{build_dir.name}-{sidecar_pin(sidecar)[7:39]}"
        self.mapped: OrderedDict[int, Buffer] = OrderedDict()
        self.serving = False  # keep every chunk read mapped, in chunk_maps (serve_source)
        self.held: dict[int, Buffer] = {}  # the chunks chunk_maps points into
        self.chunk_maps = array("Q", bytes(8 * max(1, -(-self.size // CHUNK))))
        self.ahead: set[int] = set()  # chunks whose fetch ahead was asked for
        self.landing: set[int] = set()  # chunks being fetched ahead right now
        self.for_reader = ReaderFetches(cache)  # chunks serving reads wait on
        self.lock = threading.Lock()

    def fetch_start(self) -> None:
        """Start fetching the diff's first chunks now, before any read: they hold a working
        set laid out first (pack --working-set), which --prefetch-ws reads right after the
        handshake, and the VM takes a while to connect."""
        self.fetch_chunks(range(min(AHEAD, -(-self.size // CHUNK))))

    def fetch_rest(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Queue every chunk holding diff bytes [starts[i], ends[i]) (what the served build's
        memory maps to) for fetching in the background, in storage order, behind every fetch
        a reader or a working set asks for (see FetchPool): a cold host then has all of it at
        the pace of the store, not of the guest's faults. Only while serving with the
        cache's `fetch_rest`, and not more than half the cache holds (it would evict its
        own chunks)."""
        if not (self.serving and self.cache.fetch_rest):
            return
        count = -(-self.size // CHUNK)
        edges = np.zeros(count + 1, np.int64)  # +1 where a range starts, -1 past its end
        np.add.at(edges, starts >> CHUNK_SHIFT, 1)
        np.add.at(edges, ((ends - 1) >> CHUNK_SHIFT) + 1, -1)
        needed = np.flatnonzero(np.cumsum(edges[:-1]) > 0)
        if len(needed) * CHUNK > self.cache.limit_bytes // 2:
            return
        for index in needed.tolist():
            self.cache.prefetch(lambda i=index: self._fetched_ahead(i), background=True)

    def fetch_extent(self, storage: np.ndarray) -> None:
        """Start fetching, in this order, the chunks holding the pages at `storage` (the
        working set a restore is about to prefetch): as many in flight as the cache allows,
        so that a VM connecting later finds its working set fetched, or in flight."""
        chunks = storage >> CHUNK_SHIFT
        _, first = np.unique(chunks, return_index=True)
        self.fetch_chunks(chunks[np.sort(first)].tolist())

    def fetch_chunks(self, indexes: Iterable[int]) -> None:
        """Fetch these chunks ahead of their readers (those not fetched or asked for yet);
        while serving, each is mapped into chunk_maps as it lands."""
        for index in indexes:
            with self.lock:
                if index in self.ahead or index in self.held:
                    continue
                self.ahead.add(index)
            self.cache.prefetch(lambda i=index: self._fetched_ahead(i))

    def _fetched_ahead(self, index: int) -> None:
        with self.lock:
            if index in self.held or index in self.for_reader or index in self.landing:
                return  # a reader's fetch (or one ahead) came first
            self.landing.add(index)
        try:
            chunk = self._get(index)
            if self.serving:
                self._keep(index, chunk)
        except FcsnapError as e:  # after retries for the whole --fetch-timeout (or a bad
            if self.serving:  # block): a serving read of it says so, without a second wait
                self.for_reader.fail(index, e)
        finally:
            with self.lock:
                self.landing.discard(index)

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or offset + length > self.size:
            raise FcsnapError(
                f"build {self.build_dir.name}: read [{offset:#x}, {offset + length:#x}) beyond "
                f"its {self.size:#x} bytes"
            )
        pieces = []
        end = offset + length
        while offset < end:
            index = offset // CHUNK
            chunk = self._chunk(index)
            lo = offset - index * CHUNK
            take = min(end - offset, len(chunk) - lo)
            pieces.append(bytes(chunk[lo:lo + take]))
            offset += take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def source(self, storage: int, length: int) -> int | None:
        """The address of diff bytes [storage, storage+length) in a mapped chunk (valid while
        the diff is open), or None when they span chunks."""
        index = storage >> CHUNK_SHIFT
        if (storage + length - 1) >> CHUNK_SHIFT != index:
            return None
        address = self.chunk_maps[index]
        if not address:
            self._chunk(index)
            address = self.chunk_maps[index]
        return address + storage - (index << CHUNK_SHIFT) if address else None

    def addresses(self, storage: np.ndarray) -> np.ndarray | None:
        """The addresses of the 4 KiB pages at `storage` in the chunks' mappings (mapping
        the chunks first, fetching those not cached); None if a page straddles chunks."""
        if (storage % PAGE).any():
            return None
        chunks = storage >> CHUNK_SHIFT
        pending = None
        for index in np.unique(chunks).tolist():
            if not self.chunk_maps[index]:
                try:
                    self._chunk(index)
                except FetchPending as e:  # the others are asked for too, then all wait
                    pending = e
        if pending is not None:
            raise pending
        table = np.frombuffer(self.chunk_maps, np.uint64).astype(np.int64)
        return table[chunks] + (storage & (CHUNK - 1))

    def _chunk(self, index: int) -> Buffer:
        """A chunk mapped from the cache (see `_keep`); a chunk not mapped yet also starts the
        fetch of the AHEAD chunks after it, so a sequential reader (a working-set prefetch,
        populate) finds them fetched or in flight. While serving, FetchPending instead of
        waiting for a fetch (see the class doc)."""
        with self.lock:
            chunk = self.held.get(index) or self.mapped.get(index)
            if index in self.mapped:
                self.mapped.move_to_end(index)
        if chunk is not None:
            return chunk
        if self.serving:
            chunk = self.cache.lookup(self.key, index, self._chunk_size(index),
                                      lambda data: self._check(index * CHUNK, data))
            if chunk is None:
                with self.lock:
                    landing = index in self.landing
                if not landing:  # (a fetch ahead in flight is mapped as it lands)
                    self._fetch_for_reader(index)
                raise FetchPending(f"chunk {index} of build {self.build_dir.name}")
        else:
            chunk = self._get(index)
        self._read_ahead(index)
        return self._keep(index, chunk)

    def _read_ahead(self, index: int) -> None:
        last = (self.size - 1) // CHUNK
        self.fetch_chunks(i for i in range(index + 1, min(index + AHEAD, last) + 1)
                          if i not in self.mapped)

    def _fetch_for_reader(self, index: int) -> None:
        """Fetch chunk `index` for a serving read, once; raise what its fetch failed with."""

        def fetch() -> None:
            with self.lock:
                if index in self.held:  # landed from a fetch ahead meanwhile
                    return
            self._keep(index, self._get(index))

        if self.for_reader.ask(index, fetch):
            self._read_ahead(index)

    def _keep(self, index: int, chunk: Buffer) -> Buffer:
        """Serving: keep the chunk mapped while the diff is open, its address in chunk_maps;
        otherwise among the last MAPPED chunks."""
        with self.lock:
            if self.serving:
                if index not in self.held:
                    self.held[index] = chunk
                    self.chunk_maps[index] = abi.buffer_address(chunk)
                return self.held[index]
            self.mapped[index] = chunk
            while len(self.mapped) > MAPPED:
                self.mapped.popitem(last=False)
        return chunk

    def _chunk_size(self, index: int) -> int:
        return min(CHUNK, self.size - index * CHUNK)

    def _get(self, index: int) -> Buffer:
        start = index * CHUNK
        length = self._chunk_size(index)
        return self.cache.get(
            self.key, index, lambda: self.read_range(start, length),
            lambda data: self._check(start, data), length,
        )

    def _check(self, start: int, data: Buffer) -> None:
        """Every block of a chunk against the sidecar, before it is used or cached: fetched
        from the store, or found in the host cache (once per process: the chunk stays
        mapped)."""
        bs = self.block_size
        first, count = start // bs, len(data) // bs
        view = memoryview(data)  # blocks hashed in place, not copied out
        got = np.frombuffer(
            b"".join(digest(view[i * bs:(i + 1) * bs]) for i in range(count)), np.uint8
        ).reshape(count, DIGEST_SIZE)
        bad = np.flatnonzero((got != self.table[first:first + count]).any(axis=1))
        if len(bad) or len(data) != count * bs:
            block = first + (int(bad[0]) if len(bad) else count)
            raise FcsnapError(
                f"build {self.build_dir.name}: block {block} fetched from the store does not "
                "match its hash; not installed"
            )

    def check_size(self) -> None:
        pass

    def close(self) -> None:
        """Forget the mappings (their memory goes when the last reference does: a session's
        compiled loop has stopped before its build is closed)."""
        with self.lock:
            self.chunk_maps[:] = array("Q", bytes(8 * len(self.chunk_maps)))
            self.held.clear()
            self.mapped.clear()


@contextmanager
def locked(fd: int) -> Iterator[None]:
    """flock(LOCK_EX) on an open lock file, closed after: held across processes, released if
    the holder dies."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FetchPool:
    """Up to `size` daemon threads running work in the order asked; background work only
    when no other waits and no hold is on, and BACKGROUND of it at most at once, so what
    readers and working sets ask for keeps most of the threads and of the store. Daemon
    threads: a restore that ends (its VM killed by a dead server) does not wait for them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.work: deque[Callable[[], object]] = deque()
        self.background: deque[Callable[[], object]] = deque()
        self.in_background = 0  # background work being run (at most BACKGROUND)
        self.holds = 0  # while > 0 no background work starts
        self.workers = 0
        self.changed = threading.Condition()

    def run(self, work: Callable[[], object], background: bool = False) -> None:
        with self.changed:
            (self.background if background else self.work).append(work)
            self.changed.notify()
            if self.workers >= self.size:
                return
            self.workers += 1
        threading.Thread(target=self._work, name="fcsnap-fetch", daemon=True).start()

    def hold(self, held: bool) -> None:
        with self.changed:
            self.holds += 1 if held else -1
            if not self.holds:
                self.changed.notify_all()

    def _next(self) -> tuple[Callable[[], object], bool]:
        with self.changed:
            while not (self.work or (self.background and self.in_background < BACKGROUND
                                     and not self.holds)):
                self.changed.wait()
            if self.work:
                return self.work.popleft(), False
            self.in_background += 1
            return self.background.popleft(), True

    def _work(self) -> None:
        while True:
            work, background = self._next()
            # Whatever fails here, its reader meets again and reports; the thread lives on.
            with contextlib.suppress(Exception):
                work()
            if background:
                with self.changed:
                    self.in_background -= 1
                    self.changed.notify()


def with_deadline(fetch: Callable[[], bytes], timeout: float, what: str) -> Callable[[], bytes]:
    """`fetch` retried with backoff until `timeout` seconds have passed, then one FcsnapError
    (the restore server then kills the VM: never a hang)."""

    def fetched() -> bytes:
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                return fetch()
            except FcsnapError as e:
                if time.monotonic() + delay > deadline:
                    raise FcsnapError(f"cannot fetch {what} within {timeout:g}s: {e}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    return fetched
