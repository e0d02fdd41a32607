"""SIGKILL of a page server must not freeze its VM: the watchdog process kills the VM within a
second of the server's death, unless the server had told it every page was installed.

The server is killed for real (`kill -9`, and `timeout -s KILL`, which kills its whole process
group), while the Firecracker stand-in faults; the watchdog's protocol is also driven directly,
for many VMs at once as a daemon would. Every wait has a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import WAIT, Lineage, restore_argv
from test_restore_faults import KILLED, PIDFD_LINK, UFFD_LINK, Runs, Server, make_lineages, rss

from fcsnap.testing import firecracker
from fcsnap.uffd.server import FaultServer, ServeOptions
from fcsnap.uffd.watchdog import Watchdog
from fcsnap.units import PAGE

MiB = 1 << 20
SIZE = 32 * MiB
DEADLINE = 1.0  # seconds from the server's death to the VM's
POLL_SYSCALLS = {"7", "271", "73"}  # poll and ppoll on x86_64, ppoll on aarch64


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineages(tmp_path_factory.mktemp("watchdog"), SIZE, 31, ("none",))["none"]


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    r = Runs(tmp_path)
    yield r
    r.close()


def wait_dead(pid: int, timeout: float) -> float | None:
    """Seconds until process `pid` (any process) has exited, or None if it did not within
    `timeout`."""
    started = time.monotonic()
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0.0
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            return None
        return time.monotonic() - started
    finally:
        os.close(pidfd)


def only_child(pid: int) -> int:
    """The pid of the one child process of `pid` (a server's: its watchdog), within WAIT."""
    deadline = time.monotonic() + WAIT
    children = Path(f"/proc/{pid}/task/{pid}/children")
    while time.monotonic() < deadline:
        pids = children.read_text().split()
        if pids:
            return int(pids[0])
        time.sleep(0.005)
    pytest.fail(f"process {pid} started no child")


def watchdog_of(server: Server) -> int:
    return only_child(server.proc.pid)


def fds_reading(pid: int, link: str) -> int:
    """How many fds of process `pid` read `link` in /proc."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == link
        except FileNotFoundError:
            continue
    return count


def watched_vms(pid: int) -> int:
    """How many pidfds process `pid` holds (the watchdog: VMs it would kill)."""
    return fds_reading(pid, PIDFD_LINK)


def idle_watching(pid: int, vms: int) -> bool:
    """The watchdog holds `vms` VMs and waits in poll(2), so it has read every message sent
    so far (poll returns at once while one is queued)."""
    blocked_in = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    return watched_vms(pid) == vms and blocked_in in POLL_SYSCALLS


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT:g}s waiting for {what}")
        time.sleep(0.005)


# -- the server is killed --------------------------------------------------------------------


def test_kill_9_while_the_vm_faults_kills_the_vm(lineage, runs) -> None:
    """`kill -9` of the restore while four threads fault one page at a time: the VM, which
    would freeze at its next fault, is dead within a second, and says why nowhere else."""
    server = runs.server(lineage.newest, "--fault-around", "0")
    vm = runs.vm(server, expected=lineage.expected, threads=4, order="random", hold=WAIT,
                 start_delay=0.3)
    server.wait_handshake()
    wait_until(lambda: rss(vm.proc.pid, "RssAnon") > SIZE // 8, "the VM to get some memory")
    server.proc.kill()
    server.proc.wait(WAIT)
    took = wait_dead(vm.proc.pid, WAIT)
    assert took is not None and took < DEADLINE, f"the VM was still alive after {took}s"
    assert vm.finish().status == KILLED
    assert not vm.report_path.exists(), "the VM had finished its reads before the kill"
    lines = server.finish().stderr
    assert len(lines) == 1 and "watchdog: the page server died; killed the VM" in lines[0]
    assert f"(pid {vm.proc.pid})" in lines[0]


def test_timeout_s_kill_of_the_whole_group_kills_the_vm(lineage, runs, tmp_path) -> None:
    """`timeout -s KILL` kills the restore's whole process group: the watchdog, in a session
    of its own, outlives it and kills the VM within a second. (Once the VM faults, the test
    sends `timeout` the SIGALRM its own timer would, so that it acts then.)"""
    sock, stats = tmp_path / "t.sock", tmp_path / "t.json"
    argv = ["timeout", "-s", "KILL", str(WAIT),
            *restore_argv(lineage.newest, sock, "--fault-around", "0", stats=stats)]
    proc = runs.track(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    vm = runs.vm(Server(proc, sock, stats), expected=lineage.expected, threads=4,
                 order="random", hold=WAIT, start_delay=0.3)
    restore = only_child(proc.pid)
    wait_until(lambda: fds_reading(restore, UFFD_LINK) == 1, "the restore to take the uffd")
    wait_until(lambda: rss(vm.proc.pid, "RssAnon") > SIZE // 8, "the VM to get some memory")
    os.kill(proc.pid, signal.SIGALRM)
    assert wait_dead(restore, WAIT) is not None
    took = wait_dead(vm.proc.pid, WAIT)
    assert took is not None and took < DEADLINE, f"the VM was still alive after {took}s"
    assert proc.wait(WAIT) == KILLED
    assert vm.finish().status == KILLED


@pytest.mark.parametrize("mode", ["--populate", "--eager"])
def test_kill_9_after_every_page_is_installed_leaves_the_vm_running(lineage, runs, mode):
    """With every page installed the server releases the VM from the watchdog: a `kill -9`
    then leaves it running, and it reads every byte right without its page server (it starts
    reading once the server is dead: its start gate opens then)."""
    server = runs.server(lineage.newest, mode)
    vm = runs.vm(server, expected=lineage.expected, threads=2, order="random",
                 start_gate=runs.gate)
    server.wait_handshake()  # so the server has told the watchdog to watch the VM
    watchdog = watchdog_of(server)
    wait_until(lambda: idle_watching(watchdog, 0), "the watchdog to release the VM")
    server.proc.kill()
    assert server.proc.wait(WAIT) == KILLED
    assert wait_dead(watchdog, WAIT) is not None
    runs.gate.touch()
    assert vm.finish().status == 0
    report = vm.report
    assert report is not None and report["mismatches"] == 0


def test_balloon_after_release_makes_the_vm_watched_again(lineage, runs) -> None:
    """A balloon takes pages back from a released VM: it needs its server again, so the
    server hands it back to the watchdog, and a `kill -9` then kills it."""
    server = runs.server(lineage.newest, "--populate")
    vm = runs.vm(server, expected=lineage.expected, threads=1, touch=0.1, hold=WAIT,
                 start_gate=runs.gate, balloon=[(0, 64 * PAGE)])
    server.wait_handshake()
    watchdog = watchdog_of(server)
    wait_until(lambda: idle_watching(watchdog, 0), "the watchdog to release the VM")
    runs.gate.touch()  # after populate: the guest reads, then balloons
    wait_until(lambda: watched_vms(watchdog) == 1, "the VM to be watched after its balloon")
    wait_until(lambda: vm.report_path.exists(), "the VM to finish its reads")
    server.proc.kill()
    took = wait_dead(vm.proc.pid, WAIT)
    assert took is not None and took < DEADLINE + 0.5
    assert vm.finish().status == KILLED


def test_kill_9_during_the_handshake_kills_the_vm(lineage, runs) -> None:
    """The VM is watched from its accept: a server killed while it waits for the handshake
    does not leave a connected VM waiting for pages forever."""
    server = runs.server(lineage.newest, "--handshake-timeout", str(WAIT))
    vm = runs.vm(server, expected=lineage.expected, misbehave="nothing", hold=WAIT)
    server.wait_for_fd(PIDFD_LINK)  # it has accepted the VM
    server.proc.kill()
    server.proc.wait(WAIT)
    took = wait_dead(vm.proc.pid, WAIT)
    assert took is not None and took < DEADLINE, f"the VM was still alive after {took}s"
    assert vm.finish().status == KILLED


def test_shared_watchdog_outlives_the_servers_that_use_it(lineage, tmp_path) -> None:
    """A daemon gives its servers one watchdog (ServeOptions.watchdog): a server that ends
    releases its VM but leaves the watchdog running for the others."""
    watchdog = Watchdog.start()
    try:
        for name in ("one", "two"):
            sock = tmp_path / f"{name}.sock"
            vms: list[subprocess.Popen[bytes]] = []
            server = FaultServer(lineage.newest, ServeOptions(
                socket=sock, watchdog=watchdog, on_listening=lambda sock=sock, vms=vms: vms.append(
                    firecracker.spawn(sock, expected=lineage.expected, touch=0.05,
                                      deadline=WAIT))))
            guard = threading.Timer(WAIT, server.stop)  # the test fails, not hangs
            guard.start()
            try:
                assert server.run() == 0 and server.exit_reason == "vm exited"
            finally:
                guard.cancel()
            assert vms[0].wait(WAIT) == 0
            wait_until(lambda: idle_watching(watchdog.pid, 0), "the VM to be released")
            assert wait_dead(watchdog.pid, 0) is None, "a server closed the shared watchdog"
    finally:
        watchdog.close()
    assert wait_dead(watchdog.pid, 0) == 0.0


# -- the watchdog itself, many VMs -----------------------------------------------------------

OWNER = """
import os, sys, time
from fcsnap.uffd.watchdog import Watchdog
w = Watchdog.start()
pids = [int(p) for p in sys.argv[1:]]
w.watch("vm-a", os.pidfd_open(pids[0]))
w.watch("vm-b", os.pidfd_open(pids[1]))
w.release("vm-b")
w.watch("vm-c", os.pidfd_open(pids[2]))
w.watch("vm-d", os.pidfd_open(pids[3]))
w.watch("vm-d", os.pidfd_open(pids[4]))  # the same id again: it replaces the first
w.release("never-watched")
print(w.pid, flush=True)
time.sleep(60)
"""


def test_watchdog_kills_every_vm_still_watched_when_its_owner_dies(tmp_path) -> None:
    """A daemon-like owner hands one watchdog five VMs, releases one, replaces one, and one
    exits by itself; `kill -9` of the owner kills exactly the VMs still watched, each within
    a second, with one line each; the watchdog then exits."""
    vms = [subprocess.Popen(["sleep", str(WAIT)]) for _ in range(5)]
    owner = subprocess.Popen([sys.executable, "-c", OWNER, *(str(v.pid) for v in vms)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        ready = select.select([owner.stdout], [], [], WAIT)[0]
        assert ready, "the owner did not start its watchdog"
        watchdog = int(owner.stdout.readline())
        wait_until(lambda: watched_vms(watchdog) == 3, "the watchdog to hold three VMs")
        vms[2].kill()  # vm-c exits by itself: forgotten
        vms[2].wait(WAIT)
        wait_until(lambda: watched_vms(watchdog) == 2, "the watchdog to forget an exited VM")
        owner.kill()
        for index in (0, 4):
            assert vms[index].wait(DEADLINE) == KILLED, f"VM {index} survived its owner"
        assert wait_dead(watchdog, WAIT) is not None
        for index in (1, 3):  # released, replaced
            assert vms[index].poll() is None, f"VM {index} was killed"
        _, err = owner.communicate(timeout=WAIT)
        lines = sorted(err.decode().splitlines())
        assert [line.split(" (pid")[0].rsplit(" ", 1)[-1] for line in lines] == ["vm-a", "vm-d"]
        assert f"(pid {vms[4].pid})" in lines[1]
    finally:
        for proc in (owner, *vms):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(WAIT)


def test_normal_end_leaves_no_watchdog_and_no_line(lineage, runs) -> None:
    """A server ending normally (the VM exited) leaves no watchdog behind and no line."""
    server = runs.server(lineage.newest)
    vm = runs.vm(server, expected=lineage.expected, touch=0.1)
    server.wait_handshake()
    watchdog = watchdog_of(server)
    assert vm.finish().status == 0
    assert server.finish().status == 0 and server.stderr == []
    assert wait_dead(watchdog, WAIT) is not None
    assert firecracker.read_report(vm.report_path)["mismatches"] == 0


QUEUED_PEER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("connected", flush=True)
s.settimeout(float(sys.argv[2]))
sys.exit(s.recv(1) != b"")
"""


def test_a_guard_ended_turns_away_who_queued_on_the_socket_meanwhile(tmp_path) -> None:
    """Once the server has accepted its VM (`watch`) and closed its copy of the socket, the
    watchdog's copy still listens until it lets go: a VM that queued there meanwhile is
    killed (it has sent its uffd, and no one serves it), not merely disconnected."""
    path = tmp_path / "uffd.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(8)
    watchdog = Watchdog.start()
    vm = subprocess.Popen(["sleep", str(WAIT)])
    peer = None
    try:
        watchdog.guard("vm", listener.fileno(), {os.geteuid()})
        listener.close()  # the server's copy, closed as it accepts its VM
        peer = subprocess.Popen([sys.executable, "-c", QUEUED_PEER, str(path), str(WAIT)],
                                stdout=subprocess.PIPE)
        assert peer.stdout is not None and peer.stdout.readline() == b"connected\n"
        pidfd = os.pidfd_open(vm.pid)
        watchdog.watch("vm", pidfd)
        os.close(pidfd)
        assert peer.wait(WAIT) == KILLED
        watchdog.release("vm")
    finally:
        watchdog.close()
        for proc in (vm, peer):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(WAIT)
