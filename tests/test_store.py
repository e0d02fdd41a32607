"""Builds end to end: pack, diff, unpack, verify, squash over real files and lineages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from helpers import unpacked
from store_procs import start_stopped

from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.store.format.layout import DIFF_RAW, DIFF_ZSTD, HASHES, VMS, resolve_build
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full, write_sparse_diff

MIB = 1 << 20


def wait_mid_pack(store: Path, proc: subprocess.Popen) -> None:
    """Wait (60 s at most) until the pack `proc` has staged its build, and half a second more
    for it to be busy writing; it must still be running."""
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".staging-") for p in store.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None, "pack never started"
        time.sleep(0.01)
    time.sleep(0.5)
    assert proc.poll() is None, "pack finished before it could be stopped"


def visible_builds(store: Path) -> list[str]:
    return sorted(
        p.name for p in store.iterdir() if p.is_dir() and p.name != VMS and p.name[0] != "."
    )


@pytest.mark.parametrize("block_size", [4096, 2 * MIB], ids=["4K", "2M"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("kind", ["full", "sparse"])
def test_lineage_round_trips_byte_for_byte(tmp_path, block_size, compression, kind):
    size = 8 * MIB if block_size == 4096 else 16 * MIB  # 2048 pages, or 8 blocks
    store = tmp_path / "store"
    options = BuildOptions(block_size, compression, frame_size=64 << 10)
    mem = synthetic_memory(size, seed=1)
    path = tmp_path / "mem0"
    write_full(path, mem)
    manifest, build = ops.pack(path, store, options)
    assert unpacked(build, tmp_path) == mem.tobytes()
    builds = [build]
    for g in range(1, 6):
        mem, dirty = evolve(mem, seed=100 + g, dirty_share=0.03)
        path = tmp_path / f"mem{g}"
        if kind == "sparse":
            write_sparse_diff(path, mem, dirty)
        else:
            write_full(path, mem)
        manifest, build = ops.diff(path, builds[-1], store, options, sparse_diff=kind == "sparse")
        assert manifest.generation == g
        assert manifest.parent_build_id == read_manifest(builds[-1]).build_id
        assert manifest.base_build_id == read_manifest(builds[0]).build_id
        assert unpacked(build, tmp_path) == mem.tobytes()
        ops.verify(build)
        builds.append(build)
    # Earlier generations still unpack to their own content: builds never change.
    for b in builds:
        ops.verify(b)
    stats = read_manifest(builds[-1]).stats
    assert (
        stats.blocks_total
        == stats.blocks_stored
        + stats.blocks_zero
        + stats.blocks_deduplicated
        + stats.blocks_inherited
    )


def test_pack_drops_zeros_and_stores_duplicates_once(tmp_path):
    mem = synthetic_memory(4 * MIB, seed=3)
    mem[10] = mem[20] = mem[30] = mem[40]  # make sure duplicates exist
    path = tmp_path / "mem"
    write_full(path, mem)
    manifest, build = ops.pack(path, tmp_path / "store", BuildOptions())
    nonzero = mem[mem.any(axis=1)]
    unique = len({page.tobytes() for page in nonzero})
    s = manifest.stats
    assert s.blocks_stored == unique
    assert s.blocks_deduplicated == len(nonzero) - unique
    assert s.blocks_zero == len(mem) - len(nonzero)
    assert (build / DIFF_RAW).stat().st_size == unique * 4096
    assert (build / HASHES).stat().st_size == 24 + 16 * unique


def test_diff_stores_only_changes_and_dedups_against_the_lineage(tmp_path):
    store = tmp_path / "store"
    mem0 = synthetic_memory(4 * MIB, seed=4)
    write_full(tmp_path / "m0", mem0)
    _, b0 = ops.pack(tmp_path / "m0", store, BuildOptions())
    mem1 = mem0.copy()
    data_pages = np.flatnonzero(mem0.any(axis=1))
    mem1[5] = np.frombuffer(os.urandom(4096), np.uint8)  # new content: stored
    mem1[data_pages[0]] = 0  # became zero: nil, not stored
    mem1[7] = mem0[data_pages[3]]  # equals a block generation 0 stored: a reference
    write_full(tmp_path / "m1", mem1)
    m1, b1 = ops.diff(tmp_path / "m1", b0, store, BuildOptions())
    changed = {5, int(data_pages[0]), 7} - {p for p in (5, 7) if (mem0[p] == mem1[p]).all()}
    assert m1.stats.blocks_stored == 1
    assert m1.stats.blocks_deduplicated == (1 if 7 in changed else 0)
    header = load_header(b1)
    assert header.lookup(5 * 4096).build_id == m1.build_id
    assert header.lookup(int(data_pages[0]) * 4096).build_id == uuid.UUID(int=0)
    assert header.lookup(7 * 4096).build_id == read_manifest(b0).build_id
    assert unpacked(b1, tmp_path) == mem1.tobytes()


def base_and_diff_snapshot(tmp_path: Path, store: Path, size: int
                           ) -> tuple[Path, np.ndarray, np.ndarray]:
    """A build of `size` bytes of memory packed into `store`, and m1: a Diff snapshot (holes
    where pages did not change) of that memory with 1% of its pages changed; (the build's
    directory, m1's memory, its changed pages)."""
    mem0 = synthetic_memory(size, seed=5)
    write_full(tmp_path / "m0", mem0)
    _, b0 = ops.pack(tmp_path / "m0", store, BuildOptions())
    mem1, dirty = evolve(mem0, seed=6, dirty_share=0.01)
    write_sparse_diff(tmp_path / "m1", mem1, dirty)
    return Path(b0), mem1, dirty


def test_sparse_diff_reads_only_dirty_data(tmp_path):
    store = tmp_path / "store"
    b0, mem1, dirty = base_and_diff_snapshot(tmp_path, store, 16 * MIB)
    seen: list[int] = []
    m1, b1 = ops.diff(
        tmp_path / "m1", b0, store, BuildOptions(), sparse_diff=True, progress=seen.append
    )
    assert sum(seen) == len(dirty) * 4096, "only the dirty pages are read"
    assert unpacked(b1, tmp_path) == mem1.tobytes()
    # Read as a Full file instead, the holes would be zeros: a different (wrong) generation.
    m_full, b_full = ops.diff(tmp_path / "m1", b0, store, BuildOptions(), holes_are_zeros=True)
    assert m_full.stats.blocks_zero > m1.stats.blocks_zero


@pytest.mark.parametrize("block_size", [4096, 2 * MIB], ids=["4K", "2M"])
def test_diff_refuses_holes_over_the_bases_data_unless_told(tmp_path, block_size):
    """A Diff snapshot given without --sparse-diff would store every unchanged page as zeros:
    exit 2 and one line naming both readings; no build, the name unchanged."""
    store = tmp_path / "store"
    mem0 = synthetic_memory(16 * MIB, seed=5, zero_share=0.1)
    write_full(tmp_path / "m0", mem0)
    bs = ["--block-size", "2M"] if block_size != 4096 else []
    assert fcsnap("pack", "--init", tmp_path / "m0", "--store", store, "--name", "web", *bs,
                  "--quiet").returncode == 0
    head = (store / VMS / "web").read_bytes()
    builds = visible_builds(store)
    mem1, dirty = evolve(mem0, seed=6, dirty_share=0.01)
    write_sparse_diff(tmp_path / "m1", mem1, dirty)
    done = fcsnap("diff", tmp_path / "m1", "--base", "web", "--store", store, "--name", "web")
    err = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert len(err) == 1 and "--sparse-diff" in err[0] and "--holes-are-zeros" in err[0], err
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in store.iterdir() if p.is_dir() and p.name != VMS) == builds
    assert (store / VMS / "web").read_bytes() == head
    both = fcsnap("diff", tmp_path / "m1", "--base", "web", "--store", store, "--sparse-diff",
                  "--holes-are-zeros")
    assert both.returncode == 2 and visible_builds(store) == builds
    done = fcsnap("diff", tmp_path / "m1", "--base", "web", "--store", store, "--name", "web",
                  "--sparse-diff", "--json")
    assert done.returncode == 0, done.stderr
    built = resolve_build("web", store)
    assert unpacked(built, tmp_path) == mem1.tobytes()
    done = fcsnap("diff", tmp_path / "m1", "--base", built, "--store", store,
                  "--holes-are-zeros", "--quiet")
    assert done.returncode == 0, done.stderr


def test_a_diff_snapshot_whose_filesystem_hides_its_holes_is_refused(tmp_path, monkeypatch):
    """On a filesystem whose lseek cannot tell holes (NFSv3, 9p, older FUSE: Linux's generic
    SEEK_DATA says the whole file is data), a Diff snapshot's holes read as zeros: with
    --sparse-diff or without, every unchanged page would be stored as a zero page. Refused
    (the file holds fewer blocks than its data would); --holes-are-zeros still reads it."""
    store = tmp_path / "store"
    b0, _, _ = base_and_diff_snapshot(tmp_path, store, 8 * MIB)
    real_lseek = os.lseek

    def generic_lseek(fd: int, pos: int, how: int) -> int:  # fs/read_write.c's fallback
        if how == os.SEEK_DATA:
            return pos
        if how == os.SEEK_HOLE:
            return os.fstat(fd).st_size
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", generic_lseek)
    for sparse in (True, False):
        with pytest.raises(FcsnapError, match="cannot tell its holes") as e:
            ops.diff(tmp_path / "m1", b0, store, BuildOptions(), sparse_diff=sparse)
        assert "\n" not in str(e.value)
    _, b1 = ops.diff(tmp_path / "m1", b0, store, BuildOptions(), holes_are_zeros=True)
    assert read_manifest(b1).stats.blocks_zero > 0


def test_diff_takes_a_sparse_full_file_whose_holes_are_zeros_in_the_base(tmp_path):
    """A sparse copy of a Full snapshot (holes only where the base has zeros too) needs no
    option: both readings give the same memory."""
    store = tmp_path / "store"
    mem0 = synthetic_memory(8 * MIB, seed=9)
    write_full(tmp_path / "m0", mem0)
    _, b0 = ops.pack(tmp_path / "m0", store, BuildOptions())
    mem1 = mem0.copy()
    data = np.flatnonzero(mem0.any(axis=1))
    mem1[data[:50]] = np.frombuffer(os.urandom(50 * 4096), np.uint8).reshape(50, 4096)
    write_sparse_diff(tmp_path / "m1", mem1, np.flatnonzero(mem1.any(axis=1)))
    assert os.stat(tmp_path / "m1").st_blocks * 512 < 8 * MIB, "the copy is sparse"
    _, b1 = ops.diff(tmp_path / "m1", b0, store, BuildOptions())
    assert unpacked(b1, tmp_path) == mem1.tobytes()


def test_sparse_diff_with_2m_blocks_keeps_clean_part_of_a_dirty_block(tmp_path):
    store = tmp_path / "store"
    mem0 = synthetic_memory(8 * MIB, seed=7, zero_share=0.1)
    write_full(tmp_path / "m0", mem0)
    opts = BuildOptions(block_size=2 * MIB)
    _, b0 = ops.pack(tmp_path / "m0", store, opts)
    mem1 = mem0.copy()
    mem1[513] = 7  # one 4K page inside the second 2M block
    write_sparse_diff(tmp_path / "m1", mem1, np.array([513]))
    _, b1 = ops.diff(tmp_path / "m1", b0, store, opts, sparse_diff=True)
    assert unpacked(b1, tmp_path) == mem1.tobytes()


def test_zstd_diff_decompresses_with_the_zstd_tool(tmp_path):
    mem = synthetic_memory(8 * MIB, seed=8)
    write_full(tmp_path / "m", mem)
    _, raw = ops.pack(tmp_path / "m", tmp_path / "s1", BuildOptions())
    _, zst = ops.pack(tmp_path / "m", tmp_path / "s2", BuildOptions(compression="zstd"))
    plain = subprocess.run(
        ["zstd", "-d", "-c", str(zst / DIFF_ZSTD)], capture_output=True, check=True
    ).stdout
    assert plain == (raw / DIFF_RAW).read_bytes()
    assert (zst / DIFF_ZSTD).stat().st_size < len(plain)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_verify_catches_a_flipped_byte_in_any_diff_and_a_missing_ancestor(tmp_path, compression):
    store = tmp_path / "store"
    opts = BuildOptions(compression=compression, frame_size=16 << 10)
    mem = synthetic_memory(4 * MIB, seed=9)
    write_full(tmp_path / "m0", mem)
    _, b = ops.pack(tmp_path / "m0", store, opts)
    builds = [b]
    for g in range(1, 3):
        mem, _ = evolve(mem, seed=g, dirty_share=0.05)
        write_full(tmp_path / f"m{g}", mem)
        builds.append(ops.diff(tmp_path / f"m{g}", builds[-1], store, opts)[1])
    ops.verify(builds[-1])
    for victim in builds:
        diff_file = victim / (DIFF_ZSTD if compression == "zstd" else DIFF_RAW)
        original = diff_file.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 3] ^= 0x40
        diff_file.write_bytes(bytes(flipped))
        with pytest.raises(FcsnapError, match=victim.name):
            ops.verify(builds[-1])
        result = fcsnap("verify", builds[-1])
        assert result.returncode == 1 and victim.name in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        diff_file.write_bytes(original)
    ops.verify(builds[-1])
    shutil.move(builds[0], tmp_path / "elsewhere")
    with pytest.raises(FcsnapError, match="missing|not in"):
        ops.verify(builds[-1])


def test_squash_flattens_to_generation_zero_with_same_content(tmp_path):
    store = tmp_path / "store"
    mem = synthetic_memory(4 * MIB, seed=10)
    write_full(tmp_path / "m0", mem)
    _, b = ops.pack(tmp_path / "m0", store, BuildOptions(compression="zstd"))
    for g in range(1, 4):
        mem, _ = evolve(mem, seed=g)
        write_full(tmp_path / f"m{g}", mem)
        _, b = ops.diff(tmp_path / f"m{g}", b, store, BuildOptions(compression="zstd"))
    result = fcsnap("squash", b.name, "--store", store, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    squashed = Path(data["path"])
    assert data["generation"] == 0 and data["parent_build_id"] is None
    assert load_header(squashed).build_ids() == [uuid.UUID(data["build_id"])]
    assert (squashed / DIFF_ZSTD).exists()
    assert unpacked(squashed, tmp_path) == mem.tobytes()
    ops.verify(squashed)


def test_cli_pack_diff_json_and_vm_pointer(tmp_path):
    store = tmp_path / "store"
    mem = synthetic_memory(4 * MIB, seed=11)
    write_full(tmp_path / "m0", mem)
    (tmp_path / "vmstate").write_bytes(b"vmstate-bytes")
    r = fcsnap(
        "pack", "--init",
        tmp_path / "m0",
        "--store",
        store,
        "--name",
        "web",
        "--vmstate",
        tmp_path / "vmstate",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    packed = json.loads(r.stdout)
    assert {"build_id", "path", "generation", "stats"} <= packed.keys()
    assert (store / VMS / "web").read_text().strip() == packed["build_id"]
    assert (Path(packed["path"]) / "snapfile").read_bytes() == b"vmstate-bytes"
    mem, _ = evolve(mem, seed=12)
    write_full(tmp_path / "m1", mem)
    r = fcsnap(
        "diff", tmp_path / "m1", "--base", "web", "--store", store, "--name", "web", "--json"
    )
    assert r.returncode == 0, r.stderr
    diffed = json.loads(r.stdout)
    assert diffed["generation"] == 1 and diffed["parent_build_id"] == packed["build_id"]
    assert resolve_build("web", store).name == diffed["build_id"]
    r = fcsnap("unpack", "web", "--store", store, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == mem.tobytes()
    assert fcsnap("unpack", "web", "--store", store, "-o", tmp_path / "out").returncode == 1


def test_killed_pack_leaves_no_build_and_no_pointer_change(tmp_path):
    store = tmp_path / "store"
    mem = synthetic_memory(4 * MIB, seed=13)
    write_full(tmp_path / "small", mem)
    assert fcsnap("pack", "--init", tmp_path / "small", "--store", store, "--name",
                  "vm").returncode == 0
    before = (visible_builds(store), (store / VMS / "vm").read_text())
    big = tmp_path / "big"
    big.write_bytes(os.urandom(64 * MIB))  # at zstd level 19 this takes many seconds
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fcsnap",
            "pack", "--init",
            big,
            "--store",
            store,
            "--name",
            "vm",
            "--compress",
            "zstd:19",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_mid_pack(store, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (visible_builds(store), (store / VMS / "vm").read_text()) == before
    # The next command clears what the killed one left behind.
    assert fcsnap("pack", "--init", tmp_path / "small", "--store", store).returncode == 0
    assert not any(p.name.startswith(".staging-") for p in store.iterdir())


@pytest.mark.parametrize(("signum", "status", "line"), [
    (signal.SIGINT, 130, "fcsnap: interrupted"), (signal.SIGTERM, 143, "fcsnap: terminated"),
], ids=["INT", "TERM"])
def test_interrupted_pack_removes_its_own_staging(tmp_path, signum, status, line):
    """Ctrl-C (SIGINT) or SIGTERM (a service manager, `timeout`) mid-pack: the command cleans
    up after itself - no build, no staging directory, no pointer change - and exits 130 (143)
    with one line, no traceback."""
    store = tmp_path / "store"
    write_full(tmp_path / "small", synthetic_memory(4 * MIB, seed=13))
    assert fcsnap("pack", "--init", tmp_path / "small", "--store", store, "--name",
                  "vm").returncode == 0
    before = (visible_builds(store), (store / VMS / "vm").read_text())
    big = tmp_path / "big"
    big.write_bytes(os.urandom(64 * MIB))  # at zstd level 19 this takes many seconds
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcsnap", "pack", "--init", big, "--store", store, "--name", "vm",
         "--compress", "zstd:19"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_mid_pack(store, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == status
    assert err.decode().splitlines() == [line]
    assert (visible_builds(store), (store / VMS / "vm").read_text()) == before
    assert not any(p.name.startswith(".") for p in store.iterdir())


def test_full_disk_leaves_no_build(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs on this machine")
    try:
        store = mnt / "store"
        mem = synthetic_memory(8 * MIB, seed=14, zero_share=0.2)
        write_full(tmp_path / "m", mem)
        r = fcsnap("pack", "--init", tmp_path / "m", "--store", store)
        assert r.returncode == 1
        assert "No space left" in r.stderr and "Traceback" not in r.stderr
        assert visible_builds(store) == []
        assert not any(store.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)])


def test_failing_writer_leaves_no_build(tmp_path, monkeypatch):
    store = tmp_path / "store"
    mem = synthetic_memory(8 * MIB, seed=15, zero_share=0.1)
    write_full(tmp_path / "m", mem)
    from fcsnap.store.operations import builder

    def failing(self, data):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(builder.DiffSink, "write", failing)
    with pytest.raises(OSError):
        ops.pack(
            tmp_path / "m",
            store,
            BuildOptions(),
        )
    assert list(store.iterdir()) == []


@pytest.mark.parametrize(
    "case",
    ["unaligned size", "directory", "missing", "size mismatch", "empty"],
)
def test_bad_memory_files_get_one_line_and_exit_1(tmp_path, case):
    store = tmp_path / "store"
    mem = synthetic_memory(1 * MIB, seed=16)
    write_full(tmp_path / "m0", mem)
    assert fcsnap("pack", "--init", tmp_path / "m0", "--store", store, "--name",
                  "vm").returncode == 0
    bad = tmp_path / "bad"
    if case == "unaligned size":
        bad.write_bytes(b"x" * 5000)
    elif case == "directory":
        bad.mkdir()
    elif case == "size mismatch":
        write_full(bad, synthetic_memory(2 * MIB, seed=17))
    elif case == "empty":
        bad.write_bytes(b"")
    before = visible_builds(store)
    command = ("diff", bad, "--base", "vm") if case == "size mismatch" else ("pack", "--init", bad)
    r = fcsnap(*command, "--store", store)
    assert r.returncode == 1, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert visible_builds(store) == before


def test_sigterm_during_unpack_leaves_no_partial_output(tmp_path):
    """SIGTERM while `unpack` writes (stopped there, then terminated): one line, exit 143,
    no output and no temporary file left beside it."""
    write_full(tmp_path / "m", synthetic_memory(4 * MIB, seed=15))
    assert fcsnap("pack", "--init", tmp_path / "m", "--store", tmp_path / "s", "--name", "vm"
                  ).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    proc = start_stopped("unpack", "vm", "--store", tmp_path / "s", "-o", out / "mem",
                         point="unpacking")
    try:
        proc.send_signal(signal.SIGTERM)  # pending until it runs again
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 143
    assert err.splitlines() == ["fcsnap: terminated"]
    assert list(out.iterdir()) == []
