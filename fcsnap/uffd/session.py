"""One VM's restore session: listen, accept, handshake, serve its faults, account for them.

A session owns no signals and assumes no thread: `restore` runs one on its main thread (server.py
turns SIGTERM/SIGINT into `stop`), the daemon runs one per VM on a thread of its own (the
compiled loop releases the GIL while it waits and installs). The build it serves is a
SharedBuild (shared.py), opened once for every session that serves it.

Loop: epoll over the uffd, the VM's pidfd and a stop pipe; read *all* pending events before
serving (a pending REMOVE makes every copy fail with EAGAIN); install pages with UFFDIO_COPY or
ZEROPAGE; defer EAGAIN faults and retry them after the next drain, with a short poll timeout so
none is stranded. The server never touches the guest memory itself. Where it can, a compiled
loop (fastpath.py) does the polling, reading and installing with the GIL released, and hands
back what only Python handles.

A guest whose page server is gone freezes at its next fault, so every way out other than the
VM's own exit - an error of any kind, a stop - kills the VM first.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.options import ADAPTIVE
from fcsnap.uffd import abi, latency
from fcsnap.uffd.fastpath import FastPath
from fcsnap.uffd.handshake import Peer, accept_peer
from fcsnap.uffd.installer import GONE, RETRY, Installer, InstallStats
from fcsnap.uffd.listener import SocketAccess, listen
from fcsnap.uffd.prefetch import Prefetch
from fcsnap.uffd.regions import Region, RegionMap
from fcsnap.uffd.shared import SharedBuild
from fcsnap.uffd.watchdog import Watchdog, WatchdogError
from fcsnap.workingset import read_working_set, write_working_set

RETRY_POLL = 0.002  # seconds between retries of deferred faults


@dataclass
class ServeOptions:
    socket: Path
    verify: bool = False
    stats_path: Path | None = None
    handshake_timeout: float = 10.0
    cache_bytes: int = 64 << 20
    on_listening: Callable[[], None] | None = None  # e.g. ask Firecracker to load the snapshot
    fault_around: int = ADAPTIVE  # bytes installed around a fault (faultaround.py)
    record_ws: Path | None = None  # write the pages the guest faulted, in order
    prefetch_ws: Path | None = None  # install these pages right after the handshake
    populate: bool = False  # then install every other page in the background
    eager: bool = False  # install every page before serving any fault
    batch_bytes: int = 1 << 20  # background work between two looks at the uffd
    access: SocketAccess = field(default_factory=SocketAccess)  # mode, owner, admitted uids
    watchdog: Watchdog | None = None  # a shared one (a daemon's); None: run() starts its own


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
        "per_build_pages": {str(k): v for k, v in stats.per_build_pages.items()},
        "duration_s": round(time.monotonic() - stats.started, 6),
        "first_fault_s": stats.first_fault_s,
        "prefetch_s": stats.prefetch_s,
        "fault_latency": latency.summary(stats.latency),
        **extra,
    }


class Session:
    """Serves one VM from a shared build: `listen`, then `serve` (on any thread), which
    returns 0 when the VM exits or a stop is asked for, and raises (VM killed) otherwise.
    Stats are written on every way out of `serve`; `close` frees a session never served."""

    def __init__(self, build: SharedBuild, options: ServeOptions, vm_id: str | None = None
                 ) -> None:
        self.options = options
        self.build = build
        self.header = build.header
        self.prefetch = (
            read_working_set(options.prefetch_ws, self.header.metadata.size)
            if options.prefetch_ws is not None
            else None
        )
        self.pages = build.page_source(options.verify, options.cache_bytes)
        if self.prefetch is not None:
            self.pages.mapping_arrays()  # now, not after the handshake
            self.pages.fetch_ahead(self.prefetch)  # a build in S3: fetched while VM connects
        self.stats = InstallStats()
        self.peer: Peer | None = None
        self.installer: Installer | None = None
        self.exit_reason = "not started"
        self.state = "new"  # new, listening, serving, ended
        self._listener: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Held while writing to or closing the stop pipe, so that a late stop() (the snapshot
        # load thread failing after serve() has returned) never writes to a closed fd number
        # that something else has since been given. Reentrant: a signal handler runs stop()
        # on the main thread, which may be inside stop() already.
        self._stop_lock = threading.RLock()
        self._failure: FcsnapError | None = None  # set by `fail`, raised by `serve`
        self._stop_reason = "signal"  # the exit reason a stop gives
        self._socket_inode: int | None = None
        self._pending_span: tuple[Region, int, int] | None = None
        self._backlog: list[int] = []  # faults read while installing eagerly
        self.rejected_peers = 0  # connections from uids not admitted
        self._watchdog: Watchdog | None = None  # kills the VM if this process is SIGKILLed
        self._vm_id = vm_id or str(options.socket)  # the VM's name to the watchdog
        self._released = False  # the watchdog was told the VM no longer needs us
        self._removes_seen = 0  # REMOVE events when it was told
        self._events = abi.EventReader()  # one read of many messages, into one buffer

    # -- lifecycle -------------------------------------------------------------------------

    def listen(self) -> None:
        """Check what can be checked, start (or join) the watchdog and listen; FcsnapError
        before anything listens, with everything this session opened closed again."""
        stats_path = self.options.stats_path
        problem = None
        if stats_path is not None and not stats_path.parent.is_dir():
            problem = "no such directory"
        elif stats_path is not None and stats_path.is_dir():  # found now, not after serving
            problem = "is a directory"
        try:
            if problem is not None:
                raise FcsnapError(f"cannot write --stats {stats_path}: {problem}")
            self._start_watchdog()
            self._listener = listen(self.options.socket, self.options.access)
        except BaseException:
            self._end_watch()
            self.close()
            raise
        self._socket_inode = os.stat(self.options.socket).st_ino
        self.state = "listening"

    def serve(self) -> int:
        """Serve one VM until it exits (0) or a stop is asked for (0, VM killed unless every
        page is in); any exception kills the VM and propagates."""
        listener = self._listener
        assert listener is not None, "listen() first"
        try:
            if self.options.on_listening is not None:
                self.options.on_listening()
            self.peer = accept_peer(
                listener, self.header.metadata.size, self.options.handshake_timeout,
                self._stop_r, self.options.access.admits, self._refused, self._watch,
            )
            if self.peer is None:
                if self._failure is not None:
                    raise self._failure
                self.exit_reason = "stopped before a VM was served"
                return 0
            self.state = "serving"
            self.installer = Installer(
                self.peer.uffd, RegionMap(self.peer.regions), self.pages, self.stats,
                self.options.fault_around,
            )
            if self.options.record_ws is not None:
                self.installer.recorded = []
            return self._serve()
        except BaseException as e:
            self.exit_reason = f"error: {e}"
            if self.peer is not None:
                self.peer.kill()
            raise
        finally:
            listener.close()
            self._unlink_socket()
            if self.peer is not None:
                self.peer.close()
            self._end_watch()  # the VM exited, was killed, or needs us no more
            self.state = "ended"
            try:
                self._write_working_set()
                self._write_stats()
            finally:
                self.close()

    def close(self) -> None:
        """Close the stop pipe: a session serves once, and leaks nothing when it is done.
        (The shared build is its owner's to release.)"""
        self.state = "ended"
        with self._stop_lock:
            for fd in (self._stop_r, self._stop_w):
                if fd >= 0:
                    os.close(fd)
            self._stop_r = self._stop_w = -1

    def stop(self, reason: str = "signal") -> None:
        """Ask `serve` to stop (from a signal handler or another thread): it kills the VM, if
        one is being served, and returns 0 with `reason` as its exit reason. Once `serve` has
        returned this does nothing."""
        self._stop_reason = reason
        with self._stop_lock:
            if self._stop_w < 0:
                return
            with contextlib.suppress(BlockingIOError):  # the pipe is full: a stop is pending
                os.write(self._stop_w, b"x")

    def fail(self, error: FcsnapError) -> None:
        """Stop with `error` (from another thread: Firecracker refused the snapshot load):
        `serve` kills the VM, if one connected, and raises it."""
        self._failure = error
        self.stop()

    def document(self) -> dict[str, Any]:
        """The --stats document, live (read from another thread while serving: the counters
        are a moment's, not one consistent snapshot)."""
        extra = {
            "exit_reason": self.exit_reason,
            "peer_pid": self.peer.pid if self.peer else None,
            "regions": len(self.peer.regions) if self.peer else 0,
            "extra_fds_closed": self.peer.extra_fds if self.peer else 0,
            "rejected_peers": self.rejected_peers,
            "build_id": str(self.header.metadata.build_id),
        }
        return stats_json(self.stats, extra)

    def _start_watchdog(self) -> None:
        self._watchdog = self.options.watchdog
        if self._watchdog is None:
            try:
                self._watchdog = Watchdog.start()
            except WatchdogError as e:
                raise FcsnapError(str(e)) from e

    def _watch(self, _pid: int, pidfd: int) -> None:
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

    def _refused(self, pid: int, uid: int) -> None:
        """A connection from a uid not admitted: log it, count it, keep waiting for the VM."""
        self.rejected_peers += 1
        admitted = ", ".join(str(u) for u in sorted(self.options.access.admitted_uids()))
        print(f"fcsnap: refused a connection to {self.options.socket} from uid {uid} "
              f"(pid {pid}): admitted uids are {admitted}", file=sys.stderr, flush=True)

    def _unlink_socket(self) -> None:
        """Remove our socket file, unless someone has since put another file there."""
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.options.socket).st_ino == self._socket_inode:
                os.unlink(self.options.socket)

    def _write_stats(self) -> None:
        path = self.options.stats_path
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.document(), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise FcsnapError(f"cannot write --stats {path}: {e.strerror or e}") from e

    def _write_working_set(self) -> None:
        path = self.options.record_ws
        if path is None or self.installer is None or self.installer.recorded is None:
            return
        offsets = dict.fromkeys(self.installer.recorded)  # first install of each page
        try:
            write_working_set(path, self.header.metadata.size, offsets)
        except OSError as e:
            raise FcsnapError(f"cannot write --record-ws {path}: {e.strerror or e}") from e

    # -- the loop --------------------------------------------------------------------------

    def _serve(self) -> int:
        peer, installer = self.peer, self.installer
        assert peer is not None and installer is not None
        prefetch = None
        handshake = time.monotonic()
        if self.prefetch is not None:
            prefetch = Prefetch(installer, self.prefetch, self.options.batch_bytes)
        background = self._populate_work(installer)
        if self.options.eager:
            while prefetch is not None and prefetch.step():
                if select.select([peer.pidfd], [], [], 0)[0]:
                    break  # the VM is gone: installs fail (ESRCH) from now on
                self._backlog += self._drain(peer.uffd, installer)  # REMOVEs before going on
            if prefetch is not None:
                self.stats.prefetch_s = round(time.monotonic() - handshake, 6)
            prefetch = None
            self._run_background(background, until_done=True)
            self._update_watch()
        poller = select.epoll()
        poller.register(peer.uffd, select.EPOLLIN)
        poller.register(self._stop_r, select.EPOLLIN)
        poller.register(peer.pidfd, select.EPOLLIN)
        fast = FastPath.for_installer(installer)
        deferred: list[int] = []
        prefetching = prefetch is not None
        busy = True  # populate work may remain
        try:
            while True:
                # With background work, what is pending is served once between its batches:
                # a guest faulting as fast as it is served must not hold the batches back.
                timeout = 0 if busy or prefetching else (RETRY_POLL if deferred else -1)
                batch = None
                if fast is not None and not deferred and timeout != 0:
                    batch = fast.run(self._stop_r, peer.pidfd, timeout)  # serves, GIL released
                    ready = {fd for fd, _ in poller.poll(0)}
                else:
                    ready = {fd for fd, _ in poller.poll(timeout)}
                    if fast is not None and peer.uffd in ready:
                        batch = fast.pump()
                if self._stop_r in ready:
                    if self._failure is not None:
                        raise self._failure
                    self.exit_reason = self._stop_reason
                    if not installer.fully_resident():
                        peer.kill()  # it would freeze at its next fault
                    return 0
                if peer.pidfd in ready:
                    self.exit_reason = "vm exited"
                    return 0
                faults, self._backlog = self._backlog, []
                if fast is None:
                    faults += self._drain(peer.uffd, installer)
                elif batch is not None:
                    if batch.gone:
                        self.exit_reason = "vm exited"
                        return 0
                    self._apply(batch.events, installer, faults)
                    if batch.events:  # the rest of what is pending, before serving any
                        faults += self._drain(peer.uffd, installer)
                    faults += batch.defer
                if self._released and self.stats.remove_events != self._removes_seen:
                    self._update_watch()  # a balloon: the VM needs us again
                if deferred:
                    self.stats.retries += len(deferred)
                    faults = deferred + faults
                deferred = [] if batch is None else batch.retry
                for address in faults:
                    outcome = installer.fault(address)
                    if outcome is RETRY:
                        deferred.append(address)
                    elif outcome is GONE:
                        self.exit_reason = "vm exited"
                        return 0
                if prefetch is not None and prefetching:
                    # Faults or not: the guest needs every page of its working set.
                    prefetching = prefetch.step()
                    if not prefetching:
                        self.stats.prefetch_s = round(time.monotonic() - handshake, 6)
                elif busy and not faults and not deferred:
                    busy = self._run_background(background)
                    if not busy:
                        self._update_watch()
        finally:
            poller.close()
            if fast is not None:
                fast.add_stats(self.stats)

    def _populate_work(self, installer: Installer) -> Iterator[tuple[Region, int, int]]:
        """Spans to install when no fault is waiting (--populate, --eager): everything."""
        if self.options.populate or self.options.eager:
            batch = max(1, self.options.batch_bytes)
            for region in installer.regions.regions:
                step = max(1, batch // region.page_size)
                pages = region.size // region.page_size
                for lo in range(0, pages, step):
                    yield region, lo, min(lo + step, pages)

    def _run_background(
        self, work: Iterator[tuple[Region, int, int]], until_done: bool = False
    ) -> bool:
        """Install about batch_bytes of populate spans (DONTWAKE), then wake what they
        cover; False once no work is left."""
        installer = self.installer
        assert installer is not None
        budget = self.options.batch_bytes
        woken: dict[int, tuple[int, int]] = {}
        more = True
        while until_done or budget > 0:
            span = self._pending_span or next(work, None)
            self._pending_span = None
            if span is None:
                more = False
                break
            region, lo, hi = span
            installed, resume = installer.install_span(region, lo, hi)
            self.stats.populated_pages += installed
            budget -= max(1, installed) * region.page_size
            if installed:
                first, last = woken.get(region.base, (lo, hi))
                woken[region.base] = (min(first, lo), max(last, hi))
            if resume is not None:  # EAGAIN: events first, then carry on from there
                self._pending_span = (region, resume, hi)
                if until_done:  # eager: keep the faults for the loop, carry on installing
                    self._backlog += self._drain(installer.uffd, installer)
                    continue
                break
        for region in installer.regions.regions:
            if region.base in woken:
                first, last = woken[region.base]
                size = region.page_size
                abi.wake(installer.uffd, region.base + first * size, (last - first) * size)
        return more

    def _drain(self, uffd: int, installer: Installer) -> list[int]:
        """Read every pending event; apply REMOVEs; return fault addresses in arrival order."""
        faults: list[int] = []
        while events := self._events.read(uffd):
            self._apply(events, installer, faults)
        return faults

    def _apply(self, events: list[abi.Event], installer: Installer, faults: list[int]) -> None:
        """Apply REMOVEs now and append the addresses of faults to `faults`, in order."""
        for event in events:
            if type(event) is abi.Fault:
                self.stats.faults += 1
                if self.stats.first_fault_s is None:
                    self.stats.first_fault_s = time.monotonic() - self.stats.started
                faults.append(event.address)
            elif type(event) is abi.Remove:
                installer.remove(event.start, event.end)
