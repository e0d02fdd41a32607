"""The Firecracker stand-in, end to end against a minimal in-test uffd page server.

The server here is deliberately small (accept, take the regions and the uffd, serve faults
from a bytes buffer, zeros for REMOVEd ranges) so that the stand-in is proven independently
of fcsnap's real server. It runs in a thread of the test process; it never touches the guest
memory, which lives in the stand-in's process.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fcsnap.testing import firecracker
from fcsnap.uffd import abi
from fcsnap.units import PAGE

MiB = 1 << 20
HUGE = 2 * MiB
WAIT = 30  # seconds any one stand-in run may take before the test fails


@dataclass
class MiniServer:
    """Serves one stand-in from `memory`; records what it saw for the assertions."""

    path: Path
    memory: bytes
    serve: bool = True  # False: take the handshake, never answer a fault
    answer: int | None = None  # answer only this many faults, then none (a wedged server)
    zero_removed: bool = True  # False: serve the old bytes after a REMOVE (a broken server)
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)
    faults: int = 0
    removes: list[tuple[int, int]] = field(default_factory=list)
    connected: bool = False
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(1)
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def regions(self) -> list[dict[str, int]]:
        return json.loads(self.payload)

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(WAIT)
        for fd in (*self.fds, self.stop_r, self.stop_w):
            os.close(fd)
        self.listener.close()
        if self.error is not None:
            raise self.error

    def _wait(self, fd: int) -> bool:
        """Wait for fd to be readable; False once the test asked us to stop."""
        ready, _, _ = select.select([fd, self.stop_r], [], [])
        return self.stop_r not in ready

    def _run(self) -> None:
        try:
            if not self._wait(self.listener.fileno()):
                return
            conn, _ = self.listener.accept()
            self.connected = True
            with conn:
                self._handshake(conn)
                if self.serve and self.fds:
                    self._serve(self.fds[0], self.regions)
                else:
                    self._wait(self.stop_r)
        except BaseException as e:  # re-raised in the test by close()
            self.error = e

    def _handshake(self, conn: socket.socket) -> None:
        """Like Firecracker's example handlers: read up to 1 KiB (here 64) until the fd and
        a whole JSON document have arrived, or the stand-in stops sending."""
        while self._wait(conn.fileno()):
            data, anc, _, _ = conn.recvmsg(64 << 10, socket.CMSG_SPACE(8 * 4))
            for level, kind, body in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    self.fds.extend(array.array("i", body[: len(body) - len(body) % 4]))
            self.payload += data
            if not data or (self.fds and self.payload.rstrip().endswith(b"]")):
                return
            if not self.payload.lstrip().startswith(b"["):
                return  # garbage

    def _serve(self, uffd: int, regions: list[dict[str, int]]) -> None:
        src = abi.buffer_address(self.memory)  # self.memory outlives the loop
        zeros = bytes(HUGE)
        zero_src = abi.buffer_address(zeros)
        deferred: list[int] = []
        while True:
            ready, _, _ = select.select([uffd, self.stop_r], [], [], 0.002 if deferred else None)
            if self.stop_r in ready:
                return
            faults, deferred = deferred, []
            for event in abi.read_events(uffd):
                if type(event) is abi.Fault:
                    self.faults += 1
                    faults.append(event.address)
                elif type(event) is abi.Remove:
                    self.removes.append((event.start, event.end))
            for address in faults:
                if self.answer is not None and self.faults > self.answer:
                    continue
                r = next(r for r in regions
                         if r["base_host_virt_addr"] <= address < r["base_host_virt_addr"]
                         + r["size"])
                page = r.get("page_size_kib", PAGE)
                dst = address - address % page
                removed = self.zero_removed and any(s <= dst < e for s, e in self.removes)
                try:
                    if removed and page == PAGE:
                        abi.zeropage(uffd, dst, page)
                    else:
                        offset = r["offset"] + dst - r["base_host_virt_addr"]
                        abi.copy(uffd, dst, zero_src if removed else src + offset, page)
                except abi.UffdError as e:
                    if e.errno == errno.EAGAIN:
                        deferred.append(address)
                    elif e.errno == errno.ESRCH:
                        return
                    elif e.errno != errno.EEXIST:
                        raise


@pytest.fixture
def memory_file(tmp_path: Path) -> tuple[Path, bytes]:
    """4 MiB of random-looking guest memory with some zero pages, like a real memory file."""
    data = bytearray(os.urandom(4 * MiB))
    data[MiB : MiB + 64 * PAGE] = bytes(64 * PAGE)
    path = tmp_path / "mem.bin"
    path.write_bytes(data)
    return path, bytes(data)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    servers: list[MiniServer] = []

    def make(memory: bytes, serve: bool = True, **options: Any) -> MiniServer:
        server = MiniServer(tmp_path / f"uffd{len(servers)}.sock", memory, serve, **options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def run_standin(
    server: MiniServer | None, report: Path, expect_status: int = 0, **options: Any
) -> dict[str, Any]:
    """Run the stand-in against `server` (None: a file backend, given in `options`) to its
    end; check its exit status and return its report."""
    options.setdefault("deadline", WAIT)
    socket = server.path if server is not None else None
    proc = firecracker.spawn(socket, report=report, popen={"stderr": subprocess.PIPE},
                             **options)
    try:
        _, stderr = proc.communicate(timeout=WAIT + 10)
    finally:
        proc.kill()
    assert proc.returncode == expect_status, stderr.decode()
    return firecracker.read_report(report)


@pytest.mark.parametrize(
    ("payload", "keys"),
    [
        ("v1.1", {"base_host_virt_addr", "size", "offset"}),
        ("v1.7", {"base_host_virt_addr", "size", "offset", "page_size_kib"}),
        ("v1.12", {"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}),
    ],
)
def test_payload_versions(memory_file, server_factory, tmp_path, payload, keys) -> None:
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, payload=payload)
    [region] = server.regions
    assert set(region) == keys
    assert (region["size"], region["offset"]) == (len(data), 0)
    assert all(region[k] == PAGE for k in keys & {"page_size", "page_size_kib"})
    assert len(server.fds) == 1
    assert report["pages_touched"] == len(data) // PAGE
    assert report["mismatches"] == 0
    assert server.faults == len(data) // PAGE  # one fault per page: every page came from us


def test_two_regions_four_threads_random(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, regions=2, threads=4,
                         order="random", seed=7)
    a, b = sorted(server.regions, key=lambda r: r["offset"])
    assert a["offset"] == 0 and b["offset"] == a["size"] and a["size"] + b["size"] == len(data)
    assert report["pages_touched"] == len(data) // PAGE
    assert report["mismatches"] == 0
    assert report["regions"] == server.regions


def test_shared_pages_partial_touch(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, threads=3,
                         shared_pages=True, touch=0.25, order="random")
    pages = round(0.25 * len(data) / PAGE)
    assert report["pages_touched"] == 3 * pages
    assert report["mismatches"] == 0
    assert pages <= server.faults < 3 * pages  # threads met on the same pages


def test_balloon_reads_zero(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data)
    ranges = [(0, 16 * PAGE), (3 * MiB, MiB)]  # the second spans the region border
    report = run_standin(server, tmp_path / "r.json", expected=path, regions=2,
                         balloon=ranges)
    assert report["balloon_ok"] is True
    assert report["mismatches"] == 0
    removed = sum(end - start for start, end in server.removes)
    assert removed == sum(n for _, n in ranges)


def test_wrong_byte_is_a_mismatch(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    bad = bytearray(data)
    bad[5 * PAGE + 123] ^= 0xFF
    server = server_factory(bytes(bad))
    report = run_standin(server, tmp_path / "r.json", expect_status=3, expected=path,
                         threads=2, order="random")
    assert report["mismatches"] == 1
    assert report["first_mismatches"] == [5 * PAGE]


def test_deadline_when_server_never_answers(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data, serve=False)
    report = run_standin(server, tmp_path / "r.json", expect_status=4, expected=path,
                         deadline=1)
    assert report["deadline_exceeded"] is True
    assert report["pages_touched"] == 0


def test_late_handshake_then_normal_run(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, misbehave="late:0.3",
                         touch=0.1)
    assert report["mismatches"] == 0 and report["pages_touched"] > 0


@pytest.mark.parametrize(
    ("mode", "nfds", "check"),
    [
        ("nothing", 0, lambda payload: payload == b""),
        ("garbage", 1, lambda payload: not payload.startswith(b"[")),
        ("no-fd", 0, lambda payload: len(json.loads(payload)) == 1),
        ("two-fds", 2, lambda payload: len(json.loads(payload)) == 1),
        ("oversize-region", 1, lambda payload: json.loads(payload)[0]["size"] == 8 * MiB),
        ("bad-page-size", 1, lambda payload: json.loads(payload)[0]["page_size"] == 8192),
        ("overlap", 1, lambda payload: _overlapping(json.loads(payload))),
        ("hangup", 0, lambda payload: payload == b""),
        ("wrong-fd", 1, lambda payload: len(json.loads(payload)) == 1),
        ("huge", 1, lambda payload: len(payload) > firecracker.HUGE_PADDING
         and len(json.loads(payload)) == 1),
    ],
)
def test_misbehaviour(memory_file, server_factory, tmp_path, mode, nfds, check) -> None:
    path, data = memory_file
    server = server_factory(data, serve=False)
    proc = firecracker.spawn(server.path, expected=path, misbehave=mode, hold=30)
    try:
        # the stand-in holds: it must still be alive after the server has seen its handshake
        silent = mode in ("nothing", "hangup")
        assert _wait_for(lambda: server.connected if silent else server.payload)
        time.sleep(0.1)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(WAIT)
    assert len(server.fds) == nfds
    assert check(server.payload)
    if mode == "wrong-fd":
        assert os.readlink(f"/proc/self/fd/{server.fds[0]}") == os.devnull


def _overlapping(regions: list[dict[str, int]]) -> bool:
    a, b = regions
    return a["offset"] + a["size"] > b["offset"] and b["offset"] + b["size"] == 4 * MiB


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_spawn_rejects_unknown_options(tmp_path) -> None:
    with pytest.raises(TypeError):
        firecracker.command(tmp_path / "s", thread=4)
    argv = firecracker.command(tmp_path / "s", threads=4, kvm=True, balloon=[(0, 4096)])
    assert argv[-5:] == ["--threads", "4", "--kvm", "--balloon", "0:4096"]


def test_hugepages(memory_file, server_factory, tmp_path, hugepages) -> None:
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, page_size="2M",
                         regions=2, threads=2, balloon=[(HUGE, HUGE)])
    assert all(r["page_size"] == HUGE for r in server.regions)
    assert report["pages_touched"] == 2 + 1 + 1  # first pass, ballooned page, recheck
    assert report["mismatches"] == 0
    assert report["balloon_ok"] is True


def test_kvm_reads_guest_memory(memory_file, server_factory, tmp_path) -> None:
    pytest.importorskip("fcsnap.testing.kvm")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no /dev/kvm")
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, kvm=True, threads=0,
                         regions=2)
    assert report["kvm"]["ok"] is True
    assert server.faults >= len(data) // PAGE


def run_file_backend(path: Path, report: Path, expect_status: int = 0,
                     **options: Any) -> dict[str, Any]:
    return run_standin(None, report, expect_status, file_backend=path, **options)


def test_file_backend_reads_the_file(memory_file, tmp_path) -> None:
    path, data = memory_file
    report = run_file_backend(path, tmp_path / "r.json", expected=path, regions=2, threads=3,
                              order="random", latency=True)
    assert report["backend"] == "file"
    assert report["pages_touched"] == len(data) // PAGE
    assert report["mismatches"] == 0
    a, b = report["regions"]
    assert (a["offset"], b["offset"], a["size"] + b["size"]) == (0, a["size"], len(data))
    assert report["latency"]["touch"]["touches"] == len(data) // PAGE
    assert report["rusage"]["minor_faults"] > 0


def test_file_backend_catches_a_wrong_byte(memory_file, tmp_path) -> None:
    path, data = memory_file
    bad = bytearray(data)
    bad[7 * PAGE + 5] ^= 0x01
    other = tmp_path / "other.bin"
    other.write_bytes(bad)
    report = run_file_backend(other, tmp_path / "r.json", expect_status=3, expected=path,
                              threads=2)
    assert report["first_mismatches"] == [7 * PAGE]
    # without the byte compare the same run passes: benchmarks leave the compare out
    report = run_file_backend(other, tmp_path / "r2.json", expected=path, threads=2,
                              verify_bytes=False)
    assert report["mismatches"] == 0 and report["pages_touched"] == len(data) // PAGE


def test_file_backend_private_writes_leave_the_file_alone(memory_file, tmp_path) -> None:
    path, data = memory_file
    guest = firecracker.FileGuest(str(path), len(data), 2)
    target = guest.host(3 * MiB)
    ctypes.memset(target, 0xAB, PAGE)  # MAP_PRIVATE: copy on write, like a running guest
    assert ctypes.string_at(target, 4) == b"\xab" * 4
    assert path.read_bytes() == data


def test_ws_fraction_then_all_pages(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    pages = len(data) // PAGE
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, ws_fraction=0.1,
                         seed=3, threads=4, latency=True)
    ws = round(0.1 * pages)
    assert report["ws_pages"] == ws
    assert report["pages_touched"] == ws + pages  # the working set, then every page
    assert report["mismatches"] == 0
    assert 0 < report["ws_s"] <= report["all_s"] <= report["touch_s"]
    assert server.faults == pages  # the second pass found the working set present
    assert report["latency"]["ws"]["touches"] == ws
    assert report["latency"]["all"]["touches"] == pages


def test_ws_fraction_is_fixed_by_the_seed(memory_file, tmp_path) -> None:
    path, data = memory_file

    def working_set(seed: int, threads: int) -> list[int]:
        args = firecracker.parse_args(["--file-backend", str(path), "--ws-fraction", "0.05",
                                       "--seed", str(seed), "--threads", str(threads)])
        guest = firecracker.FileGuest(str(path), len(data), 1)
        [(name, plan), _] = firecracker.StandIn(args)._passes(guest)
        assert name == "ws" and len(plan) == threads
        return [offset for share in plan for offset in share]

    first = working_set(1, 4)
    assert len(first) == len(set(first)) == round(0.05 * len(data) / PAGE)
    assert first != sorted(first)  # random order
    assert working_set(1, 2) == first  # the same pages in the same order, however split
    assert set(working_set(2, 4)) != set(first)


def test_file_backend_usage_errors(memory_file, tmp_path) -> None:
    path, _ = memory_file
    for argv in ([], [str(tmp_path / "s"), "--file-backend", str(path)],
                 ["--file-backend", str(path), "--balloon", "0:4096"],
                 ["--file-backend", str(path), "--misbehave", "garbage"]):
        with pytest.raises(SystemExit) as e:
            firecracker.parse_args(argv)
        assert e.value.code == 2
    argv = firecracker.command(None, file_backend=path, verify_bytes=False)
    assert argv[3:] == ["--file-backend", str(path), "--no-verify-bytes"]


BALLOON_RANGES = [(0, 16 * PAGE), (3 * MiB, MiB)]  # the second spans the region border


def test_balloon_cycles_race_the_threads(memory_file, server_factory, tmp_path) -> None:
    """Each cycle is a touch pass with a balloon thread giving its pages back one by one
    (one REMOVE each) and reading them again; the pages read zero from then on."""
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, regions=2, threads=4,
                         order="random", balloon=BALLOON_RANGES, balloon_cycles=3)
    ballooned = sum(n for _, n in BALLOON_RANGES) // PAGE
    assert report["mismatches"] == 0 and report["balloon_ok"] is True
    assert report["pages_touched"] == 3 * (len(data) // PAGE + ballooned)
    assert len(report["cycle_ends"]) == 3 and report["cycle_ends"] == sorted(report["cycle_ends"])
    assert len(server.removes) == 3 * ballooned
    assert all(end - start == PAGE for start, end in server.removes)


def test_balloon_cycles_catch_old_bytes_after_a_remove(memory_file, server_factory,
                                                       tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data, zero_removed=False)
    report = run_standin(server, tmp_path / "r.json", expect_status=3, expected=path,
                         threads=2, balloon=BALLOON_RANGES, balloon_cycles=1)
    assert report["balloon_ok"] is False and report["mismatches"] > 0


def test_start_delay(memory_file, server_factory, tmp_path) -> None:
    path, data = memory_file
    server = server_factory(data)
    report = run_standin(server, tmp_path / "r.json", expected=path, start_delay=0.5)
    assert report["mismatches"] == 0
    assert report["elapsed_s"] - report["touch_s"] >= 0.5


def test_start_and_end_gates(memory_file, server_factory, tmp_path) -> None:
    """--start-gate: no page is touched until its file exists; --end-gate: after its report,
    the stand-in stays until its file exists, then exits 0."""
    path, data = memory_file
    server = server_factory(data)
    report, start, end = tmp_path / "r.json", tmp_path / "start", tmp_path / "end"
    proc = firecracker.spawn(server.path, report=report, expected=path, deadline=WAIT,
                             start_gate=start, end_gate=end,
                             popen={"stderr": subprocess.DEVNULL})
    try:
        assert _wait_for(lambda: bool(server.fds), WAIT)  # the handshake is in
        time.sleep(0.3)
        assert server.faults == 0 and not report.exists()
        start.touch()
        assert _wait_for(report.exists, WAIT)
        time.sleep(0.3)
        assert proc.poll() is None  # held at the end gate
        end.touch()
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
    assert firecracker.read_report(report)["mismatches"] == 0
    assert server.faults > 0


def test_first_mismatch_is_reported_at_once(memory_file, server_factory, tmp_path) -> None:
    """A VM whose server goes on to kill it (here: stops answering) still shows the wrong
    byte it read: the report is written at the first mismatch, not only at the end."""
    path, data = memory_file
    bad = bytearray(data)
    bad[5 * PAGE] ^= 0xFF
    server = server_factory(bytes(bad), answer=8)
    report = tmp_path / "r.json"
    proc = firecracker.spawn(server.path, report=report, expected=path, deadline=WAIT,
                             popen={"stderr": subprocess.DEVNULL})
    try:
        assert _wait_for(report.exists, WAIT)
        assert proc.poll() is None  # still waiting for page 8
    finally:
        proc.kill()
        proc.wait(WAIT)
    result = firecracker.read_report(report)
    assert (result["mismatches"], result["first_mismatches"]) == (1, [5 * PAGE])
    assert result["pages_touched"] == 6


def test_balloon_cycles_usage_errors(memory_file) -> None:
    path, _ = memory_file
    for extra in (["--balloon-cycles", "2"], ["--balloon-cycles", "-1", "--balloon", "0:4096"],
                  ["--balloon-cycles", "2", "--balloon", "0:4096", "--kvm"],
                  ["--start-delay", "-1"]):
        with pytest.raises(SystemExit) as e:
            firecracker.parse_args(["s", "--expected", str(path), *extra])
        assert e.value.code == 2
