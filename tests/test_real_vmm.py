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
import os
from pathlib import Path

import pytest
from helpers import fcsnap, top_up_hugepages

from fcsnap.testing.fcguest import FILL_BASE, GuestConfig
from fcsnap.testing.realvmm import (
    Daemon,
    Firecracker,
    GuestError,
    Jail,
    RestoreProcess,
    Snapshot,
    restore_in_process,
    take_snapshot,
    take_snapshots,
)

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

# 8 MiB of scattered pages in a 256 MiB VM; each round reads 1024 of them (its working set) and
# compares 512 word for word (all 2048 every 4 rounds): about 0.3 s a round.
CONFIG = GuestConfig(fill=2048, ws=1024, sweep=512, write=16, seed=7)
ROUNDS = 3  # rounds a restored guest must print, all ok and counting on
HUGE_MIB = 64  # a hugepage-backed VM: 32 hugepages (the pool is machine-wide: keep it small)


@pytest.fixture(scope="module")
def template(real_vmm: None, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return take_snapshot(tmp_path_factory.mktemp("template"), CONFIG)


@pytest.fixture(scope="module")
def store(template: Snapshot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the template's memory twice: "raw" (uncompressed) and "zstd", each
    with the vmstate as its snapfile."""
    store = tmp_path_factory.mktemp("store") / "store"
    for name, compress in (("raw", "none"), ("zstd", "zstd")):
        done = fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store",
                      store,
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


def test_firecracker_loads_as_soon_as_the_socket_exists(template: Snapshot, store: Path,
                                                        tmp_path: Path) -> None:
    """An orchestrator has Firecracker load the snapshot once restore's socket exists, while
    restore still imports the server and opens the build: Firecracker's connection waits in
    the socket's backlog and the guest is served."""
    stats = tmp_path / "stats.json"
    with Firecracker(tmp_path, "clone") as vm, RestoreProcess(
            tmp_path / "uffd.sock", "--vm", "zstd", "--store", store, "--stats", stats,
            socket_only=True) as server:
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


@pytest.mark.parametrize(("where", "rounds"), [
    (3, 2),  # in the tag word its working-set pass reads: the first whole round after the load
    (1000, CONFIG.fill // CONFIG.sweep + 2),  # elsewhere: once its sweep comes to the page
])
def test_a_wrong_byte_is_seen_by_the_guest(template: Snapshot, tmp_path: Path, where: int,
                                           rounds: int) -> None:
    """The guest's own check: one byte flipped in page 0 of its fill order (in the memory
    file the File backend maps) makes a round BAD - so rounds that say ok mean the pages they
    checked were right."""
    mem = tmp_path / "vm.mem"
    data = bytearray(template.mem.read_bytes())
    data[FILL_BASE + where] ^= 0x40
    mem.write_bytes(data)
    with Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, mem_file=mem)
        with pytest.raises(GuestError, match=f"BAD page={FILL_BASE:#x}"):
            vm.expect_progress(template.last_round, rounds)

def test_restore_has_firecracker_load_the_snapshot(template: Snapshot, store: Path,
                                                   tmp_path: Path) -> None:
    """`restore --firecracker-api`: once listening, restore has Firecracker load the build's
    snapfile from it (the body Firecracker 1.12 takes) and the guest goes on."""
    with Firecracker(tmp_path, "clone") as vm, RestoreProcess(
            tmp_path / "uffd.sock", "--vm", "raw", "--store", store, "--firecracker-api",
            vm.api_socket, loaded=True) as server:
        vm.expect_progress(template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()


def test_daemon_has_firecracker_load_the_snapshot(template: Snapshot, store: Path,
                                                  tmp_path: Path) -> None:
    """`restore --daemon --firecracker-api`: the daemon has Firecracker load the snapshot from
    it once the socket listens, and the guest goes on."""
    with Daemon(store, tmp_path) as daemon, Firecracker(tmp_path, "clone") as vm:
        daemon.restore("raw", tmp_path / "uffd.sock", "--firecracker-api", str(vm.api_socket))
        vm.expect_progress(template.last_round, ROUNDS)


def test_diff_snapshots_three_generations(real_vmm: None, tmp_path: Path) -> None:
    """A VM tracking dirty pages, snapshotted Full and then Diff twice as it runs; `pack` and
    two `diff --sparse-diff` store the three generations, and restoring the newest (its pages
    from all three builds) lets the guest go on from its last snapshot."""
    config = GuestConfig(fill=2048, ws=1024, sweep=512, write=64, seed=8)
    snaps = take_snapshots(tmp_path / "template", config, ("Full", "Diff", "Diff"),
                           mem_mib=64)
    store = tmp_path / "store"
    done = fcsnap("pack", "--init", snaps[0].mem, "--vmstate", snaps[0].vmstate, "--store", store,
                  "--name", "vm", "--quiet")
    assert done.returncode == 0, done.stderr
    for snap in snaps[1:]:
        assert snap.mem.stat().st_blocks * 512 < snap.mem.stat().st_size // 16  # sparse
        done = fcsnap("diff", snap.mem, "--sparse-diff", "--base", "vm", "--vmstate",
                      snap.vmstate, "--store", store, "--name", "vm", "--quiet")
        assert done.returncode == 0, done.stderr
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "vm", "--store", store,
                        "--stats", stats) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(snaps[-1].vmstate, uffd=server.socket, enable_diff_snapshots=True)
        vm.expect_progress(snaps[-1].last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    assert len(served_stats(stats)["per_build_pages"]) == 3


@pytest.fixture(scope="module")
def huge_template(real_vmm: None, hugepage_pool: list[bool],
                  tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    if top_up_hugepages(HUGE_MIB // 2 + 4):
        hugepage_pool.append(True)
    return take_snapshot(tmp_path_factory.mktemp("huge"), CONFIG, mem_mib=HUGE_MIB,
                         huge_pages="2M")


@pytest.mark.parametrize("block_size", ["4K", "2M"])
def test_hugepage_guest(huge_template: Snapshot, hugepage_pool: list[bool], tmp_path: Path,
                        block_size: str) -> None:
    """A VM on 2 MiB hugepages, packed with 4K or 2M blocks: restore serves it 2 MiB pages at
    a time and the guest goes on."""
    if top_up_hugepages(HUGE_MIB // 2 + 4):
        hugepage_pool.append(True)
    store = tmp_path / "store"
    done = fcsnap("pack", "--init", huge_template.mem, "--vmstate", huge_template.vmstate,
                  "--store",
                  store, "--name", "vm", "--block-size", block_size, "--quiet")
    assert done.returncode == 0, done.stderr
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "vm", "--store", store,
                        "--stats", stats) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(huge_template.vmstate, uffd=server.socket)
        vm.expect_progress(huge_template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    served = served_stats(stats)
    assert served["bytes_served"] == served["pages_served"] * (2 << 20)


def test_jailed_firecracker_with_socket_owner(template: Snapshot, store: Path,
                                              tmp_path: Path) -> None:
    """Firecracker under its jailer (chrooted, uid 65534) loads from a socket made in its
    chroot and given to its uid with `--socket-owner`: the guest goes on."""
    if os.geteuid() != 0:
        pytest.skip("the jailer needs root")
    jail = Jail(uid=65534, gid=65534)
    with Firecracker(tmp_path, "j", jail=jail) as vm, RestoreProcess(
            vm.root / "uffd.sock", "--vm", "raw", "--store", store, "--socket-owner",
            f"{jail.uid}:{jail.gid}") as server:
        assert vm.root is not None and vm.proc is not None
        assert Path(f"/proc/{vm.proc.pid}").stat().st_uid == jail.uid  # jailed: not root
        assert server.socket.stat().st_uid == jail.uid
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
