"""`POST /restores/ID/checkpoint`: the next generation from the pages the guest wrote, read
from the live VM (process_vm_readv), each checkpoint a diff over the one before holding only
that interval's writes, byte-exact against the guest's memory at that moment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import WAIT, one_build_store, unpacked
from helpers import fcsnap_here as fcsnap  # in this process: the daemon is tested here
from test_daemon import Daemon
from test_write_tracking import restore_writing_end_ws, written, written_set

from fcsnap.daemon.checkpoint import CheckpointRequest, checkpoint
from fcsnap.daemon.client import checkpoint_via_daemon, wait_checkpoint
from fcsnap.daemon.request import RequestError
from fcsnap.daemon.restores import Restore
from fcsnap.errors import FcsnapError
from fcsnap.store.format.layout import build_path, resolve_build
from fcsnap.store.format.manifest import read_manifest
from fcsnap.testing import firecracker
from fcsnap.testing.firecracker_api import RawAnswer, answer
from fcsnap.uffd.fastpath import PURE_PYTHON_ENV
from fcsnap.uffd.regions import Region
from fcsnap.units import PAGE
from fcsnap.workingset import parse_page_set

# The daemon without CAP_SYS_PTRACE (dropped from its bounding set: root keeps the rest).
NO_PTRACE = ("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace")
PYTHON_PATH = ("env", f"{PURE_PYTHON_ENV}=1")  # the daemon serves every fault in Python
MiB = 1 << 20
SIZE = 8 * MiB
# Two regions of 4 MiB: the first interval writes across their border too.
FIRST = [(0, 8 * PAGE), (SIZE // 2 - 2 * PAGE, 4 * PAGE), (6 * MiB, PAGE)]
SECOND = [(4 * PAGE, 8 * PAGE), (3 * MiB, 2 * PAGE)]


def pages(ranges: list[tuple[int, int]]) -> list[int]:
    return sorted({o for start, n in ranges for o in range(start, start + n, PAGE)})


def wait_report(vm, report: Path, key: str) -> None:
    deadline = time.monotonic() + WAIT
    while not report.exists() or not firecracker.read_report(report).get(key):
        assert vm.poll() is None and time.monotonic() < deadline, f"the VM never said {key}"
        time.sleep(0.02)


def test_checkpoints_hold_each_interval_and_unpack_byte_exact(tmp_path: Path) -> None:
    store = one_build_store(tmp_path, SIZE, seed=5)
    memory = bytearray((tmp_path / "vm.mem").read_bytes())
    daemon = Daemon(store, tmp_path, "--output-dir", str(tmp_path))
    try:
        answer = restore_writing_end_ws(daemon, tmp_path)
        report, gate, hold = tmp_path / "vm.json", tmp_path / "gate", tmp_path / "hold"
        vm = firecracker.spawn(tmp_path / "vm.sock", expected=tmp_path / "vm.mem",
                               report=report, threads=2, regions=2, write=FIRST,
                               second_write=SECOND, gate=gate, last_gate=hold, deadline=WAIT)
        url = f"/restores/{answer['id']}/checkpoint"
        builds = []
        for ranges, key, go_on in ((FIRST, "first_write_done", gate),
                                   (SECOND, "second_write_done", hold)):
            wait_report(vm, report, key)
            if not builds:
                status, done = daemon.call("POST", url, {"name": "vm-cp"})
                assert status == 201, done
            else:  # the command line's form
                out = fcsnap("checkpoint", answer["id"], "--daemon", daemon.api,
                             "--name", "vm-cp")
                assert out.returncode == 0, out.stderr
                done = {"build_id": out.stdout.strip(),
                        "written_pages": len(pages(ranges))}
            assert done["written_pages"] == len(pages(ranges))  # this interval's writes only
            for offset in pages(ranges):
                memory[offset:offset + PAGE] = firecracker.written_page(
                    offset, second=ranges is SECOND)
            build = build_path(store, done["build_id"])
            assert unpacked(build, tmp_path) == memory
            assert read_manifest(build).stats.bytes_stored <= len(pages(ranges)) * PAGE
            builds.append(build)
            go_on.touch()
        assert read_manifest(builds[1]).parent_build_id == read_manifest(builds[0]).build_id
        status, error = daemon.call("GET", f"/restores/{answer['id']}/written?new_interval=1")
        assert status == 409 and "out of the next checkpoint" in error["error"]
        assert vm.wait(WAIT) == 0
        daemon.wait_ended(answer["id"])  # the set at the end is against the last checkpoint
        _, left, base = parse_page_set((tmp_path / "end.ws").read_bytes(), "end.ws")
        assert left.tolist() == [] and base == read_manifest(builds[1]).build_id
    finally:
        daemon.close()


def test_checkpoint_refusals(tmp_path: Path) -> None:
    """A restore not tracking writes, a bad body (background's keys too), an unknown restore:
    one line each."""
    store = one_build_store(tmp_path, SIZE, seed=6)
    daemon = Daemon(store, tmp_path)
    try:
        status, answer = daemon.call("POST", "/restores", {
            "vm": "vm", "socket": str(tmp_path / "vm.sock")})
        assert status == 201
        url = f"/restores/{answer['id']}/checkpoint"
        status, error = daemon.call("POST", url, {"name": "x"})
        assert status == 409 and "no VM being served" in error["error"]
        status, error = daemon.call("POST", url, {"nom": "x"})
        assert status == 400 and "the body must be" in error["error"]
        status, error = daemon.call("POST", url, {"name": "../x"})
        assert status == 400
        for body, says in (({"name": "x", "background": 1}, '"background" must be'),
                           ({"name": "x", "background": True, "copy_rate": -1},
                            '"copy_rate" must be'),
                           ({"name": "x", "copy_rate": 5}, 'it needs "background"')):
            status, error = daemon.call("POST", url, body)
            assert status == 400 and says in error["error"], error
        for number in ("1", "9" * 5000):  # none began; one no int holds is none either
            status, error = daemon.call("GET", f"/restores/{answer['id']}/checkpoints/{number}")
            assert status == 404 and "no background checkpoint" in error["error"], error
        out = fcsnap("checkpoint", "nope", "--daemon", daemon.api, "--name", "x")
        assert out.returncode == 1 and out.stderr.splitlines() == [
            "fcsnap: error: the daemon refused the checkpoint: no restore 'nope'"]
        out = fcsnap("checkpoint", answer["id"], "--daemon", daemon.api, "--name", "x",
                     "--copy-rate", "5")
        lines = out.stderr.splitlines()
        assert out.returncode == 2 and len(lines) == 1 and "--background" in lines[0], lines
    finally:
        daemon.close()


@pytest.mark.skipif(shutil.which("setpriv") is None,
                    reason="setpriv (util-linux) drops the daemon's CAP_SYS_PTRACE")
def test_a_refused_read_is_one_line_and_loses_no_write(tmp_path: Path) -> None:
    """A VM the daemon may not read (not dumpable, the daemon without CAP_SYS_PTRACE): one
    line naming the refusal, nothing published, and the written set still holds every page."""
    store = one_build_store(tmp_path, SIZE, seed=7)
    daemon = Daemon(store, tmp_path, prefix=NO_PTRACE)
    try:
        status, answer = daemon.call("POST", "/restores", {
            "vm": "vm", "socket": str(tmp_path / "vm.sock"), "track_writes": True})
        assert status == 201, answer
        report, gate = tmp_path / "vm.json", tmp_path / "gate"
        vm = firecracker.spawn(tmp_path / "vm.sock", expected=tmp_path / "vm.mem",
                               report=report, threads=2, write=FIRST, second_write=SECOND,
                               gate=gate, not_dumpable=True, deadline=WAIT)
        wait_report(vm, report, "first_write_done")
        status, error = daemon.call("POST", f"/restores/{answer['id']}/checkpoint",
                                    {"name": "vm-cp"})
        assert status == 400, error
        assert error["error"].startswith("the kernel refused to read the VM's memory "
                                         "(process_vm_readv on pid"), error
        assert "Operation not permitted" in error["error"]
        assert not (store / "vms" / "vm-cp").exists()
        url = f"/restores/{answer['id']}/written"
        assert written(daemon.api, url) == pages(FIRST)
        assert written(daemon.api, url + "?new_interval=1") == pages(FIRST)
        status, error = daemon.call("POST", f"/restores/{answer['id']}/checkpoint",
                                    {"name": "vm-cp"})
        assert status == 409 and "would miss those pages" in error["error"]
        gate.touch()
        assert vm.wait(WAIT) == 0
    finally:
        daemon.close()


# The background copy reads the run at 0 after 2 s and the one at 6 MiB after 3 s (COPY_RATE):
# meanwhile the guest writes over the second run (and over pages the copy does not hold).
BG_FIRST = [(0, 8 * PAGE), (6 * MiB, 4 * PAGE)]
BG_SECOND = [(6 * MiB, 4 * PAGE), (1 * MiB, 2 * PAGE)]
COPY_RATE = 16 << 10


def first_interval(daemon: Daemon, tmp_path: Path, **vm: Any) -> tuple[str, Any, Path, Path, Path]:
    """A restore with track_writes and its stand-in VM, once the VM has written BG_FIRST and
    waits at its gate (then writes BG_SECOND and waits at the last gate): (the restore's id,
    the VM, its report, its gate, its last gate)."""
    status, answer = daemon.call("POST", "/restores", {
        "vm": "vm", "socket": str(tmp_path / "vm.sock"), "track_writes": True})
    assert status == 201, answer
    report, gate, hold = tmp_path / "vm.json", tmp_path / "gate", tmp_path / "hold"
    proc = firecracker.spawn(tmp_path / "vm.sock", expected=tmp_path / "vm.mem", report=report,
                             threads=2, write=BG_FIRST, second_write=BG_SECOND, gate=gate,
                             last_gate=hold, deadline=WAIT, **vm)
    wait_report(proc, report, "first_write_done")
    return answer["id"], proc, report, gate, hold


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_background_checkpoint_holds_memory_at_the_pause(tmp_path: Path, path: str) -> None:
    """The VM resumes before its pages are copied and writes over some of them: the
    checkpoint still unpacks to memory at the pause (their pre-images kept, by the compiled
    loop or in Python), the pages written during the copy are the next interval's, and the
    next checkpoint holds them."""
    store = one_build_store(tmp_path, SIZE, seed=8)
    memory = bytearray((tmp_path / "vm.mem").read_bytes())
    daemon = Daemon(store, tmp_path, prefix=PYTHON_PATH if path == "python" else ())
    try:
        restore, vm, report, gate, hold = first_interval(daemon, tmp_path)
        started = checkpoint_via_daemon(daemon.api, restore, "vm-bg", True, COPY_RATE)
        assert started["state"] == "copying" and started["written_pages"] == len(
            pages(BG_FIRST))
        gate.touch()
        status, error = daemon.call("POST", f"/restores/{restore}/checkpoint", {"name": "x"})
        assert status == 409 and "being checkpointed already" in error["error"]
        wait_report(vm, report, "second_write_done")
        status, document = daemon.call("GET", f"/restores/{restore}")
        assert document["last_checkpoint"]["state"] == "copying"  # written during the copy
        _, during = written_set(daemon.api, f"/restores/{restore}/written")
        done = wait_checkpoint(daemon.api, restore, started["checkpoint"], WAIT)
        assert str(during) == done["build_id"]  # against the checkpoint from its take on
        for offset in pages(BG_FIRST):
            memory[offset:offset + PAGE] = firecracker.written_page(offset)
        assert unpacked(build_path(store, done["build_id"]), tmp_path) == memory
        assert done["preimages"] == 4, done  # the run at 6 MiB, written before it was read
        url = f"/restores/{restore}/written"
        assert written(daemon.api, url, done["build_id"]) == pages(BG_SECOND)
        out = fcsnap("checkpoint", restore, "--daemon", daemon.api, "--name", "vm-bg",
                     "--background")
        assert out.returncode == 0, out.stderr
        for offset in pages(BG_SECOND):
            memory[offset:offset + PAGE] = firecracker.written_page(offset, second=True)
        assert unpacked(build_path(store, out.stdout.strip()), tmp_path) == memory
        # the first client, asking after the second checkpoint ended, gets its own
        mine = wait_checkpoint(daemon.api, restore, started["checkpoint"], WAIT)
        assert mine["build_id"] == done["build_id"] != out.stdout.strip()
        later = started["checkpoint"] + 1
        assert daemon.call("GET", f"/restores/{restore}/checkpoints/{later}")[1][
            "build_id"] == out.stdout.strip()
        status, error = daemon.call("GET", f"/restores/{restore}/checkpoints/{later + 1}")
        assert status == 404 and "no background checkpoint" in error["error"]
        hold.touch()
        assert vm.wait(WAIT) == 0
    finally:
        daemon.close()


@pytest.mark.skipif(shutil.which("setpriv") is None,
                    reason="setpriv (util-linux) drops the daemon's CAP_SYS_PTRACE")
def test_a_failed_background_copy_publishes_nothing_and_the_vm_goes_on(tmp_path: Path
                                                                      ) -> None:
    """The copy the kernel refuses (after the VM resumed), pre-images too: the checkpoint
    fails with one line, nothing is published, the VM writes over pending pages unfrozen,
    and no write is lost."""
    store = one_build_store(tmp_path, SIZE, seed=9)
    daemon = Daemon(store, tmp_path, prefix=NO_PTRACE)
    try:
        restore, vm, report, gate, hold = first_interval(daemon, tmp_path, not_dumpable=True)
        started = checkpoint_via_daemon(daemon.api, restore, "vm-bg", True, COPY_RATE)
        gate.touch()
        wait_report(vm, report, "second_write_done")  # over pages whose pre-image is refused
        status, document = daemon.call("GET", f"/restores/{restore}")
        assert document["last_checkpoint"]["state"] == "copying"
        with pytest.raises(FcsnapError, match="the kernel refused to read the VM's memory"):
            wait_checkpoint(daemon.api, restore, started["checkpoint"], WAIT)
        assert not (store / "vms" / "vm-bg").exists()
        url = f"/restores/{restore}/written"
        served = (store / "vms" / "vm").read_text().strip()  # against it again: nothing made
        assert written(daemon.api, url, served) == pages(BG_FIRST + BG_SECOND)
        out = fcsnap("checkpoint", restore, "--daemon", daemon.api, "--name", "vm-bg",
                     "--background")
        assert out.returncode == 1 and out.stderr.startswith(
            "fcsnap: error: the checkpoint 'vm-bg' failed: the kernel refused to read the "
            "VM's memory") and len(out.stderr.splitlines()) == 1, out.stderr
        assert written(daemon.api, url) == pages(BG_FIRST + BG_SECOND)
        hold.touch()
        assert vm.wait(WAIT) == 0
    finally:
        daemon.close()


@pytest.mark.skipif(shutil.which("setpriv") is None,
                    reason="setpriv (util-linux) drops the daemon's CAP_SYS_PTRACE")
def test_a_new_interval_during_a_copy_that_fails_names_no_build(tmp_path: Path) -> None:
    """A client's new interval while a background copy goes on, the copy then failing: the
    pages it gives back are not all the set lacks against the build served (the client took
    some), so the set names no build rather than that one."""
    store = one_build_store(tmp_path, SIZE, seed=13)
    daemon = Daemon(store, tmp_path, prefix=NO_PTRACE)
    try:
        restore, vm, report, gate, hold = first_interval(daemon, tmp_path, not_dumpable=True)
        started = checkpoint_via_daemon(daemon.api, restore, "vm-bg", True, COPY_RATE)
        url = f"/restores/{restore}/written"
        assert written(daemon.api, url + "?new_interval=1") == []
        gate.touch()
        wait_report(vm, report, "second_write_done")  # the client's interval holds these
        with pytest.raises(FcsnapError, match="the kernel refused to read the VM's memory"):
            wait_checkpoint(daemon.api, restore, started["checkpoint"], WAIT)
        assert written_set(daemon.api, url)[1] is None
        hold.touch()
        assert vm.wait(WAIT) == 0
    finally:
        daemon.close()


def served(store: Path) -> Any:
    """What a Restore keeps of the build it serves (SharedBuild's build_dir and build_id)."""
    build_dir = resolve_build("vm", store)
    return SimpleNamespace(build_dir=build_dir, build_id=uuid.UUID(build_dir.name))


class RacingSession:
    """A served restore's session whose reactor, asked for its first take, first runs a
    `GET written?new_interval=1` that came in meanwhile (another client's request)."""

    def __init__(self, size: int) -> None:
        self.peer = SimpleNamespace(pid=os.getpid(), pidfd=os.open("/", os.O_RDONLY),
                                    regions=[])
        self.installer = SimpleNamespace(states={})
        self.header = SimpleNamespace(metadata=SimpleNamespace(size=size, build_id=None))
        self.written_base = None
        self.restore: Restore | None = None
        self.raced = False
        self.given_back: list[list[int]] = []

    def call(self, fn: Any, timeout: float) -> Any:
        if not self.raced:
            self.raced = True
            assert self.restore is not None
            self.restore.written(True)  # reaches the reactor just before the checkpoint's take
        return fn()

    def take_written(self, new_interval: bool) -> tuple[np.ndarray, int]:
        return np.array([0], np.int64), 1

    def take_for_copy(self, preimages: Any) -> tuple[np.ndarray, int, np.ndarray]:
        return (*self.take_written(True), np.array([0], np.int64))

    def end_copy(self) -> None:
        pass

    def give_back_written(self, offsets: np.ndarray) -> None:
        self.given_back.append(list(offsets))


@pytest.mark.parametrize("background", [False, True])
def test_a_new_interval_taken_as_a_checkpoint_starts_refuses_the_checkpoint(
        tmp_path: Path, background: bool) -> None:
    """GET written?new_interval=1 arriving after a checkpoint's checks but before its take:
    the checkpoint would miss the pages that take emptied out of the set, so it is refused
    on the serving thread, with the take, not published."""
    store = one_build_store(tmp_path, SIZE, seed=10)
    session = RacingSession(SIZE)
    restore = Restore("r", "vm", session, served(store), None)  # type: ignore[arg-type]
    session.restore = restore
    try:
        with pytest.raises(RequestError, match="would miss those pages") as refused:
            checkpoint(restore, store, CheckpointRequest("vm-cp", background))
        assert refused.value.status == 409
        assert not (store / "vms" / "vm-cp").exists()
        assert not restore.checkpointing.locked() and session.given_back == []
    finally:
        os.close(session.peer.pidfd)


class StalledSession(RacingSession):
    """A served restore's session whose reactor does not answer one call in time: the one
    that gives a failed checkpoint's pages back."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.calls = 0

    def call(self, fn: Any, timeout: float) -> Any:
        self.calls += 1
        if self.calls == 2:
            raise FcsnapError(f"the restore's server did not answer within {timeout:g}s")
        return fn()


def test_pages_a_failed_checkpoint_cannot_give_back_refuse_what_would_miss_them(
        tmp_path: Path) -> None:
    """A checkpoint fails after its take (here: its reads) and the serving thread does not
    take its pages back in time: the written set misses them from then on, so the next
    checkpoint and GET written are refused rather than missing them."""
    store = one_build_store(tmp_path, SIZE, seed=11)
    session = StalledSession(SIZE)
    restore = Restore("r", "vm", session, served(store), None)  # type: ignore[arg-type]
    try:
        with pytest.raises(FcsnapError, match="none of the VM's regions"):
            checkpoint(restore, store, CheckpointRequest("vm-cp"))
        assert session.given_back == []  # the call that would have given them back stalled
        for attempt in (lambda: checkpoint(restore, store, CheckpointRequest("vm-cp")),
                        lambda: restore.written(False)):
            with pytest.raises(RequestError, match="could not give its pages back") as refused:
                attempt()
            assert refused.value.status == 409
        assert not (store / "vms" / "vm-cp").exists()
    finally:
        os.close(session.peer.pidfd)


class ExitingSession(RacingSession):
    """A served restore's session whose VM (and with it Firecracker's API) is gone by the
    time the checkpoint takes its written set."""

    def __init__(self, size: int, api: RawAnswer) -> None:
        super().__init__(size)
        gone = subprocess.Popen(["true"])
        gone.wait()
        self.peer.pid = gone.pid
        self.peer.regions = [Region(base=1 << 30, size=size, offset=0, page_size=PAGE)]
        self.api = api

    def call(self, fn: Any, timeout: float) -> Any:
        self.api.close()  # the pause was answered; Firecracker has exited since
        return fn()


def test_a_vm_exiting_during_a_checkpoint_is_the_error_not_the_resume(tmp_path: Path
                                                                      ) -> None:
    """The daemon paused the VM through its API and the VM exits mid-checkpoint: the answer
    says the VM exited, and is not replaced by the failure to resume it."""
    store = one_build_store(tmp_path, SIZE, seed=12)
    api = RawAnswer(tmp_path / "fc.api", b"".join(answer(204)), piece=1 << 16, close=True)
    session = ExitingSession(SIZE, api)
    restore = Restore("r", "vm", session, served(store),
                      SimpleNamespace(api_socket=tmp_path / "fc.api"))  # type: ignore[arg-type]
    try:
        with pytest.raises(FcsnapError) as failed:
            checkpoint(restore, store, CheckpointRequest("vm-cp"))
        assert str(failed.value) == f"the VM (pid {session.peer.pid}) has exited"
        assert api.request is not None and json.loads(api.request.body) == {"state": "Paused"}
        assert not (store / "vms" / "vm-cp").exists()
    finally:
        os.close(session.peer.pidfd)


def test_a_daemon_that_numbers_no_checkpoint_is_one_line(tmp_path: Path) -> None:
    """A daemon older than the client answers a background checkpoint without its number:
    `fcsnap checkpoint --background` says so in one line (exit 1), not an internal error."""
    head, body = answer(202, {"name": "vm-bg", "state": "copying"})
    daemon = RawAnswer(tmp_path / "api.sock", head + body, piece=1 << 16, close=True)
    out = fcsnap("checkpoint", "r1", "--daemon", tmp_path / "api.sock", "--name", "vm-bg",
                 "--background")
    daemon.thread.join(WAIT)
    assert out.returncode == 1 and out.stderr.splitlines() == [
        "fcsnap: error: the daemon's answer numbers no checkpoint, so its end cannot be "
        "waited for (a daemon older than this fcsnap?)"], out.stderr
