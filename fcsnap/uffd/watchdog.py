"""Kills the VMs of a page server that died without a word (SIGKILL, the OOM killer).

A guest whose page server is gone freezes at its next fault, and a SIGKILLed server cannot kill
its VM first. So before serving, the server starts this watchdog: a separate small process (a
fresh interpreter without site packages that imports only builtin modules, started with
posix_spawn so that it shares nothing with the server) in its own session, so that a signal to
the server's process group (`timeout -s KILL`, Ctrl-C) does not reach it. Its stdin is one end of
a SOCK_SEQPACKET socket pair whose other end only the server holds. Messages, one per packet:

    guard UIDS ID with the listening socket a VM will connect to (SCM_RIGHTS) and the uids it
                  admits (comma-separated): until `watch ID` or `release ID`, kill every VM of
                  those uids queued on it if the server dies (restore listens before it opens
                  its build: a VM that connected meanwhile has sent its uffd)
    watch ID      with the VM's pidfd (SCM_RIGHTS): kill this VM if the server dies
    release ID    this VM no longer needs the server (every page installed), or the server has
                  dealt with it (killed it, or seen it exit)

At EOF on the socket (the server exited, however it died) the watchdog kills every VM queued on
a guarded socket and every VM still watched, through its pidfd (never a recycled pid), says so
in one line each on stderr, and exits.
A VM that exits by itself is forgotten. One watchdog serves any number of VMs (a daemon starts
one for all of them); a repeated `watch ID` replaces the earlier one.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import sys
from collections.abc import Iterable

MAX_MESSAGE = 4096
CLOSE_TIMEOUT = 2.0  # seconds the watchdog may take to exit after EOF before it is killed


class WatchdogError(Exception):
    """The watchdog cannot be started or reached (the server side turns it into its error)."""


class Watchdog:
    """The server's end: start the watchdog, hand it VMs, release them, close it."""

    def __init__(self, channel: socket.socket, pid: int) -> None:
        self._channel = channel
        self.pid = pid

    @classmethod
    def start(cls) -> Watchdog:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            argv = [sys.executable, "-S", "-I", os.path.abspath(__file__)]
            pid = os.posix_spawn(sys.executable, argv, os.environ, setsid=True,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0)])
        except OSError as e:
            ours.close()
            raise WatchdogError(f"cannot start the watchdog: {e.strerror or e}") from e
        finally:
            theirs.close()
        return cls(ours, pid)

    def guard(self, vm_id: str, listener: int, uids: Iterable[int]) -> None:
        """From now on until the VM `vm_id` is watched or released, the VMs of `uids` queued
        on the listening socket `listener` are killed if this process dies."""
        self._send(f"guard {','.join(map(str, sorted(uids)))} {vm_id}", [listener])

    def watch(self, vm_id: str, pidfd: int) -> None:
        """From now on, the VM is killed if this process dies before releasing it."""
        self._send(f"watch {vm_id}", [pidfd])

    def release(self, vm_id: str) -> None:
        """The VM no longer needs this process (or this process has dealt with it)."""
        self._send(f"release {vm_id}")

    def close(self) -> None:
        """Hang up (the watchdog kills whatever is still watched and exits) and reap it."""
        self._channel.close()
        pidfd = os.pidfd_open(self.pid)
        try:
            if not exited(pidfd, CLOSE_TIMEOUT):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        finally:
            os.close(pidfd)

    def _send(self, message: str, fds: list[int] | None = None) -> None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._channel.sendmsg([message.encode()], rights)
        except OSError as e:
            raise WatchdogError(f"the watchdog is gone ({e.strerror or e})") from e


# -- the watchdog process ------------------------------------------------------------------


def watch_until_eof(channel: socket.socket) -> None:
    """Follow the server's messages; at EOF kill every VM queued on a guarded socket and
    every VM still watched."""
    watched: dict[str, int] = {}  # VM id -> pidfd
    guarded: dict[str, tuple[socket.socket, set[int]]] = {}  # VM id -> listener, uids
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd != channel.fileno():
                # A VM exited by itself, unless the server released it meanwhile (in this
                # same batch of events, and the fd number may have been reused since).
                vm_id = next((k for k, v in watched.items() if v == fd), None)
                if vm_id is not None and exited(fd, 0):
                    _forget(watched, vm_id, poller)
                continue
            message, fds = _receive(channel)
            if message is None:
                for listener, uids in guarded.values():
                    _kill_queued(listener, uids, "the page server died before serving it")
                _kill_all(watched)
                return
            verb, _, rest = message.partition(" ")
            uids, _, vm_id = rest.partition(" ") if verb == "guard" else ("", "", rest)
            if verb in ("watch", "release"):
                _forget(watched, vm_id, poller)
            if verb in ("watch", "release", "guard") and vm_id in guarded:
                # The VM accepted, or dealt with: the server has closed its copy of the
                # socket, so whoever queued on ours since will not be served either.
                listener, admitted = guarded.pop(vm_id)
                _kill_queued(listener, admitted, f"no one serves it (the page server of {vm_id} "
                             "has taken its VM or ended)")
                listener.close()
            if verb == "guard" and vm_id and len(fds) == 1:
                guarded[vm_id] = (socket.socket(fileno=fds.pop()),
                                  {int(uid) for uid in uids.split(",") if uid.isdigit()})
            if verb == "watch" and vm_id and len(fds) == 1:
                watched[vm_id] = fds.pop()
                poller.register(watched[vm_id], select.POLLIN)
            for extra in fds:
                os.close(extra)


def _receive(channel: socket.socket) -> tuple[str | None, list[int]]:
    """(message, fds received); (None, []) at EOF."""
    try:
        data, ancdata, _flags, _ = channel.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
    except OSError:
        return None, []
    fds = array.array("i")
    for level, kind, body in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(body[: len(body) - len(body) % fds.itemsize])
    if not data and not ancdata:
        return None, []
    return data.decode(errors="replace"), list(fds)


def _forget(watched: dict[str, int], vm_id: str, poller: select.poll) -> None:
    pidfd = watched.pop(vm_id, None)
    if pidfd is not None:
        poller.unregister(pidfd)
        os.close(pidfd)


def _kill_all(watched: dict[str, int]) -> None:
    for vm_id, pidfd in watched.items():
        if exited(pidfd, 0):
            continue
        pid = _pid_of(pidfd)  # now: a dead process's pidfd says -1
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            continue
        line = (f"fcsnap: watchdog: the page server died; killed the VM {vm_id} "
                f"(pid {pid}) rather than leave it frozen\n")
        os.write(2, line.encode())


def _kill_queued(listener: socket.socket, uids: set[int], why: str) -> None:
    """Kill every process of `uids` queued on `listener` (it has sent its uffd, and no one
    will serve its faults: `why`); disconnect every other peer."""
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # none left
            return
        with conn:
            try:
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid, uid = (int.from_bytes(cred[i:i + 4], sys.byteorder) for i in (0, 4))
                if pid <= 0 or uid not in uids:
                    continue
                pidfd = os.pidfd_open(pid)
            except OSError:  # gone already: no VM to kill
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.write(2, (f"fcsnap: watchdog: killed the VM queued on the socket (pid {pid}) "
                             f"rather than leave it frozen: {why}\n").encode())
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)


def exited(pidfd: int, timeout: float) -> bool:
    """Whether the process has exited, waiting up to `timeout` seconds (poll, not select:
    a daemon's fds go beyond select's 1024)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def _pid_of(pidfd: int) -> str:
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as info:
            return next((line.split()[1] for line in info if line.startswith("Pid:")), "?")
    except OSError:
        return "?"


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its own session, but a stray kill -INT too
    os.closerange(3, 1 << 16)  # nothing of the server's but the channel (fd 0) and stdio
    try:
        watch_until_eof(socket.socket(fileno=0))
    except Exception as e:  # a bug: one line, as everywhere in fcsnap
        os.write(2, f"fcsnap: watchdog: internal error ({type(e).__name__}: {e})\n".encode())
        sys.exit(1)


if __name__ == "__main__":
    main()
