"""The real Firecracker (v1.12.1) through restore's other paths: its options, snapshots of a
restored VM, clones on the daemon, the server stopped or killed under a running VM, damaged
blocks, and a build in S3.

Every test loads a snapshot of fcguest into a new Firecracker with its memory served by fcsnap
(most through `--firecracker-api`, so that fcsnap sends the load) and checks that the guest goes
on: its round counter continues from the last round printed before the snapshot and every page
it checks holds what it wrote - or, where a test breaks something, that the guest is stopped or
sees it. tests/test_real_vmm.py has the basic paths, the Diff cycle, hugepages and the jailer.
Marked `firecracker` (run with `-m firecracker`); every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import fcsnap, in_a_fault, wait_for
from store_procs import stopping_at

from fcsnap.daemon.client import call_daemon
from fcsnap.header import load_header
from fcsnap.store.format.layout import DIFF_RAW
from fcsnap.testing.fcguest import FILL_BASE, PAGE, GuestConfig
from fcsnap.testing.realvmm import (
    WAIT,
    Daemon,
    Firecracker,
    GuestError,
    RestoreProcess,
    Snapshot,
    snapshot_a_restore,
    take_snapshot,
)

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

CONFIG = GuestConfig(fill=2048, ws=512, sweep=64, write=16, seed=11)
ROUNDS = 3  # rounds a restored guest must print, all ok and counting on
MEM_PAGES = (256 << 20) // PAGE
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def template(real_vmm: None, tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    return take_snapshot(tmp_path_factory.mktemp("template"), CONFIG)


@pytest.fixture(scope="module")
def store(template: Snapshot, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template packed raw as "vm", its vmstate as the snapfile."""
    store = tmp_path_factory.mktemp("store") / "store"
    done = fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
                  "--name", "vm", "--quiet")
    assert done.returncode == 0, done.stderr
    return store


def stats_of(path: Path) -> dict[str, Any]:
    stats = json.loads(path.read_text())
    assert stats["exit_reason"] == "vm exited", stats
    return stats


def serve(template: Snapshot, store: Path | str, tmp_path: Path, *args: str | Path,
          vm: str = "vm", env: dict[str, str] | None = None) -> dict[str, Any]:
    """`fcsnap restore ARGS --firecracker-api` of `vm` to a new Firecracker: the guest must go
    on from the template's last round; restore must exit 0 once the VM is gone. Its stats."""
    stats = tmp_path / "stats.json"
    with Firecracker(tmp_path, "clone") as fc, RestoreProcess(
            tmp_path / "uffd.sock", "--vm", vm, "--store", store, "--stats", stats,
            "--firecracker-api", fc.api_socket, *args, loaded=True, env=env) as server:
        fc.expect_progress(template.last_round, ROUNDS)
        fc.kill()
        assert server.finish() == 0, server.tail()
    return stats_of(stats)


@pytest.mark.parametrize("option", ["--eager", "--populate", "--fault-around=0"])
def test_restore_options(template: Snapshot, store: Path, tmp_path: Path, option: str
                         ) -> None:
    """Each way of installing pages serves the real VM right, and does what it says: --eager
    installs every page before the guest runs, --populate installs the rest in the
    background, --fault-around 0 installs one page a fault."""
    stats = serve(template, store, tmp_path, option)
    installed = stats["pages_served"]  # zero pages among them
    if option == "--eager":  # a fault can only find its page there already
        assert installed == MEM_PAGES and stats["faults"] == stats["already_present"], stats
    elif option == "--populate":
        assert stats["populated_pages"] > 0, stats
    else:
        assert installed == stats["installs"] == stats["faults"] - stats["already_present"]


def test_recorded_working_set_is_prefetched(template: Snapshot, store: Path, tmp_path: Path
                                            ) -> None:
    """`--record-ws` of one run, then `--prefetch-ws` of it: the guest goes on both times and
    the second takes most of its pages before it asks for them."""
    ws = tmp_path / "vm.ws"
    (tmp_path / "record").mkdir()
    recorded = serve(template, store, tmp_path / "record", "--record-ws", ws)
    assert ws.stat().st_size > 0
    (tmp_path / "prefetch").mkdir()
    prefetched = serve(template, store, tmp_path / "prefetch", "--prefetch-ws", ws)
    assert prefetched["prefetched_pages"] >= CONFIG.ws, prefetched
    assert prefetched["faults"] < recorded["faults"] / 2, (recorded, prefetched)


def test_full_snapshot_of_a_restored_vm_and_its_diff(template: Snapshot, store: Path,
                                                     tmp_path: Path) -> None:
    """A VM restored lazily is snapshotted Full (Firecracker reads all of its memory, which
    fcsnap serves); `diff` stores only what changed since the template, and the new build,
    restored, goes on from the second snapshot."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    vmstate, mem, last = snapshot_a_restore(template, store, first, ROUNDS)
    done = fcsnap("diff", mem, "--base", "vm", "--vmstate", vmstate, "--store", store,
                  "--name", "gen1", "--json")
    assert done.returncode == 0, done.stderr
    build = store / json.loads(done.stdout)["build_id"]
    assert (build / DIFF_RAW).stat().st_size < CONFIG.fill * PAGE // 2  # the changed pages
    second.mkdir()
    gen1 = Snapshot(vmstate, mem, "Full", last, CONFIG, 256, None)
    stats = serve(gen1, store, second, vm="gen1")
    assert len(stats["per_build_pages"]) == 2, stats


def test_four_clones_on_the_daemon_at_once(template: Snapshot, store: Path, tmp_path: Path
                                           ) -> None:
    """Four Firecrackers load one template from the daemon at once (`restore --daemon
    --firecracker-api` each, started together): all four go on, and while they run the
    daemon lists them serving, with no exit reason yet."""
    with Daemon(store, tmp_path) as daemon:
        vms = [Firecracker(tmp_path, f"clone{i}").start() for i in range(4)]
        try:
            ids: dict[int, str] = {}
            errors: list[BaseException] = []

            def ask(i: int) -> None:
                try:
                    ids[i] = daemon.restore("vm", tmp_path / f"clone{i}.sock",
                                            "--firecracker-api", str(vms[i].api_socket))
                except BaseException as e:  # noqa: BLE001 (raised below)
                    errors.append(e)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            assert not errors, errors
            for vm in vms:
                vm.expect_progress(template.last_round, ROUNDS)
            status, listed = call_daemon(daemon.api, "GET", "/restores", None, WAIT)
            live = {r["id"]: r for r in listed}
            assert status == 200 and set(live) == set(ids.values())
            assert {(r["state"], r["exit_reason"]) for r in live.values()} == {
                ("serving", None)}
        finally:
            for vm in vms:
                vm.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_server_stopped_or_killed_under_a_running_vm(template: Snapshot, store: Path,
                                                     tmp_path: Path, signum: int) -> None:
    """The server ended while the guest still needs pages: on SIGTERM restore kills the VM
    itself and exits 0; on SIGKILL its watchdog kills it. Never a VM left frozen."""
    with Firecracker(tmp_path, "clone") as fc, RestoreProcess(
            tmp_path / "uffd.sock", "--vm", "vm", "--store", store, "--firecracker-api",
            fc.api_socket, loaded=True) as server:
        fc.expect_progress(template.last_round, 2)
        assert server.proc is not None and fc.proc is not None
        server.proc.send_signal(signum)
        assert fc.proc.wait(WAIT) == KILLED
        assert server.finish() == (0 if signum == signal.SIGTERM else KILLED)


def test_restore_killed_while_opening_its_build(template: Snapshot, store: Path,
                                               tmp_path: Path) -> None:
    """kill -9 of restore while it opens its build, Firecracker loading the snapshot from its
    socket meanwhile: the VM waits in its first fault, and restore's watchdog kills it."""
    sock = tmp_path / "uffd.sock"
    with Firecracker(tmp_path, "clone") as fc, RestoreProcess(
            sock, "--vm", "vm", "--store", store, env=stopping_at("lineage"),
            socket_only=True) as server:
        assert server.proc is not None and fc.proc is not None

        def load() -> None:  # it may never answer (its memory is not served), or die first
            with contextlib.suppress(Exception):
                fc.load(template.vmstate, uffd=sock)

        threading.Thread(target=load, daemon=True).start()
        wait_for(lambda: in_a_fault(fc.proc.pid), "Firecracker to wait in a fault")
        server.proc.kill()
        assert fc.proc.wait(WAIT) == KILLED


def damaged_store(store: Path, tmp_path: Path) -> Path:
    """A copy of `store` with one byte flipped in the tag word of the page the guest checks
    first every round."""
    copy = tmp_path / "store"
    shutil.copytree(store, copy, symlinks=True)
    build = copy / (copy / "vms" / "vm").read_text().strip()
    offset = FILL_BASE + 3  # in the tag word of the first page of the working set
    mapping = next(m for m in load_header(build).mappings if m.offset <= offset < m.end)
    assert not mapping.is_zero
    path = copy / str(mapping.build_id) / DIFF_RAW
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(mapping.storage_offset + offset - mapping.offset)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    return copy


def test_damaged_block_with_and_without_verify(template: Snapshot, store: Path,
                                               tmp_path: Path) -> None:
    """A flipped byte in a stored block: with --verify restore refuses the block, kills the
    VM and exits 1 with one line; without it the guest gets the page and sees it wrong."""
    damaged = damaged_store(store, tmp_path)
    page = FILL_BASE
    (tmp_path / "verify").mkdir()
    with Firecracker(tmp_path / "verify", "clone") as fc, RestoreProcess(
            tmp_path / "verify" / "uffd.sock", "--vm", "vm", "--store", damaged, "--verify",
            "--firecracker-api", fc.api_socket) as server:
        assert server.finish() == 1, server.tail()
        assert fc.proc is not None and fc.proc.wait(WAIT) == KILLED
        assert "does not match its hash" in server.tail()
        assert not any(r.number > template.last_round + 1 for r in fc.rounds())
    (tmp_path / "plain").mkdir()
    with Firecracker(tmp_path / "plain", "clone") as fc, RestoreProcess(
            tmp_path / "plain" / "uffd.sock", "--vm", "vm", "--store", damaged,
            "--firecracker-api", fc.api_socket, loaded=True), pytest.raises(
                GuestError, match=f"BAD page={page:#x}"):
        fc.expect_progress(template.last_round, 2)


def test_build_in_s3(template: Snapshot, bucket: Any, tmp_path: Path) -> None:
    """`pack` to an S3 store (SeaweedFS, or CI's endpoint), then `restore` from the bucket
    through the host chunk cache: the guest goes on."""
    done = subprocess.run(
        [sys.executable, "-m", "fcsnap", "pack", "--init", str(template.mem), "--vmstate",
         str(template.vmstate), "--store", bucket.url(), "--name", "vm", "--quiet"],
        capture_output=True, text=True, env=bucket.env, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr
    stats = serve(template, bucket.url(), tmp_path, "--cache-dir", tmp_path / "cache",
                  env=bucket.env)
    assert stats["pages_served"] > 0
