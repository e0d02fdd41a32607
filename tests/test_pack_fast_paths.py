"""The pack pipeline's fast paths: the zero check, the raw diff written straight from the scan's
buffer with writev, and the batches handed to the compressing worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import unpacked

from fcsnap import files
from fcsnap.options import PURE_PYTHON_ENV
from fcsnap.store.format.layout import DIFF_RAW, DIFF_ZSTD, HASHES, HEADER
from fcsnap.store.operations import blockscan, builder, ops, scan
from fcsnap.store.operations.builder import BuildOptions, build_generation
from fcsnap.store.operations.scan import MemoryFile
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.units import PAGE
from fcsnap.workingset import write_working_set

MIB = 1 << 20


@pytest.mark.parametrize("block_size", [4096, 2 * MIB], ids=["4K", "2M"])
def test_a_single_nonzero_byte_anywhere_makes_a_block_data(tmp_path, block_size):
    """Each non-zero block holds one non-zero byte: first, last, inside a word, and the top
    byte of a word at 0x80 and 0xff (negative as a signed word). None may read as zero."""
    spots = [(0, 1), (block_size - 1, 1), (3, 0x10), (7, 0x80), (block_size - 1, 0xFF),
             (block_size // 2 + 7, 0xC0)]
    blocks = 2 * len(spots)  # every other block stays zero
    mem = np.zeros(blocks * block_size, np.uint8)
    for i, (offset, value) in enumerate(spots):
        mem[2 * i * block_size + offset] = value
    path = tmp_path / "mem"
    mem.tofile(path)
    manifest, build = ops.pack(path, tmp_path / "store", BuildOptions(block_size))
    assert manifest.stats.blocks_stored == len(spots)
    assert manifest.stats.blocks_zero == blocks - len(spots)
    assert unpacked(build, tmp_path) == mem.tobytes()


def test_write_all_writes_every_piece_in_order_through_short_writes(tmp_path, monkeypatch):
    """More pieces than one writev takes, and a kernel that writes at most 5000 bytes a call."""
    real = os.writev

    def short(fd: int, buffers: list[memoryview]) -> int:
        budget, taken = 5000, []
        for b in buffers:
            if not budget:
                break
            taken.append(b[:budget])
            budget -= len(taken[-1])
        return real(fd, taken)

    monkeypatch.setattr(builder.os, "writev", short)
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 3 * builder.IOV_MAX * 700, dtype=np.uint8).tobytes()
    cuts = np.sort(rng.choice(len(data), 3 * builder.IOV_MAX, replace=False))
    pieces = [memoryview(data)[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    with open(tmp_path / "out", "wb", buffering=0) as f:
        assert builder.write_all(f.fileno(), pieces) == len(data)
    assert (tmp_path / "out").read_bytes() == data


def test_zstd_diff_handed_to_the_worker_in_many_batches_round_trips(tmp_path, monkeypatch):
    """Small hand-offs: the worker gets many batches, the scan waits on it; nothing is lost or
    reordered, and the zstd tool reads the file."""
    monkeypatch.setattr(builder, "HANDOFF_BYTES", 64 << 10)
    mem = synthetic_memory(8 * MIB, seed=21)
    path = tmp_path / "mem"
    write_full(path, mem)
    manifest, build = ops.pack(
        path, tmp_path / "store", BuildOptions(compression="zstd", frame_size=32 << 10)
    )
    assert unpacked(build, tmp_path) == mem.tobytes()
    ops.verify(build)
    plain = subprocess.run(["zstd", "-d", "-c", str(build / DIFF_ZSTD)], capture_output=True,
                           check=True).stdout
    assert len(plain) == manifest.stats.bytes_stored


ENTRY = """
import atexit, sys, threading, time
from pathlib import Path
from fcsnap.cli import main
atexit.register(print, "exit handler ran", file=sys.stderr)
marker, store = Path(sys.argv.pop(1)), Path(sys.argv[sys.argv.index("--store") + 1])
def late() -> None:  # ends a second after the build is published: after the command
    deadline = time.monotonic() + 60
    while not any(p.name[0] != "." for p in store.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1)
    marker.write_text("done")
if marker.name == "thread":
    threading.Thread(target=late).start()
sys.argv[0] = "fcsnap"
main()
"""


@pytest.mark.parametrize("thread", [False, True], ids=["alone", "with a thread running"])
def test_a_build_command_ends_with_its_output_exit_handlers_and_threads(tmp_path, thread):
    """pack ends its process at once (cli._end_now), yet prints all it says and runs exit
    handlers; with a thread still running, the process waits for it."""
    mem = synthetic_memory(4 * MIB, seed=22)
    write_full(tmp_path / "mem", mem)
    marker = tmp_path / ("thread" if thread else "none")
    r = subprocess.run(
        [sys.executable, "-c", ENTRY, str(marker), "pack", "--init", str(tmp_path / "mem"),
         "--store",
         str(tmp_path / "store"), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["blocks_total"] == len(mem)
    assert r.stderr.splitlines() == ["exit handler ran"]
    assert marker.exists() == thread


def scan_both_ways(data: memoryview, block_size: int, monkeypatch) -> tuple[list[int], list[int]]:
    """nonzero_blocks compiled, then in pure Python (FCSNAP_PURE_PYTHON=1)."""
    compiled = blockscan.nonzero_blocks(data, block_size)
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    pure = blockscan.nonzero_blocks(data, block_size)
    monkeypatch.delenv(PURE_PYTHON_ENV)
    return compiled, pure


@pytest.mark.skipif(blockscan.lib is None, reason="the compiled scan is not built (no C compiler)")
@pytest.mark.parametrize("block_size", [4096, 2 * MIB], ids=["4K", "2M"])
@pytest.mark.parametrize("misaligned", [0, 1, 8], ids=["aligned", "odd", "word"])
def test_the_compiled_scan_and_the_python_scan_find_the_same_blocks(
    block_size, misaligned, monkeypatch
):
    """Random blocks hold one non-zero byte, at a random place or on an edge (a block's first
    or last byte, the last byte of a 256-byte stride or the first of the next); the first and
    last blocks are data; the buffer starts `misaligned` bytes into its memory."""
    rng = np.random.default_rng(block_size + misaligned)
    blocks = max(8, (4 * MIB) // block_size)
    mem = np.zeros(misaligned + blocks * block_size, np.uint8)
    chosen = {0, blocks - 1} | set(rng.choice(blocks, blocks // 3, replace=False).tolist())
    edges = [0, block_size - 1, 255, 256]
    for k, b in enumerate(sorted(chosen)):
        spot = edges[k] if k < len(edges) else int(rng.integers(block_size))
        mem[misaligned + b * block_size + spot] = rng.integers(1, 256)
    data = memoryview(mem)[misaligned:]
    truth = np.flatnonzero(mem[misaligned:].reshape(blocks, block_size).any(axis=1)).tolist()
    assert truth == sorted(chosen)
    assert scan_both_ways(data, block_size, monkeypatch) == (truth, truth)


@pytest.mark.parametrize("block_size", [4096, 2 * MIB], ids=["4K", "2M"])
def test_a_pack_is_the_build_the_lineage_aware_builder_writes(tmp_path, block_size):
    """The generation 0 builder (fresh.py, no numpy) and the one that diffs (generation.py)
    store the same bytes, map them the same way and count the same stats, on memory with
    zeros, repeated blocks and holes, read in chunks of several sizes."""
    mem = synthetic_memory(24 * MIB, seed=23)
    pages = mem.reshape(-1, PAGE)  # a view: the writes below change mem
    pages[100:400] = pages[1000:1300]  # repeats, some in runs
    pages[2000::97] = pages[7]
    flat = mem.reshape(-1)
    flat[8 * MIB : 10 * MIB] = flat[12 * MIB : 14 * MIB]  # a repeated 2M block
    flat[4 * MIB : 6 * MIB] = 0
    path = tmp_path / "mem"
    with open(path, "wb") as f:  # [4M, 6M) a hole: a sparse copy's zeros
        f.write(flat[: 4 * MIB].tobytes())
        f.seek(6 * MIB)
        f.write(flat[6 * MIB :].tobytes())
    built = {}
    for kind, first in (("fresh", None), ("generation", iter(()))):
        with MemoryFile(path, block_size) as source:
            manifest, build = build_generation(
                tmp_path / kind, source.chunks(chunk_bytes=3 * block_size), source.size,
                BuildOptions(block_size), first=first,
            )
        assert unpacked(build, tmp_path) == mem.tobytes()
        header = (build / HEADER).read_bytes().replace(manifest.build_id.bytes, b"ID" * 8)
        built[kind] = (header, (build / HASHES).read_bytes(), (build / DIFF_RAW).read_bytes(),
                       manifest.stats)
    assert built["fresh"] == built["generation"]
    assert built["fresh"][3].blocks_deduplicated > 0


def test_a_raw_pack_loads_neither_numpy_nor_zstandard(tmp_path):
    """A whole `fcsnap pack` process (raw) never loads numpy (a quarter of its time, starting)
    nor zstandard."""
    write_full(tmp_path / "mem", synthetic_memory(4 * MIB, seed=24))
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: print({'numpy', 'zstandard'} & set(sys.modules),"
        " file=sys.stderr))\n"
        "from fcsnap.cli import main\n"
        "sys.argv[0] = 'fcsnap'\n"
        "main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, "pack", "--init", str(tmp_path / "mem"), "--store",
         str(tmp_path / "store"), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["set()"]


def test_a_sparse_file_of_single_pages_is_written_in_few_calls(tmp_path, monkeypatch):
    """A file whose data is 600 single pages between holes: the raw diff gathers their blocks
    and writes megabytes a call, not a page; every byte comes back."""
    calls = []
    real = os.writev
    monkeypatch.setattr(builder.os, "writev", lambda fd, bufs: calls.append(1) or real(fd, bufs))
    rng = np.random.default_rng(25)
    pages = rng.integers(1, 256, (600, PAGE), np.uint8)
    mem = np.zeros((1200, PAGE), np.uint8)
    mem[::2] = pages
    path = tmp_path / "mem"
    with open(path, "wb") as f:
        for i in range(0, 1200, 2):
            f.seek(i * PAGE)
            f.write(mem[i].tobytes())
        f.truncate(1200 * PAGE)
    monkeypatch.setattr(builder, "WRITEBACK_BYTES", 1 * MIB)  # several gathered writes
    manifest, build = ops.pack(path, tmp_path / "store", BuildOptions())
    assert manifest.stats.blocks_stored == 600
    assert 2 <= len(calls) <= 4
    assert unpacked(build, tmp_path) == mem.tobytes()


def test_fsync_paths_syncs_every_path_at_once_and_raises_the_first_error(tmp_path, monkeypatch):
    """Every path is fsynced, all at the same time (each waits at a barrier for the others:
    one after another would never get past it), and a failure is raised after the rest."""
    paths = [tmp_path / name for name in ("a", "b", "c")]
    for p in paths:
        p.write_bytes(b"x")
    paths.append(tmp_path)
    barrier = [threading.Barrier(len(paths), timeout=30)]  # the fsyncs meet there
    synced = []
    real = os.fsync

    def fsync(fd: int) -> None:
        barrier[0].wait()
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    files.fsync_paths(paths)
    assert sorted(synced) == sorted(str(p) for p in paths)
    barrier[0] = threading.Barrier(len(paths) - 1, timeout=30)  # one path cannot be opened
    synced.clear()
    with pytest.raises(FileNotFoundError):
        files.fsync_paths([tmp_path / "gone", *paths[1:]])
    assert sorted(synced) == sorted(str(p) for p in paths[1:])


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "cold"])
def test_diff_written_reads_the_written_blocks_in_batches(tmp_path, monkeypatch, cached):
    """diff --written reads the written blocks a batch at a time (runs across batch edges,
    pages in a hole of the Full file); a read the page cache cannot serve announces the rest
    of its batch at once. The new generation unpacks byte-exact."""
    mem = synthetic_memory(8 * MIB, seed=26)
    path = tmp_path / "mem"
    write_full(path, mem)
    _, base = ops.pack(path, tmp_path / "store", BuildOptions())
    pages = mem.reshape(-1, PAGE)
    written = [3, 4, 5, 6, 7, 8, 100, 101, 1000, 1500, 1501, 2047]
    pages[written] = np.random.default_rng(26).integers(0, 256, (len(written), PAGE), np.uint8)
    pages[1500:1502] = 0  # written zeros: a hole in the next Full file
    with open(path, "wb") as f:
        f.write(pages[:1500].tobytes())
        f.seek(1502 * PAGE)
        f.write(pages[1502:].tobytes())
    write_working_set(tmp_path / "written", mem.nbytes, [p * PAGE for p in written])
    monkeypatch.setattr(scan, "CHUNK", 4 * PAGE)  # batches of 4 blocks
    real_preadv, announced = os.preadv, []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags and not cached:
            raise BlockingIOError
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(scan.os, "preadv", preadv)
    monkeypatch.setattr(scan.os, "posix_fadvise", lambda fd, at, n, advice: announced.append(at))
    _, build = ops.diff(path, base, tmp_path / "store", BuildOptions(),
                        written=tmp_path / "written")
    assert unpacked(build, tmp_path) == mem.tobytes()
    # cold: each batch announces its runs from its first read on, once
    assert announced == ([] if cached else [p * PAGE for p in (3, 7, 100, 1000, 1500, 2047)])
