"""`fcsnap restore` listens first, then opens its build.

An orchestrator starts Firecracker once the restore's socket exists: what restore does before
then delays the VM by as much, what it does after overlaps Firecracker's own start-up and
snapshot load. The server's modules (numpy, cffi, the store) cost more than the rest of
restore's start together, and opening a build (pins and lock, header, diffs) takes a moment
more. So restore creates its socket as soon as its options are checked, then imports the
server and opens the build. A VM that connects meanwhile waits in the socket's
backlog; its handshake is taken once the build is known good. Until the server takes the
socket over, `Opening` answers for it: SIGTERM/SIGINT end the restore as a stop (`Stopped`),
and any way out turns away the VMs queued on the socket (killed: one that sent its uffd would
freeze at its first fault) and removes the socket file. A restore killed outright (SIGKILL, the
OOM killer) cannot: its watchdog, started as soon as the socket listens and given the socket,
kills them then.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from fcsnap.errors import FcsnapError
from fcsnap.uffd.listener import SocketAccess, listen
from fcsnap.uffd.watchdog import Watchdog, WatchdogError

STOPS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """SIGTERM/SIGINT while the build was being opened (a BaseException, as
    KeyboardInterrupt is: no `except Exception` on the way may take it for a failure)."""


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Opening:
    """The restore's listening socket, from before its build is opened to the end."""

    def __init__(self, path: Path, access: SocketAccess) -> None:
        """Listen at `path`, with a watchdog guarding the socket for the VM `str(path)` (the
        id the session gives its VM: its `watch` ends the guard)."""
        self.path = path
        self.access = access
        self.server: Stoppable | None = None  # set once the server can take a stop
        self.watchdog: Watchdog | None = None  # the session's too (ServeOptions.watchdog)
        self._stopped = False
        self._deferred: bool | None = None  # a stop held back while the socket is made
        # A stop from before the socket exists on: one arriving as it appears (an orchestrator
        # that stops the restore as soon as it sees the socket) is a stop too.
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on_signal) for s in STOPS}
        self.listener: socket.socket | None = None
        try:
            # A stop waits for the inode: without it the socket's file could not be removed.
            # (The handler defers it rather than the signal being blocked: a process-directed
            # signal blocked in this thread is delivered to another one, and Python runs the
            # handler here all the same.)
            self._deferred = False
            try:
                self.listener = listen(path, access)
                self.inode = os.stat(path).st_ino
            finally:
                deferred, self._deferred = self._deferred, None
            if deferred:
                self._on_signal(signal.SIGTERM, None)
            self.watchdog = Watchdog.start()
            self.watchdog.guard(str(path), self.listener.fileno(), access.admitted_uids())
        except BaseException as e:
            self.__exit__(None, None, None)
            if isinstance(e, WatchdogError):
                raise FcsnapError(str(e)) from e
            raise

    def __enter__(self) -> Opening:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        try:
            self.close()
        finally:
            for signum, handler in self._old.items():
                signal.signal(signum, handler)
            self._old = {}

    def close(self) -> None:
        """Turn away the VMs still queued, close the socket and remove its file (unless
        another file has taken its place), then hang up on the watchdog (which turns away a
        VM that connected in between). Does nothing more once the server has done it."""
        self._stopped = True  # a signal from here on is no stop: it must not cut this short
        try:
            if self.listener is not None and self.listener.fileno() >= 0:
                try:
                    turn_away(self.listener, self.access.admits)
                finally:
                    stop_listening(self.listener)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(self.path).st_ino == self.inode:
                        os.unlink(self.path)
        finally:
            watchdog, self.watchdog = self.watchdog, None
            if watchdog is not None:
                watchdog.close()

    def _on_signal(self, _signum: int, _frame: object) -> None:
        if self._deferred is not None:
            self._deferred = True
        elif self.server is not None:
            self.server.stop()
        elif not self._stopped:  # once: a second signal must not cut the way out short
            self._stopped = True
            raise Stopped


def turn_away(listener: socket.socket, admits: Callable[[int], bool]) -> None:
    """Kill every admitted VM queued on `listener` and disconnect every peer: no one will
    serve their pages."""
    from fcsnap.uffd.handshake import kill_process, peer_credentials

    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:  # none left (or the socket broke: no one can queue on it)
            return
        with conn, contextlib.suppress(OSError):  # a peer gone already is no VM to kill
            pid, uid = peer_credentials(conn)
            if pid > 0 and admits(uid):
                pidfd = os.pidfd_open(pid)
                try:
                    kill_process(pidfd)
                finally:
                    os.close(pidfd)


def stop_listening(listener: socket.socket) -> None:
    """Close `listener` so that a client connecting from now on is refused at once: it is
    shut down first, because the watchdog holds a copy of it (the guard) that would keep it
    listening, and a VM queued on it then would be killed rather than refused."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()
