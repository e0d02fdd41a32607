"""The real Firecracker (v1.12.1) restores fcguest from fcsnap's builds.

One guest is booted per module and snapshotted (Full) after two good rounds (the Diff, hugepage
and restored-VM tests take snapshots of their own); every test loads a snapshot into a new
Firecracker, its memory served by one of fcsnap's paths, and checks that the guest goes on:
the round counter kept in its RAM continues from the last round printed before the snapshot,
and every page it checks (its working set, the same each round, and a sweep over the rest)
holds what it wrote. Marked `firecracker`: run with `-m firecracker` (fcsnap.testing.realvmm
says how; the `real_vmm` fixture skips, or fails in CI, when this machine cannot run
Firecracker).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import fcsnap, top_up_hugepages

from fcsnap.store.layout import diff_path, resolve_build
from fcsnap.testing.fcguest import FILL_BASE, PAGE, GuestConfig
from fcsnap.testing.realvmm import (
    WAIT,
    Daemon,
    Firecracker,
    GuestError,
    Jail,
    RestoreProcess,
    Snapshot,
    VmmError,
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
        done = fcsnap("pack", template.mem, "--vmstate", template.vmstate, "--store", store,
                      "--name", name, "--compress", compress, "--quiet")
        assert done.returncode == 0, done.stderr
    return store


def served_stats(path: Path) -> dict[str, Any]:
    stats = json.loads(path.read_text())
    assert stats["exit_reason"] == "vm exited", stats
    assert stats["pages_served"] > 0, stats
    return stats


def resume_from(template: Snapshot, store: Path, tmp_path: Path, name: str,
                *args: str) -> dict[str, Any]:
    """`fcsnap restore --vm NAME ARGS` serving a new Firecracker that loads the template with
    the Uffd backend: the guest goes on right, and once the VM is gone restore exits 0 by
    itself. Returns its stats."""
    tmp_path.mkdir(exist_ok=True)
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", name, "--store", store,
                        "--stats", stats, *args) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    return served_stats(stats)


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_restore_serves_a_packed_snapshot(template: Snapshot, store: Path, tmp_path: Path,
                                          name: str) -> None:
    """`fcsnap restore` (default options) serves the packed Full snapshot: every page the
    guest reads comes through a fault."""
    stats = resume_from(template, store, tmp_path, name)
    assert stats["faults"] > 0 and stats["populated_pages"] == stats["prefetched_pages"] == 0


@pytest.mark.parametrize("args", [
    ("--verify",), ("--eager",), ("--populate",), ("--fault-around", "0"),
], ids=lambda args: " ".join(args))
def test_restore_options(template: Snapshot, store: Path, tmp_path: Path,
                         args: tuple[str, ...]) -> None:
    """Each restore option under the real VMM, the guest going on right: --verify (every
    block hashed before it goes in), --eager (every page in before any fault is served: the
    vCPU waits at its first), --populate (the rest in the background), --fault-around 0 (one
    page a fault)."""
    stats = resume_from(template, store, tmp_path, "zstd", *args)
    every_page = template.mem_mib << 8
    if args == ("--eager",):
        assert stats["pages_served"] == every_page and stats["faults"] < 64, stats
    elif args == ("--populate",):
        assert stats["pages_served"] == every_page and stats["populated_pages"] > 0, stats
    elif args == ("--fault-around", "0"):
        assert stats["installs"] == stats["pages_served"] == stats["faults"], stats


def test_record_then_prefetch_the_working_set(template: Snapshot, store: Path,
                                              tmp_path: Path) -> None:
    """`--record-ws` writes the pages a restored guest faulted; `--prefetch-ws` of that file
    installs them right after the handshake, so the next clone faults far less."""
    working_set = tmp_path / "ws.txt"
    recorded = resume_from(template, store, tmp_path / "first", "raw", "--record-ws",
                           str(working_set))
    prefetched = resume_from(template, store, tmp_path / "second", "raw", "--prefetch-ws",
                             str(working_set))
    assert prefetched["prefetched_pages"] >= CONFIG.ws, prefetched
    assert prefetched["faults"] < recorded["faults"] // 2, (recorded, prefetched)


def test_four_clones_on_the_daemon_at_once(template: Snapshot, store: Path,
                                           tmp_path: Path) -> None:
    """One daemon serves four Firecrackers loading the same snapshot at once: every guest
    goes on from the template's round, its memory right."""
    with Daemon(store, tmp_path) as daemon, contextlib.ExitStack() as vms:
        clones = [vms.enter_context(Firecracker(tmp_path, f"clone{i}")) for i in range(4)]
        for i, _vm in enumerate(clones):
            daemon.restore("zstd", tmp_path / f"clone{i}.sock")
        for i, vm in enumerate(clones):
            vm.load(template.vmstate, uffd=tmp_path / f"clone{i}.sock")
        for vm in clones:
            vm.expect_progress(template.last_round, ROUNDS)


def writable_copy(store: Path, dest: Path) -> Path:
    """A copy of the module's store that a test may add to or damage."""
    shutil.copytree(store, dest)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def damage_page(template: Snapshot, store: Path, dest: Path, at: int) -> Path:
    """A writable copy of `store` at `dest` in which byte `at` of the guest's page 0 (at
    FILL_BASE) is flipped where the raw build keeps it; returns the copy's build."""
    build = resolve_build("raw", writable_copy(store, dest))
    with template.mem.open("rb") as f:
        f.seek(FILL_BASE)
        page = f.read(PAGE)
    diff = bytearray(diff_path(build).read_bytes())
    assert diff.count(page) == 1  # its tag words make every filled page unique
    diff[diff.find(page) + at] ^= 0x40
    diff_path(build).write_bytes(diff)
    return build


def test_a_damaged_block_is_seen_by_the_guest(template: Snapshot, store: Path,
                                              tmp_path: Path) -> None:
    """A byte flipped in a stored page is served as it is without --verify: the guest finds
    it in its working set on the next round."""
    damaged = damage_page(template, store, tmp_path / "store", 3)
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "raw", "--store", damaged.parent
                        ) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        with pytest.raises(GuestError, match=f"BAD page={FILL_BASE:#x}"):
            vm.expect_progress(template.last_round, 2)


def test_verify_refuses_a_damaged_block(template: Snapshot, store: Path, tmp_path: Path
                                        ) -> None:
    """Under --verify the damaged block fails its hash as the guest first reads it: restore
    exits 1 with one line naming the build, and the VM is killed, having never printed a
    BAD round."""
    damaged = damage_page(template, store, tmp_path / "store", 3)
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "raw", "--store", damaged.parent,
                        "--verify") as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        assert server.finish() == 1
        assert vm.proc is not None and vm.proc.wait(WAIT) == -signal.SIGKILL
        assert [r for r in vm.rounds() if not r.ok] == []
    errors = [line for line in server.stderr.lines if line.startswith("fcsnap: error: ")]
    assert len(errors) == 1 and damaged.name in errors[0], server.stderr.lines
    assert "does not match its hash" in errors[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_the_vm_does_not_outlive_its_page_server(template: Snapshot, store: Path,
                                                 tmp_path: Path, signum: int) -> None:
    """A restore ended by SIGTERM (exit 0) or SIGKILL (its watchdog left) while the guest
    still faults pages in: Firecracker is killed, not left frozen at its next fault."""
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "raw", "--store", store
                        ) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, 2)
        assert server.proc is not None and vm.proc is not None
        server.proc.send_signal(signum)
        assert server.finish() == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
        assert vm.proc.wait(WAIT) == -signal.SIGKILL


def test_full_snapshot_of_a_restored_vm(template: Snapshot, store: Path,
                                        tmp_path: Path) -> None:
    """A VM restored by fcsnap runs on, is paused and snapshotted Full (Firecracker reads all
    of its memory through the page server to write it); `diff` stores that as the next
    generation, and restoring it lets the guest go on from its second snapshot."""
    store = writable_copy(store, tmp_path / "store")
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "raw", "--store", store
                        ) as server, Firecracker(tmp_path, "first") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, ROUNDS)
        last = vm.pause()
        vm.snapshot(tmp_path / "gen1.state", tmp_path / "gen1.mem", "Full")
        vm.kill()
        assert server.finish() == 0, server.tail()
    done = fcsnap("diff", tmp_path / "gen1.mem", "--base", "raw", "--vmstate",
                  tmp_path / "gen1.state", "--store", store, "--name", "raw", "--quiet")
    assert done.returncode == 0, done.stderr
    (tmp_path / "gen1.mem").unlink()
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "raw", "--store", store
                        ) as server, Firecracker(tmp_path, "second") as vm:
        vm.load(tmp_path / "gen1.state", uffd=server.socket)
        vm.expect_progress(last, ROUNDS)


def test_a_build_in_s3(template: Snapshot, bucket, tmp_path: Path) -> None:  # noqa: ANN001
    """The snapshot packed (zstd) into a store in S3 and restored from there through the host
    chunk cache: the guest goes on; what it reads was fetched from the bucket."""
    done = fcsnap("pack", template.mem, "--vmstate", template.vmstate, "--store",
                  bucket.url(), "--name", "vm", "--compress", "zstd", "--quiet",
                  env=bucket.env)
    assert done.returncode == 0, done.stderr
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", "vm", "--store", bucket.url(),
                        "--cache-dir", tmp_path / "cache", "--stats", stats, env=bucket.env
                        ) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(template.vmstate, uffd=server.socket)
        vm.expect_progress(template.last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    fetched = served_stats(stats)
    assert fetched["fetch_requests"] > 0 and fetched["fetched_bytes"] > 0, fetched


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


# What restore sends to have Firecracker load a snapshot, Firecracker 1.12 refuses.
REFUSED_LOAD_BODY = pytest.mark.xfail(
    strict=True, raises=VmmError,
    reason="restore's load body has track_dirty_pages, which Firecracker 1.12 refuses")


@REFUSED_LOAD_BODY
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


@REFUSED_LOAD_BODY
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
    done = fcsnap("pack", snaps[0].mem, "--vmstate", snaps[0].vmstate, "--store", store,
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
    done = fcsnap("pack", huge_template.mem, "--vmstate", huge_template.vmstate, "--store",
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
