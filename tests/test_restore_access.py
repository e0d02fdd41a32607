"""Who may use a restore socket, and what a restore does to sockets that are not its own.

Whoever connects to a page server gets guest memory. The socket is 0600 and its owner's from
the moment it appears; a peer whose uid is not admitted (SO_PEERCRED) is disconnected without
taking the VM's place; and `--socket` never replaces the socket of a process that is listening
on it (another service, another restore, one in another network namespace). Other users are
real: the test forks a child that drops to uid 65534 (`nobody`) before it connects. Every wait
has a deadline.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import WAIT, Lineage, check_served, wait_for
from test_restore import make_lineage

from fcsnap.units import PAGE

NOBODY = 65534
PROMPT = 3.0  # seconds within which a refused peer must be disconnected
KILLED = -9
AS_ROOT = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: to connect as another user, chown, or unshare")


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineage(tmp_path_factory.mktemp("access") / "raw", "none", PAGE, 21)


def as_stranger(sock: Path, send: bytes = b"", uid: int = NOBODY) -> tuple[list[str], int]:
    """Connect to `sock` from a forked child running as `uid` (it reaches the socket from its
    directory, its cwd: the parents of the test's directory are 0700). Returns what the
    child saw - "denied" (the file's mode), or "connected" then "closed" (the server hung up)
    or "kept" (it did not within PROMPT seconds) - and its exit status."""
    sock.parent.chmod(0o711)  # searchable, so that only the socket's own mode decides
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(r)
            _stranger(sock, send, uid, w)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], WAIT)[0]:
            os.kill(pid, 9)
            pytest.fail(f"the stranger did not finish within {WAIT:g}s")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    with os.fdopen(r) as seen:
        events = seen.read().split()
    code = os.waitstatus_to_exitcode(status)
    return events, code


def _stranger(sock: Path, send: bytes, uid: int, report: int) -> None:
    os.chdir(sock.parent)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock.name)
    except PermissionError:
        os.write(report, b"denied\n")
        return
    os.write(report, b"connected\n")
    conn.settimeout(PROMPT)
    try:
        if send:
            conn.sendall(send)
        closed = conn.recv(1) == b""
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    except TimeoutError:
        closed = False
    os.write(report, b"closed\n" if closed else b"kept\n")


def first_sight(path: Path, proc: subprocess.Popen[bytes]) -> os.stat_result:
    """lstat of `path` the moment it appears (polled as fast as possible), within WAIT."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            assert proc.poll() is None, "the server exited before listening"
    pytest.fail(f"{path} did not appear within {WAIT:g}s")


def refusals(lines: list[str]) -> list[str]:
    return [line for line in lines if "refused a connection" in line]


# -- the socket admits only its VM -----------------------------------------------------------


@AS_ROOT
def test_socket_is_0600_from_the_start_and_strangers_cannot_connect(lineage, procs) -> None:
    """Default: the file is the server's user's, mode 0600, from the moment it appears (no
    window with the umask's wider mode); another user's connect fails; the VM is served; the
    private directory the socket was made in is gone."""
    server = procs.server(lineage.newest.name, lineage.store)
    st = first_sight(procs.socket, server)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert as_stranger(procs.socket) == (["denied"], 0)
    out = procs.outcome(server, procs.vm(expected=lineage.expected, touch=0.1))
    check_served(out, lineage)
    assert out.stats is not None and out.stats["rejected_peers"] == 0
    assert not [p for p in os.listdir(procs.tmp) if p.startswith(".fcsnap-socket")]


@AS_ROOT
def test_stranger_is_refused_without_taking_the_vms_place(lineage, procs) -> None:
    """With a mode that lets anyone connect, a uid that is not admitted still gets nothing:
    disconnected at once (twice), one line and one count each, and the VM that connects
    afterwards is served every byte."""
    server = procs.server(lineage.newest.name, lineage.store, "--socket-mode", "0666")
    st = first_sight(procs.socket, server)
    assert stat.S_IMODE(st.st_mode) == 0o666
    for _ in range(2):
        assert as_stranger(procs.socket, send=b"[]") == (["connected", "closed"], 0)
    out = procs.outcome(server, procs.vm(expected=lineage.expected, touch=0.1))
    check_served(out, lineage)
    assert out.stats is not None and out.stats["rejected_peers"] == 2
    lines = refusals(out.stderr)
    assert len(lines) == 2 and out.stderr == lines, out.stderr
    assert all(f"from uid {NOBODY} " in line and "admitted uids are 0" in line for line in lines)


@AS_ROOT
@pytest.mark.parametrize("options", [
    pytest.param(("--socket-owner", f"{NOBODY}:{NOBODY}"), id="socket-owner"),
    pytest.param(("--socket-mode", "0666", "--allow-uid", str(NOBODY)), id="allow-uid"),
    pytest.param(("--socket-owner", "nobody", "--socket-mode", "0660"), id="owner-by-name"),
])
def test_options_admit_a_jailed_uid(lineage, procs, options: tuple[str, ...]) -> None:
    """A Firecracker jailed under another uid: --socket-owner gives it the file (and admits
    its uid), --allow-uid admits it on a wider mode. Admitted, it is the server's VM: its
    incomplete handshake fails the restore, and the server kills it as any VM it cannot
    serve."""
    server = procs.server(lineage.newest.name, lineage.store, "--handshake-timeout", "0.5",
                          *options)
    st = first_sight(procs.socket, server)
    if "--socket-owner" in options:
        assert st.st_uid == NOBODY
        assert stat.S_IMODE(st.st_mode) == (0o660 if "0660" in options else 0o600)
    events, status = as_stranger(procs.socket, send=b"[]")  # regions, and no uffd
    assert events[:1] == ["connected"] and status == KILLED
    out = procs.outcome(server, None)
    assert out.status == 1 and "did not send the uffd" in out.error
    assert out.stats is not None and out.stats["rejected_peers"] == 0


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--socket-mode", "999", "not an octal permission mode"),
    ("--socket-mode", "1777", "not an octal permission mode"),
    ("--socket-owner", "no-such-user-here", "no such user"),
    ("--socket-owner", "0:no-such-group-here", "no such group"),
    ("--allow-uid", "no-such-user-here", "no such user"),
])
def test_bad_access_options_are_usage_errors(lineage, procs, option, value, message) -> None:
    server = procs.server(lineage.newest.name, lineage.store, option, value)
    _, err = server.communicate(timeout=WAIT)
    assert server.returncode == 2 and message in err.decode()
    assert not procs.socket.exists()


# -- --socket never replaces a live socket ---------------------------------------------------


def test_listening_service_is_not_replaced(lineage, procs) -> None:
    """Another service listens at --socket: exit 1 with one line, before listening; the
    service's socket still works."""
    service = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    service.bind(str(procs.socket))
    service.listen(4)
    inode = os.lstat(procs.socket).st_ino
    try:
        out = procs.outcome(procs.server(lineage.newest.name, lineage.store), None)
        assert out.status == 1 and "is the socket of a running process" in out.error
        assert os.lstat(procs.socket).st_ino == inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(PROMPT)
            client.connect(str(procs.socket))
            service.settimeout(PROMPT)
            service.accept()[0].close()
    finally:
        service.close()


def test_another_running_restore_is_not_replaced(lineage, procs) -> None:
    """A second restore on a running restore's socket exits 1 without disturbing it (it is
    not probed with a connection, which that restore would take for its VM): the first
    serves its VM normally."""
    first = procs.server(lineage.newest.name, lineage.store)
    wait_for(procs.socket.exists, "the first restore to listen")
    second = procs.server(lineage.newest.name, lineage.store, stats=False)
    _, err = second.communicate(timeout=WAIT)
    lines = err.decode().splitlines()
    assert second.returncode == 1 and len(lines) == 1, lines
    assert "is the socket of a running process" in lines[0]
    out = procs.outcome(first, procs.vm(expected=lineage.expected, touch=0.1))
    check_served(out, lineage)
    assert out.stderr == []


def test_restores_started_together_one_listens(lineage, procs) -> None:
    """Three restores started at once on one path: exactly one listens (and serves), the
    others exit 1 with one line; none replaces another's socket."""
    servers = [procs.server(lineage.newest.name, lineage.store, stats=i == 0)
               for i in range(3)]
    deadline = time.monotonic() + WAIT
    while sum(s.poll() is None for s in servers) > 1:
        if time.monotonic() > deadline:
            pytest.fail("more than one restore kept running on the same socket")
        time.sleep(0.02)
    (winner,) = [s for s in servers if s.poll() is None]
    for loser in servers:
        if loser is winner:
            continue
        lines = loser.communicate(timeout=WAIT)[1].decode().splitlines()
        assert loser.returncode == 1 and len(lines) == 1, lines
        assert "refusing to replace it" in lines[0]
    vm = procs.vm(expected=lineage.expected, touch=0.1)
    vm.communicate(timeout=WAIT + 10)
    assert vm.returncode == 0
    winner.communicate(timeout=WAIT)
    assert winner.returncode == 0


@AS_ROOT
def test_listener_in_another_network_namespace_is_probed(lineage, procs) -> None:
    """The kernel's socket list covers this network namespace only; a listener in another
    one (a container sharing the directory) is found by a connect probe."""
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]);"
            " s.listen(4); print('ready', flush=True); time.sleep(60)")
    other = subprocess.Popen(["unshare", "--net", sys.executable, "-c", code,
                              str(procs.socket)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    procs.started.append(other)
    if not select.select([other.stdout], [], [], WAIT)[0] or not other.stdout.readline():
        other.kill()
        pytest.skip(f"cannot listen in a new network namespace: {other.communicate()[1]!r}")
    out = procs.outcome(procs.server(lineage.newest.name, lineage.store), None)
    assert out.status == 1 and "is the socket of a running process" in out.error
    assert other.poll() is None
