"""A build opened once and served to any number of VMs: what sessions may share, and what not.

Shared (read-only once made, or behind a lock): the lineage lock and pin check, the header,
the diff files (raw: one fd and one read-only shared mapping; zstd: a SeekableReader, which is
thread-safe, over the daemon's one FrameCache), the hash sidecars (--verify) and the mapping
arrays. Per session, never shared: PageSource's span buffers and each raw diff's MappedDiff
(its chunk counters and read buffer, which the compiled loop updates with the GIL released).
A MappedDiff dropping the shared mapping (MADV_DONTNEED) only zaps page table entries of a
read-only file mapping; another session's copy out of it faults the page back in. A diff in
object storage (chunk_cache.CachedDiff) is shared whole, its table of chunk mappings too: an
entry only goes from 0 to the address of a mapping that lives until the build is closed
(after its last session), so every session's compiled loop reads it without a lock.


A closed build leaves its parsed header and mapping arrays behind (the last PARSED_KEPT
builds): parsing is most of the cost of opening a build, and a build's header never changes
once published, so the next opening of it (a VM restored after its build's last one ended)
only locks the lineage, checks the pins and opens the diffs. The header file's identity
(device, inode, size, mtime) must match, or it is parsed again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fcsnap.header import Header, load_header
from fcsnap.store.backends.holds import hold_builds
from fcsnap.store.format.layout import HEADER
from fcsnap.store.format.seekable import FrameCache
from fcsnap.store.format.source import DiffFile, open_diffs
from fcsnap.threads import start_signal_free
from fcsnap.uffd.pages import PageSource, hash_tables, mapping_arrays

PARSED_KEPT = 16  # closed builds whose parsed header and mapping arrays are kept

if TYPE_CHECKING:
    from fcsnap.store.backends.remote import RemoteStore

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Parsed:
    """What a closed build leaves for its next opening: its header file's identity, the
    header parsed from it, and its mapping arrays if they were made."""

    identity: tuple[int, int, int, int] | None
    header: Header
    arrays: Arrays | None


def header_identity(build_dir: Path) -> tuple[int, int, int, int] | None:
    """None if it cannot be had (then the header is read, and its reading says what is
    wrong)."""
    try:
        st = os.stat(build_dir / HEADER)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class SharedBuild:
    """One build's header, diffs, hashes and mapping arrays, opened once."""

    def __init__(self, build_dir: Path, cache_bytes: int, frame_cache: FrameCache | None = None,
                 parsed: Parsed | None = None, store: RemoteStore | None = None) -> None:
        self.build_dir = build_dir
        self.cache_bytes = cache_bytes
        # pins checked; LOCK_SH held (and in `store`, object storage, a lease) while served
        self.hold = hold_builds(build_dir, store)
        try:
            identity = header_identity(build_dir)
            self.header_parsed = parsed is None or identity is None or parsed.identity != identity
            if self.header_parsed:
                parsed = Parsed(identity, load_header(build_dir), None)
            assert parsed is not None
            self.identity = identity
            self.header: Header = parsed.header
            self.diffs: dict[uuid.UUID, DiffFile] = open_diffs(
                self.header, build_dir.parent, cache_bytes, frame_cache
            )
        except BaseException:
            self.hold.release()
            raise
        self.build_id = self.header.metadata.build_id
        self.users = 0  # sessions holding it (BuildRegistry counts them)
        self._lock = threading.Lock()
        self._hashes: dict[uuid.UUID, np.ndarray] | None = None
        self._arrays: Arrays | None = parsed.arrays
        self._arrays_thread: threading.Thread | None = None  # make_arrays_soon's
        self._fetching_rest = False

    def hashes(self) -> dict[uuid.UUID, np.ndarray]:
        """The hash sidecars (for --verify), read on first use."""
        with self._lock:
            if self._hashes is None:
                self._hashes = hash_tables(self.diffs)
            return self._hashes

    def mapping_arrays(self) -> Arrays:
        """The header's mappings as arrays (PageSource.where, the compiled loop), made once."""
        with self._lock:
            if self._arrays is None:
                self._arrays = mapping_arrays(self.header, list(self.diffs))
            return self._arrays

    def make_arrays_soon(self) -> None:
        """Have the mapping arrays made on a thread now, unless they are made or being made:
        a VM connects right after its socket listens, and its first fault would otherwise
        wait for them - a tenth of a second per 100,000 mappings."""
        with self._lock:
            if self._arrays is not None or self._arrays_thread is not None:
                return
            self._arrays_thread = threading.Thread(target=self._make_arrays,
                                                   name="fcsnap-arrays", daemon=True)
        start_signal_free(self._arrays_thread)

    def _make_arrays(self) -> None:
        with contextlib.suppress(Exception):  # the session's own call raises it where it counts
            self.mapping_arrays()

    def fetch_rest(self) -> None:
        """Builds in object storage: have every chunk of their raw diffs that this build's
        memory maps to fetched in the background (CachedDiff.fetch_rest), the head's and its
        ancestors' alike; once per opening, on a thread (the mapping arrays take a moment on
        a large header, and the VM is about to connect)."""
        fetchers = [getattr(d, "fetch_rest", None) for d in self.diffs.values()]
        with self._lock:
            if self._fetching_rest or not any(fetchers):
                return
            self._fetching_rest = True
        threading.Thread(target=self._fetch_rest, args=(fetchers,), name="fcsnap-fetch-rest",
                         daemon=True).start()

    def hold_fetch_rest(self, held: bool) -> None:
        """Hold (or let go on) the background fetches of the host caches this build reads
        through: while held, none starts (those under way finish). Holds nest."""
        caches = {id(c): c for d in self.diffs.values()
                  if hasattr(c := getattr(d, "cache", None), "hold_background")}
        for cache in caches.values():
            cache.hold_background(held)

    def _fetch_rest(self, fetchers: list[Callable[[np.ndarray, np.ndarray], None] | None]
                    ) -> None:
        starts, storage, owner = self.mapping_arrays()
        lengths = np.diff(starts, append=self.header.metadata.size)
        for number, fetch in enumerate(fetchers):
            mine = owner == number
            if fetch is not None and mine.any():
                fetch(storage[mine], storage[mine] + lengths[mine])

    def page_source(self, verify: bool, map_budget: int) -> PageSource:
        """A session's own view of the build (its own mapped-diff state)."""
        hashes = self.hashes() if verify else None
        return PageSource(self.header, self.diffs, hashes, map_budget, self.mapping_arrays)

    def parsed(self) -> Parsed:
        """What the next opening of this build may reuse."""
        with self._lock:
            return Parsed(self.identity, self.header, self._arrays)

    def close(self) -> None:
        for diff in self.diffs.values():
            diff.close()
        self.hold.release()


class BuildRegistry:
    """The builds a daemon serves, each opened once while a session uses it; one frame cache
    (one budget) for all."""

    def __init__(self, cache_bytes: int, store: RemoteStore | None = None) -> None:
        self.store = store  # the store in object storage the builds are mirrored from
        self.frames = FrameCache(cache_bytes)
        self.cache_bytes = cache_bytes
        self._builds: dict[Path, SharedBuild] = {}
        self._parsed: OrderedDict[Path, Parsed] = OrderedDict()  # closed builds', newest last
        self._lock = threading.Lock()
        self.opened = 0  # times a build was opened (not found open): sharing at work
        self.header_parses = 0  # of those, the times its header was parsed (not kept)

    def acquire(self, build_dir: Path) -> SharedBuild:
        """The open build (opening it if no session has it), counted as used once more.
        Opening holds the registry lock: two first requests for a build open it once."""
        key = build_dir.resolve()
        with self._lock:
            build = self._builds.get(key)
            if build is None:
                build = SharedBuild(key, self.cache_bytes, self.frames, self._parsed.get(key),
                                    self.store)
                self._builds[key] = build
                self.opened += 1
                self.header_parses += build.header_parsed
            build.users += 1
            return build

    def release(self, build: SharedBuild) -> None:
        """One session is done with it; the last closes it (releasing its lineage lock)."""
        with self._lock:
            build.users -= 1
            if build.users > 0:
                return
            self._builds.pop(build.build_dir, None)
            self._parsed[build.build_dir] = build.parsed()
            self._parsed.move_to_end(build.build_dir)
            while len(self._parsed) > PARSED_KEPT:
                self._parsed.popitem(last=False)
        build.close()

    def open_builds(self) -> list[SharedBuild]:
        with self._lock:
            return list(self._builds.values())
