"""One VM's restore session: listen, accept, handshake, serve its faults, account for them.

A session is event-driven and owns no thread and no signals: a reactor (reactor.py) waits on
its fds together with other sessions' and calls it when one is ready (the listener, the
connection while the handshake comes in, the uffd, the VM's pidfd, the stop pipe), when a
timer of its is due (the handshake's deadline, deferred faults to retry) and, round robin with
the others, for a step of background work (prefetch, populate, eager). `restore` runs one
session on a reactor on its main thread (server.py turns SIGTERM/SIGINT into `stop`); the
daemon spreads its sessions over a few reactor threads. The build it serves is a SharedBuild
(shared.py), opened once for every session that serves it.

Serving: read *all* pending events before serving (a pending REMOVE makes every copy fail
with EAGAIN); install pages with UFFDIO_COPY or ZEROPAGE; defer EAGAIN faults and retry them
after the next drain, on a short timer so none is stranded. The server never touches the guest
memory itself. Where it can, the reactor's compiled wait (fastpath.py) reads and installs a
session's faults with the GIL released and hands back only what Python handles. A build in
object storage never makes the reactor wait on the network: a fault (or a batch of background
work) whose bytes are still being fetched (FetchPending) is asked again on a 1 ms timer, and
the reactor serves every other fault and VM meanwhile.

A guest whose page server is gone freezes at its next fault, so every way out other than the
VM's own exit - an error of any kind, a stop - kills the VM first.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.outputs import write_output
from fcsnap.uffd import abi, latency, writes
from fcsnap.uffd.fastpath import Batch, FastPath
from fcsnap.uffd.handshake import (
    HandshakeReader,
    Peer,
    accept_admitted,
    kill_process,
    peer_pidfd,
)
from fcsnap.uffd.installer import GONE, RETRY, Installer, InstallStats
from fcsnap.uffd.listener import listen
from fcsnap.uffd.opening import stop_listening, turn_away
from fcsnap.uffd.prefetch import Prefetch
from fcsnap.uffd.preimage import Preimages
from fcsnap.uffd.regions import Region, RegionMap
from fcsnap.uffd.serve_options import ServeOptions
from fcsnap.uffd.shared import SharedBuild
from fcsnap.uffd.watchdog import Watchdog, WatchdogError
from fcsnap.workingset import read_working_set, write_working_set

if TYPE_CHECKING:
    from fcsnap.uffd.reactor import Reactor

RETRY_POLL = 0.002  # seconds between retries of deferred faults
FETCH_POLL = 0.001  # seconds between asks for what is being fetched (a fetch takes ~10 ms)


def stats_json(stats: InstallStats, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "faults": stats.faults,
        "pages_served": stats.pages_served,
        "bytes_served": stats.bytes_served,
        "zero_pages": stats.zero_pages,
        "installs": stats.installs,
        "compiled_faults": stats.compiled_faults,
        "prefetched_pages": stats.prefetched_pages,
        "populated_pages": stats.populated_pages,
        "remove_events": stats.remove_events,
        "retries": stats.retries,
        "already_present": stats.already_present,
        "wp_faults": stats.wp_faults,
        "per_build_pages": {str(k): v for k, v in stats.per_build_pages.items()},
        "duration_s": round(time.monotonic() - stats.started, 6),
        "first_fault_s": stats.first_fault_s,
        "prefetch_s": stats.prefetch_s,
        "fault_latency": latency.summary(stats.latency),
        **extra,
    }


class Session:
    """Serves one VM from a shared build: `listen`, then hand it to a reactor, which calls
    the `on_*` handlers until `done`, then `finish` (VM killed unless it exited or is fully
    served; stats and working set written). `close` frees a session never served."""

    def __init__(self, build: SharedBuild, options: ServeOptions, vm_id: str | None = None
                 ) -> None:
        self.options = options
        self.build = build
        self.header = build.header
        # the build the written set's pages differ from: the one served; a daemon's checkpoint
        # sets its own with its take, and a new interval for a client None (not a build)
        self.written_base: uuid.UUID | None = self.header.metadata.build_id
        self.prefetch = (
            read_working_set(options.prefetch_ws, self.header.metadata.size)
            if options.prefetch_ws is not None
            else None
        )
        self.pages = build.page_source(options.verify, options.cache_bytes)
        self._holding_fetches = False  # while the working set goes in (see _start_serving)
        build.fetch_rest()  # of builds in object storage: in the background
        if self.prefetch is not None:
            self.pages.mapping_arrays()  # now, not after the handshake
            self.pages.fetch_ahead(self.prefetch)  # a build in S3: fetched while VM connects
        self.stats = InstallStats()
        self.peer: Peer | None = None
        self.installer: Installer | None = None
        self.exit_reason: str | None = None  # why it ended: None until it has
        self.state = "new"  # new, listening, serving, ended
        self.done = False  # set by a handler: the reactor then calls `finish`
        self._error: BaseException | None = None  # what ended it, if not the VM or a stop
        self._reactor: Reactor | None = None
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Held while writing to or closing the stop pipe, so that a late stop() (the snapshot
        # load thread failing after the session ended) never writes to a closed fd number
        # that something else has since been given. Reentrant: a signal handler runs stop()
        # on the main thread, which may be inside stop() already.
        self._stop_lock = threading.RLock()
        self._failure: FcsnapError | None = None  # set by `fail`, raised by the reactor
        self._stop_reason = "signal"  # the exit reason a stop gives
        self._socket_inode: int | None = None
        # A VM accepted whose handshake is on its way: (connection, pid, pidfd) and its reader
        self._connecting: tuple[socket.socket, int, int] | None = None
        self._handshake: HandshakeReader | None = None
        self._fast: FastPath | None = None
        self._phase: str | None = None  # background work: eager, prefetch, populate, or None
        self._prefetcher: Prefetch | None = None
        self._populate: Iterator[tuple[Region, int, int]] = iter(())
        self._served_from = 0.0  # when the handshake ended
        self._pending_span: tuple[Region, int, int] | None = None
        self._backlog: list[int] = []  # faults read while installing eagerly
        self._deferred: list[int] = []  # faults that met EAGAIN: retried after a drain
        self._fetching: dict[int, int] = {}  # faults waiting on a fetch: when first read (ns)
        self._retry_at: float | None = None
        self._background_at: float | None = None  # background work waiting on a fetch
        self.rejected_peers = 0  # connections from uids not admitted
        self._watchdog: Watchdog | None = None  # kills the VM if this process is SIGKILLed
        self._vm_id = vm_id or str(options.socket)  # the VM's name to the watchdog
        self._released = False  # the watchdog was told the VM no longer needs us
        self._removes_seen = 0  # REMOVE events when it was told
        self._events = abi.EventReader()  # one read of many messages, into one buffer

    # -- lifecycle -------------------------------------------------------------------------

    def listen(self) -> None:
        """Check what can be checked, start (or join) the watchdog and listen (or take the
        options' listener); FcsnapError before anything listens, with everything this session
        opened closed again (a listener it was given stays its giver's to close)."""
        try:
            self.options.check_outputs()  # now, not after serving
            self._start_watchdog()
            self._listener = self.options.listener
            if self._listener is None:
                self._listener = listen(self.options.socket, self.options.access)
            self._listener.setblocking(False)  # accept only what is there: see on_listener
        except BaseException:
            self._end_watch()
            self.close()
            raise
        self._socket_inode = os.stat(self.options.socket).st_ino
        self.state = "listening"

    def handed_to(self, reactor: Reactor) -> None:
        """Note the reactor about to serve this session (on the thread handing it over), so
        that `call` made before the reactor adopts it waits for it rather than failing."""
        self._reactor = reactor

    def attach(self, reactor: Reactor) -> None:
        """Start being served by `reactor` (on its thread): wait for the VM or a stop."""
        listener = self._listener
        assert listener is not None, "listen() first"
        self._reactor = reactor
        reactor.watch(self._stop_r, self, self.on_stop)
        reactor.watch(listener.fileno(), self, self.on_listener)
        self.build.make_arrays_soon()  # while the VM starts and connects
        if self.options.on_listening is not None:
            self.options.on_listening()

    def abort(self, error: BaseException) -> None:
        """End with `error` (a handler raised it): `finish` kills the VM and reports it."""
        self._error = error
        self.done = True

    def finish(self) -> BaseException | None:
        """The session's way out, whatever it was (the reactor has stopped watching its fds):
        the VM killed unless it exited or needs us no more, everything closed, the working
        set and stats written. Returns the error that ended it, None for the VM's exit or a
        stop."""
        error = self._error
        self.done = True
        try:
            if error is not None:
                self.exit_reason = f"error: {error}"
                if self.peer is not None:
                    self.peer.kill()
            if self._listener is not None:
                try:
                    turn_away(self._listener, self.options.access.admits)  # queued VMs
                finally:
                    stop_listening(self._listener)
            self._unlink_socket()
            self._close_handshake()
            if self._fast is not None:
                self._fast.settle()
            if self.peer is not None:
                self.peer.close()
            self._end_watch()  # the VM exited, was killed, or needs us no more
            self.state = "ended"
            try:
                self._write_working_set()
                self._write_written()
                self._write_stats()
            except FcsnapError as e:
                error = error or e
        finally:
            self.close()
        return error

    def close(self) -> None:
        """Close the stop pipe: a session serves once, and leaks nothing when it is done.
        (The shared build is its owner's to release.)"""
        self.state = "ended"
        self._hold_fetches(False)  # a working set never finished: let the fetches go on
        with self._stop_lock:
            for fd in (self._stop_r, self._stop_w):
                if fd >= 0:
                    os.close(fd)
            self._stop_r = self._stop_w = -1

    def stop(self, reason: str = "signal") -> None:
        """Ask the session to stop (from a signal handler or another thread): it kills the
        VM, if one is being served and needs us, and ends with `reason` as its exit reason.
        Once it has ended this does nothing."""
        self._stop_reason = reason
        with self._stop_lock:
            if self._stop_w < 0:
                return
            with contextlib.suppress(BlockingIOError):  # the pipe is full: a stop is pending
                os.write(self._stop_w, b"x")

    def fail(self, error: FcsnapError) -> None:
        """Stop with `error` (from another thread: Firecracker refused the snapshot load):
        the session kills the VM, if one connected, and ends with it."""
        self._failure = error
        self.stop()

    def document(self) -> dict[str, Any]:
        """The --stats document, live (read from another thread while serving: the counters
        are a moment's, not one consistent snapshot)."""
        installer = self.installer
        tracking = installer.tracking if installer is not None else None
        extra = {
            "write_tracking": tracking.mode if tracking is not None else None,
            "written_pages": (self.written_count() if tracking is not None
                              and tracking.recorded else None),
            "exit_reason": self.exit_reason,
            "peer_pid": self.peer.pid if self.peer else None,
            "regions": len(self.peer.regions) if self.peer else 0,
            "extra_fds_closed": self.peer.extra_fds if self.peer else 0,
            "rejected_peers": self.rejected_peers,
            "build_id": str(self.header.metadata.build_id),
        }
        if self.options.more_stats is not None:
            extra.update(self.options.more_stats())
        return stats_json(self.stats, extra)

    # -- the written set ---------------------------------------------------------------------

    def written_count(self) -> int:
        """4 KiB pages the guest wrote since the restore or the last new interval (a moment's
        count, from any thread)."""
        installer = self.installer
        return 0 if installer is None else writes.written_count(installer.states.values())

    def written_set(self) -> np.ndarray:
        """The written set (writes.py): ascending guest-memory offsets of 4 KiB pages."""
        installer = self.installer
        if installer is None:
            return np.zeros(0, np.int64)
        return writes.written_set(installer.states.values())

    def take_written(self, new_interval: bool) -> tuple[np.ndarray, int]:
        """(the written set, its written pages); with `new_interval`, the set starts empty
        again and the pages in it are write-protected again, so that the next interval gets
        only its own writes. On the reactor's thread (`call`): the compiled loop, which
        notes writes, runs there too, so nothing is noted between the take and the
        re-protect. FcsnapError where writes are not tracked."""
        installer = self._tracking()
        written, count = self.written_set(), self.written_count()
        if new_interval and self.peer is not None:
            def read_events() -> int:  # REMOVEs applied; the faults served below
                events = self._events.read(installer.uffd)
                self._apply(events, self._backlog)
                return len(events)

            for state in installer.states.values():
                writes.protect_again(installer.uffd, state, read_events)
            if self._backlog and self._phase != "eager":
                self._serve_pending(None)
        return written, count

    def take_for_copy(self, preimages: Preimages) -> tuple[np.ndarray, int, np.ndarray]:
        """A background checkpoint's take (on the reactor's thread, the VM paused): the pages
        present in the written set marked pending, `preimages` attached to keep what the
        guest writes over before the copy has them, then `take_written(True)`. Returns its
        answer and the pending pages' offsets. FcsnapError while another copy runs."""
        installer = self._tracking()
        if installer.preimages is not None:
            raise FcsnapError("a checkpoint's background copy is under way")
        parts = [writes.mark_pending(state) for state in installer.states.values()]
        live = np.sort(np.concatenate([np.zeros(0, np.int64), *parts]))
        installer.preimages = preimages
        if self._fast is not None and self.peer is not None:
            self._fast.keep_preimages(preimages, self.peer.pid)
        try:
            return (*self.take_written(True), live)
        except BaseException:
            self.end_copy()
            raise

    def end_copy(self) -> None:
        """The background copy ended (on the reactor's thread): nothing is pending any more."""
        installer = self.installer
        if installer is not None:
            for state in installer.states.values():
                state.pending[:] = 0
            installer.preimages = None
            if self._fast is not None:
                self._fast.keep_preimages(None)

    def _tracking(self) -> Installer:
        """The installer, where it tracks writes; FcsnapError (one line) if not."""
        installer = self.installer
        if installer is None or not installer.tracking.recorded:
            raise FcsnapError("this restore does not track writes (no VM yet, or its memory "
                              "is not registered for write-protect: restore --track-writes)")
        return installer

    def give_back_written(self, offsets: np.ndarray) -> None:
        """Note `offsets` (taken by take_written) as written again, on the reactor's thread:
        a checkpoint that failed after the take loses no write."""
        installer = self.installer
        if installer is not None:
            writes.mark_written(installer.states.values(), offsets)

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run `fn` on the reactor's thread (from another thread) and return what it returns,
        or raise what it raises; FcsnapError if it has not run within `timeout` seconds."""
        reactor = self._reactor
        if reactor is None or self.done:
            raise FcsnapError("the restore is not being served")
        future = reactor.call(self, fn)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise FcsnapError(f"the restore's server did not answer within {timeout:g}s"
                              ) from None

    # -- handlers (the reactor's thread) ---------------------------------------------------

    def on_stop(self) -> None:
        """The stop pipe: end, the VM killed unless every page is in (a failure: raised)."""
        if self._failure is not None:
            raise self._failure
        installer = self.installer
        if self.peer is None or installer is None:
            self._end("stopped before a VM was served")  # finish kills a VM half connected
            return
        if not installer.fully_resident():
            self.peer.kill()  # it would freeze at its next fault
        self._end(self._stop_reason)

    def on_listener(self) -> None:
        """Accept the VM, if an admitted one is there, and start taking its handshake. The
        listener is shut down at once: a second client is refused instead of waiting behind
        this handshake; one already queued is killed by the watchdog when the guard ends (an
        admitted peer has sent its uffd, and no one will serve it), any other disconnected."""
        listener, reactor = self._listener, self._reactor
        assert listener is not None and reactor is not None
        accepted = accept_admitted(listener, self.options.access.admits, self._refused)
        if accepted is None:
            return
        conn, pid = accepted
        reactor.unwatch(listener.fileno())
        stop_listening(listener)
        self._listener = None
        try:
            conn.setblocking(False)
            pidfd = peer_pidfd(pid)
        except BaseException:
            conn.close()
            raise
        self._connecting = (conn, pid, pidfd)
        self._watch(pidfd)
        self._handshake = HandshakeReader(self.header.metadata.size,
                                          self.options.handshake_timeout)
        reactor.watch(conn.fileno(), self, self.on_connection)

    def on_connection(self) -> None:
        """Part of the handshake came in; once it is whole, start serving the VM."""
        assert self._connecting is not None and self._handshake is not None
        conn, pid, pidfd = self._connecting
        received = self._handshake.feed(conn)
        if received is None:
            return
        regions, uffd, extra = received
        self.peer = Peer(conn, uffd, regions, pid, pidfd, extra)
        self._connecting = self._handshake = None
        assert self._reactor is not None
        self._reactor.unwatch(conn.fileno())
        self._start_serving()

    def on_pidfd(self) -> None:
        self._end("vm exited")

    def on_uffd(self) -> None:
        """Events for Python: read by the compiled wait (its batch), or all of them here."""
        if self._phase == "eager":  # every page in before any fault: keep them for later
            self._backlog += self._drain()
            return
        self._serve_pending(self._fast.collect() if self._fast is not None else None)

    def collect(self) -> None:
        """The compiled wait served this session's faults in C: fold its stats in."""
        fast = self._fast
        if fast is not None and fast.ctx.pumped:
            batch = fast.collect()
            assert not (batch.events or batch.retry or batch.defer)

    def next_timer(self) -> float | None:
        """When `on_timer` is next due (time.monotonic()), or None."""
        if self._handshake is not None:
            return self._handshake.deadline
        due = [t for t in (self._retry_at, self._background_at) if t is not None]
        return min(due) if due else None

    def on_timer(self, now: float) -> None:
        """The handshake's deadline passed (an error), or deferred faults, or work waiting on
        a fetch, are due again."""
        if self._handshake is not None:
            if now >= self._handshake.deadline:
                raise self._handshake.timed_out()
            return
        if self._background_at is not None and now >= self._background_at:
            self._background_at = None
            assert self._reactor is not None
            self._reactor.schedule(self)
        if self._retry_at is not None and now >= self._retry_at:
            self._serve_pending(self._fast.pump() if self._fast is not None else None)

    def background(self) -> bool:
        """One batch of background work (the reactor serves every session's pending faults
        between two); False once this session has none left, or while what it needs is
        being fetched (the timer schedules it again)."""
        try:
            return self._background_step()
        except FetchPending:
            self._background_at = time.monotonic() + FETCH_POLL
            return False

    def _background_step(self) -> bool:
        installer = self.installer
        assert installer is not None
        if self._phase == "eager":
            self._backlog += self._drain()  # REMOVEs before going on
            if self._prefetcher is not None:
                if self._prefetcher.step():
                    return True
                self._prefetched()
            if self._run_background():
                return True
            self._update_watch()
            self._phase = None
            assert self._reactor is not None and self.peer is not None
            if self._fast is not None:  # from now on the compiled wait serves the uffd
                self._reactor.watch(self.peer.uffd, self, self.on_uffd, self._fast)
            self._serve_pending(self._fast.pump() if self._fast is not None else None)
            return False
        if self._phase == "prefetch":
            # Faults or not: the guest needs every page of its working set.
            assert self._prefetcher is not None
            if not self._prefetcher.step():
                self._prefetched()
                self._phase = "populate"
            return True
        if self._deferred:  # faults waiting for their retry come first
            return True
        if self._run_background():
            return True
        self._update_watch()
        self._phase = None
        return False

    # -- serving ---------------------------------------------------------------------------

    def _start_serving(self) -> None:
        peer, reactor = self.peer, self._reactor
        assert peer is not None and reactor is not None
        early: list[abi.Event] = []  # read before the installer is there to apply them

        def read_events() -> int:
            events = self._events.read(peer.uffd)
            early.extend(events)
            return len(events)

        track = self.options.track_writes or self.options.written is not None
        tracking = writes.set_up(peer.uffd, peer.regions, track, read_events)
        self.state = "serving"
        installer = self.installer = Installer(
            peer.uffd, RegionMap(peer.regions), self.pages, self.stats, self.options.fault_around,
            tracking,
        )
        if self.options.record_ws is not None:
            installer.recorded = []
        if early:  # applied now, their faults served first
            self._apply(early, self._backlog)
            self._retry_at = time.monotonic()
        self._served_from = time.monotonic()
        if self.prefetch is not None:
            self._prefetcher = Prefetch(installer, self.prefetch, self.options.batch_bytes)
            # No background fetch starts meanwhile: checking and caching its chunks would take
            # the cores the working set's installs need.
            self._hold_fetches(True)
        if self.options.populate or self.options.eager:
            self._populate = self._populate_work(installer)
        self._fast = FastPath.for_installer(installer)
        reactor.watch(peer.pidfd, self, self.on_pidfd)
        if self.options.eager:
            self._phase = "eager"
            reactor.watch(peer.uffd, self, self.on_uffd)  # drained in Python until done
        else:
            self._phase = "prefetch" if self._prefetcher is not None else "populate"
            reactor.watch(peer.uffd, self, self.on_uffd, self._fast)
        reactor.schedule(self)  # populate's last step hands the VM back when all is in

    def _prefetched(self) -> None:
        self.stats.prefetch_s = round(time.monotonic() - self._served_from, 6)
        self._prefetcher = None
        self._hold_fetches(False)

    def _hold_fetches(self, held: bool) -> None:
        if held != self._holding_fetches:
            self._holding_fetches = held
            self.build.hold_fetch_rest(held)

    def _serve_pending(self, batch: Batch | None) -> None:
        """Serve what is pending: the faults kept back, the compiled wait's batch (or, in
        Python, every event now readable), the deferred ones first."""
        installer = self.installer
        assert installer is not None
        faults, self._backlog = self._backlog, []
        if batch is None:
            faults += self._drain()
        else:
            if batch.gone:
                self._end("vm exited")
                return
            self._apply(batch.events, faults)
            if batch.events:  # the rest of what is pending, before serving any
                faults += self._drain()
            faults += batch.defer
        if self._released and self.stats.remove_events != self._removes_seen:
            self._update_watch()  # a balloon: the VM needs us again
        if self._deferred:
            self.stats.retries += len(self._deferred)
            faults = self._deferred + faults
        self._deferred = [] if batch is None else batch.retry
        fetching, self._fetching = self._fetching, {}
        for address in [*fetching, *faults] if fetching else faults:
            try:
                outcome = installer.fault(address, since=fetching.get(address))
            except FetchPending:
                self._fetching.setdefault(address, fetching.get(address, time.monotonic_ns()))
                continue
            if outcome is RETRY:
                self._deferred.append(address)
            elif outcome is GONE:
                self._end("vm exited")
                return
        now = time.monotonic()
        self._retry_at = (now + RETRY_POLL if self._deferred
                          else now + FETCH_POLL if self._fetching else None)

    def _end(self, reason: str) -> None:
        self.exit_reason = reason
        self.done = True

    def _populate_work(self, installer: Installer) -> Iterator[tuple[Region, int, int]]:
        """Spans to install when no fault is waiting (--populate, --eager): everything."""
        batch = max(1, self.options.batch_bytes)
        for region in installer.regions.regions:
            step = max(1, batch // region.page_size)
            pages = region.size // region.page_size
            for lo in range(0, pages, step):
                yield region, lo, min(lo + step, pages)

    def _run_background(self) -> bool:
        """Install about batch_bytes of populate spans (DONTWAKE), then wake what they
        cover; False once no work is left. An EAGAIN ends the batch early: the events are
        read before it resumes there."""
        installer = self.installer
        assert installer is not None
        budget = self.options.batch_bytes
        woken: dict[int, tuple[int, int]] = {}
        more = True
        try:
            while budget > 0:
                span = self._pending_span or next(self._populate, None)
                self._pending_span = None
                if span is None:
                    more = False
                    break
                region, lo, hi = span
                try:
                    installed, resume = installer.install_span(region, lo, hi)
                except FetchPending:  # this span again once fetched (what is in stays in)
                    self._pending_span = span
                    raise
                self.stats.populated_pages += installed
                budget -= max(1, installed) * region.page_size
                if installed:
                    first, last = woken.get(region.base, (lo, hi))
                    woken[region.base] = (min(first, lo), max(last, hi))
                if resume is not None:
                    self._pending_span = (region, resume, hi)
                    break
        finally:
            for region in installer.regions.regions:
                if region.base in woken:
                    first, last = woken[region.base]
                    size = region.page_size
                    abi.wake(installer.uffd, region.base + first * size, (last - first) * size)
        return more

    def _drain(self) -> list[int]:
        """Read every pending event; apply REMOVEs; return fault addresses in arrival order."""
        assert self.installer is not None
        faults: list[int] = []
        while events := self._events.read(self.installer.uffd):
            self._apply(events, faults)
        return faults

    def _apply(self, events: list[abi.Event], faults: list[int]) -> None:
        """Apply REMOVEs now and append the addresses of faults to `faults`, in order."""
        installer = self.installer
        assert installer is not None
        for event in events:
            if type(event) is abi.Fault:
                self.stats.faults += 1
                if self.stats.first_fault_s is None:
                    self.stats.first_fault_s = time.monotonic() - self.stats.started
                faults.append(writes.fault_token(event.address, event.flags))
            elif type(event) is abi.Remove:
                installer.remove(event.start, event.end)

    # -- the watchdog, files ---------------------------------------------------------------

    def _start_watchdog(self) -> None:
        self._watchdog = self.options.watchdog
        if self._watchdog is None:
            try:
                self._watchdog = Watchdog.start()
            except WatchdogError as e:
                raise FcsnapError(str(e)) from e

    def _watch(self, pidfd: int) -> None:
        """Hand the accepted VM to the watchdog, before its handshake: from then on it
        freezes at its next fault if this process dies."""
        assert self._watchdog is not None
        try:
            self._watchdog.watch(self._vm_id, pidfd)
        except WatchdogError as e:
            raise FcsnapError(f"{e}: not serving a VM nothing would kill if this server died"
                              ) from e

    def _update_watch(self) -> None:
        """Release the VM from the watchdog once every page is installed (a SIGKILL of this
        process then leaves it running); watch it again if a balloon took pages back."""
        installer, watchdog = self.installer, self._watchdog
        assert installer is not None and watchdog is not None and self.peer is not None
        resident = installer.fully_resident()
        if resident != self._released:
            try:
                if resident:
                    watchdog.release(self._vm_id)
                else:
                    watchdog.watch(self._vm_id, self.peer.pidfd)
            except WatchdogError as e:  # serve on: killing the VM now would be a sure loss
                print(f"fcsnap: warning: {e}; a SIGKILL of this server would now leave the "
                      "VM frozen", file=sys.stderr, flush=True)
            self._released = resident
        self._removes_seen = self.stats.remove_events

    def _end_watch(self) -> None:
        """Release the VM (it exited, was killed or needs us no more) and hang up on our
        own watchdog; a shared one goes on watching its other VMs."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        with contextlib.suppress(WatchdogError):
            watchdog.release(self._vm_id)
        if self.options.watchdog is None:
            watchdog.close()

    def _close_handshake(self) -> None:
        """A VM that connected and was not served (a stop, a bad or late handshake) is
        killed: it would wait for its pages forever."""
        if self._handshake is not None:
            self._handshake.close()
            self._handshake = None
        if self._connecting is not None:
            conn, _pid, pidfd = self._connecting
            self._connecting = None
            kill_process(pidfd)
            os.close(pidfd)
            conn.close()

    def _refused(self, pid: int, uid: int) -> None:
        """A connection from a uid not admitted: log it, count it, keep waiting for the VM."""
        self.rejected_peers += 1
        admitted = ", ".join(str(u) for u in sorted(self.options.access.admitted_uids()))
        print(f"fcsnap: refused a connection to {self.options.socket} from uid {uid} "
              f"(pid {pid}): admitted uids are {admitted}", file=sys.stderr, flush=True)

    def _unlink_socket(self) -> None:
        """Remove our socket file, unless someone has since put another file there."""
        if self._socket_inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.options.socket).st_ino == self._socket_inode:
                os.unlink(self.options.socket)

    def _write_stats(self) -> None:
        path = self.options.stats_path
        if path is None:
            return
        document = json.dumps(self.document(), indent=2) + "\n"
        write_output(path, document.encode(), "--stats", self.options.output_root)

    def _write_written(self) -> None:
        path = self.options.written
        if path is None or self.installer is None or not self.installer.tracking.recorded:
            return
        write_working_set(path, self.header.metadata.size, self.written_set().tolist(),
                          "--written", self.options.output_root, self.written_base)

    def _write_working_set(self) -> None:
        path = self.options.record_ws
        if path is None or self.installer is None or self.installer.recorded is None:
            return
        offsets = dict.fromkeys(self.installer.recorded)  # first install of each page
        write_working_set(path, self.header.metadata.size, offsets, "--record-ws",
                          self.options.output_root)
