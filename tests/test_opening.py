"""restore listens before it opens its build (fcsnap/uffd/opening.py): a VM that connects
meanwhile is never left hanging. Each test holds the opening until the VM is queued on the
socket, so the VM surely connected before the build was known good or bad."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, Processes, in_a_fault, one_build_store, wait_for
from store_procs import start_stopped

from fcsnap import api
from fcsnap.errors import FcsnapError
from fcsnap.store.backends import stores
from fcsnap.testing import firecracker
from fcsnap.uffd import opening

KILLED = -signal.SIGKILL
SIZE = 256 << 10


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_build_store(tmp_path_factory.mktemp("opening"), SIZE, seed=3)


@pytest.fixture
def procs() -> Any:
    p = Processes()
    yield p
    p.close()


def stand_in_vm(sock: Path) -> subprocess.Popen[bytes]:
    return firecracker.spawn(sock, size=SIZE, deadline=WAIT, hold=WAIT)


def plain_peer(sock: Path) -> subprocess.Popen[bytes]:
    """A process that connects and exits 0 once it is disconnected."""
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            f"s.settimeout({WAIT}); sys.exit(s.recv(1) != b'')")
    return subprocess.Popen([sys.executable, "-c", code, str(sock)])


def hold_opening(monkeypatch: pytest.MonkeyPatch, sock: Path, procs: Processes,
                 then: Callable[[], Any], peer: Callable[[Path], subprocess.Popen[bytes]]
                 = stand_in_vm) -> list[subprocess.Popen[bytes]]:
    """Make the build's opening start a peer (a stand-in VM), wait until it is queued on the
    socket (the listener readable), then do `then` (fail, or signal) instead of opening."""
    listeners: list[socket.socket] = []
    vms: list[subprocess.Popen[bytes]] = []

    def spying_listen(path: Path, access: Any) -> socket.socket:
        listeners.append(opening_listen(path, access))
        return listeners[-1]

    def held(*_args: Any, **_kwargs: Any) -> Any:
        vms.append(procs.track(peer(sock)))
        readable, _, _ = select.select(listeners, [], [], WAIT)
        assert readable, "the stand-in VM never connected"
        return then()

    opening_listen = opening.listen
    monkeypatch.setattr(opening, "listen", spying_listen)
    monkeypatch.setattr(stores, "serve_source", held)
    return vms


def test_a_build_that_cannot_be_opened_kills_the_vm_that_connected(
        store: Path, tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "uffd.sock"

    def fail() -> None:
        raise FcsnapError("build vm is damaged")

    vms = hold_opening(monkeypatch, sock, procs, fail)
    with pytest.raises(FcsnapError, match="damaged"):
        api.restore("vm", sock, store=store)
    assert vms[0].wait(WAIT) == KILLED  # not left waiting for pages no one serves
    assert not sock.exists()


def test_sigterm_while_opening_is_a_stop(
        store: Path, tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit status 0 as for a stop once serving, with --stats written; the VM queued is
    killed; the caller's signal handlers are back."""
    sock, stats = tmp_path / "uffd.sock", tmp_path / "stats.json"
    before = signal.getsignal(signal.SIGTERM)
    vms = hold_opening(monkeypatch, sock, procs,
                       lambda: os.kill(os.getpid(), signal.SIGTERM))
    served = api.restore("vm", sock, store=store, stats_path=stats)
    assert (served.status, served.exit_reason) == (0, "stopped before a VM was served")
    assert vms[0].wait(WAIT) == KILLED
    assert json.loads(stats.read_text())["pages_served"] == 0
    assert not sock.exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_peer_not_admitted_is_disconnected_not_killed(
        store: Path, tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only admitted uids are taken for the VM; anyone else queued is only disconnected."""
    sock = tmp_path / "uffd.sock"

    def fail() -> None:
        raise FcsnapError("build vm is damaged")

    peers = hold_opening(monkeypatch, sock, procs, fail, plain_peer)
    monkeypatch.setattr(opening.SocketAccess, "admits", lambda _self, _uid: False)
    with pytest.raises(FcsnapError, match="damaged"):
        api.restore("vm", sock, store=store)
    assert peers[0].wait(WAIT) == 0  # it saw the connection go


def test_a_restore_killed_while_opening_has_its_queued_vm_killed(
        store: Path, tmp_path: Path, procs: Processes) -> None:
    """kill -9 (the OOM killer) while the build is being opened: the VM queued on the socket
    has sent its uffd and waits in its first fault, which no one will serve; the watchdog
    kills it rather than leave it frozen."""
    sock = tmp_path / "uffd.sock"
    restore = procs.track(start_stopped("restore", "vm", "--store", store, "--socket", sock,
                                        point="lineage"))
    vm = procs.track(firecracker.spawn(sock, size=SIZE, deadline=10, hold=10))
    wait_for(lambda: in_a_fault(vm.pid), "the VM to wait in its first fault")
    restore.kill()
    restore.communicate(timeout=WAIT)
    assert vm.wait(WAIT) == KILLED  # not 4: its deadline passed in a frozen fault


def test_sigterm_while_turning_away_does_not_cut_the_way_out_short(
        store: Path, tmp_path: Path, procs: Processes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop asked for while a restore that could not open its build is closing (the
    orchestrator giving up at that moment): the failure is reported, the queued VM killed and
    the socket removed; no stop escapes half way (a traceback, the socket left behind)."""
    sock = tmp_path / "uffd.sock"

    def fail() -> None:
        raise FcsnapError("build vm is damaged")

    vms = hold_opening(monkeypatch, sock, procs, fail)
    turn_away = opening.turn_away

    def signalled(*args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        turn_away(*args)

    monkeypatch.setattr(opening, "turn_away", signalled)
    with pytest.raises(FcsnapError, match="damaged"):
        api.restore("vm", sock, store=store)
    assert vms[0].wait(WAIT) == KILLED
    assert not sock.exists()


@pytest.mark.parametrize("when", ["listen", "watchdog"])
def test_sigterm_as_the_socket_appears_is_a_stop(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    """An orchestrator stopping the restore the moment its socket exists (the signal comes
    as `listen` returns, or while the watchdog starts): a stop, exit status 0, the socket
    removed, the caller's handlers back; not the default handler's exit 143."""
    sock = tmp_path / "uffd.sock"

    def default(_signum: int, _frame: object) -> None:  # as the command line's own handler
        raise AssertionError("the SIGTERM reached the caller's handler, not restore's")

    before = signal.signal(signal.SIGTERM, default)
    real_listen, real_start = opening.listen, opening.Watchdog.start

    def listen_then_term(path: Path, access: Any) -> socket.socket:
        listener = real_listen(path, access)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # time for another thread to take it, as a loaded machine gives
        return listener

    def start_then_term() -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_start()

    if when == "listen":
        monkeypatch.setattr(opening, "listen", listen_then_term)
    else:
        monkeypatch.setattr(opening.Watchdog, "start", staticmethod(start_then_term))
    # Another thread that takes signals (as a test runner's or an embedding program's do): the
    # kernel hands it a SIGTERM that the main thread holds back.
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, args=(WAIT,), daemon=True)
    bystander.start()
    try:
        served = api.restore("vm", sock, store=store)
        assert signal.getsignal(signal.SIGTERM) is default
    finally:
        signal.signal(signal.SIGTERM, before)
        idle.set()
        bystander.join(WAIT)
    assert (served.status, served.exit_reason) == (0, "stopped before a VM was served")
    assert not sock.exists()


def stopped_through_another_thread(serve: Callable[[Callable[[], None]], Any]) -> Any:
    """`serve(ready)` in this (the main) thread, stopped by a SIGTERM handed to another thread
    once it is ready and asleep (numpy's BLAS threads take signals: the kernel hands them one
    while the main thread holds signals for a moment); what it returns. Fails if it slept
    through that SIGTERM (it is then woken the usual way)."""
    idle, ended, ready = threading.Event(), threading.Event(), threading.Event()
    bystander = threading.Thread(target=idle.wait, args=(WAIT,), daemon=True)
    bystander.start()
    main, rescued = threading.main_thread().ident, []

    def stop_through_the_bystander() -> None:
        ready.wait(WAIT)
        time.sleep(0.2)  # asleep in its wait by now
        signal.pthread_kill(bystander.ident, signal.SIGTERM)
        if not ended.wait(5.0):  # asleep still: wake it the usual way, and fail
            rescued.append(True)
            signal.pthread_kill(main, signal.SIGTERM)

    stopper = threading.Thread(target=stop_through_the_bystander, daemon=True)
    stopper.start()
    try:
        result = serve(ready.set)
    finally:
        ended.set()
        idle.set()
        stopper.join(WAIT)
        bystander.join(WAIT)
    assert not rescued, "it slept through a SIGTERM another thread took"
    return result


def test_a_stop_another_thread_takes_wakes_the_server(store: Path, tmp_path: Path) -> None:
    done = stopped_through_another_thread(lambda ready: api.restore(
        "vm", tmp_path / "uffd.sock", store=store, on_listening=lambda _: ready()))
    assert (done.status, done.exit_reason) == (0, "stopped before a VM was served")


def test_a_stop_another_thread_takes_wakes_the_daemon(store: Path, tmp_path: Path) -> None:
    from fcsnap.daemon.main import run_daemon
    from fcsnap.uffd.listener import SocketAccess

    api_path = tmp_path / "api.sock"

    def serve(ready: Callable[[], None]) -> int:
        threading.Thread(target=lambda: (wait_for(api_path.exists, "the API socket"), ready()),
                         daemon=True).start()
        return run_daemon(store, api_path, SocketAccess(), 1 << 20)

    assert stopped_through_another_thread(serve) == 0
    assert not api_path.exists()
