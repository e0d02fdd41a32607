"""The store's flock locks (fcsnap/store/format/locks.py) against real processes holding them."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcsnap.errors import FcsnapError
from fcsnap.store.format.locks import (
    NameMoved,
    lock_dir,
    lock_lineage,
    locked_new_dir,
    publish_name,
    try_remove_staging,
)
from fcsnap.store.format.names import read_vm_pointer
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

MIB = 1 << 20
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX if sys.argv[2] == "ex" else fcntl.LOCK_SH)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_by_other_process(path: Path, exclusive: bool) -> Iterator[subprocess.Popen]:
    """Another process holding flock on `path` until the block ends (or it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "ex" if exclusive else "sh"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline() == "locked\n", "holder did not lock in 30 s"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


def lineage(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A store with generations 0 and 1; returns (store, gen0 dir, gen1 dir)."""
    store = tmp_path / "store"
    mem = synthetic_memory(2 * MIB, seed=3)
    write_full(tmp_path / "m0", mem)
    _, g0 = ops.pack(tmp_path / "m0", store, BuildOptions())
    mem, _ = evolve(mem, seed=4)
    write_full(tmp_path / "m1", mem)
    _, g1 = ops.diff(tmp_path / "m1", g0, store, BuildOptions())
    return store, g0, g1


def test_cleanup_keeps_staging_a_live_process_holds_and_removes_it_once_gone(tmp_path):
    staging = tmp_path / ".staging-1-x"
    staging.mkdir()
    (staging / "memfile.diff").write_bytes(b"x")
    with held_by_other_process(staging, exclusive=True) as holder:
        assert not try_remove_staging(staging)
        assert staging.is_dir()
        holder.kill()
        holder.wait(timeout=30)
        assert try_remove_staging(staging)
    assert not staging.exists()


def test_locked_new_dir_and_file_are_held_against_cleanup(tmp_path):
    lock = locked_new_dir(tmp_path / ".staging-2-y")
    partial = tmp_path / ".fcsnap-unpack-z.partial"
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        partial_fd = ops.locked_partial(dir_fd, partial.name)
    finally:
        os.close(dir_fd)
    assert not try_remove_staging(lock.path) and not try_remove_staging(partial)
    lock.release()
    os.close(partial_fd)
    assert try_remove_staging(lock.path) and try_remove_staging(partial)
    assert list(tmp_path.iterdir()) == []


def test_lineage_lock_holds_every_build_shared(tmp_path):
    store, g0, g1 = lineage(tmp_path)
    with lock_lineage(store, g1) as held:
        assert held.build_dirs == [g1, g0]
        for build in (g0, g1):
            assert lock_dir(build, exclusive=True, block=False) is None  # gc would keep it
            shared = lock_dir(build, exclusive=False, block=False)  # readers share
            assert shared is not None
            shared.release()
    for build in (g0, g1):
        free = lock_dir(build, exclusive=True, block=False)
        assert free is not None
        free.release()


def test_lineage_lock_refuses_a_build_removed_while_it_waited(tmp_path):
    """A reader blocked on a build gc holds sees, once it gets the lock, that the directory it
    locked is no longer the store's: it fails naming the build instead of reading it."""
    store, g0, g1 = lineage(tmp_path)
    result: list[BaseException | None] = []

    def reader() -> None:
        try:
            lock_lineage(store, g1).release()
            result.append(None)
        except BaseException as e:
            result.append(e)

    with held_by_other_process(g0, exclusive=True):  # gc, between its check and its removal
        thread = threading.Thread(target=reader)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the reader did not wait for the exclusive lock"
        g0.rename(store / f".trash-{g0.name}")
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(result[0], FcsnapError)
    assert str(result[0]) == f"build {g0.name} was removed"


def test_publish_name_is_a_compare_and_swap(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    publish_name(store, "web", first, None, "pack")
    with pytest.raises(NameMoved, match=f"^web moved to {first} while this pack ran$"):
        publish_name(store, "web", second, None, "pack")  # expected absent, but it exists
    publish_name(store, "web", second, first, "diff")
    with pytest.raises(NameMoved, match=f"^web moved to {second} while this diff ran$"):
        publish_name(store, "web", third, first, "diff")
    assert read_vm_pointer(store, "web") == second


def test_publish_name_takes_any_name_the_filesystem_allows_and_clears_stale_temps(tmp_path):
    store = tmp_path / "store"
    (store / "vms").mkdir(parents=True)
    stale = store / "vms" / ".tmp-0123"  # a publisher killed between write and rename
    stale.write_text("junk")
    name = "é" * 127 + "x"  # 255 bytes of UTF-8
    build = uuid.uuid4()
    publish_name(store, name, build, None, "pack")
    assert read_vm_pointer(store, name) == build
    assert not stale.exists()


def test_publish_name_waits_for_the_name_lock(tmp_path):
    store = tmp_path / "store"
    (store / "vms").mkdir(parents=True)
    (store / "vms" / ".lock").touch()
    done = threading.Event()
    with held_by_other_process(store / "vms" / ".lock", exclusive=True):
        thread = threading.Thread(
            target=lambda: (publish_name(store, "web", uuid.uuid4(), None, "pack"), done.set())
        )
        thread.start()
        assert not done.wait(0.5), "published while another process held the name lock"
    assert done.wait(30)
    thread.join(30)
