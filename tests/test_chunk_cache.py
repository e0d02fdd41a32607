"""The host chunk cache's serving mode: a fault server's read never waits on the network. A
chunk being fetched answers FetchPending (the reactor serves other faults meanwhile), the
fetch is asked once however often the read is tried, and a failed fetch is reported to the
next read as one line."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import WAIT, fcsnap, wait_for

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.store.backends.cached_zstd import CachedZstd
from fcsnap.store.backends.chunk_cache import BACKGROUND, CHUNK, CachedDiff, ChunkCache, FetchPool
from fcsnap.store.format.layout import DIFF_RAW, DIFF_ZSTD
from fcsnap.store.format.names import read_vm_pointer
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions

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



def wait_source(diff: CachedDiff, offset: int, what: str) -> int:
    """The address `diff` serves the page at `offset` from, once it has it (FetchPending until
    the chunk is in)."""
    def served() -> bool:
        try:
            return diff.source(offset, 4096) is not None
        except FetchPending:
            return False

    wait_for(served, what)
    return diff.source(offset, 4096)

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
    address = wait_source(diff, CHUNK + 8192, "the chunk to land")
    want = (build / DIFF_RAW).read_bytes()
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


def test_background_fetches_give_way_to_every_other_fetch() -> None:
    """A whole diff fetched in the background never holds up what a working set or a reader
    asks for: it takes BACKGROUND threads at most, so asked work finds a thread at once."""
    pool = FetchPool(BACKGROUND + 1)
    gates = {name: threading.Event() for name in ("b0", "b1", "b2", "b3", "asked")}
    lock = threading.Lock()
    started: list[str] = []
    most = [0, 0]  # background running now, at most

    def work(name: str) -> None:
        background = name.startswith("b")
        with lock:
            started.append(name)
            most[0] += background
            most[1] = max(most)
        assert gates[name].wait(WAIT)
        with lock:
            most[0] -= background

    for name in ("b0", "b1", "b2", "b3"):
        pool.run(lambda name=name: work(name), background=True)
    wait_for(lambda: len(started) == BACKGROUND, "the background's first fetches")
    pool.run(lambda: work("asked"))  # a thread is free for it: it starts at once
    wait_for(lambda: "asked" in started, "the asked fetch")
    assert started[-1] == "asked" and len(started) == BACKGROUND + 1
    for gate in gates.values():
        gate.set()
    wait_for(lambda: len(started) == 5 and not most[0], "every fetch")
    assert most[1] == BACKGROUND


def test_a_hold_keeps_background_fetches_from_starting() -> None:
    """While a working set goes in (a hold), asked fetches run and no background one starts;
    they start once every hold is let go."""
    pool = FetchPool(4)
    started: list[str] = []
    pool.hold(True)
    pool.hold(True)  # two sessions installing their working sets
    pool.run(lambda: started.append("background"), background=True)
    pool.run(lambda: started.append("asked"))
    wait_for(lambda: started == ["asked"], "the asked fetch")
    pool.hold(False)
    pool.run(lambda: started.append("asked 2"))
    wait_for(lambda: started == ["asked", "asked 2"], "the second asked fetch")
    pool.hold(False)
    wait_for(lambda: started[-1:] == ["background"], "the background fetch, once let go")


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


# What the host cache holds is checked by each process that maps it (issue: a short or
# damaged cache file served other memory). A bad file is a miss: removed, fetched again.

def damage(path: Path, how: str) -> None:
    if how == "short":  # what a cut-off copy or a full disk leaves
        os.truncate(path, 100 << 10)
    elif how == "empty":  # what an un-fsynced file often becomes after a power loss
        os.truncate(path, 0)
    elif how == "symlink":  # to a file of the right size and other bytes: never followed
        other = path.with_name("elsewhere")
        other.write_bytes(bytes(path.stat().st_size))
        path.unlink()
        path.symlink_to(other)
    else:  # one flipped byte, in the middle
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x5A]))


DAMAGE = ["short", "empty", "flipped"]
KINDS = [*DAMAGE, "symlink"]


@pytest.mark.parametrize("how", KINDS)
def test_a_damaged_cached_chunk_is_fetched_again(build: Path, tmp_path: Path, how: str,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    store = GatedStore(build / DIFF_RAW)
    store.gate.set()
    cache = tmp_path / "cache"
    CachedDiff(build, ChunkCache(cache), CHUNKS * CHUNK, store).read(CHUNK, 4096)
    (cached,) = cache.glob("*/00000001")
    damage(cached, how)
    store.asked.clear()
    want = (build / DIFF_RAW).read_bytes()[CHUNK:2 * CHUNK]

    reader = CachedDiff(build, ChunkCache(cache), CHUNKS * CHUNK, store)  # another process
    chunk = reader._chunk(1)
    assert len(chunk) == CHUNK and bytes(chunk) == want
    assert 1 in store.asked  # fetched again from the store
    assert cached.read_bytes() == want  # and cached right
    assert reader.cache.stats.cache_discarded == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"chunk cache file {cached}" in err, err

    damage(cached, how)  # a fault server: never an address into a bad mapping
    store.asked.clear()
    diff = serving(build, tmp_path, store)
    with pytest.raises(FetchPending):
        diff.source(CHUNK, 4096)
    wait_source(diff, CHUNK, "the chunk fetched again")
    assert ctypes.string_at(diff.source(CHUNK + 8192, 4096), 4096) == want[8192:12288]


@pytest.fixture(scope="module")
def zstd_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("zstd-chunks")
    rng = np.random.default_rng(6)
    mem = rng.integers(0, 256, 2 * CHUNK, np.uint8)
    mem[::3] = 0  # compressible
    (root / "vm.mem").write_bytes(mem.tobytes())
    ops.pack(root / "vm.mem", root / "store", BuildOptions(name="vm", compression="zstd"))
    return root / "store" / str(read_vm_pointer(root / "store", "vm"))


@pytest.mark.parametrize("how", KINDS)
def test_a_damaged_cached_zstd_group_is_fetched_again(zstd_build: Path, tmp_path: Path,
                                                      how: str) -> None:
    diff_path = zstd_build / DIFF_ZSTD
    size = diff_path.stat().st_size
    asked: list[int] = []

    def read_range(start: int, length: int) -> bytes:
        asked.append(start)
        with open(diff_path, "rb") as f:
            f.seek(start)
            return f.read(length)

    cache = tmp_path / "cache"
    first = CachedZstd.open(zstd_build, ChunkCache(cache), size, read_range)
    want = first.read(0, 8192)
    (cached,) = cache.glob("*/00000000")
    damage(cached, how)
    asked.clear()
    for nonblocking in (False, True):  # a reader that may wait, and a fault server
        again = CachedZstd.open(zstd_build, ChunkCache(cache), size, read_range)
        again.nonblocking = nonblocking

        def read(reader: CachedZstd = again) -> bytes | None:
            try:
                return reader.read(0, 8192)
            except FetchPending:
                return None

        wait_for(lambda r=read: r() is not None, "the group fetched again")
        assert read() == want
        damage(cached, how)
    assert asked.count(0) == 2  # the damaged group, each time from the store


def modes(root: Path) -> dict[str, str]:
    """Every directory and file under root (and root), with its permission bits."""
    return {str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.lstat().st_mode))
            for p in [root, *root.rglob("*")]}


def test_the_cache_is_private_from_the_start(build: Path, tmp_path: Path) -> None:
    """0700 directories and 0600 files whatever the umask, the cache's parents made by it
    too; a cache directory made readable by an older fcsnap is made private."""
    store = GatedStore(build / DIFF_RAW)
    store.gate.set()
    old = os.umask(0o022)
    try:
        cache = ChunkCache(tmp_path / "made" / "here" / "cache")
        CachedDiff(build, cache, CHUNKS * CHUNK, store).read(0, 4096)
        wait_for(lambda: len(list(cache.directory.glob("*/0*"))) == CHUNKS,
                 "the chunks read ahead")  # (none half-written when the modes are read)
        legacy = tmp_path / "legacy"
        legacy.mkdir(mode=0o755)
        ChunkCache(legacy)
    finally:
        os.umask(old)
    found = modes(tmp_path / "made")
    files = {k: v for k, v in found.items() if (tmp_path / k).is_file()}
    assert len(files) >= CHUNKS + 1 and set(files.values()) == {"0o600"}, found
    assert {v for k, v in found.items() if k not in files} == {"0o700"}, found
    assert oct(stat.S_IMODE(legacy.stat().st_mode)) == "0o700"


NOBODY = 65534


@pytest.mark.parametrize("layout", ["owned", "parent-owned", "group-writable",
                                    "parent-world-writable", "symlink-in-their-directory",
                                    "their-symlink-in-a-sticky-directory"])
def test_a_cache_directory_someone_else_controls_is_refused(tmp_path: Path, layout: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    cache = tmp_path / "cache"
    if layout == "owned":
        cache.mkdir(mode=0o700)
        os.chown(cache, NOBODY, NOBODY)
        where = str(cache)
    elif layout == "parent-owned":
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        cache = theirs / "cache"
        cache.mkdir(mode=0o700)
        os.chown(theirs, NOBODY, NOBODY)
        where = str(theirs)
    elif layout == "group-writable":
        cache.mkdir(mode=0o700)
        cache.chmod(0o770)
        where = "writable by group or others"
    elif layout == "parent-world-writable":
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        cache = shared / "cache"
        where = f"{shared} above it is writable by group or others without the sticky bit"
    elif layout == "symlink-in-their-directory":
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        (tmp_path / "mine").mkdir(mode=0o700)
        (theirs / "cache").symlink_to(tmp_path / "mine")
        os.chown(theirs, NOBODY, NOBODY)
        cache = theirs / "cache"
        where = str(theirs)
    else:  # as /tmp: they cannot touch what is ours in it, but their symlink they can repoint
        shared = tmp_path / "tmp"
        shared.mkdir()
        shared.chmod(0o1777)
        (tmp_path / "mine").mkdir(mode=0o700)
        cache = shared / "cache"
        cache.symlink_to(tmp_path / "mine")
        os.lchown(cache, NOBODY, NOBODY)
        where = f"{cache} is a symbolic link owned by uid {NOBODY}"
    with pytest.raises(FcsnapError) as e:
        ChunkCache(cache)
    assert "refusing cache directory" in str(e.value) and where in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_a_sticky_world_writable_parent_is_fine(tmp_path: Path) -> None:
    """As /tmp: nobody else can rename or remove what this user made in it."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    ChunkCache(shared / "cache")
    assert oct(stat.S_IMODE((shared / "cache").stat().st_mode)) == "0o700"


def test_serve_refuses_such_a_cache_directory_in_one_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = fcsnap("serve", "--store", "s3://bucket/prefix", "--api", tmp_path / "api.sock",
                    "--cache-dir", shared / "cache")
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "refusing cache directory" in result.stderr
    assert not (tmp_path / "api.sock").exists()


def test_two_readers_of_one_damaged_chunk_discard_it_once(tmp_path: Path, capfd) -> None:
    """Two readers (threads or processes) that both found a chunk damaged: the one that
    removes it counts and says so; the other, finding it gone, neither counts nor warns."""
    cache = ChunkCache(tmp_path / "cache")
    path = cache.directory / "key" / "00000000"
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"")
    found = os.lstat(path)
    for _ in range(2):  # both found it empty before either removed it
        cache._discard(path, found, "holds 0 bytes, not 4096")
    assert not path.exists() and cache.stats.cache_discarded == 1
    assert capfd.readouterr().err.count("chunk cache file") == 1


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A cache directory on a filesystem with no inode left: no directory, lock or chunk
    file can be made in it (a full disk)."""
    where = tmp_path / "full"
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=1,mode=0700",
                           "tmpfs", str(where)], capture_output=True)
    if made.returncode:
        pytest.skip("needs to mount a tmpfs (root) to fill a filesystem")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_costs_the_cache_not_the_vm(build: Path, full_disk: Path) -> None:
    """No room for a build's directory or a chunk's lock file in the cache: the chunk is
    fetched, checked and served without being cached (a reader that may wait, and a fault
    server, which must not ask for it again and again while its VM waits)."""
    store = GatedStore(build / DIFF_RAW)
    store.gate.set()
    want = (build / DIFF_RAW).read_bytes()[CHUNK:CHUNK + 4096]
    assert CachedDiff(build, ChunkCache(full_disk), CHUNKS * CHUNK, store).read(CHUNK, 4096) == want
    diff = CachedDiff(build, ChunkCache(full_disk), CHUNKS * CHUNK, store)
    diff.serving = True
    address = wait_source(diff, CHUNK, "the chunk served uncached")
    assert ctypes.string_at(address, 4096) == want


def test_a_closed_reader_s_late_groups_reach_no_other_reader(
        zstd_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon's FrameCache is shared by every build. A group fetched ahead lands after its
    reader closed (its build's last VM ended), and a reader of another build opened later
    may sit at the closed one's address (CPython reuses it; made certain here): the other
    build's VM must still get its own bytes, never the closed reader's."""
    from fcsnap.store.backends import cached_zstd
    from fcsnap.store.format import seekable
    from fcsnap.store.format.seekable import FrameCache

    other = tmp_path / "other"
    mem = np.random.default_rng(8).integers(0, 256, CHUNK, np.uint8)
    mem[::3] = 0
    (other / "vm.mem").parent.mkdir()
    (other / "vm.mem").write_bytes(mem.tobytes())
    ops.pack(other / "vm.mem", other / "store", BuildOptions(name="vm", compression="zstd"))
    other_build = other / "store" / str(read_vm_pointer(other / "store", "vm"))
    monkeypatch.setattr(cached_zstd, "id", lambda _: 1, raising=False)  # the same address
    monkeypatch.setattr(seekable, "id", lambda _: 1, raising=False)
    frames, cache = FrameCache(64 << 20), ChunkCache(tmp_path / "cache")

    def reader(build_dir: Path) -> CachedZstd:
        diff = build_dir / DIFF_ZSTD
        size = diff.stat().st_size

        def read_range(start: int, length: int) -> bytes:
            with open(diff, "rb") as f:
                f.seek(start)
                return f.read(length)

        return CachedZstd.open(build_dir, cache, size, read_range, frame_cache=frames)

    closed = reader(zstd_build)
    closed.close()
    closed._load(0)  # the fetch ahead that was in flight, landing now
    assert reader(other_build).read(0, 4096) == mem[:4096].tobytes()


@pytest.mark.parametrize("blocks", [1, 2])
def test_a_sidecar_shorter_than_its_diff_is_refused_at_open(tmp_path: Path, blocks: int
                                                            ) -> None:
    """A head's sidecar (pinned by nothing) without the hashes of its diff's last `blocks`
    blocks, alone in the last chunk: refused in one line when the diff is opened, never the
    last block served unchecked (no hash to compare it with) nor a ValueError in a fetch
    thread (a fault server would ask for the chunk forever, its VM frozen)."""
    from fcsnap.store.format.hashes import dump_hashes, read_hashes
    from fcsnap.store.format.layout import HASHES

    size = CHUNK + blocks * 4096
    rng = np.random.default_rng(9)
    (tmp_path / "vm.mem").write_bytes(rng.integers(0, 256, size, np.uint8).tobytes())
    ops.pack(tmp_path / "vm.mem", tmp_path / "store", BuildOptions(name="vm"))
    build_dir = tmp_path / "store" / str(read_vm_pointer(tmp_path / "store", "vm"))
    block_size, table = read_hashes(build_dir / HASHES)
    (build_dir / HASHES).write_bytes(dump_hashes(block_size, table[:-blocks].tobytes()))
    store = GatedStore(build_dir / DIFF_RAW)
    store.gate.set()
    with pytest.raises(FcsnapError, match="hash sidecar") as e:
        CachedDiff(build_dir, ChunkCache(tmp_path / "cache"), size, store).read(CHUNK, 4096)
    assert "\n" not in str(e.value)


def test_what_killed_writers_left_is_removed(build: Path, tmp_path: Path) -> None:
    """A process killed (SIGKILL, the OOM killer) while writing chunks leaves its temporaries,
    which the size limit does not count: the next cache opened removes those older than
    STALE_TEMP, and leaves a newer one (another process may be writing it)."""
    from fcsnap.store.backends.chunk_cache import STALE_TEMP

    store = GatedStore(build / DIFF_RAW)
    store.gate.set()
    cache = ChunkCache(tmp_path / "cache")
    CachedDiff(build, cache, CHUNKS * CHUNK, store).read(0, 4096)
    (key,) = cache.directory.iterdir()
    old, new = key / ".tmp-0123456789abcdef01234567", key / ".tmp-76543210fedcba9876543210"
    for temp in (old, new):
        temp.write_bytes(bytes(CHUNK))
    long_ago = os.stat(new).st_mtime - STALE_TEMP - 60
    os.utime(old, (long_ago, long_ago))
    ChunkCache(tmp_path / "cache")
    assert not old.exists() and new.exists()
