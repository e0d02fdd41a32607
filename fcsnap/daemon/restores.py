"""The daemon's restores: start one per request, on the least loaded of a few reactors.

A restore is a Session (fcsnap/uffd/session.py) over a SharedBuild from the daemon's registry,
watched by the daemon's one watchdog. The daemon has a fixed pool of reactors (reactor.py),
one thread each, by default as many as the CPUs it may run on: a reactor's compiled wait
serves faults with the GIL released, so the reactors serve side by side on every core, and
however many VMs there are the daemon has the same few threads. Whatever ends a session (its
VM exiting, a DELETE, a bad handshake, a corrupt block, any exception) ends that restore only:
its reason goes into its stats and one line on stderr, and the other VMs go on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.daemon.request import RequestError, RestoreRequest, parse_restore, request_build
from fcsnap.errors import FcsnapError, redact
from fcsnap.uffd import latency
from fcsnap.uffd.firecracker_api import Response, SnapshotLoad
from fcsnap.uffd.reactor import Reactor
from fcsnap.uffd.session import Session
from fcsnap.uffd.shared import BuildRegistry, SharedBuild
from fcsnap.uffd.watchdog import Watchdog
from fcsnap.units import format_bytes
from fcsnap.workingset import dump_working_set

if TYPE_CHECKING:
    from fcsnap.daemon.remote import RemoteBuilds

KEEP_ENDED = 256  # ended restores still listed (their final stats), newest kept
END_WAIT = 10.0  # seconds a DELETE or a daemon stop waits for a session to end
LOST = "a failed checkpoint could not give its pages back to the written set"
LOAD_GRACE = 5.0  # seconds past its --api-timeout a snapshot load may take to settle
CHECKPOINTS_KEPT = 32  # background checkpoints whose state GET .../checkpoints/N still answers

COUNTERS = ("faults", "pages_served", "bytes_served", "zero_pages", "compiled_faults",
            "remove_events", "retries")


@dataclass
class Restore:
    id: str
    vm: str
    session: Session | None  # None once ended: only its final documents are kept
    build: SharedBuild
    load: SnapshotLoad | None
    ended: threading.Event = field(default_factory=threading.Event)  # retired
    started: float = field(default_factory=time.time)
    ended_reason: str | None = None  # the reason class once ended (metrics' label)
    final: tuple[dict[str, Any], dict[str, Any]] | None = None  # (summary, document)
    checkpoint_base: Path | None = None  # the last checkpoint's build: the next one's base
    interval_restarted: bool = False  # by GET written?new_interval=1: checkpoints would miss it
    written_lost: bool = False  # pages a failed checkpoint took could not be given back
    checkpointing: threading.Lock = field(default_factory=threading.Lock)  # one at a time
    last_checkpoint: dict[str, Any] | None = None  # a background one's state (checkpoint.py)
    checkpoints: dict[int, dict[str, Any]] = field(default_factory=dict)  # theirs by number
    checkpoints_begun: int = 0  # checkpoints are numbered 1, 2, ... in each restore

    def summary(self) -> dict[str, Any]:
        session = self.session
        if session is None:
            assert self.final is not None
            return self.final[0]
        stats = session.stats
        return {
            "id": self.id,
            "vm": self.vm,
            "build_id": str(self.build.build_id),
            "socket": str(session.options.socket),
            "state": session.state,
            "vm_pid": session.peer.pid if session.peer else None,
            "exit_reason": session.exit_reason,
            "started_at": round(self.started, 3),  # Unix time of the request
            **{key: getattr(stats, key) for key in ("faults", "pages_served", "bytes_served")},
        }

    def document(self) -> dict[str, Any]:
        session = self.session
        if session is None:  # a background checkpoint may end after its VM
            assert self.final is not None
            return {**self.final[1], "last_checkpoint": self.last_checkpoint}
        return {"id": self.id, "vm": self.vm, "state": session.state, **session.document(),
                "last_checkpoint": self.last_checkpoint}

    def note_checkpoint(self, status: dict[str, Any]) -> None:
        """A background checkpoint's state, as `last_checkpoint` and under its number (the
        last CHECKPOINTS_KEPT: its client finds its own even after another one began)."""
        self.last_checkpoint = status
        self.checkpoints[status["checkpoint"]] = status
        for number in sorted(self.checkpoints)[:-CHECKPOINTS_KEPT]:
            del self.checkpoints[number]

    def checkpoint_state(self, number: str) -> dict[str, Any]:
        """A background checkpoint's state by its number (ASCII digits, any many: one too long
        for an int is none either); RequestError 404 if not kept."""
        status = self.checkpoints.get(int(number)) if len(number) <= 18 else None
        if status is None:
            raise RequestError(f"restore {self.id} has no background checkpoint {number} "
                               f"(the last {CHECKPOINTS_KEPT} are kept)", 404)
        return status

    def written(self, new_interval: bool) -> tuple[bytes, int]:
        """(the written set as a working-set file, its written pages), taken on the session's
        reactor thread; with `new_interval` the set starts empty again, atomically with the
        take (Session.take_written). RequestError 409 once ended or where writes are not
        tracked."""
        session = self.session
        if session is None:
            raise RequestError(f"restore {self.id} has ended", 409)
        if self.written_lost:
            raise RequestError(f"restore {self.id}: {LOST}, so the set would miss them", 409)
        if new_interval and self.checkpoint_base is not None:
            raise RequestError(f"restore {self.id} is checkpointed: a new interval taken here "
                               "would leave its pages out of the next checkpoint", 409)
        def take() -> tuple[Any, int, uuid.UUID | None]:
            # on the reactor's thread, as a checkpoint's take: whichever comes second sees
            # what the first did
            base = session.written_base
            offsets, count = session.take_written(new_interval)
            self.interval_restarted |= new_interval
            if new_interval:  # from now on against what the client makes of this take
                session.written_base = None
            return offsets, count, base

        try:
            offsets, count, base = session.call(take, END_WAIT)
        except FcsnapError as e:
            raise RequestError(f"restore {self.id}: {e}", 409) from None
        return dump_working_set(session.header.metadata.size, offsets.tolist(), base), count

    def retire(self) -> None:
        """Keep the final documents, drop the session (its page flags, buffers, fds' owners):
        an ended restore stays listed for a while and must cost next to nothing."""
        self.final = (self.summary(), self.document())
        self.session = None


def reason_class(exit_reason: str) -> str:
    """The few values of the `reason` label: the exit reason without its details."""
    if exit_reason.startswith("error"):
        return "error"
    return exit_reason.replace(" ", "_")


class Restores:
    """Every restore of the daemon: start, list, end; totals of the ended ones for metrics."""

    def __init__(self, store: Path | RemoteBuilds, cache_bytes: int, watchdog: Watchdog,
                 reactors: int | None = None, output_dir: Path | None = None) -> None:
        self.store = store
        self.output_dir = output_dir  # where requests may have stats and working sets written
        self.builds = BuildRegistry(cache_bytes, None if isinstance(store, Path) else store.store)
        self.watchdog = watchdog
        self._live: dict[str, Restore] = {}
        self._ended: OrderedDict[str, Restore] = OrderedDict()
        self.ended_by_reason: Counter[str] = Counter()
        self.ended_totals: Counter[tuple[str, str]] = Counter()  # (counter, build id)
        self.ended_latency: dict[str, latency.Histogram] = {}  # build id -> their sum
        self._lock = threading.Lock()
        self._closing = False
        self.reactors = [Reactor() for _ in range(reactors or default_reactors())]
        self._threads = [
            threading.Thread(target=reactor.run, name=f"reactor-{i}", daemon=True)
            for i, reactor in enumerate(self.reactors)
        ]
        for thread in self._threads:
            thread.start()
        self._preloaded: list[SharedBuild] = []  # held open until the daemon stops

    def preload(self, names: list[str]) -> None:
        """Open these builds (names, ids or directories in the store) now and keep them open
        until the daemon stops, so that no POST pays for opening them (lineage lock and pin
        check, header, diffs, mapping arrays). The price: while open, `gc` cannot remove
        them. A name is resolved once, here: a build published under it later is opened by
        its first POST."""
        for name in names:
            build = self.builds.acquire(request_build(name, self.store))
            self._preloaded.append(build)
            build.mapping_arrays()
            build.page_source(False, self.builds.cache_bytes)  # a session's first steps, once

    def start(self, body: object) -> Restore:
        """Check the request, open (or share) its build, listen; the restore is on the least
        loaded reactor when this returns. RequestError/FcsnapError: nothing listens."""
        if self._closing:
            raise RequestError("the daemon is stopping", 503)
        request: RestoreRequest = parse_restore(body, self.store, self.builds.cache_bytes,
                                                 self.output_dir)
        restore_id = uuid.uuid4().hex[:16]
        options = request.options
        options.watchdog = self.watchdog
        build = self.builds.acquire(request.build_dir)
        try:
            session = Session(build, options, vm_id=restore_id)
        except BaseException:
            self.builds.release(build)
            raise
        restore = Restore(restore_id, request.vm, session, build, request.load)
        if request.load is not None:
            options.on_listening = lambda: self._start_load(restore)
        try:
            session.listen()
        except BaseException:
            self.builds.release(build)
            raise
        with self._lock:
            self._live[restore_id] = restore
        reactor = min(self.reactors, key=lambda r: r.load)
        reactor.add(session, lambda _session, error: self._ended_session(restore, error))
        return restore

    def wait_loaded(self, restore: Restore) -> FcsnapError | None:
        """With `firecracker_api`: wait for Firecracker's answer to the snapshot load; its
        refusal (the restore has then ended with it), or None once the VM is loaded."""
        load = restore.load
        assert load is not None
        if not load.settled(load.timeout + LOAD_GRACE):
            return FcsnapError(f"Firecracker did not answer PUT /snapshot/load within "
                               f"{load.timeout:g}s")
        return load.error

    def get(self, restore_id: str) -> Restore | None:
        with self._lock:
            return self._live.get(restore_id) or self._ended.get(restore_id)

    def all(self) -> list[Restore]:
        with self._lock:
            return [*self._ended.values(), *self._live.values()]

    def live(self) -> list[Restore]:
        with self._lock:
            return list(self._live.values())

    def end(self, restore: Restore, wait: float = END_WAIT) -> bool:
        """Stop one restore as SIGTERM stops `restore` (the VM is killed unless every page is
        installed); True once its session has ended."""
        if restore.session is not None:
            restore.session.stop("deleted")
        return restore.ended.wait(wait)

    def stop_all(self) -> None:
        """The daemon is stopping: refuse new restores, end every live one."""
        self._closing = True
        live = self.live()
        for restore in live:
            if restore.session is not None:
                restore.session.stop("daemon stopped")
        deadline = time.monotonic() + END_WAIT
        for restore in live:
            restore.ended.wait(max(0.0, deadline - time.monotonic()))
        preloaded, self._preloaded = self._preloaded, []
        for build in preloaded:
            self.builds.release(build)
        for reactor in self.reactors:
            reactor.shutdown()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for reactor, thread in zip(self.reactors, self._threads, strict=True):
            if not thread.is_alive():
                reactor.close()

    def counter_totals(self) -> Counter[tuple[str, str]]:
        """(counter, build id) -> total over every restore, ended or live, taken under the
        lock so that a restore ending meanwhile is counted once."""
        with self._lock:
            totals = Counter(self.ended_totals)
            for restore in self._live.values():
                build_id = str(restore.build.build_id)
                if restore.session is not None:
                    for key in COUNTERS:
                        totals[key, build_id] += getattr(restore.session.stats, key)
            return totals

    def latency_totals(self) -> dict[str, latency.Histogram]:
        """build id -> fault latency histogram summed over every restore, ended or live
        (the live ones' arrays read as they are counted into: a moment's figures)."""
        with self._lock:
            totals = {build_id: latency.new_histogram() for build_id in self.ended_latency}
            for build_id, histogram in self.ended_latency.items():
                latency.add(totals[build_id], histogram)
            for restore in self._live.values():
                if restore.session is not None:
                    build_id = str(restore.build.build_id)
                    latency.add(totals.setdefault(build_id, latency.new_histogram()),
                                restore.session.stats.latency)
            return totals


    # -- a restore's end (on its reactor's thread) ----------------------------------------

    def _ended_session(self, restore: Restore, error: BaseException | None) -> None:
        """Its session has finished: settle the snapshot load, then retire the restore. A
        load still waiting for Firecracker's answer is waited for on a thread of its own,
        not on the reactor, which serves other VMs."""
        if restore.load is not None:
            threading.Thread(target=self._retire_after_load, args=(restore, error),
                             name=f"load-{restore.id}", daemon=True).start()
        else:
            self._retire_with(restore, error)

    def _retire_after_load(self, restore: Restore, error: BaseException | None) -> None:
        assert restore.load is not None
        self._retire_with(restore, restore.load.finish() or error)

    def _retire_with(self, restore: Restore, error: BaseException | None) -> None:
        session = restore.session
        assert session is not None
        try:
            if isinstance(error, FcsnapError):
                if not session.exit_reason.startswith("error"):
                    session.exit_reason = f"error: {error}"
            elif error is not None:  # a bug in one session: that VM was killed, on we go
                session.exit_reason = (
                    f"error: internal error ({type(error).__name__}: {error})")
                traceback.print_exception(error, file=sys.stderr)
        finally:
            self.builds.release(restore.build)
            self._retire(restore, session)
            restore.ended.set()

    def _start_load(self, restore: Restore) -> None:
        assert restore.load is not None

        def loaded(response: Response) -> None:
            log(f"restore {restore.id}: Firecracker loaded the snapshot (HTTP {response.status})")

        assert restore.session is not None
        restore.load.start(restore.session.fail, loaded)

    def _retire(self, restore: Restore, session: Session) -> None:
        stats = session.stats
        restore.ended_reason = reason_class(session.exit_reason)
        log(f"restore {restore.id} ({restore.vm} on {session.options.socket}) ended: "
            f"{session.exit_reason}; {stats.faults} faults, {stats.pages_served} pages "
            f"({format_bytes(stats.bytes_served)}) served")
        build_id = str(restore.build.build_id)
        with self._lock:
            restore.retire()
            self._live.pop(restore.id, None)
            self._ended[restore.id] = restore
            while len(self._ended) > KEEP_ENDED:
                self._ended.popitem(last=False)
            self.ended_by_reason[restore.ended_reason] += 1
            for key in COUNTERS:
                self.ended_totals[key, build_id] += getattr(stats, key)
            latency.add(self.ended_latency.setdefault(build_id, latency.new_histogram()),
                        stats.latency)


def default_reactors() -> int:
    """One reactor per CPU this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


def log(line: str) -> None:
    """One line on stderr, written whole: print() writes the newline separately, so lines
    from two restores ending at once could run together."""
    sys.stderr.write(f"fcsnap: {redact(line)}\n")
    sys.stderr.flush()
