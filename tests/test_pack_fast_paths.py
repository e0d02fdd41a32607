"""The pack pipeline's fast paths: the zero check, the raw diff written straight from the scan's
buffer with writev, and the batches handed to the compressing worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import unpacked

from fcsnap.store.format.layout import DIFF_ZSTD
from fcsnap.store.operations import builder, ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full

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
