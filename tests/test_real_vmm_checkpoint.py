"""The real Firecracker (v1.12.1): a checkpoint of a VM the daemon serves with track_writes.

The guest runs restored from the template, writing as it goes; the caller pauses it, takes the
vmstate from Firecracker (a Diff snapshot into a throwaway memory file: with
enable_diff_snapshots only the pages KVM logged dirty are written, and Firecracker reads none it
never touched), has the daemon checkpoint it (the written pages read from the live VM), and
resumes it. A new Firecracker loading the checkpoint's generation with that vmstate goes on
from the pause. Marked `firecracker` (see tests/test_real_vmm.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import fcsnap

from fcsnap.daemon.client import checkpoint_via_daemon
from fcsnap.testing.fcguest import GuestConfig
from fcsnap.testing.realvmm import Daemon, Firecracker, take_snapshot

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

CONFIG = GuestConfig(fill=2048, ws=1024, sweep=512, write=64, seed=11)
ROUNDS = 3


def test_checkpoint_of_a_running_vm_restores_and_goes_on(tmp_path: Path) -> None:
    template = take_snapshot(tmp_path / "template", CONFIG, mem_mib=64)
    store = tmp_path / "store"
    done = fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
                  "--name", "vm", "--quiet")
    assert done.returncode == 0, done.stderr
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
    again = tmp_path / "again"
    again.mkdir()
    with Daemon(store, again) as daemon, Firecracker(again, "checkpointed") as vm:
        daemon.restore("vm-cp", again / "uffd.sock")
        vm.load(vmstate, uffd=again / "uffd.sock")
        vm.expect_progress(last, ROUNDS)


def test_daemon_pauses_and_resumes_through_firecracker_api(tmp_path: Path) -> None:
    """A restore given firecracker_api: the checkpoint pauses the VM itself (PATCH /vm) and
    resumes it after; the guest goes on."""
    template = take_snapshot(tmp_path / "template", CONFIG, mem_mib=64)
    store = tmp_path / "store"
    done = fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
                  "--name", "vm", "--quiet")
    assert done.returncode == 0, done.stderr
    with Daemon(store, tmp_path) as daemon, Firecracker(tmp_path, "clone") as vm:
        restore = daemon.restore("vm", tmp_path / "uffd.sock", "--track-writes",
                                 "--firecracker-api", str(vm.api_socket))
        vm.expect_progress(template.last_round, 2)
        answer = checkpoint_via_daemon(daemon.api, restore, "vm-cp")
        assert answer["written_pages"] > 0 and answer["paused_seconds"] > 0
        seen = len(vm.rounds())
        vm.wait_rounds(seen + 2)  # resumed: it goes on
