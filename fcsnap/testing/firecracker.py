"""A Firecracker stand-in: the VM side of the UFFD protocol (docs/FORMAT.md §9), for tests.

It does what Firecracker does on a UFFD snapshot load - anonymous guest memory, one uffd with
UFFD_FEATURE_EVENT_REMOVE, every region registered MISSING, one sendmsg of the JSON regions
with the uffd - and then plays a guest: faulting threads read every page and compare it with
the memory file, a balloon gives ranges back with MADV_DONTNEED, and optionally a KVM vCPU
reads memory so that the faults come from kernel mode. It runs as its own process, like
Firecracker:

    python -m fcsnap.testing.firecracker SOCKET --expected mem.bin --threads 4 --report r.json

For benchmarks, `--ws-fraction F` first touches a fixed random working set (F of the pages,
chosen by --seed) and then every page, timing both passes (`ws_s`, `all_s`); `--file-backend
FILE` skips the socket and the uffd and maps FILE MAP_PRIVATE instead, as Firecracker's File
memory backend does, for a baseline; `--no-verify-bytes` leaves out the byte compare and
`--latency` times every touch. The touch plans are made before the handshake, so the guest
starts touching right after it, as a resumed VM does (or `--start-delay` seconds later, or once
the `--start-gate` file exists: a test breaks things in between). At the end it writes its
report and exits (after `--hold` seconds, or once the `--end-gate` file exists).

`--balloon-cycles N` races the balloon with the faulting threads: the touch pass runs N times,
and during each a balloon thread gives the --balloon pages back one page at a time (a REMOVE
event amid the faults) and then reads them again, which must give zeros. Threads reading a
ballooned page accept the file's bytes only until the first inflation has finished, zeros
always. The first mismatch of each thread is written to the report at once, so that a VM its
page server killed afterwards still shows it.

`--wp` registers guest memory MISSING|WP, as E2B's Firecracker builds do, to learn what the
guest writes. `--write START:LEN[,...]` then plays a guest that writes: after the passes (and
the balloon), threads write those pages (each with `written_page(offset)`) and read them back;
`--dump FILE` then reads all of guest memory into FILE, as a Full snapshot does, and
`--pagemap` reports which present pages are write-protected (/proc/self/pagemap bit 57).
`--second-write RANGES --gate FILE` writes again once FILE exists (the report says
"first_write_done" meanwhile), each page `written_page(offset, second=True)`: two intervals
of a VM's writes. `--last-gate FILE` then says
"second_write_done" and waits for FILE (a VM checkpointed after each interval).

Guest memory is only ever read through ctypes.memmove, which releases the GIL: a Python thread
blocked in a uffd fault would otherwise hold it and stop every other thread (and the watchdog).
Exit status: 0 all pages matched, 3 some byte mismatched, 4 the deadline passed (the server
stopped answering faults), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import json
import mmap
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.outputs import write_output
from fcsnap.uffd import abi
from fcsnap.units import HUGE_PAGE, PAGE, parse_size

PAGE_SIZES = {"4K": PAGE, "2M": HUGE_PAGE}
PAYLOADS = ("v1.1", "v1.7", "v1.12")
MISBEHAVIOURS = (
    "nothing", "garbage", "no-fd", "two-fds", "late", "oversize-region", "bad-page-size",
    "overlap", "hangup", "wrong-fd", "huge",
)
HUGE_PADDING = 96 << 10  # bytes of whitespace in a "huge" handshake (the server takes 64 KiB)
EXIT_MISMATCH = 3
EXIT_DEADLINE = 4
FIRST_MISMATCHES = 16
BALLOON_RECHECKS = 8
LATENCY_STALLS_NS = (1_000_000, 10_000_000)  # touches slower than 1 ms and 10 ms are counted
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_UFFD_WP = 1 << 57


PR_SET_DUMPABLE = 4


def written_page(offset: int, size: int = PAGE, second: bool = False) -> bytes:
    """What `--write` (`--second-write`: `second`) writes into the page at memory-file
    `offset`: a page written twice differs after each."""
    return struct.pack("<QQ", offset, 0xF00DFACE + second) * (size // 16)


Plan = list[list[int]]  # memory-file offsets each touching thread reads, in order


@dataclass(frozen=True)
class GuestRegion:
    host: int  # address of the region's mapping in this process
    size: int
    offset: int  # where the region's bytes live in the memory file


class GuestMemory:
    """Guest memory as Firecracker lays it out: one mapping per region, regions concatenated
    in the memory file. Subclasses map the regions (`_map`)."""

    def __init__(self, size: int, page_size: int, n_regions: int) -> None:
        pages = size // page_size
        if size <= 0 or size % page_size:
            raise FcsnapError(f"guest size {size} is not a positive multiple of {page_size}")
        if not 1 <= n_regions <= pages:
            raise FcsnapError(f"cannot split {pages} pages into {n_regions} regions")
        self.size = size
        self.page_size = page_size
        self.regions: list[GuestRegion] = []
        offset = 0
        for i in range(n_regions):
            region_pages = pages // n_regions + (1 if i < pages % n_regions else 0)
            length = region_pages * page_size
            self.regions.append(GuestRegion(self._map(offset, length), length, offset))
            offset += length
        self._offsets = [r.offset for r in self.regions]

    def _map(self, offset: int, length: int) -> int:
        """Map the region holding memory-file bytes [offset, offset+length); its address."""
        raise NotImplementedError

    def host(self, offset: int) -> int:
        """Host address of a memory-file offset."""
        r = self.regions[bisect.bisect_right(self._offsets, offset) - 1]
        return r.host + offset - r.offset

    def host_ranges(self, start: int, length: int) -> list[tuple[int, int]]:
        """(host address, length) pieces of a memory-file range, split at region borders."""
        pieces = []
        for r in self.regions:
            lo, hi = max(start, r.offset), min(start + length, r.offset + r.size)
            if lo < hi:
                pieces.append((r.host + lo - r.offset, hi - lo))
        return pieces

    def region_objects(self, payload: str) -> list[dict[str, int]]:
        """The JSON regions Firecracker of this payload version sends."""
        objects = []
        for r in self.regions:
            obj = {"base_host_virt_addr": r.host, "size": r.size, "offset": r.offset}
            if payload == "v1.12":
                obj["page_size"] = self.page_size
            if payload != "v1.1":
                obj["page_size_kib"] = self.page_size  # in bytes, despite the name
            objects.append(obj)
        return objects


class Guest(GuestMemory):
    """Guest memory on Firecracker's Uffd backend: anonymous mappings, all registered MISSING
    (with `wp`, MISSING|WP) on one uffd with EVENT_REMOVE."""

    def __init__(self, size: int, page_size: int, n_regions: int, wp: bool = False,
                 features: int = 0) -> None:
        self._flags = abi.MAP_PRIVATE | abi.MAP_ANONYMOUS | abi.MAP_NORESERVE
        if page_size != PAGE:
            self._flags |= abi.MAP_HUGETLB | abi.MAP_HUGE_2MB
        self._mode = abi.MISSING | (abi.UFFDIO_REGISTER_MODE_WP if wp else 0)
        self.uffd = abi.userfaultfd(os.O_CLOEXEC | os.O_NONBLOCK)
        features |= abi.UFFD_FEATURE_EVENT_REMOVE
        if wp and page_size != PAGE:
            features |= abi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        abi.api_handshake(self.uffd, features)
        super().__init__(size, page_size, n_regions)

    def _map(self, offset: int, length: int) -> int:
        host = abi.mmap_anonymous(length, self._flags)
        abi.register(self.uffd, host, length, self._mode)
        return host


class FileGuest(GuestMemory):
    """Guest memory on Firecracker's File backend: each region a MAP_PRIVATE mapping of its
    part of the memory file, so pages come from the page cache, with no uffd and no server."""

    def __init__(self, path: str, size: int, n_regions: int) -> None:
        self._maps: list[mmap.mmap] = []  # kept open: their addresses are the guest memory
        with open(path, "rb") as f:
            self._fileno = f.fileno()  # only used while mapping, inside this block
            super().__init__(size, PAGE, n_regions)

    def _map(self, offset: int, length: int) -> int:
        m = mmap.mmap(self._fileno, length, offset=offset, access=mmap.ACCESS_COPY)
        self._maps.append(m)
        return abi.buffer_address(m)


def connect(path: str, timeout: float) -> socket.socket:
    """Connect to the page server, waiting for its socket to appear (it may start after us)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise FcsnapError(
                    f"no page server listening on {path} after {timeout:g}s"
                ) from None
            time.sleep(0.02)


def handshake(sock: socket.socket, guest: Guest, payload: str, misbehave: str | None) -> None:
    """Firecracker's single sendmsg, or the chosen way of getting it wrong."""
    if misbehave == "nothing":
        return
    if misbehave == "hangup":  # connect, then close before sending anything
        sock.close()
        return
    objects = guest.region_objects(payload)
    fds = [guest.uffd]
    if misbehave == "oversize-region":
        objects[-1]["size"] += guest.size
    elif misbehave == "bad-page-size":
        for obj in objects:
            obj["page_size_kib"] = 8192
            if "page_size" in obj:
                obj["page_size"] = 8192
    elif misbehave == "overlap":  # in bounds, but the first region runs a page into the next
        if len(objects) == 1:
            whole, half = objects[0], guest.size // guest.page_size // 2 * guest.page_size
            objects = [{**whole, "size": half}, {**whole, "size": guest.size - half,
                       "base_host_virt_addr": whole["base_host_virt_addr"] + half,
                       "offset": half}]
        objects[0]["size"] += guest.page_size
    elif misbehave == "no-fd":
        fds = []
    elif misbehave == "two-fds":
        fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    elif misbehave == "wrong-fd":  # one fd, but not the uffd
        fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
    data = b"{not json at all" if misbehave == "garbage" else json.dumps(objects).encode()
    if misbehave == "huge":  # valid JSON, but padded far beyond any real region list
        data = data[:1] + b" " * HUGE_PADDING + data[1:]
    socket.send_fds(sock, [data], fds)


@dataclass
class Tally:
    """One thread's results (threads never share one, so no lock is needed)."""

    touched: int = 0
    mismatches: int = 0
    first: list[int] = field(default_factory=list)
    first_touch: float | None = None  # time.monotonic() just before the first touch
    latencies_ns: list[int] = field(default_factory=list)  # per touch, with --latency
    on_first_mismatch: Callable[[], None] | None = None  # e.g. write the report now

    def record(self, offset: int, ok: bool) -> None:
        self.touched += 1
        if not ok:
            self.mismatches += 1
            if len(self.first) < FIRST_MISMATCHES:
                self.first.append(offset)
            if self.mismatches == 1 and self.on_first_mismatch is not None:
                self.on_first_mismatch()


@dataclass
class BalloonRace:
    """Pages (memory-file offsets) a balloon thread inflates while other threads read them;
    `inflated` is set once the first inflation of all of them has finished."""

    pages: frozenset[int]
    inflated: threading.Event = field(default_factory=threading.Event)


class Reader:
    """Reads guest pages into a private buffer without the GIL and compares them (with no
    `expected`, only reads); with `timed`, records how long each read took; with `race`, its
    pages may also read zero (and must, once inflated)."""

    def __init__(
        self, guest: GuestMemory, expected: mmap.mmap | None, tally: Tally, timed: bool = False,
        race: BalloonRace | None = None,
    ) -> None:
        self.guest = guest
        self.expected = expected
        self.tally = tally
        self.timed = timed
        self.race = race
        self.page = guest.page_size
        self.buf = bytearray(self.page)
        self.buf_addr = abi.buffer_address(self.buf)  # buf is never resized

    def check(self, offsets: Sequence[int], want_zero: bool = False) -> None:
        page, buf, buf_addr, expected = self.page, self.buf, self.buf_addr, self.expected
        race = self.race
        zero = bytes(page) if want_zero or race else b""
        record, host = self.tally.record, self.guest.host
        clock, latencies, timed = time.perf_counter_ns, self.tally.latencies_ns, self.timed
        if self.tally.first_touch is None:
            self.tally.first_touch = time.monotonic()
        for off in offsets:
            if race is not None and off in race.pages:
                settled = race.inflated.is_set()  # before the read: it may zero the page
                ctypes.memmove(buf_addr, host(off), page)
                record(off, buf == zero or (
                    not settled and (expected is None or buf == expected[off : off + page])))
                continue
            if timed:
                t0 = clock()
                ctypes.memmove(buf_addr, host(off), page)  # may fault: GIL released
                latencies.append(clock() - t0)
            else:
                ctypes.memmove(buf_addr, host(off), page)
            if want_zero:
                record(off, buf == zero)
            else:
                record(off, expected is None or buf == expected[off : off + page])


class Watchdog:
    """Ends the process with status 4 (after writing the report) if the workload is not done
    by the deadline: a server that stops answering faults would otherwise hang us forever.
    SIGALRM, a few seconds later, covers the case where even this thread cannot run."""

    def __init__(self, deadline: float, on_expiry: Callable[[], None]) -> None:
        self._done = threading.Event()
        self._deadline = deadline
        self._on_expiry = on_expiry
        self._thread = threading.Thread(target=self._run, daemon=True, name="watchdog")
        self._thread.start()
        signal.alarm(int(deadline) + 5)

    def _run(self) -> None:
        if not self._done.wait(self._deadline):
            self._on_expiry()
            os._exit(EXIT_DEADLINE)

    def cancel(self) -> None:
        signal.alarm(0)
        self._done.set()


class StandIn:
    """One run: set up the guest, shake hands, run the workload, report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.tallies: list[Tally] = []
        self.errors: list[BaseException] = []
        self.report: dict[str, Any] = {
            "pid": os.getpid(), "payload": args.payload, "page_size": args.page_size,
            "threads": args.threads, "pages_touched": 0, "mismatches": 0,
            "first_mismatches": [], "balloon_ok": None, "kvm": None, "touch_s": None,
            "deadline_exceeded": False,
        }
        self._report_lock = threading.Lock()  # main, watchdog and mismatching threads write

    def write_report(self) -> None:
        """Write the report (atomically: a test may read it the moment we exit)."""
        with self._report_lock:
            r = self.report
            r["pages_touched"] = sum(t.touched for t in self.tallies)
            r["mismatches"] = sum(t.mismatches for t in self.tallies)
            r["first_mismatches"] = sorted(o for t in self.tallies for o in t.first)[
                :FIRST_MISMATCHES
            ]
            r["elapsed_s"] = round(time.monotonic() - self.started, 6)
            if self.args.report is None:
                return
            report = (json.dumps(r, indent=2) + "\n").encode()
            write_output(Path(self.args.report), report, "the report")

    def _expire(self) -> None:
        self.report["deadline_exceeded"] = True
        self.write_report()

    def run(self) -> int:
        a = self.args
        watchdog = Watchdog(a.deadline, self._expire)
        guest: GuestMemory
        if a.file_backend is not None:
            guest = FileGuest(a.file_backend, a.size, a.regions)
        else:
            guest = Guest(a.size, a.page_size, a.regions, a.wp,
                          abi.UFFD_FEATURE_WP_ASYNC if a.wp_async else 0)
        self.report["backend"] = "file" if a.file_backend is not None else "uffd"
        self.report["regions"] = guest.region_objects(a.payload)
        passes = self._passes(guest)  # planned before the handshake: touching starts right after
        with _open_expected(a.expected if a.verify_bytes else None) as expected:
            if isinstance(guest, Guest):
                self.sock = connect(a.socket, a.connect_timeout)  # never closed, as Firecracker's
                if a.late:
                    time.sleep(a.late)
                handshake(self.sock, guest, a.payload, a.misbehave)
            if not a.misbehave:
                time.sleep(a.start_delay)
                while a.start_gate and not os.path.exists(a.start_gate):
                    time.sleep(0.005)  # the watchdog's deadline bounds this
                if a.start_at is not None:  # many VMs touching at once, whenever each started
                    time.sleep(max(0.0, a.start_at - time.monotonic()))
                self._workload(guest, expected, passes)
        watchdog.cancel()
        self.write_report()
        time.sleep(a.hold)
        end = time.monotonic() + a.deadline
        while a.end_gate and not os.path.exists(a.end_gate) and time.monotonic() < end:
            time.sleep(0.005)
        failed = self.report["mismatches"] or (self.report["kvm"] or {}).get("ok") is False
        return EXIT_MISMATCH if failed else 0

    def _workload(
        self, guest: GuestMemory, expected: mmap.mmap | None, passes: list[tuple[str, Plan]]
    ) -> None:
        """Run the passes one after the other, each with its threads all at once (so their
        faults overlap), and a balloon cycle alongside each with --balloon-cycles; time each
        pass's end from the first touch of the first."""
        a = self.args
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        ends: dict[str, float] = {}
        latencies: dict[str, list[int]] = {}
        race = None
        if a.balloon_cycles:
            race = BalloonRace(frozenset(
                o for start, n in a.balloon for o in range(start, start + n, guest.page_size)))
        balloon_tallies: list[Tally] = []
        for i, (name, plan) in enumerate(passes):
            tallies = [Tally(on_first_mismatch=self.write_report) for _ in plan]
            self.tallies += tallies
            workers = [
                threading.Thread(
                    target=self._guarded,
                    args=(Reader(guest, expected, tally, a.latency, race).check, pages))
                for tally, pages in zip(tallies, plan, strict=True)
            ]
            if race is not None:
                balloon_tallies.append(Tally(on_first_mismatch=self.write_report))
                self.tallies.append(balloon_tallies[-1])
                workers.append(threading.Thread(
                    target=self._guarded,
                    args=(self._balloon_cycle, guest, race, balloon_tallies[-1])))
            for w in workers:
                w.start()
            if a.kvm and i == len(passes) - 1:  # main thread: kvm signals its vCPU from here
                self._guarded(self._kvm, guest, expected)
            for w in workers:
                w.join()
            ends[name] = time.monotonic()
            if self.errors:
                raise self.errors[0]
            latencies[name] = [ns for t in tallies for ns in t.latencies_ns]
        self.report["touch_s"] = round(time.monotonic() - t0, 6)
        self.report["touch_start"] = t0  # CLOCK_MONOTONIC: lines up the runs of many VMs
        starts = [t.first_touch for t in self.tallies if t.first_touch is not None]
        first = min(starts, default=t0)
        if a.ws_fraction is not None:
            self.report["ws_pages"] = sum(len(pages) for pages in passes[0][1])
            self.report["ws_s"] = round(ends["ws"] - first, 6)
            self.report["all_s"] = round(ends["all"] - first, 6)
        if a.latency:
            self.report["latency"] = {name: _summary(ns) for name, ns in latencies.items()}
        if race is not None:
            self.report["cycle_ends"] = [ends[name] for name, _ in passes]
            self.report["balloon_ok"] = all(t.mismatches == 0 for t in balloon_tallies)
        done = resource.getrusage(resource.RUSAGE_SELF)
        self.report["rusage"] = {"minor_faults": done.ru_minflt - usage.ru_minflt,
                                 "major_faults": done.ru_majflt - usage.ru_majflt}
        if a.balloon and race is None:
            self._balloon(guest, expected)
        if a.write:
            self.report["written"] = self._write(guest, a.write)
        if a.second_write:
            self.report["first_write_done"] = True
            self.write_report()
            while not os.path.exists(a.gate):  # the watchdog's deadline bounds this
                time.sleep(0.01)
            self.report["written_second"] = self._write(guest, a.second_write, second=True)
        if a.last_gate:
            self.report["second_write_done"] = True
            self.write_report()
            while not os.path.exists(a.last_gate):  # the watchdog's deadline bounds this
                time.sleep(0.01)
        if a.dump:
            self._dump(guest)
        if a.pagemap:
            self.report["pagemap"] = pagemap_report(guest)

    def _write(self, guest: GuestMemory, ranges: list[tuple[int, int]], second: bool = False
               ) -> list[int]:
        """Write the pages of `ranges` from all the threads at once (each `written_page`),
        then read them back; returns their offsets."""
        page = guest.page_size
        offsets = sorted({o for start, n in ranges for o in range(start, start + n, page)})
        tally = Tally(on_first_mismatch=self.write_report)
        self.tallies.append(tally)

        def write(share: list[int]) -> None:
            for off in share:
                data = written_page(off, page, second)
                ctypes.memmove(guest.host(off), data, page)  # may fault: GIL released

        workers = [threading.Thread(target=self._guarded, args=(write, share))
                   for share in self._split(offsets)]
        began = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.report["write_s"] = round(time.monotonic() - began, 6)  # the last write pass
        if self.errors:
            raise self.errors[0]
        buf = bytearray(page)
        for off in offsets:
            ctypes.memmove(abi.buffer_address(buf), guest.host(off), page)
            tally.record(off, buf == written_page(off, page, second))
        return offsets

    def _dump(self, guest: GuestMemory) -> None:
        """All of guest memory into --dump, in memory-file order (as a Full snapshot)."""
        buf = bytearray(guest.page_size)
        address = abi.buffer_address(buf)
        with open(self.args.dump, "wb") as f:
            for offset in range(0, guest.size, guest.page_size):
                ctypes.memmove(address, guest.host(offset), guest.page_size)
                f.write(buf)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a worker, keeping its exception for the main thread to raise."""
        try:
            fn(*args)
        except BaseException as e:
            self.errors.append(e)

    def _passes(self, guest: GuestMemory) -> list[tuple[str, Plan]]:
        """The touch passes in order: ("ws", working set) then ("all", --touch pages) with
        --ws-fraction; ("cycle1", ...) to ("cycleN", the same pages) with --balloon-cycles N;
        otherwise one ("touch", --touch pages)."""
        if self.args.balloon_cycles:
            plan = self._plan(guest)
            return [(f"cycle{i + 1}", plan) for i in range(self.args.balloon_cycles)]
        if self.args.ws_fraction is None:
            return [("touch", self._plan(guest))]
        return [("ws", self._ws_plan(guest)), ("all", self._plan(guest))]

    def _plan(self, guest: GuestMemory) -> Plan:
        """Memory-file offsets each faulting thread reads, in order."""
        a = self.args
        page = guest.page_size
        n = guest.size // page
        rng = random.Random(a.seed)
        count = max(1, round(a.touch * n)) if a.touch > 0 else 0
        chosen = sorted(rng.sample(range(n), count)) if count < n else list(range(n))
        if a.order == "random":
            rng.shuffle(chosen)
        offsets = [p * page for p in chosen]
        if a.shared_pages:
            return [offsets] * a.threads
        return self._split(offsets)

    def _ws_plan(self, guest: GuestMemory) -> Plan:
        """The working set: --ws-fraction of the pages, chosen by --ws-seed or --seed alone (the
        same set on every run of the same guest size), in random order, split over the
        threads."""
        a = self.args
        n = guest.size // guest.page_size
        count = max(1, round(a.ws_fraction * n)) if a.ws_fraction > 0 else 0
        seed = a.seed if a.ws_seed is None else a.ws_seed
        chosen = random.Random(f"ws:{seed}").sample(range(n), count)
        return self._split([p * guest.page_size for p in chosen])

    def _split(self, offsets: list[int]) -> Plan:
        """Contiguous shares of `offsets`, one per thread."""
        n = self.args.threads
        return [offsets[i * len(offsets) // n : (i + 1) * len(offsets) // n] for i in range(n)]

    def _kvm(self, guest: GuestMemory, expected: mmap.mmap | None) -> None:
        """A vCPU reads each region, so the faults are kernel-mode ones (like Firecracker's)."""
        from fcsnap.testing.kvm import expected_checksum, guest_checksum

        t0 = time.monotonic()
        results = []
        for r in guest.regions:
            got = list(guest_checksum(r.host, r.size))
            want = None
            if expected is not None:
                with memoryview(expected) as view:
                    want = list(expected_checksum(view[r.offset : r.offset + r.size]))
            results.append({"offset": r.offset, "size": r.size, "checksum": got,
                            "expected": want})
        ok = None if expected is None else all(x["checksum"] == x["expected"] for x in results)
        self.report["kvm"] = {"regions": results, "ok": ok,
                              "elapsed_s": round(time.monotonic() - t0, 6)}

    def _balloon_cycle(self, guest: GuestMemory, race: BalloonRace, tally: Tally) -> None:
        """Inflate while the threads read: give the pages back one at a time, so that each
        REMOVE event lands amid their faults; then deflate and touch them again: zeros."""
        page = guest.page_size
        for off in sorted(race.pages):
            abi.madvise(guest.host(off), page, abi.MADV_DONTNEED)  # blocks until the server reads
        race.inflated.set()
        Reader(guest, None, tally).check(sorted(race.pages), want_zero=True)

    def _balloon(self, guest: GuestMemory, expected: mmap.mmap | None) -> None:
        """Inflate: MADV_DONTNEED the ranges (UFFD_EVENT_REMOVE), then they must read zero
        while the rest of memory still reads as the file says."""
        page = guest.page_size
        tally = Tally(on_first_mismatch=self.write_report)
        self.tallies.append(tally)
        ballooned: set[int] = set()
        for start, length in self.args.balloon:
            for host, n in guest.host_ranges(start, length):
                abi.madvise(host, n, abi.MADV_DONTNEED)  # blocks until the server reads
            ballooned.update(range(start, start + length, page))
        reader = Reader(guest, expected, tally)
        reader.check(sorted(ballooned), want_zero=True)
        others = [o for o in range(0, guest.size, page) if o not in ballooned]
        step = max(1, len(others) // BALLOON_RECHECKS)
        reader.check(others[::step][:BALLOON_RECHECKS])
        self.report["balloon_ok"] = tally.mismatches == 0


def pagemap_report(guest: GuestMemory) -> dict[str, Any]:
    """The present 4 KiB pages of guest memory (memory-file offsets), write-protected or
    writable, from /proc/self/pagemap."""
    protected, writable = [], []
    with open("/proc/self/pagemap", "rb") as f:
        for r in guest.regions:
            f.seek(r.host // PAGE * 8)
            entries = struct.unpack(f"<{r.size // PAGE}Q", f.read(r.size // PAGE * 8))
            for i, entry in enumerate(entries):
                if entry & PAGEMAP_PRESENT:
                    (protected if entry & PAGEMAP_UFFD_WP else writable).append(
                        r.offset + i * PAGE)
    return {"protected": protected, "writable": writable}


def _summary(latencies_ns: list[int]) -> dict[str, float | int]:
    """Percentiles (microseconds) and stall counts of per-touch latencies."""
    ns = sorted(latencies_ns)
    if not ns:
        return {"touches": 0}

    def at(q: float) -> float:
        return round(ns[min(len(ns) - 1, int(q * len(ns)))] / 1000, 1)

    summary: dict[str, float | int] = {
        "touches": len(ns), "p50_us": at(0.5), "p99_us": at(0.99), "p999_us": at(0.999),
        "max_us": round(ns[-1] / 1000, 1),
    }
    for limit in LATENCY_STALLS_NS:
        summary[f"over_{limit // 1_000_000}ms"] = len(ns) - bisect.bisect_right(ns, limit)
    return summary


def _open_expected(path: str | None) -> AbstractContextManager[mmap.mmap | None]:
    if path is None:
        return nullcontext()
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _balloon_ranges(text: str) -> list[tuple[int, int]]:
    ranges = []
    for part in text.split(","):
        start, sep, length = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"balloon range {part!r} is not START:LEN")
        try:
            ranges.append((parse_size(start, "balloon start"), parse_size(length, "balloon")))
        except FcsnapError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return ranges


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except FcsnapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fcsnap.testing.firecracker",
        description="Play Firecracker's side of a UFFD snapshot load against a page server.",
    )
    p.add_argument("socket", nargs="?", help="the page server's Unix socket")
    p.add_argument("--size", type=_size, help="guest memory bytes (default: --expected's size)")
    p.add_argument("--expected", help="memory file every page must read as")
    p.add_argument("--page-size", choices=PAGE_SIZES, default="4K",
                   help="2M maps hugetlb memory (needs reserved hugepages)")
    p.add_argument("--regions", type=int, default=1, help="split memory into N regions")
    p.add_argument("--payload", choices=PAYLOADS, default="v1.12",
                   help="handshake version: v1.1 (no page size), v1.7, v1.12")
    p.add_argument("--threads", type=int, default=1, help="faulting threads (0: --kvm only)")
    p.add_argument("--order", choices=("sequential", "random"), default="sequential")
    p.add_argument("--touch", type=_fraction, default=1.0, help="share of pages to read")
    p.add_argument("--shared-pages", action="store_true",
                   help="every thread reads the same pages in the same order")
    p.add_argument("--ws-fraction", type=_fraction, metavar="F",
                   help="first read a working set (F of the pages, random, fixed by --seed), "
                   "then the --touch pages; reports ws_s and all_s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ws-seed", type=int, metavar="N",
                   help="choose the working set by N instead of --seed: the same working set "
                   "on runs whose other touches differ")
    p.add_argument("--file-backend", metavar="FILE",
                   help="no socket, no uffd: map FILE MAP_PRIVATE as guest memory "
                   "(Firecracker's File memory backend)")
    p.add_argument("--verify-bytes", action=argparse.BooleanOptionalAction, default=True,
                   help="compare every page read with --expected (default: on)")
    p.add_argument("--latency", action="store_true",
                   help="time every touch; report percentiles and stalls per pass")
    p.add_argument("--balloon", type=_balloon_ranges,
                   help="START:LEN[,...] memory-file ranges to give back after the first pass")
    p.add_argument("--balloon-cycles", type=int, default=0, metavar="N",
                   help="run the touch pass N times, each racing a balloon thread that gives "
                   "the --balloon pages back one at a time, then reads them (zeros)")
    p.add_argument("--wp", action="store_true",
                   help="register guest memory MISSING|WP (as E2B's Firecracker does)")
    p.add_argument("--not-dumpable", action="store_true",
                   help="prctl(PR_SET_DUMPABLE, 0): only CAP_SYS_PTRACE may read this memory")
    p.add_argument("--wp-async", action="store_true",
                   help="ask for UFFD_FEATURE_WP_ASYNC (the kernel resolves WP faults itself)")
    p.add_argument("--write", type=_balloon_ranges, metavar="START:LEN[,...]",
                   help="after the passes (and --balloon), write these memory-file ranges from "
                   "the threads, then read them back")
    p.add_argument("--second-write", type=_balloon_ranges, metavar="START:LEN[,...]",
                   help="after --write, once --gate exists, write these ranges too")
    p.add_argument("--gate", metavar="FILE", help="the file --second-write waits for")
    p.add_argument("--last-gate", metavar="FILE",
                   help="after --second-write, say so in the report and wait for FILE")
    p.add_argument("--dump", metavar="FILE",
                   help="at the end, read all of guest memory into FILE (a Full snapshot)")
    p.add_argument("--pagemap", action="store_true",
                   help="report the present pages, write-protected or not (pagemap bit 57)")
    p.add_argument("--start-delay", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long after the handshake before touching memory")
    p.add_argument("--start-gate", metavar="FILE",
                   help="after the handshake, wait until FILE exists before touching memory")
    p.add_argument("--start-at", type=float, metavar="MONOTONIC",
                   help="after the handshake, wait until CLOCK_MONOTONIC reads this")
    p.add_argument("--kvm", action="store_true", help="also read memory from a KVM vCPU")
    p.add_argument("--report", help="write a JSON report here")
    p.add_argument("--end-gate", metavar="FILE",
                   help="at the end, after its report, stay alive until FILE exists "
                   "(--deadline seconds at most)")
    p.add_argument("--hold", type=float,
                   help="seconds to stay alive at the end (default 0; 30 with --misbehave)")
    p.add_argument("--deadline", type=float, default=60.0,
                   help="exit 4 if the workload is not done by then")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--misbehave", metavar="MODE",
                   help="nothing|garbage|no-fd|two-fds|late:SECONDS|oversize-region|"
                   "bad-page-size|overlap|hangup|wrong-fd|huge: get the handshake wrong, "
                   "then hold")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.page_size = PAGE_SIZES[args.page_size]
    args.late = 0.0
    if args.misbehave is not None:
        mode, _, seconds = args.misbehave.partition(":")
        if mode not in MISBEHAVIOURS or (mode == "late") != bool(seconds):
            p.error(f"unknown --misbehave {args.misbehave!r}")
        if mode == "late":
            args.late = float(seconds)
            args.misbehave = None  # late, then a normal run
        else:
            args.misbehave = mode
    if args.hold is None:
        args.hold = 30.0 if args.misbehave else 0.0
    if (args.socket is None) == (args.file_backend is None):
        p.error("give either SOCKET or --file-backend")
    if args.file_backend is not None and (
        args.misbehave or args.late or args.balloon or args.page_size != PAGE
    ):
        p.error("--file-backend takes no --misbehave, --balloon or --page-size 2M")
    for option, path in (("--expected", args.expected), ("--file-backend", args.file_backend)):
        if path is None:
            continue
        file_size = os.path.getsize(path)
        if args.size is None:
            args.size = file_size
        elif args.size > file_size:
            p.error(f"--size {args.size} is larger than {option} {path} ({file_size} bytes)")
    if args.size is None:
        p.error("give --size, --expected or --file-backend")
    if args.balloon_cycles < 0 or (args.balloon_cycles and (
        not args.balloon or args.kvm or args.ws_fraction is not None
    )):
        p.error("--balloon-cycles takes a count, needs --balloon, and no --kvm or --ws-fraction")
    if args.start_delay < 0:
        p.error("--start-delay must not be negative")
    if args.threads < 0 or (args.threads == 0 and not args.kvm):
        p.error("--threads must be at least 1 (or 0 with --kvm)")
    page = args.page_size
    if (args.second_write is None) != (args.gate is None) or (
            args.second_write and not args.write):
        p.error("--second-write needs --write and --gate (and --gate --second-write)")
    for start, length in [*(args.balloon or ()), *(args.write or ()),
                          *(args.second_write or ())]:
        if start % page or length % page or length == 0 or start + length > args.size:
            p.error(f"range {start}:{length} is not whole pages inside guest memory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in; meant to be its own process (the watchdog ends the process)."""
    args = parse_args(argv)
    if args.not_dumpable:  # as a hardened VMM: only CAP_SYS_PTRACE may read its memory
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    try:
        return StandIn(args).run()
    except FcsnapError as e:
        print(f"firecracker stand-in: {e}", file=sys.stderr)
        return 1


# -- driving it from tests and demos ---------------------------------------------------------


def command(socket_path: str | os.PathLike[str] | None, **options: Any) -> list[str]:
    """The argv that runs the stand-in: options are the long flags with '_' for '-'
    (True for switches, a list of (start, length) for balloon); no socket with file_backend."""
    known = {a.dest for a in build_parser()._actions}
    argv = [sys.executable, "-m", "fcsnap.testing.firecracker"]
    if socket_path is not None:
        argv.append(os.fspath(socket_path))
    for name, value in options.items():
        if name not in known or name == "socket":
            raise TypeError(f"unknown stand-in option {name!r}")
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if name == "verify_bytes":  # on by default: say it either way
            argv.append(flag if value else "--no-verify-bytes")
        elif value is False:
            continue
        elif value is True:
            argv.append(flag)
        elif name in ("balloon", "write", "second_write") and not isinstance(value, str):
            argv += [flag, ",".join(f"{s}:{n}" for s, n in value)]
        else:
            argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]
    return argv


def spawn(
    socket_path: str | os.PathLike[str] | None, popen: dict[str, Any] | None = None,
    **options: Any,
) -> subprocess.Popen[bytes]:
    """Start the stand-in as its own process (as Firecracker is); `popen` goes to Popen."""
    return subprocess.Popen(command(socket_path, **options), **(popen or {}))


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON report a run wrote with --report."""
    return json.loads(Path(path).read_text())


if __name__ == "__main__":
    sys.exit(main())
