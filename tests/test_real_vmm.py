"""The real Firecracker (v1.12.1) restores fcguest from fcsnap's builds.

One guest is booted per module and snapshotted (Full) after two good rounds; every test loads
that snapshot into a new Firecracker, its memory served by one of fcsnap's paths, and checks
that the guest goes on: the round counter kept in its RAM continues from the last round printed
before the snapshot, and every page it checks (its working set, the same each round, and a
sweep over the rest) holds what it wrote. Marked `firecracker`: run with `-m firecracker`
(fcsnap.testing.realvmm says how; the `real_vmm` fixture skips, or fails in CI, when this
machine cannot run Firecracker).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fcsnap

from fcsnap.testing.fcguest import FILL_BASE, GuestConfig
from fcsnap.testing.realvmm import (
    Daemon,
    Firecracker,
    GuestError,
    RestoreProcess,
    Snapshot,
    restore_in_process,
    take_snapshot,
)

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

# 8 MiB of scattered pages in a 256 MiB VM; 576 of them checked a round (~0.3 s a round).
CONFIG = GuestConfig(fill=2048, ws=512, sweep=64, write=16, seed=7)
ROUNDS = 3  # rounds a restored guest must print, all ok and counting on


@pytest.fixture(scope="module")
def template(real_vmm: None, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return take_snapshot(tmp_path_factory.mktemp("template"), CONFIG)


@pytest.fixture(scope="module")
def store(template: Snapshot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the template's memory twice: "raw" (uncompressed) and "zstd", each
    with the vmstate as its snapfile."""
    store = tmp_path_factory.mktemp("store") / "store"
    for name, compress in (("raw", "none"), ("zstd", "zstd")):
        done = fcsnap("pack", template.mem, "--vmstate", template.vmstate, "--store", store,
                      "--name", name, "--compress", compress, "--quiet")
        assert done.returncode == 0, done.stderr
    return store


def served_stats(path: Path) -> dict[str, object]:
    stats = json.loads(path.read_text())
    assert stats["exit_reason"] == "vm exited", stats
    assert stats["faults"] > 0 and stats["pages_served"] > 0, stats
    return stats


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_restore_serves_a_packed_snapshot(template: Snapshot, store: Path, tmp_path: Path,
                                          name: str) -> None:
    """`fcsnap restore` (default options) serves the packed Full snapshot to a Firecracker
    loading it with the Uffd backend: the guest goes on, its memory right; once the VM is
    gone, restore exits 0 by itself."""
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", name, "--store", store,
                        "--stats", stats) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    served_stats(stats)


def test_restore_verify_checks_every_block_it_serves(template: Snapshot, store: Path,
                                                     tmp_path: Path) -> None:
    """`restore --verify` under the real VMM: every block hashed before it goes in, and the
    guest goes on right."""
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "zstd", "--store", store, "--verify",
                        "--stats", stats) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    served_stats(stats)


def test_python_api_restore(template: Snapshot, store: Path, tmp_path: Path) -> None:
    """fcsnap.api.restore in this process serves the real VMM; it returns once the VM is gone,
    with status 0 and its stats."""
    with Firecracker(tmp_path, "clone") as vm:
        served, rounds = restore_in_process("raw", tmp_path / "uffd.sock", vm, template.vmstate,
                                            template.last_round, rounds=ROUNDS, store=store)
    assert (served.status, served.exit_reason) == (0, "vm exited")
    assert served.stats.faults > 0 and len(rounds) == ROUNDS


def test_daemon_restore(template: Snapshot, store: Path, tmp_path: Path) -> None:
    """`restore --daemon`: the daemon listens on the socket and serves the VM Firecracker loads
    from it; the restore ends when the VM exits."""
    with Daemon(store, tmp_path) as daemon, Firecracker(tmp_path, "clone") as vm:
        daemon.restore("zstd", tmp_path / "uffd.sock")
        vm.load(template.vmstate, uffd=tmp_path / "uffd.sock")
        vm.expect_progress(template.last_round, ROUNDS)


def test_file_backend_is_the_baseline(template: Snapshot, tmp_path: Path) -> None:
    """Firecracker's own File backend on the snapshot's memory file: the guest goes on. What
    every fcsnap path is compared with; a failure here is the harness's or the snapshot's."""
    with Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, mem_file=template.mem)
        vm.expect_progress(template.last_round, ROUNDS)


def test_a_wrong_page_is_seen_by_the_guest(template: Snapshot, tmp_path: Path) -> None:
    """The guest's own check: one byte flipped in a page of its working set (in the memory
    file the File backend maps) makes its next round BAD - so an ok round means the pages it
    checked were right."""
    mem = tmp_path / "vm.mem"
    data = bytearray(template.mem.read_bytes())
    offset = FILL_BASE + 1000  # in page 0 of the fill order, which every round checks first
    data[offset] ^= 0x40
    mem.write_bytes(data)
    with Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, mem_file=mem)
        with pytest.raises(GuestError, match=f"BAD page={offset & ~4095:#x}"):
            vm.expect_progress(template.last_round, 2)  # the 1st may have checked before

