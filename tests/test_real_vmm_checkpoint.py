"""The real Firecracker (v1.12.1): a checkpoint of a VM the daemon serves with track_writes.

The guest runs restored from the template, writing as it goes; the caller pauses it, takes the
vmstate from Firecracker (a Diff snapshot into a throwaway memory file: with
enable_diff_snapshots only the pages KVM logged dirty are written, and Firecracker reads none it
never touched), has the daemon checkpoint it (the written pages read from the live VM), and
resumes it. A new Firecracker loading the checkpoint's generation with that vmstate goes on
from the pause. Marked `firecracker` (see tests/test_real_vmm.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import fcsnap

from fcsnap.daemon.client import checkpoint_via_daemon, wait_checkpoint
from fcsnap.testing.fcguest import GuestConfig
from fcsnap.testing.realvmm import (
    Daemon,
    Firecracker,
    Snapshot,
    snapshot_a_restore,
    take_snapshot,
)
from fcsnap.units import PAGE

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

CONFIG = GuestConfig(fill=2048, ws=1024, sweep=512, write=64, seed=11)
ROUNDS = 3


def packed(template: Snapshot, tmp_path: Path) -> Path:
    """A store holding the template's snapshot (memory and vmstate) as `vm`."""
    store = tmp_path / "store"
    done = fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
                  "--name", "vm", "--quiet")
    assert done.returncode == 0, done.stderr
    return store


def goes_on(store: Path, name: str, vmstate: Path, last: int, tmp_path: Path) -> None:
    """The build `name`, served by a daemon to a new Firecracker loading `vmstate`: its guest
    goes on from round `last`, every round ok."""
    again = tmp_path / "again"
    again.mkdir()
    with Daemon(store, again) as daemon, Firecracker(again, name) as vm:
        daemon.restore(name, again / "uffd.sock")
        vm.load(vmstate, uffd=again / "uffd.sock")
        vm.expect_progress(last, ROUNDS)


def test_checkpoint_of_a_running_vm_restores_and_goes_on(tmp_path: Path) -> None:
    template = take_snapshot(tmp_path / "template", CONFIG, mem_mib=64)
    store = packed(template, tmp_path)
    vmstate, throwaway = tmp_path / "cp.state", tmp_path / "cp.mem"
    with Daemon(store, tmp_path) as daemon, Firecracker(tmp_path, "clone") as vm:
        restore = daemon.restore("vm", tmp_path / "uffd.sock", "--track-writes")
        vm.load(template.vmstate, uffd=tmp_path / "uffd.sock", enable_diff_snapshots=True)
        vm.expect_progress(template.last_round, ROUNDS)
        last = vm.pause()
        started = time.monotonic()
        vm.snapshot(vmstate, throwaway, "Diff")
        snapshot_s = time.monotonic() - started
        answer = checkpoint_via_daemon(daemon.api, restore, "vm-cp")
        vm.resume()
        vm.wait_rounds(len(vm.rounds()) + 1)  # the checkpointed VM goes on too
    assert answer["written_pages"] > 0
    print(f"vmstate by Diff snapshot {snapshot_s * 1e3:.1f} ms, checkpoint "
          f"{answer['seconds'] * 1e3:.1f} ms of {answer['written_pages']} pages")
    goes_on(store, "vm-cp", vmstate, last, tmp_path)


def test_daemon_pauses_and_resumes_through_firecracker_api(tmp_path: Path) -> None:
    """A restore given firecracker_api: the checkpoint pauses the VM itself (PATCH /vm) and
    resumes it after (in the background: before the copy); the guest goes on."""
    template = take_snapshot(tmp_path / "template", CONFIG, mem_mib=64)
    store = packed(template, tmp_path)
    with Daemon(store, tmp_path) as daemon, Firecracker(tmp_path, "clone") as vm:
        restore = daemon.restore("vm", tmp_path / "uffd.sock", "--track-writes",
                                 "--firecracker-api", str(vm.api_socket))
        vm.expect_progress(template.last_round, 2)
        answer = checkpoint_via_daemon(daemon.api, restore, "vm-cp")
        assert answer["written_pages"] > 0 and answer["paused_seconds"] > 0
        seen = len(vm.rounds())
        vm.wait_rounds(seen + 2)  # resumed: it goes on
        answer = checkpoint_via_daemon(daemon.api, restore, "vm-bg", True)
        assert answer["state"] == "copying" and answer["paused_seconds"] > 0
        seen = len(vm.rounds())
        assert wait_checkpoint(daemon.api, restore, answer["checkpoint"])["state"] == "done"
        after = vm.wait_rounds(seen + 2)[seen:]  # resumed before the copy: it goes on
        assert all(r.ok for r in after), [r.line for r in after if not r.ok]


BUSY = GuestConfig(fill=2048, ws=1024, sweep=512, write=256, seed=12)
COPY_RATE = 1 << 20  # bytes a second: the copy spans rounds of the guest's writes


def test_background_checkpoint_is_memory_at_the_pause(tmp_path: Path) -> None:
    """The guest resumes before its pages are copied and rewrites many of them during the
    copy (paced by copy_rate), checking its memory each round; the checkpoint, loaded into a
    new Firecracker with the vmstate of the pause, goes on from the pause."""
    template = take_snapshot(tmp_path / "template", BUSY, mem_mib=64)
    store = packed(template, tmp_path)
    vmstate, throwaway = tmp_path / "cp.state", tmp_path / "cp.mem"
    with Daemon(store, tmp_path) as daemon, Firecracker(tmp_path, "clone") as vm:
        restore = daemon.restore("vm", tmp_path / "uffd.sock", "--track-writes")
        vm.load(template.vmstate, uffd=tmp_path / "uffd.sock", enable_diff_snapshots=True)
        vm.expect_progress(template.last_round, ROUNDS)
        last = vm.pause()
        vm.snapshot(vmstate, throwaway, "Diff")
        answer = checkpoint_via_daemon(daemon.api, restore, "vm-cp", True, COPY_RATE)
        vm.resume()
        seen = len(vm.rounds())
        copied = wait_checkpoint(daemon.api, restore, answer["checkpoint"])
        after = vm.wait_rounds(max(len(vm.rounds()), seen + 1) + 1)[seen:]
    assert answer["state"] == "copying" and answer["written_pages"] > 0
    assert copied["preimages"] > 0, copied  # the guest wrote pages before they were copied
    assert all(r.ok for r in after), [r.line for r in after if not r.ok]
    print(f"background checkpoint: {answer['written_pages']} pages, copy "
          f"{copied['copy_seconds'] * 1e3:.0f} ms, {copied['preimages']} pre-images kept")
    goes_on(store, "vm-cp", vmstate, last, tmp_path)


@pytest.mark.parametrize("how", ["faults", "eager"])
def test_full_snapshot_diffed_by_its_written_set_is_byte_exact(tmp_path: Path, how: str
                                                                ) -> None:
    """`restore --written` under the real VM (pages served by faults, or all installed first),
    a Full snapshot at the pause, and `diff --written` of it: the next generation, reading only
    the written pages, unpacks to the snapshot byte for byte, and the VM restored from it goes
    on from the pause."""
    template = take_snapshot(tmp_path / "template", BUSY, mem_mib=64)
    store = packed(template, tmp_path)
    written = tmp_path / "vm.written"
    extra = ("--eager",) if how == "eager" else ()
    vmstate, mem, last = snapshot_a_restore(template, store, tmp_path, ROUNDS, "--written",
                                            written, *extra)
    done = fcsnap("diff", mem, "--base", "vm", "--written", written, "--vmstate", vmstate,
                  "--store", store, "--name", "gen1", "--json")
    assert done.returncode == 0, done.stderr
    build = store / json.loads(done.stdout)["build_id"]
    unpacked = tmp_path / "gen1.unpacked"
    assert fcsnap("unpack", build, "-o", unpacked, "--store", store).returncode == 0
    got, want = unpacked.read_bytes(), mem.read_bytes()
    wrong = [o for o in range(0, len(want), PAGE) if got[o:o + PAGE] != want[o:o + PAGE]]
    assert not wrong, f"{len(wrong)} pages differ, the first at {wrong[0]:#x}"
    goes_on(store, "gen1", vmstate, last, tmp_path)
