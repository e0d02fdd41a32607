"""The reactor: one epoll fd, one thread, any number of sessions (session.py).

It waits on every fd of its sessions at once (listeners, handshake connections, uffds, pidfds,
stop pipes) and calls the session the ready fd belongs to; it keeps the sessions' timers
(handshake deadlines, retries of deferred faults) and runs their background work (prefetch,
populate, eager) a batch at a time, round robin, looking at every fd between two batches, so
faults come first and no session holds up the others for longer than a batch.

Where the fault path is compiled the wait itself is in C (fp_wait in csrc/fastpath.c), with
the GIL released: it serves the ready uffds of compiled sessions there, fault after fault,
and comes back to Python only with what Python handles (a session's events, retries, faults
it defers, an error, the VM gone; any other fd ready; a timeout), or BUDGET_MS after it
first served a fault (a timerfd in the epoll set), so that the stats stay current. Sessions
that serve in Python (--verify, zstd, FCSNAP_PURE_PYTHON=1) are called when their uffd is
ready.

Each session is isolated: an exception in one of its handlers ends that session only (the VM
killed, its stats written, its `on_end` told), never the reactor or the other sessions.
`fcsnap restore` runs one reactor with one session on its main thread; the daemon runs a few
on threads of their own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from fcsnap.errors import FcsnapError
from fcsnap.threads import signals_wake
from fcsnap.uffd import fastpath

BUDGET_MS = 10  # the longest the compiled wait serves before Python sees the stats again
READY_MAX = 256  # fds the compiled wait hands back at once
FD_TABLE = 1024  # the compiled wait's fd -> session table grows from this


class Session(Protocol):
    """What the reactor needs of a session (session.py's Session): sessions know the
    reactor, the reactor knows them only through this."""

    done: bool

    def attach(self, reactor: Reactor) -> None: ...
    def abort(self, error: BaseException) -> None: ...
    def finish(self) -> BaseException | None: ...
    def collect(self) -> None: ...
    def next_timer(self) -> float | None: ...
    def on_timer(self, now: float) -> None: ...
    def background(self) -> bool: ...


OnEnd = Callable[[Session, BaseException | None], None]
Handler = Callable[[], None]


class Reactor:
    """Serves sessions on the thread that calls `run`; `add` and `shutdown` from any
    thread."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._compiled = fastpath.compiled()
        self._table = self._ready = None
        self._timer = -1  # fires BUDGET_MS after the compiled wait first served a fault
        if self._compiled:
            ffi, lib = fastpath.ffi, fastpath.lib
            self._table = ffi.new("struct fp_ctx *[]", FD_TABLE)  # uffd -> compiled ctx
            self._ready = ffi.new("int[]", READY_MAX)
            self._timer = lib.fp_timer()
            if self._timer < 0:
                raise OSError(-self._timer, f"timerfd_create: {os.strerror(-self._timer)}")
        self._handlers: dict[int, tuple[Session, Handler]] = {}
        self._fds: dict[Session, set[int]] = {}
        self._on_end: dict[Session, OnEnd] = {}
        self._paths: dict[Session, fastpath.FastPath] = {}  # compiled sessions' uffd paths
        self._background: deque[Session] = deque()
        self._incoming: list[tuple[Session, OnEnd]] = []
        self._calls: list[tuple[Session, Callable[[], Any], concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        self._closing = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        if self._timer >= 0:
            self._epoll.register(self._timer, select.EPOLLIN)

    @property
    def load(self) -> int:
        """Sessions this reactor serves or is about to."""
        with self._lock:
            return len(self._on_end) + len(self._incoming)

    def add(self, session: Session, on_end: OnEnd) -> None:
        """Serve `session` (listening already); `on_end(session, error)` runs on this
        reactor's thread once it has finished (error None: the VM exited or a stop)."""
        session.handed_to(self)  # calls made before the session is adopted queue behind it
        with self._lock:
            self._incoming.append((session, on_end))
        self._wake()

    def call(self, session: Session, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on this reactor's thread between two turns (from any thread), while
        `session` is served: its result or exception goes to the future returned."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._calls.append((session, fn, future))
        self._wake()
        return future

    def shutdown(self) -> None:
        """Make `run` return (from any thread) once every session has ended."""
        self._closing = True
        self._wake()

    def close(self) -> None:
        """Free the epoll fd, the timer and the wake pipe (after `run` has returned)."""
        self._epoll.close()
        if self._timer >= 0:
            os.close(self._timer)
        with self._lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- what sessions call ----------------------------------------------------------------

    def watch(self, fd: int, session: Session, handler: Handler,
              path: fastpath.FastPath | None = None) -> None:
        """Call `handler` when `fd` is readable; with `path`, fd is the session's uffd and
        the compiled wait serves it (calling `handler` only with what needs Python). Watching
        a watched fd again changes its handler and path."""
        if fd not in self._handlers:
            self._epoll.register(fd, select.EPOLLIN)
            self._fds[session].add(fd)
        self._handlers[fd] = (session, handler)
        if self._table is not None:
            self._grow(fd)
            self._table[fd] = fastpath.ffi.NULL if path is None else path.ctx
        if path is not None:
            self._paths[session] = path

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd` (before it is closed)."""
        session, _ = self._handlers.pop(fd)
        self._fds[session].discard(fd)
        self._epoll.unregister(fd)
        if self._table is not None:
            self._table[fd] = fastpath.ffi.NULL

    def schedule(self, session: Session) -> None:
        """`session.background()` is to be called, batch by batch, until it returns False."""
        if session not in self._background:
            self._background.append(session)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until `shutdown` and no session is left. Whatever escapes (a bug here, not
        in a session) ends every session first: no VM is left frozen."""
        error: BaseException | None = None
        try:
            with signals_wake(self._wake_w):  # a stop taken by another thread wakes the loop
                while not (self._closing and not self._on_end and not self._incoming):
                    self._turn()
        except BaseException as e:
            error = e
            raise
        finally:
            for session in list(self._on_end):
                session.abort(error or RuntimeError("the reactor stopped"))
                self._end(session)

    def run_until_idle(self) -> None:
        """Serve until no session is left (`fcsnap restore`: its one session has ended)."""
        self._closing = True
        self.run()

    def _turn(self) -> None:
        self._adopt()
        self._run_calls()
        timeout = 0.0 if self._background else self._until_next_timer()
        for fd in self._wait(timeout):
            entry = self._handlers.get(fd)
            if entry is None:  # the wake pipe, the budget's timer, or an fd let go of
                if fd in (self._wake_r, self._timer):
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 4096)
                continue
            self._call(entry[0], entry[1])
        for session, path in list(self._paths.items()):
            if path.ctx.pumped:
                self._call(session, session.collect)
        now = time.monotonic()
        for session in list(self._on_end):
            due = session.next_timer()
            if due is not None and due <= now:
                self._call(session, lambda s=session: s.on_timer(now))
        if self._background:
            session = self._background.popleft()
            more = False

            def step(s: Session = session) -> None:
                nonlocal more
                more = s.background()

            self._call(session, step)
            if more and session in self._on_end:
                self._background.append(session)

    def _until_next_timer(self) -> float:
        """Seconds until the first session timer is due, -1 if there is none."""
        due = [t for t in (s.next_timer() for s in self._on_end) if t is not None]
        return max(0.0, min(due) - time.monotonic()) if due else -1.0

    def _wait(self, timeout: float) -> list[int]:
        """The fds ready within `timeout` seconds (< 0: no limit) that need Python."""
        if not self._compiled:
            return [fd for fd, _ in self._epoll.poll(timeout)]
        ffi, lib = fastpath.ffi, fastpath.lib
        ms = -1 if timeout < 0 else math.ceil(timeout * 1000)
        n = lib.fp_wait(self._epoll.fileno(), self._table, len(self._table), ms, BUDGET_MS,
                        self._timer, self._ready, READY_MAX)
        if n < 0:
            raise OSError(-n, f"epoll_wait: {os.strerror(-n)}")
        return ffi.unpack(self._ready, n) if n else []

    def _call(self, session: Session, handler: Handler) -> None:
        """Run one handler of `session`; an exception ends that session only."""
        if session.done:
            return
        try:
            handler()
        except Exception as e:
            session.abort(e)
        if session.done:
            self._end(session)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for session, fn, future in calls:
            if not future.set_running_or_notify_cancel():
                continue
            if session.done or session not in self._on_end:
                future.set_exception(FcsnapError("the restore has ended"))
                continue
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
            if session.done:
                self._end(session)

    def _adopt(self) -> None:
        with self._lock:  # moved in one step, so that `load` never misses them in between
            incoming, self._incoming = self._incoming, []
            self._on_end.update(incoming)
        for session, _on_end in incoming:
            self._fds[session] = set()
            self._call(session, lambda s=session: s.attach(self))

    def _end(self, session: Session) -> None:
        """Stop watching the session's fds, then let it finish and tell its owner."""
        for fd in list(self._fds[session]):
            self.unwatch(fd)
        del self._fds[session]
        self._paths.pop(session, None)
        with contextlib.suppress(ValueError):
            self._background.remove(session)
        on_end = self._on_end.pop(session)
        try:
            error = session.finish()
        except Exception as e:  # closing or writing its files failed: still this one only
            error = e
        on_end(session, error)

    def _grow(self, fd: int) -> None:
        size = len(self._table)
        if fd < size:
            return
        bigger = fastpath.ffi.new("struct fp_ctx *[]", max(2 * size, fd + 1))
        bigger[0:size] = self._table[0:size]
        self._table = bigger

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):  # full: a wake is pending
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")
