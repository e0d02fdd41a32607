"""The restore server's memory while it serves a raw build bigger than its memory bound.

Raw diffs are mmapped and copied from; without dropping what was copied, the server's RSS
would grow by the whole diff (2 MiB at a time: the page cache maps large folios whole).
"""

from __future__ import annotations

import ctypes
import os
import random
from pathlib import Path

import pytest
from helpers import WAIT, Lineage, wait_for

from fcsnap.store.format.source import DiffFile
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd.mapped import CHUNK_SHIFT, MappedDiff

MiB = 1 << 20
SIZE = 320 * MiB  # about 225 MiB of data: several times what the server may keep mapped
CACHE_MB = 16  # restore --cache-mb: what the server may keep mapped of a raw diff
RSS_FILE_BOUND = 48  # MiB: shared libraries (~20) plus CACHE_MB, with slack
HWM_BOUND = 100  # MiB: the bound for a raw build (no frame cache)


@pytest.fixture(scope="module")
def big_build(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    root = tmp_path_factory.mktemp("big")
    mem = synthetic_memory(SIZE, seed=31, zero_share=0.3)
    write_full(root / "mem", mem)
    _, build = ops.pack(root / "mem", root / "store", BuildOptions())
    assert build.joinpath("memfile.diff").stat().st_size > 2 * HWM_BOUND * MiB
    return Lineage(root / "store", [build], [root / "mem"])


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssFile", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


@pytest.mark.parametrize(("fault_around", "order"), [
    ("256K", "random"),  # every fault maps another 2 MiB chunk
    ("0", "sequential"),  # streaming 4 KiB copies: mapped, chunk after chunk
])
def test_server_memory_stays_bounded(big_build, procs, fault_around: str, order: str) -> None:
    """Every page of the guest is served and checked; meanwhile the server's peak RSS and
    its file-backed RSS stay under bounds far below the diff's size (--cache-mb is the
    budget for mapped diff pages)."""
    server = procs.server(big_build.newest.name, big_build.store, "--fault-around",
                          fault_around, "--cache-mb", str(CACHE_MB))
    vm = procs.vm(expected=big_build.expected, threads=4, order=order, hold=WAIT,
                  deadline=4 * WAIT)
    wait_for(procs.report.exists, "the VM to read every page", timeout=4 * WAIT)
    memory = memory_mib(server.pid)
    vm.kill()
    out = procs.outcome(server, vm)
    assert out.status == 0, out.stderr
    assert out.report is not None and out.report["mismatches"] == 0
    assert out.report["pages_touched"] == SIZE // 4096
    assert out.stats is not None and out.stats["pages_served"] == SIZE // 4096
    assert memory["RssFile"] < RSS_FILE_BOUND, memory
    assert memory["VmHWM"] < HWM_BOUND, memory


def test_sources_hold_the_right_bytes_across_drops(big_build) -> None:
    """Scattered small copies, streaming ones and big ones, with drops in between: each
    address holds the diff's bytes when it is handed out, and the chunks in use stay within
    the bound."""
    diff = DiffFile(big_build.newest)
    try:
        budget = 16 << CHUNK_SHIFT
        mapped = MappedDiff(diff, budget)
        assert not mapped.fits and MappedDiff(diff, diff.size).fits
        fd = os.open(diff.path, os.O_RDONLY)
        rng = random.Random(1)
        asks = [(rng.randrange(diff.size // 4096) * 4096, 4096) for _ in range(200)]
        asks += [(8 * MiB + i * 4096, 4096) for i in range(100)]  # streaming
        asks += [(rng.randrange((diff.size - MiB) // 4096) * 4096, rng.choice([64 << 10, MiB]))
                 for _ in range(64)]
        rng.shuffle(asks)
        try:
            for storage, length in asks:
                address = mapped.source(storage, length)
                assert ctypes.string_at(address, length) == os.pread(fd, length, storage)
        finally:
            os.close(fd)
        assert sum(mapped.chunks) == mapped.counters[0] <= budget >> CHUNK_SHIFT
    finally:
        diff.close()
