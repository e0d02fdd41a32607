"""The working-set prefetch's installs (prefetch.py `copy_runs`): the C loop (fp_copy_runs) and
the Python one give the same pages, bytes and stats, also when the kernel stops a run part way
(a page installed behind the server's back: EEXIST) and the installer finishes it; and the
server serves faults between batches without letting them hold the prefetch back."""

from __future__ import annotations

import os

import numpy as np
import pytest
import test_hotpath
from helpers import PAGE, Lineage, restore
from test_hotpath import GUEST, Served, needs_compiled

from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd import abi, fastpath
from fcsnap.uffd.prefetch import Prefetch
from fcsnap.workingset import read_working_set

guest = test_hotpath.guest
PAGES = GUEST // PAGE


def working_set() -> np.ndarray:
    """Scattered pages and runs of neighbours (one copy each), zero pages among them."""
    rng = np.random.default_rng(11)
    scattered = rng.choice(PAGES, 300, replace=False)
    runs = np.concatenate([np.arange(s, s + 9) for s in (50, 1000, 3000)])
    pages = np.unique(np.concatenate([scattered, runs, np.arange(100, 140)]))
    return rng.permutation(pages) * PAGE


def prefetch_all(s: Served, offsets: np.ndarray, intruders: list[int]) -> None:
    """Install `intruders` without the installer knowing (its copies will meet EEXIST),
    then run the prefetch to its end."""
    for page in intruders:
        abi.zeropage(s.uffd, s.addr + page * PAGE, PAGE)
    prefetch = Prefetch(s.installer, offsets, 64 << 10)
    steps = 0
    while prefetch.step():
        steps += 1
        assert steps < 1000, "the prefetch does not end"


@needs_compiled
def test_c_and_python_prefetch_install_the_same(guest, monkeypatch) -> None:
    offsets = working_set()
    intruders = [1003, 3004, 120]  # inside runs: the kernel stops those part way
    compiled = Served(guest, 0, 64 << 20)
    python = Served(guest, 0, 64 << 20)
    try:
        prefetch_all(compiled, offsets, intruders)
        monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1")
        assert not fastpath.compiled()
        prefetch_all(python, offsets, intruders)
        wanted = offsets // PAGE
        assert python.state.present[wanted].all()
        assert np.array_equal(python.state.present, compiled.state.present)
        for i in np.setdiff1d(wanted, intruders).tolist():
            assert python.page(i) == compiled.page(i) == guest.memory[i].tobytes(), f"page {i}"
        for name in ("pages_served", "bytes_served", "zero_pages", "installs",
                     "already_present", "prefetched_pages", "per_build_pages"):
            assert getattr(python.stats, name) == getattr(compiled.stats, name), name
        assert python.stats.already_present == len(intruders)
        assert python.stats.pages_served == len(wanted) - len(intruders)
        assert python.stats.prefetched_pages == len(wanted)  # the intruders found there too
    finally:
        compiled.close()
        python.close()


@pytest.mark.parametrize("path", ["python", pytest.param("compiled", marks=needs_compiled)])
def test_prefetch_takes_runs_of_neighbours_in_one_copy(guest, monkeypatch, path) -> None:
    """Pages next to each other in memory and in storage go in with one install."""
    if path == "python":
        monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1")
    s = Served(guest, 0, 64 << 20)
    try:
        offsets = np.arange(2000, 2064) * PAGE  # 64 neighbours, stored in order
        prefetch_all(s, offsets, [])
        assert s.stats.prefetched_pages == 64
        assert s.stats.installs < 64 // 4
        for i in range(2000, 2064):
            assert s.page(i) == guest.memory[i].tobytes()
    finally:
        s.close()


def test_a_guest_at_the_prefetch_frontier_does_not_hold_it_back(tmp_path, procs) -> None:
    """A guest touching its working set in the recorded order, from the moment of the
    handshake, is always at the prefetch's frontier. Its faults are served once between
    batches, so it waits for batches instead of taking the pages one fault at a time: nearly
    every page comes from the prefetch, however fast the guest faults. (With faults served
    until none was pending, this run took 150-1100 faults about three times in four.)"""
    size = 64 << 20
    memory = synthetic_memory(size, seed=21)
    write_full(tmp_path / "mem", memory)
    store = tmp_path / "store"
    _, build = ops.pack(tmp_path / "mem", store, BuildOptions())
    ws = tmp_path / "ws"
    guest = {"ws_fraction": 0.25, "touch": 0.0, "threads": 2, "size": size}
    first = restore(procs, Lineage(store, [build], [tmp_path / "mem"], PAGE),
                    ("--record-ws", str(ws)), **guest)
    assert first.status == 0 and first.report["mismatches"] == 0, first.stderr
    recorded = read_working_set(ws, size)
    _, ws_build = ops.pack(tmp_path / "mem", store, BuildOptions(working_set=ws))
    procs.stats.unlink()
    # One core for both (they inherit this process's affinity): the guest, woken, takes the
    # core from the server at once, as on a host where VMs outnumber cores.
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        second = restore(procs, Lineage(store, [ws_build], [tmp_path / "mem"], PAGE),
                         ("--prefetch-ws", str(ws)), **guest)
    finally:
        os.sched_setaffinity(0, allowed)
    assert second.status == 0 and second.vm_status == 0, second.stderr
    assert second.report["mismatches"] == 0
    # batches of 1, 2, 4, 8 and 1 MiB: a fault per thread between each, not hundreds
    assert second.stats["faults"] <= 30
    assert second.stats["prefetched_pages"] >= len(recorded) - 30
