"""The reactor (fcsnap/uffd/reactor.py): many sessions on one epoll fd and one thread.

Real parts: stand-in VMs (their own processes) with real userfaultfd, builds in a real store,
every byte compared with the memory file. One reactor thread serves VMs of raw builds (the
compiled wait) and of zstd builds and --verify (Python) at once, with --populate, --eager and
--prefetch-ws among them, beside a VM killed while served, a bad handshake, a silent peer with
a short handshake deadline and one with a long one: none of them holds up the others. The
daemon keeps its reactor pool's threads whatever the number of VMs. Every wait has a deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_for
from test_daemon import SIZE, Build, Daemon, store  # noqa: F401  (the store fixture)
from test_restore_faults import KILLED, WAIT

from fcsnap.daemon.restores import Restores
from fcsnap.header import ZEROS
from fcsnap.testing import firecracker
from fcsnap.uffd import fastpath
from fcsnap.uffd.reactor import Reactor
from fcsnap.uffd.session import ServeOptions, Session
from fcsnap.uffd.shared import SharedBuild
from fcsnap.uffd.watchdog import Watchdog
from fcsnap.units import PAGE
from fcsnap.workingset import write_working_set

# name: (build, session options, stand-in options)
SESSIONS = {
    "raw": ("raw", {}, {}),
    "raw-populate": ("raw", {"populate": True}, {}),
    "raw-eager": ("raw", {"eager": True}, {}),
    "raw-prefetch": ("raw", {"prefetch_ws": True}, {}),
    "zstd": ("zstd", {}, {}),
    "zstd-page": ("zstd", {"fault_around": 0}, {}),
    "verify": ("raw", {"verify": True}, {}),
    "killed": ("raw", {}, {"start_delay": WAIT, "hold": WAIT}),
    "garbage": ("raw", {}, {"misbehave": "garbage"}),
    "late": ("raw", {"handshake_timeout": 1.0}, {"misbehave": "nothing"}),
    "silent": ("raw", {"handshake_timeout": 4 * WAIT}, {"misbehave": "nothing"}),
}
GOOD = [name for name, (_, _, vm) in SESSIONS.items() if not vm]


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve through the compiled path or the Python one, whatever the environment says."""
    if path == "python":
        monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1")
    elif fastpath.lib is None:
        pytest.skip("the compiled fault path is not built (no C compiler)")
    else:
        monkeypatch.delenv(fastpath.PURE_PYTHON_ENV, raising=False)


class Ended:
    """What each session ended with, as the reactor reports it."""

    def __init__(self) -> None:
        self.errors: dict[str, BaseException | None] = {}
        self.lock = threading.Lock()

    def callback(self, name: str):  # noqa: ANN201
        def on_end(_session: Session, error: BaseException | None) -> None:
            with self.lock:
                self.errors[name] = error
        return on_end

    def wait(self, names: list[str], timeout: float = WAIT) -> None:
        wait_for(lambda: all(n in self.errors for n in names), f"sessions {names} to end",
                 timeout)


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_one_reactor_thread_serves_many_vms_at_once(store, tmp_path: Path, path: str,  # noqa: F811
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root, builds = store
    use_path(path, monkeypatch)
    ws = tmp_path / "ws"  # the first and the last quarter of the guest, in that order
    write_working_set(ws, SIZE, dict.fromkeys(
        [*range(0, SIZE // 4, PAGE), *range(3 * SIZE // 4, SIZE, PAGE)]))
    shared = {name: SharedBuild(root / b.build_id, 8 << 20) for name, b in builds.items()}
    watchdog = Watchdog.start()
    reactor = Reactor()
    thread = threading.Thread(target=reactor.run, name="the-reactor", daemon=True)
    ended = Ended()
    sessions: dict[str, Session] = {}
    vms: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (build, options, _) in SESSIONS.items():
            options = {**options, "prefetch_ws": ws} if "prefetch_ws" in options else options
            session = Session(shared[build], ServeOptions(
                socket=tmp_path / f"{name}.sock", stats_path=tmp_path / f"{name}.stats",
                watchdog=watchdog, **options), vm_id=name)
            session.listen()
            sessions[name] = session
            reactor.add(session, ended.callback(name))
        thread.start()
        for name, (build, _, vm) in SESSIONS.items():
            vms[name] = firecracker.spawn(
                tmp_path / f"{name}.sock", expected=builds[build].expected,
                report=tmp_path / f"{name}.json", deadline=WAIT, threads=2, order="random",
                popen={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}, **vm)
        wait_for(lambda: sessions["killed"].state == "serving", "the VM to kill to be served")
        vms["killed"].kill()
        for name in GOOD:  # all of them while a peer stays silent on the same thread
            assert vms[name].wait(WAIT) == 0, name
            report = firecracker.read_report(tmp_path / f"{name}.json")
            assert report["mismatches"] == 0 and report["pages_touched"] == SIZE // PAGE
        ended.wait([*GOOD, "killed", "garbage", "late"])
        for name in [*GOOD, "killed"]:
            assert ended.errors[name] is None, (name, ended.errors[name])
            assert sessions[name].exit_reason == "vm exited"
        assert sessions["raw-populate"].stats.populated_pages > 0
        assert sessions["raw-prefetch"].stats.prefetched_pages > 0
        assert sessions["raw"].stats.compiled_faults == 0 if path == "python" else (
            sessions["raw"].stats.compiled_faults > 0)
        assert str(ended.errors["garbage"]).startswith("handshake is not a JSON region array")
        assert str(ended.errors["late"]) == (
            "the VM connected but did not send its handshake in 1s")
        for name in ("garbage", "late"):
            assert vms[name].wait(WAIT) == KILLED  # connected and not served: killed
        assert "silent" not in ended.errors and sessions["silent"].state == "listening"
        sessions["silent"].stop()
        ended.wait(["silent"])
        assert ended.errors["silent"] is None
        assert sessions["silent"].exit_reason == "stopped before a VM was served"
        assert vms["silent"].wait(WAIT) == KILLED
        for name in SESSIONS:  # stats written on every way out, sockets gone
            assert (tmp_path / f"{name}.stats").is_file(), name
            assert not (tmp_path / f"{name}.sock").exists(), name
        reactor.shutdown()
        thread.join(WAIT)
        assert not thread.is_alive()
    finally:
        for session in sessions.values():
            session.stop()
        reactor.shutdown()
        thread.join(WAIT)
        for vm in vms.values():
            if vm.poll() is None:
                vm.kill()
            vm.wait(WAIT)
        if not thread.is_alive():
            reactor.close()
        watchdog.close()
        for build in shared.values():
            build.close()


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_stats_are_current_while_the_vm_sits_idle(store, tmp_path: Path, path: str,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM that touched all its memory and then does nothing: the live stats (a daemon's
    GET /restores/ID) show every page served within moments, not at the VM's exit."""
    root, builds = store
    use_path(path, monkeypatch)
    build = SharedBuild(root / builds["raw"].build_id, 8 << 20)
    reactor = Reactor()
    thread = threading.Thread(target=reactor.run, daemon=True)
    ended = Ended()
    session = Session(build, ServeOptions(socket=tmp_path / "vm.sock", fault_around=0))
    vm = None
    try:
        session.listen()
        reactor.add(session, ended.callback("vm"))
        thread.start()
        report = tmp_path / "vm.json"
        vm = firecracker.spawn(tmp_path / "vm.sock", expected=builds["raw"].expected,
                               report=report, deadline=WAIT, threads=1, hold=WAIT,
                               popen={"stdout": subprocess.DEVNULL})
        wait_for(report.exists, "the VM to touch all its memory")
        assert firecracker.read_report(report)["mismatches"] == 0
        wait_for(lambda: session.document()["pages_served"] == SIZE // PAGE,
                 "the live stats to show every page", 2.0)
        assert session.state == "serving"
        session.stop()
        ended.wait(["vm"])
        assert ended.errors["vm"] is None and session.exit_reason == "signal"
        time.sleep(0.2)
        assert vm.poll() is None  # every page was in: a stop leaves it running
    finally:
        session.stop()
        reactor.shutdown()
        thread.join(WAIT)
        if vm is not None and vm.poll() is None:
            vm.kill()
            vm.wait(WAIT)
        if not thread.is_alive():
            reactor.close()
        build.close()


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_daemon_keeps_its_reactor_pool_for_sixteen_vms(store, tmp_path: Path) -> None:  # noqa: F811
    """16 VMs served at once by a daemon with 2 reactors: it has no more threads than when
    idle (not one per VM), and every VM gets every byte right."""
    root, builds = store
    daemon = Daemon(root, tmp_path, "--reactors", "2")
    try:
        assert daemon.call("GET", "/healthz")[0] == 200
        idle = threads(daemon.proc.pid)
        ids = [daemon.restore("raw" if i % 2 else "zstd", f"vm{i}")["id"] for i in range(16)]
        gate = tmp_path / "start-gate"  # touching starts once all are served
        vms: dict[str, tuple[Build, subprocess.Popen[bytes]]] = {}
        for i in range(16):
            build = builds["raw" if i % 2 else "zstd"]
            vms[f"vm{i}"] = build, daemon.vm(f"vm{i}", build, threads=2, order="random",
                                             start_gate=gate)

        def all_serving() -> bool:
            return all(daemon.call("GET", f"/restores/{i}")[1]["state"] == "serving"
                       for i in ids)

        wait_for(all_serving, "all 16 VMs to be served", WAIT / 3)
        gate.touch()
        wait_for(lambda: threads(daemon.proc.pid) <= idle, "the API's threads to end")
        for name, (_build, vm) in vms.items():
            assert vm.wait(WAIT) == 0, (name, daemon.report(name))
            report = daemon.report(name)
            assert report is not None and report["mismatches"] == 0
            assert report["pages_touched"] == SIZE // PAGE
        for restore_id in ids:
            assert daemon.wait_ended(restore_id)["exit_reason"] == "vm exited"
        code, _ = daemon.stop()
        assert code == 0
    finally:
        daemon.close()


def test_daemon_places_each_restore_on_the_least_loaded_reactor(store, tmp_path: Path  # noqa: F811
                                                                 ) -> None:
    """Restores spread evenly over the pool; a DELETE frees its reactor's place."""
    root, _ = store
    watchdog = Watchdog.start()
    restores = Restores(root, 8 << 20, watchdog, reactors=3)
    try:
        started = [restores.start({"vm": "raw", "socket": str(tmp_path / f"{i}.sock")})
                   for i in range(6)]
        assert [r.load for r in restores.reactors] == [2, 2, 2]
        assert restores.end(started[0])
        assert sorted(r.load for r in restores.reactors) == [1, 2, 2]
        started.append(restores.start({"vm": "raw", "socket": str(tmp_path / "6.sock")}))
        assert [r.load for r in restores.reactors] == [2, 2, 2]
    finally:
        restores.stop_all()
        watchdog.close()
    assert all(r.ended.is_set() for r in started)
    assert restores.ended_by_reason == {"stopped_before_a_VM_was_served": 7}


def test_serve_refuses_no_reactors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fcsnap", "serve", "--store", str(tmp_path), "--api",
         str(tmp_path / "api.sock"), "--reactors", "0"], capture_output=True, text=True,
        timeout=WAIT)
    assert result.returncode == 2
    assert "--reactors" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "api.sock").exists()


@dataclass
class Listening:
    """One session of the raw build, listening, handed to a reactor whose thread is not yet
    started (`thread.start()` starts serving)."""

    build: SharedBuild
    session: Session
    reactor: Reactor
    thread: threading.Thread


@pytest.fixture
def listening(store, tmp_path: Path) -> Iterator[Listening]:  # noqa: F811
    root, builds = store
    build = SharedBuild(root / builds["raw"].build_id, 8 << 20)
    reactor = Reactor()
    parts = Listening(build, Session(build, ServeOptions(socket=tmp_path / "vm.sock")), reactor,
                      threading.Thread(target=reactor.run, daemon=True))
    try:
        assert build.parsed().arrays is None  # nothing made before it listens
        parts.session.listen()
        reactor.add(parts.session, Ended().callback("vm"))
        yield parts
    finally:
        parts.session.stop()
        reactor.shutdown()
        if parts.thread.ident is not None:  # started
            parts.thread.join(WAIT)
        if not parts.thread.is_alive():
            reactor.close()
        build.close()


def test_a_listening_session_has_its_mapping_arrays_made_before_a_vm_connects(
        listening: Listening) -> None:
    """Once a session listens, its build's mapping arrays are made on a thread, with no VM
    connected: a VM that connects at once does not make its first fault (and so Firecracker's
    load call) wait for them. They are what each mapping says."""
    build = listening.build
    listening.thread.start()
    wait_for(lambda: build.parsed().arrays is not None, "the mapping arrays", WAIT)
    assert listening.session.state == "listening"
    starts, storage, owner = build.parsed().arrays
    mappings = build.header.mappings
    number = {b: i for i, b in enumerate(build.diffs)}
    assert starts.tolist() == [m.offset for m in mappings]
    assert storage.tolist() == [m.storage_offset for m in mappings]
    assert owner.tolist() == [ZEROS if m.is_zero else number[m.build_id] for m in mappings]
    assert ZEROS in owner.tolist() and 0 in owner.tolist()  # zero and stored mappings


def test_a_call_made_before_the_reactor_adopts_a_session_waits_for_it(
        listening: Listening) -> None:
    """The daemon answers `POST /restores` once the session is handed to a reactor, which
    adopts it on its own thread a moment later: a request about that restore in between (its
    written set, a checkpoint) is run once the reactor has adopted it, not refused."""
    answers: list = []
    session = listening.session  # handed over, not adopted: the reactor is not running
    asking = threading.Thread(target=lambda: answers.append(session.call(lambda: 42, WAIT)))
    asking.start()
    listening.thread.start()
    asking.join(WAIT)
    assert answers == [42]
