"""The host chunk cache's serving mode: a fault server's read never waits on the network. A
chunk being fetched answers FetchPending (the reactor serves other faults meanwhile), the
fetch is asked once however often the read is tried, and a failed fetch is reported to the
next read as one line."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import WAIT, wait_for

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.store import ops
from fcsnap.store.builder import BuildOptions
from fcsnap.store.chunk_cache import BACKGROUND, CHUNK, CachedDiff, ChunkCache, FetchPool
from fcsnap.store.layout import DIFF_RAW
from fcsnap.store.names import read_vm_pointer

CHUNKS = 3  # of random memory: the raw diff is as large


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(5)
    (root / "vm.mem").write_bytes(rng.integers(0, 256, CHUNKS * CHUNK, np.uint8).tobytes())
    ops.pack(root / "vm.mem", root / "store", BuildOptions(name="vm"))
    return root / "store" / str(read_vm_pointer(root / "store", "vm"))


class GatedStore:
    """Range reads of the local diff that wait for `gate` (a server that has stopped
    answering) and count what was asked; `failing`: each read fails instead."""

    def __init__(self, diff: Path, failing: bool = False) -> None:
        self.diff = diff
        self.failing = failing
        self.gate = threading.Event()
        self.asked: list[int] = []

    def __call__(self, start: int, length: int) -> bytes:
        self.asked.append(start // CHUNK)
        if self.failing:
            raise FcsnapError("cannot fetch s3://b/p/diff within 1s: connection refused")
        assert self.gate.wait(WAIT)
        with open(self.diff, "rb") as f:
            f.seek(start)
            return f.read(length)


def serving(build: Path, tmp_path: Path, store: GatedStore) -> CachedDiff:
    diff = CachedDiff(build, ChunkCache(tmp_path / "cache"), CHUNKS * CHUNK, store)
    diff.serving = True
    return diff


def test_a_read_waits_on_no_fetch_and_asks_once(build: Path, tmp_path: Path) -> None:
    store = GatedStore(build / DIFF_RAW)
    diff = serving(build, tmp_path, store)
    for _ in range(3):  # the server answers nothing: each try comes back at once
        with pytest.raises(FetchPending):
            diff.source(CHUNK + 8192, 4096)
    wait_for(lambda: 1 in store.asked, "the fetch to be asked for")
    assert store.asked.count(1) == 1
    with pytest.raises(FetchPending):  # several chunks at once: each asked, none waited on
        diff.addresses(np.array([0, 2 * CHUNK], np.int64))
    store.gate.set()

    def served() -> bool:
        try:
            return diff.source(CHUNK + 8192, 4096) is not None
        except FetchPending:
            return False

    wait_for(served, "the chunk to land")
    want = (build / DIFF_RAW).read_bytes()
    address = diff.source(CHUNK + 8192, 4096)
    assert ctypes.string_at(address, 4096) == want[CHUNK + 8192:CHUNK + 12288]
    assert store.asked.count(1) == 1  # fetched once for all those reads


def test_a_failed_fetch_reaches_the_next_read(build: Path, tmp_path: Path) -> None:
    diff = serving(build, tmp_path, GatedStore(build / DIFF_RAW, failing=True))
    with pytest.raises(FetchPending):
        diff.source(0, 4096)

    def failed() -> bool:
        try:
            diff.source(0, 4096)
        except FetchPending:
            return False
        except FcsnapError as e:
            assert "cannot fetch" in str(e) and "\n" not in str(e)
            return True
        raise AssertionError("a chunk that never came was served")

    wait_for(failed, "the failure to be reported")


def test_a_reader_that_may_wait_gets_the_bytes(build: Path, tmp_path: Path) -> None:
    """unpack, squash, verify: not serving, the read waits for its fetch."""
    store = GatedStore(build / DIFF_RAW)
    diff = CachedDiff(build, ChunkCache(tmp_path / "cache"), CHUNKS * CHUNK, store)
    threading.Timer(0.2, store.gate.set).start()
    assert diff.read(2 * CHUNK, 4096) == (build / DIFF_RAW).read_bytes()[2 * CHUNK:][:4096]


def test_background_fetches_wait_for_every_other_fetch() -> None:
    """A whole diff fetched in the background never competes with what a working set or a
    reader asks for: it starts only when no other fetch waits or runs, BACKGROUND at most."""
    pool = FetchPool(8)
    release = threading.Event()
    lock = threading.Lock()
    running = {"asked": 0, "background": 0}
    started: list[str] = []
    overlaps: list[str] = []

    def work(name: str, background: bool) -> None:
        key = "background" if background else "asked"
        with lock:
            started.append(name)
            if background and running["asked"]:
                overlaps.append(f"{name} began while an asked fetch ran")
            running[key] += 1
            if running["background"] > BACKGROUND:
                overlaps.append(f"{running['background']} background fetches at once")
        if not background:
            assert release.wait(WAIT)
        with lock:
            running[key] -= 1

    pool.run(lambda: work("asked 1", False))
    for i in range(5):
        pool.run(lambda i=i: work(f"background {i}", True), background=True)
    pool.run(lambda: work("asked 2", False))
    wait_for(lambda: len(started) == 2, "both asked fetches to start")
    assert sorted(started) == ["asked 1", "asked 2"]
    release.set()
    wait_for(lambda: len(started) == 7 and not any(running.values()), "the background")
    assert overlaps == []


def test_what_a_build_reads_is_fetched_in_the_background(build: Path, tmp_path: Path) -> None:
    """Every chunk holding bytes the served memory maps to, each once; no other chunk (an
    ancestor's diff holds much its head no longer reads)."""
    store = GatedStore(build / DIFF_RAW)
    store.gate.set()
    diff = serving(build, tmp_path, store)
    diff.fetch_rest(np.array([8192, 2 * CHUNK + 4096]), np.array([12288, 2 * CHUNK + 8192]))
    wait_for(lambda: diff.chunk_maps[0] and diff.chunk_maps[2], "chunks 0 and 2 to land")
    assert sorted(store.asked) == [0, 2] and not diff.chunk_maps[1]
    want = (build / DIFF_RAW).read_bytes()
    assert ctypes.string_at(diff.source(2 * CHUNK, 4096), 4096) == want[2 * CHUNK:][:4096]
    diff.fetch_rest(np.array([0]), np.array([CHUNKS * CHUNK]))  # all of it: the one missing
    wait_for(lambda: all(diff.chunk_maps), "every chunk to land")
    assert sorted(store.asked) == list(range(CHUNKS))


def test_a_diff_the_cache_cannot_hold_is_not_fetched_whole(build: Path, tmp_path: Path) -> None:
    store = GatedStore(build / DIFF_RAW)
    diff = CachedDiff(build, ChunkCache(tmp_path / "cache", limit_bytes=CHUNKS * CHUNK),
                      CHUNKS * CHUNK, store)
    diff.serving = True
    diff.fetch_rest(np.array([0]), np.array([CHUNKS * CHUNK]))
    assert not diff.cache.ahead.background and store.asked == []
    diff.fetch_rest(np.array([0]), np.array([4096]))  # a chunk of it: fine
    wait_for(lambda: store.asked == [0], "its one chunk to be asked for")
    store.gate.set()
