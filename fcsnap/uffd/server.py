"""The lazy-restore fault server: one VM, one uffd, every fault resolved through the header.

Loop: epoll over the uffd, the VM's pidfd and a stop pipe; read *all* pending events before
serving (a pending REMOVE makes every copy fail with EAGAIN); install pages with UFFDIO_COPY or
ZEROPAGE; defer EAGAIN faults and retry them after the next drain, with a short poll timeout so
none is stranded. The server never touches the guest memory itself.

A guest whose page server is gone freezes at its next fault, so every way out other than the
VM's own exit - an error of any kind, SIGTERM/SIGINT - kills the VM first.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import os
import select
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.store.source import DiffFile, open_diffs
from fcsnap.uffd import abi
from fcsnap.uffd.handshake import Peer, accept_peer, listen
from fcsnap.uffd.pages import PageSource, hash_tables
from fcsnap.uffd.regions import Region, RegionMap

RETRY_POLL = 0.002  # seconds between retries of deferred faults


@dataclass
class ServeOptions:
    socket: Path
    verify: bool = False
    stats_path: Path | None = None
    handshake_timeout: float = 10.0
    cache_bytes: int = 64 << 20
    on_listening: Callable[[], None] | None = None  # e.g. ask Firecracker to load the snapshot


@dataclass
class ServeStats:
    faults: int = 0
    pages_served: int = 0
    bytes_served: int = 0
    zero_pages: int = 0
    remove_events: int = 0
    retries: int = 0
    already_present: int = 0
    per_build_pages: Counter = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    first_fault_s: float | None = None

    def to_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "faults": self.faults,
            "pages_served": self.pages_served,
            "bytes_served": self.bytes_served,
            "zero_pages": self.zero_pages,
            "remove_events": self.remove_events,
            "retries": self.retries,
            "already_present": self.already_present,
            "per_build_pages": {str(k): v for k, v in self.per_build_pages.items()},
            "duration_s": round(time.monotonic() - self.started, 6),
            "first_fault_s": self.first_fault_s,
            **extra,
        }


class Removed:
    """Guest ranges emptied by REMOVE events (balloon): they serve zeros from then on.

    Kept as sorted, disjoint, merged host address ranges: a balloon gives memory back in
    many small ranges, and every fault asks whether it falls in one of them.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.ends, start)  # first range ending at or after start
        j = bisect.bisect_right(self.starts, end)  # past the last range starting by end
        if i < j:  # ranges i..j-1 overlap or touch [start, end): merge them in
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def covers(self, address: int) -> bool:
        i = bisect.bisect_right(self.starts, address) - 1
        return i >= 0 and address < self.ends[i]


class FaultServer:
    """Serves one VM from one build; `run` returns the process exit status."""

    def __init__(self, build_dir: Path, options: ServeOptions) -> None:
        self.options = options
        self.header = load_header(build_dir)
        self.diffs: dict[uuid.UUID, DiffFile] = open_diffs(
            self.header, build_dir.parent, options.cache_bytes
        )
        hashes = hash_tables(self.diffs) if options.verify else None
        self.pages = PageSource(self.header, self.diffs, hashes)
        self.stats = ServeStats()
        self.removed = Removed()
        self.zero_huge = bytearray(2 << 20)  # hugetlb ranges cannot take UFFDIO_ZEROPAGE
        self.zero_huge_addr = abi.buffer_address(self.zero_huge)
        self.peer: Peer | None = None
        self.regions: RegionMap | None = None
        self.exit_reason = "not started"
        self._stop_r, self._stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._socket_inode: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Listen, serve one VM until it exits (0) or a stop is asked for (0, VM killed);
        any exception kills the VM and propagates. Stats are written on every way out."""
        stats_path = self.options.stats_path
        if stats_path is not None and not stats_path.parent.is_dir():
            raise FcsnapError(f"cannot write --stats {stats_path}: no such directory")
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            listener = listen(self.options.socket)
        except BaseException:
            self._restore_signals(old)
            raise
        self._socket_inode = os.stat(self.options.socket).st_ino
        try:
            if self.options.on_listening is not None:
                self.options.on_listening()
            self.peer = accept_peer(
                listener, self.header.metadata.size, self.options.handshake_timeout,
                self._stop_r,
            )
            listener.close()
            if self.peer is None:
                self.exit_reason = "stopped before a VM was served"
                return 0
            self.regions = RegionMap(self.peer.regions)
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
            for diff in self.diffs.values():
                diff.close()
            try:
                self._write_stats()  # before restoring: a signal now must not lose them
            finally:
                self._restore_signals(old)

    def stop(self) -> None:
        """Ask `run` to stop (from a signal handler or another thread): it kills the VM, if
        one is being served, and returns 0."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a stop is pending
            os.write(self._stop_w, b"x")

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stop()

    @staticmethod
    def _restore_signals(old: dict[signal.Signals, Any]) -> None:
        for signum, handler in old.items():
            signal.signal(signum, handler)

    def _unlink_socket(self) -> None:
        """Remove our socket file, unless someone has since put another file there."""
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.options.socket).st_ino == self._socket_inode:
                os.unlink(self.options.socket)

    def _write_stats(self) -> None:
        path = self.options.stats_path
        if path is None:
            return
        extra = {
            "exit_reason": self.exit_reason,
            "peer_pid": self.peer.pid if self.peer else None,
            "regions": len(self.peer.regions) if self.peer else 0,
            "extra_fds_closed": self.peer.extra_fds if self.peer else 0,
            "build_id": str(self.header.metadata.build_id),
        }
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.stats.to_json(extra), indent=2) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise FcsnapError(f"cannot write --stats {path}: {e.strerror or e}") from e

    # -- the loop --------------------------------------------------------------------------

    def _serve(self) -> int:
        peer = self.peer
        assert peer is not None
        poller = select.epoll()
        poller.register(peer.uffd, select.EPOLLIN)
        poller.register(self._stop_r, select.EPOLLIN)
        poller.register(peer.pidfd, select.EPOLLIN)
        deferred: list[int] = []
        try:
            while True:
                ready = {fd for fd, _ in poller.poll(RETRY_POLL if deferred else -1)}
                if self._stop_r in ready:
                    self.exit_reason = "signal"
                    peer.kill()
                    return 0
                if peer.pidfd in ready:
                    self.exit_reason = "vm exited"
                    return 0
                faults = self._drain(peer.uffd)
                if deferred:
                    self.stats.retries += len(deferred)
                    faults = deferred + faults
                deferred = []
                for address in faults:
                    outcome = self._serve_fault(peer.uffd, address)
                    if outcome == errno.EAGAIN:
                        deferred.append(address)
                    elif outcome == errno.ESRCH:
                        self.exit_reason = "vm exited"
                        return 0
        finally:
            poller.close()

    def _drain(self, uffd: int) -> list[int]:
        """Read every pending event; apply REMOVEs; return fault addresses in arrival order."""
        faults: list[int] = []
        while True:
            events = abi.read_events(uffd)
            if not events:
                return faults
            for event in events:
                kind = event[0]
                if kind == "fault":
                    self.stats.faults += 1
                    if self.stats.first_fault_s is None:
                        self.stats.first_fault_s = time.monotonic() - self.stats.started
                    faults.append(event[1])
                elif kind == "remove":
                    self.stats.remove_events += 1
                    self.removed.add(event[1], event[2])

    def _serve_fault(self, uffd: int, address: int) -> int:
        """Install the page under `address`; returns 0 or the errno to act on."""
        assert self.regions is not None
        region = self.regions.find(address)
        if region is None:
            raise FcsnapError(f"fault at {address:#x} is outside every region the VM sent")
        page = region.page_size
        dst = address - (address - region.base) % page
        if self.removed.covers(dst):
            return self._install_zero(uffd, region, dst)
        offset = region.offset + (dst - region.base)
        source = self.pages.locate(offset, page)
        if source.address is None:
            return self._install_zero(uffd, region, dst)
        return self._copy(uffd, dst, source.address, page, source.build_id)

    def _install_zero(self, uffd: int, region: Region, dst: int) -> int:
        if region.page_size == 4096:
            try:
                abi.zeropage(uffd, dst, 4096)
            except abi.UffdError as e:
                return self._copy_error(e, dst)
            self._count(4096, None)
            return 0
        return self._copy(uffd, dst, self.zero_huge_addr, region.page_size, None)

    def _copy(self, uffd: int, dst: int, src: int, length: int, build: uuid.UUID | None) -> int:
        """UFFDIO_COPY one page; `build` supplied its bytes (None: zeros)."""
        try:
            abi.copy(uffd, dst, src, length)
        except abi.UffdError as e:
            return self._copy_error(e, dst)
        self._count(length, build)
        return 0

    def _count(self, length: int, build: uuid.UUID | None) -> None:
        """Count a page installed (only installs: a page found present counts elsewhere)."""
        self.stats.pages_served += 1
        self.stats.bytes_served += length
        if build is None:
            self.stats.zero_pages += 1
        else:
            self.stats.per_build_pages[build] += 1

    def _copy_error(self, e: abi.UffdError, dst: int) -> int:
        if e.errno == errno.EEXIST:
            self.stats.already_present += 1
            return 0
        if e.errno in (errno.EAGAIN, errno.ESRCH):
            return e.errno
        raise FcsnapError(
            f"installing the page at {dst:#x} failed: {os.strerror(e.errno or 0)} "
            "(diff file truncated or unreadable?)"
        )
