"""`fcsnap restore` when things go wrong around it, and under load: the real CLI in its own
process, the Firecracker stand-in in another.

A page server that hangs freezes its guest, and one that serves a wrong byte corrupts it
silently; these tests break things while the guest is faulting (the VM killed, SIGTERM, a
second client, diff files truncated or deleted, balloon REMOVEs racing the faults, many
threads on the same pages, many servers at once) and check both: every wait has a deadline,
and every byte a guest reads is compared with the memory file. In-process runs also check that
however serving ends, every fd, mapping and thread the server had is released.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helpers
import numpy as np
import pytest
import zstandard
from helpers import WAIT, Lineage, Processes, restore_argv

from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.store.format.seekable import SeekableReader
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.uffd.server import FaultServer, ServeOptions
from fcsnap.units import PAGE

MiB = 1 << 20
GiB = 1 << 30
HUGE = 2 * MiB
SIZE = 128 * MiB  # the lineages' guest memory; small runs give the stand-in a smaller --size
SMALL = 8 * MiB
DAMAGED_SIZE = 16 * MiB  # the lineages tests copy and damage: size is not what they test
PROMPT = 3.0  # seconds a server may take to notice and act on an event
KILLED = -signal.SIGKILL
UFFD_LINK = "anon_inode:[userfaultfd]"
PIDFD_LINK = "anon_inode:[pidfd]"


# -- builds ----------------------------------------------------------------------------------


def make_lineages(root: Path, size: int, seed: int, kinds: tuple[str, ...]) -> dict[str, Lineage]:
    """gen0 packed from a Full snapshot and gen1 diffed over it, for each compression kind."""
    mem = synthetic_memory(size, seed=seed)
    write_full(root / "gen0.mem", mem)
    new, _ = evolve(mem, seed=seed + 1, dirty_share=0.1)
    write_full(root / "gen1.mem", new)
    lineages = {}
    for kind in kinds:
        store = root / kind
        options = BuildOptions(compression=kind)
        gen0 = ops.pack(root / "gen0.mem", store, options)[1]
        gen1 = ops.diff(root / "gen1.mem", gen0, store, options)[1]
        images = [root / "gen0.mem", root / "gen1.mem"]
        lineages[kind] = Lineage(store, [gen0, gen1], images)
    return lineages


@pytest.fixture(scope="module")
def lineages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Lineage]:
    """A raw ("none") and a compressed ("zstd") lineage of the same 128 MiB guest."""
    return make_lineages(tmp_path_factory.mktemp("lineages"), SIZE, 11, ("none", "zstd"))


@pytest.fixture(scope="module")
def small_lineages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Lineage]:
    """The same, of a DAMAGED_SIZE guest, for tests that damage a copy of the store."""
    return make_lineages(tmp_path_factory.mktemp("small"), DAMAGED_SIZE, 11, ("none", "zstd"))


# -- processes -------------------------------------------------------------------------------


@dataclass
class Server:
    """One `fcsnap restore` process, its socket and its --stats file."""

    proc: subprocess.Popen[bytes]
    socket: Path
    stats_path: Path
    status: int | None = None
    stderr: list[str] = field(default_factory=list)

    def wait_handshake(self) -> None:
        """Wait until the server holds the VM's uffd, i.e. has taken its handshake."""
        self.wait_for_fd(UFFD_LINK)

    def wait_for_fd(self, link: str) -> None:
        """Wait until the server holds an fd reading `link` in /proc (a uffd: it has the
        handshake; a pidfd: it has accepted a VM)."""
        deadline = time.monotonic() + WAIT
        fds = Path(f"/proc/{self.proc.pid}/fd")
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited before holding {link}"
            for fd in list(fds.iterdir()):
                try:
                    if os.readlink(fd) == link:
                        return
                except FileNotFoundError:
                    continue
            time.sleep(0.005)
        pytest.fail(f"the server held no {link} within {WAIT:g}s")

    def finish(self, timeout: float = WAIT) -> Server:
        """Wait for the server to exit (within `timeout`) and collect its stderr."""
        _, err = self.proc.communicate(timeout=timeout)
        self.status = self.proc.returncode
        self.stderr = err.decode().splitlines()
        return self

    @property
    def stats(self) -> dict[str, Any]:
        return json.loads(self.stats_path.read_text())

    @property
    def error(self) -> str:
        """The one line the server printed for its failure."""
        assert len(self.stderr) == 1 and self.stderr[0].startswith("fcsnap: error: "), self.stderr
        return self.stderr[0]


@dataclass
class Vm:
    """One stand-in process and its report."""

    proc: subprocess.Popen[bytes]
    report_path: Path
    status: int | None = None

    def finish(self, timeout: float = WAIT + 10) -> Vm:
        self.proc.communicate(timeout=timeout)
        self.status = self.proc.returncode
        return self

    @property
    def report(self) -> dict[str, Any] | None:
        """The stand-in's report; None when it wrote none (it was killed before the end)."""
        if not self.report_path.exists():
            return None
        return firecracker.read_report(self.report_path)


class Runs(Processes):
    """Starts servers and stand-ins for one test; kills whatever is left at teardown."""

    def __init__(self, tmp: Path) -> None:
        super().__init__()
        self.tmp = tmp
        self.gate = tmp / "start-gate"  # a stand-in given start_gate=gate touches once it exists

    def server(self, build: Path, *args: str, name: str = "uffd") -> Server:
        sock, stats = self.tmp / f"{name}.sock", self.tmp / f"{name}.stats.json"
        proc = self.track(subprocess.Popen(
            restore_argv(build, sock, *args, stats=stats), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        return Server(proc, sock, stats)

    def vm(self, server: Server, name: str = "vm", **options: Any) -> Vm:
        report = self.tmp / f"{name}.json"
        options.setdefault("deadline", WAIT)
        proc = self.track(firecracker.spawn(server.socket, report=report, popen={
            "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}, **options))
        return Vm(proc, report)

    def script(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        return self.track(subprocess.Popen([sys.executable, "-c", code, *args],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE))


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Runs]:
    r = Runs(tmp_path)
    yield r
    r.close()


def assert_served(server: Server, vm: Vm, pages: int | None = None) -> dict[str, Any]:
    """Both ended well: every byte the guest read was right; returns the server's stats."""
    stats = helpers.assert_served(vm.status, server.status, server.stderr, vm.report,
                                  server.stats, pages)
    assert not server.socket.exists()
    return stats


def wait_installed(vm: Vm, server: Server, gate: Path, installed: int) -> None:
    """Wait for the handshake, take the VM's anonymous memory (the stand-in waits at its
    start gate), open the gate, and wait until about `installed` bytes of guest memory are
    in: the VM's anonymous memory has grown by that."""
    server.wait_handshake()
    baseline = rss(vm.proc.pid, "RssAnon")
    gate.touch()
    deadline = time.monotonic() + WAIT
    while rss(vm.proc.pid, "RssAnon") < baseline + installed:
        if time.monotonic() > deadline:
            pytest.fail(f"the VM never got {installed} bytes of guest memory installed")
        time.sleep(0.002)


def rss(pid: int, key: str = "VmRSS") -> int:
    """A memory figure of /proc/PID/status in bytes (0 once the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return next((int(line.split()[1]) << 10 for line in status.splitlines()
                 if line.startswith(key + ":")), 0)


# -- the VM goes away, the server is told to stop --------------------------------------------


@pytest.mark.parametrize("installed", [0, SIZE // 8], ids=["before-touching", "mid-faults"])
def test_vm_killed_while_threads_fault(lineages, runs, installed: int) -> None:
    """SIGKILL to a VM whose eight threads are faulting (or about to): the server exits 0 on
    its own ("vm exited", whatever it was doing), writes its stats, removes its socket."""
    lineage = lineages["none"]
    server = runs.server(lineage.newest, "--fault-around", "0")
    vm = runs.vm(server, expected=lineage.expected, threads=8, order="random", hold=WAIT,
                 start_gate=runs.gate)
    wait_installed(vm, server, runs.gate, installed)
    vm.proc.kill()
    killed = time.monotonic()
    server.finish()
    assert time.monotonic() - killed < PROMPT
    assert vm.finish().status == KILLED
    assert server.status == 0, server.stderr
    assert server.stderr == []
    stats = server.stats
    assert stats["exit_reason"] == "vm exited"
    assert stats["pages_served"] < SIZE // PAGE
    assert not server.socket.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_during_heavy_faulting(lineages, runs, signum: int) -> None:
    """SIGTERM or SIGINT while eight threads fault: exit 0 promptly with stats; the VM, not
    yet fully resident, is killed rather than left to freeze at its next fault."""
    lineage = lineages["zstd"]
    server = runs.server(lineage.newest, "--fault-around", "0")
    vm = runs.vm(server, expected=lineage.expected, threads=8, order="random", hold=WAIT,
                 start_gate=runs.gate)
    wait_installed(vm, server, runs.gate, SIZE // 16)
    server.proc.send_signal(signum)
    sent = time.monotonic()
    server.finish()
    assert time.monotonic() - sent < PROMPT
    assert server.status == 0, server.stderr
    assert server.stderr == []
    stats = server.stats
    assert stats["exit_reason"] == "signal"
    assert 0 < stats["pages_served"] < SIZE // PAGE
    assert vm.finish().status == KILLED
    assert not server.socket.exists()


def held_resources(store: Path) -> dict[str, object]:
    """What this process holds that a server could leak: open fds (by what they point at),
    mappings of files in `store`, and threads. Garbage is collected first: an earlier test's
    unreachable socket, closed by the collector in the middle of this one, is not a change."""
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:  # the fd of the listdir itself
            continue
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines()
            if str(store) in line]
    return {"fds": fds, "maps": maps, "threads": threading.active_count()}


@pytest.mark.parametrize(("ending", "kind"), [  # a raw diff's other endings: behind slow
    pytest.param(ending, kind, id=f"{ending}-{kind}",
                 marks=pytest.mark.slow if kind == "none" and ending != "vm-killed" else ())
    for kind in ("none", "zstd") for ending in ("vm-killed", "stopped", "failed")
])
def test_server_frees_everything_however_serving_ends(lineages, tmp_path, kind, ending):
    """In process, so that what the server holds can be counted. Mid-faults, eight threads
    faulting: the VM is SIGKILLed (run returns 0, "vm exited"), or a stop is asked for (as
    SIGTERM does: 0, VM killed), or a failure is reported (as a refused snapshot load is: the
    error raised, VM killed). Every way, the fds, the diff mappings, the threads and the socket
    file the server made are gone afterwards."""
    lineage = lineages[kind]
    sock, stats = tmp_path / "uffd.sock", tmp_path / "stats.json"
    before = held_resources(lineage.store)
    vms: list[subprocess.Popen[bytes]] = []

    def start_vm() -> None:
        vms.append(firecracker.spawn(
            sock, expected=lineage.expected, threads=8, order="random", hold=WAIT,
            deadline=WAIT, start_delay=0.3,
            popen={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}))

    server = FaultServer(lineage.newest, ServeOptions(
        socket=sock, stats_path=stats, fault_around=0, on_listening=start_vm))

    def break_things() -> None:
        deadline = time.monotonic() + WAIT
        while server.stats.pages_served < SIZE // PAGE // 16:
            if time.monotonic() > deadline:
                server.stop()  # run() returns; the assertions below fail
                return
            time.sleep(0.002)
        if ending == "vm-killed":
            vms[0].kill()
        elif ending == "stopped":
            server.stop()
        else:
            server.fail(FcsnapError("injected failure"))

    breaker = threading.Thread(target=break_things)
    guard = threading.Timer(2 * WAIT, server.stop)  # the test fails, not hangs
    breaker.start()
    guard.start()
    try:
        if ending == "failed":
            with pytest.raises(FcsnapError, match="injected failure"):
                server.run()
        else:
            assert server.run() == 0
    finally:
        guard.cancel()
        guard.join(WAIT)
        breaker.join(WAIT)
        for vm in vms:
            if vm.poll() is None and ending == "vm-killed":
                vm.kill()
            vm.wait(WAIT)
    assert vms[0].returncode == KILLED  # killed by the test or, when it stopped, the server
    reason = json.loads(stats.read_text())["exit_reason"]
    assert reason == {"vm-killed": "vm exited", "stopped": "signal"}.get(ending, reason)
    assert 0 < server.stats.pages_served < SIZE // PAGE
    assert not sock.exists()
    after = held_resources(lineage.store)
    leaked = {fd: what for fd, what in after["fds"].items() if before["fds"].get(fd) != what}
    assert leaked == {}, "fds left open"
    assert after == before


@pytest.mark.parametrize("problem", ["stats-dir-missing", "socket-is-a-file",
                                     "prefetch-garbage", "verify-without-hashes"])
def test_server_refusing_to_start_frees_everything(small_lineages, tmp_path, problem) -> None:
    """Failures found before any VM can connect (in the constructor or before listening)
    leave nothing open either."""
    lineage = small_lineages["none"].writable_copy(tmp_path / "store")
    sock, garbage = tmp_path / "uffd.sock", tmp_path / "garbage"
    garbage.write_bytes(b"not a working set")
    options = ServeOptions(socket=sock, stats_path=tmp_path / "stats.json")
    if problem == "stats-dir-missing":
        options.stats_path = tmp_path / "nope" / "stats.json"
    elif problem == "socket-is-a-file":
        sock.write_text("mine")
    elif problem == "prefetch-garbage":
        options.prefetch_ws = garbage
    else:
        options.verify = True
        (lineage.builds[0] / "memfile.hashes").unlink()
    before = held_resources(lineage.store)
    with pytest.raises(FcsnapError):
        FaultServer(lineage.newest, options).run()
    assert held_resources(lineage.store) == before
    assert sock.read_text() == "mine" if problem == "socket-is-a-file" else not sock.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_while_a_vm_withholds_its_handshake(lineages, runs, signum: int) -> None:
    """A VM connected and silent, the server waiting (up to --handshake-timeout) for its
    handshake: a signal ends the wait at once, exit 0, and the connected VM is killed."""
    lineage = lineages["none"]
    server = runs.server(lineage.newest, "--handshake-timeout", str(WAIT))
    vm = runs.vm(server, expected=lineage.expected, misbehave="nothing", hold=WAIT)
    server.wait_for_fd(PIDFD_LINK)  # it has accepted the VM and watches it
    server.proc.send_signal(signum)
    sent = time.monotonic()
    server.finish()
    assert time.monotonic() - sent < PROMPT
    assert (server.status, server.stderr) == (0, [])
    assert server.stats["exit_reason"] == "stopped before a VM was served"
    assert vm.finish().status == KILLED
    assert not server.socket.exists()


# -- a second client -------------------------------------------------------------------------


SECOND_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(float(sys.argv[2]))
try:
    sock.connect(sys.argv[1])
except ConnectionRefusedError:
    print("refused")
else:
    try:
        print("closed" if sock.recv(1) == b"" else "answered")
    except ConnectionResetError:
        print("closed")
    except TimeoutError:
        print("waited")
"""


def second_client(path: Path) -> str:
    """Connect to a server that is busy with a VM: "refused", "closed" or "killed", within
    PROMPT seconds (a client left waiting would be a second VM hung). The client is a process
    of its own, as a second VMM would be: what the server (or its watchdog) does to it,
    killing it included, is seen here, not done to the test."""
    started = time.monotonic()
    client = subprocess.run([sys.executable, "-c", SECOND_CLIENT, str(path), str(PROMPT)],
                            capture_output=True, text=True, timeout=WAIT)
    if client.returncode == -signal.SIGKILL:
        return "killed"
    assert client.returncode == 0, f"the second client ended with {client.returncode}: " \
        f"{client.stderr}"
    outcome = client.stdout.strip()
    if outcome == "waited":
        pytest.fail(f"a second client was left waiting for {PROMPT:g}s")
    assert time.monotonic() - started < PROMPT + WAIT / 2
    return outcome


def test_second_client_while_serving_is_refused(lineages, runs) -> None:
    lineage = lineages["none"]
    server = runs.server(lineage.newest)
    vm = runs.vm(server, expected=lineage.expected, size=SMALL, threads=4,
                 order="random", start_gate=runs.gate)
    server.wait_handshake()
    assert second_client(server.socket) == "refused"
    runs.gate.touch()
    assert_served(server.finish(), vm.finish(), SMALL // PAGE)


# Connects, says so, and sends its handshake only when told: the test connects a second client
# in between, while the server is waiting for this one's handshake.
SLOW_HANDSHAKE_VM = """
import json, mmap, sys
from fcsnap.testing.firecracker import Guest, Reader, Tally, connect, handshake
sock_path, expected_path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(expected_path, "rb") as f:
    expected = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
guest = Guest(size, 4096, 1)
sock = connect(sock_path, 10)
print("connected", flush=True)
sys.stdin.readline()
handshake(sock, guest, "v1.12", None)
tally = Tally()
Reader(guest, expected, tally).check(range(0, size, 4096))
print(json.dumps([tally.touched, tally.mismatches]), flush=True)
"""


def test_second_client_during_a_handshake_is_turned_away(lineages, runs) -> None:
    """The first VM has connected but not yet sent its handshake: a second client is not
    left queued behind it for the handshake timeout. Connecting after the first was taken it
    is refused; queued before that (restore listens while it opens its build), it is killed
    as a VM no one will serve (it has sent its uffd), never merely disconnected: a VMM so
    left would freeze at its first fault."""
    lineage = lineages["none"]
    server = runs.server(lineage.newest)
    first = runs.script(SLOW_HANDSHAKE_VM, str(server.socket), str(lineage.expected),
                        str(SMALL))
    assert first.stdout is not None and first.stdin is not None
    assert first.stdout.readline() == b"connected\n"
    assert second_client(server.socket) in ("refused", "killed")
    first.stdin.write(b"go\n")
    first.stdin.flush()
    out, err = first.communicate(timeout=WAIT)
    assert first.returncode == 0, err.decode()
    assert json.loads(out) == [SMALL // PAGE, 0]
    server.finish()
    assert server.status == 0, server.stderr
    assert server.stats["exit_reason"] == "vm exited"


# -- diff files changed under a running server -----------------------------------------------


def first_base_page(lineage: Lineage) -> int:
    """Storage offset, in the base diff, of the first page (in guest order) read from it."""
    base = uuid.UUID(lineage.builds[0].name)
    return next(m.storage_offset for m in load_header(lineage.newest).mappings
                if m.build_id == base)


@pytest.mark.parametrize(("kind", "cut", "threads", "order"), [
    pytest.param("none", "first-page", 1, "sequential", id="raw-cut-in-first-page"),
    pytest.param("none", "half", 4, "random", id="raw-cut-in-half", marks=pytest.mark.slow),
    pytest.param("zstd", "half", 4, "random", id="zstd-cut-in-half"),
])
def test_diff_truncated_while_serving(small_lineages, runs, tmp_path, kind, cut, threads, order):
    """The base generation's diff is cut after the handshake, before the guest touches
    memory, 100 bytes into a page (which then reads zeros after the cut). The server fails
    with one line naming the file and kills the VM, which never read a wrong byte (its
    report, written at its first mismatch, shows none). With the cut in the first page a
    sequential guest reads from that file, and one page per fault, a server that copied
    that page would let the guest see it before failing on the next."""
    lineage = small_lineages[kind].writable_copy(tmp_path / "store")
    diff = lineage.base_diff
    at = first_base_page(lineage) if cut == "first-page" else diff.stat().st_size // 2
    server = runs.server(lineage.newest, "--fault-around", "0" if cut == "first-page" else "256K")
    vm = runs.vm(server, expected=lineage.expected, threads=threads, order=order,
                 start_gate=runs.gate)
    server.wait_handshake()
    os.truncate(diff, at - at % PAGE + 100)
    runs.gate.touch()
    assert vm.finish().status == KILLED
    server.finish()
    assert server.status == 1
    assert str(diff) in server.error
    assert vm.report is None or vm.report["mismatches"] == 0
    assert server.stats["exit_reason"].startswith("error: ")
    assert not server.socket.exists()


def flip_undetected(lineage: Lineage) -> int:
    """Flip one bit in the first frame of the base's compressed diff such that zstd still
    decodes the frame, to other bytes the newest generation reads from it; returns the
    first storage offset whose byte changed."""
    path = lineage.base_diff
    base = uuid.UUID(lineage.builds[0].name)
    served = [(m.storage_offset, m.storage_offset + m.length)
              for m in load_header(lineage.newest).mappings if m.build_id == base]
    with SeekableReader(path) as reader:
        frame, want = reader.frames[0], reader.read_frame(0)
    blob = bytearray(path.read_bytes())
    start, end = frame.compressed_offset, frame.compressed_offset + frame.compressed_size
    for at in range((start + end) // 2, end):
        blob[at] ^= 0x01
        try:
            got = zstandard.ZstdDecompressor().decompress(
                bytes(blob[start:end]), max_output_size=frame.decompressed_size)
        except zstandard.ZstdError:
            got = b""
        changed = np.flatnonzero(
            np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8)
        ) if len(got) == len(want) else []
        if len(changed) and all(
            any(lo <= frame.decompressed_offset + i < hi for lo, hi in served)
            for i in changed.tolist()
        ):
            path.write_bytes(blob)
            return frame.decompressed_offset + int(changed[0])
        blob[at] ^= 0x01
    pytest.fail("no bit of the first frame decodes to other served bytes")


def test_corrupt_compressed_frame_is_not_served(small_lineages, runs, tmp_path) -> None:
    """A bit flipped in a zstd frame that still decodes: without --verify the frame's
    checksum in the seek table is what stands between it and the guest."""
    lineage = small_lineages["zstd"].writable_copy(tmp_path / "store")
    flip_undetected(lineage)
    server = runs.server(lineage.newest)
    vm = runs.vm(server, expected=lineage.expected, threads=2, order="random")
    assert vm.finish().status == KILLED
    server.finish()
    assert server.status == 1
    assert str(lineage.base_diff) in server.error and "checksum" in server.error
    assert vm.report is None or vm.report["mismatches"] == 0


@pytest.mark.parametrize(("kind", "args"), [
    pytest.param("none", ("--verify",), id="raw-verify"),
    pytest.param("zstd", (), id="zstd-frame-checksums"),
])
def test_diff_corrupted_while_serving_is_not_served(small_lineages, runs, tmp_path, kind, args):
    """Bytes of the base diff changed in place after the handshake, before the guest reads
    them: a raw diff under --verify fails its block hash, a zstd frame (still decodable) its
    seek-table checksum. The server fails with one line naming the build or file and kills
    the VM, which never read a wrong byte."""
    lineage = small_lineages[kind].writable_copy(tmp_path / "store")
    server = runs.server(lineage.newest, *args)
    vm = runs.vm(server, expected=lineage.expected, threads=4, order="random",
                 start_gate=runs.gate)
    server.wait_handshake()
    if kind == "none":
        at = first_base_page(lineage) + 100
        with lineage.base_diff.open("r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ 0xFF]))
    else:
        flip_undetected(lineage)
    runs.gate.touch()
    assert vm.finish().status == KILLED
    server.finish()
    assert server.status == 1
    if kind == "none":
        assert lineage.builds[0].name in server.error and "does not match its hash" in server.error
    else:
        assert str(lineage.base_diff) in server.error and "checksum" in server.error
    assert vm.report is None or vm.report["mismatches"] == 0
    assert not server.socket.exists()


@pytest.mark.parametrize("kind", ["none", pytest.param("zstd", marks=pytest.mark.slow)])
def test_diff_deleted_while_serving_is_still_served(small_lineages, runs, tmp_path, kind) -> None:
    """Deleting a diff file does not take it from the server: the open file stays valid."""
    lineage = small_lineages[kind].writable_copy(tmp_path / "store")
    server = runs.server(lineage.newest, "--verify")
    vm = runs.vm(server, expected=lineage.expected, threads=4, order="random",
                 start_gate=runs.gate)
    server.wait_handshake()
    lineage.base_diff.unlink()
    runs.gate.touch()
    stats = assert_served(server.finish(), vm.finish(), DAMAGED_SIZE // PAGE)
    assert stats["per_build_pages"].get(lineage.builds[0].name, 0) > 0


# -- races between the guest's threads and its balloon ---------------------------------------


BALLOON_CASES = [
    pytest.param("none", "4K", "256K", id="raw-4k"),
    pytest.param("zstd", "4K", "0", id="zstd-4k-no-fault-around"),
    pytest.param("none", "2M", "256K", id="raw-2m"),
]


@pytest.mark.parametrize(("kind", "page", "fault_around"), BALLOON_CASES)
def test_balloon_cycles_race_the_faults(request, lineages, runs, kind, page, fault_around):
    """Eight threads fault every page while a balloon gives a quarter of them back one page
    at a time (REMOVE events amid faults on the same pages), then touches them again, three
    times over: every byte is right and every ballooned page reads zero."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    page_size = firecracker.PAGE_SIZES[page]
    size = 16 * MiB
    balloon = [(page_size, 2 * MiB), (6 * MiB, 4 * MiB)]  # the second spans the regions' border
    ballooned = 6 * MiB // page_size
    cycles = 3
    lineage = lineages[kind]
    server = runs.server(lineage.newest, "--fault-around", fault_around)
    vm = runs.vm(server, expected=lineage.expected, size=size, page_size=page, regions=2,
                 threads=8, order="random", balloon=balloon, balloon_cycles=cycles)
    stats = assert_served(server.finish(), vm.finish(), cycles * (size // page_size + ballooned))
    report = vm.report
    assert report is not None and report["balloon_ok"] is True
    assert len(report["cycle_ends"]) == cycles
    assert stats["remove_events"] == cycles * ballooned  # one madvise per page
    assert stats["zero_pages"] >= cycles * ballooned  # each cycle touched them again


@pytest.mark.parametrize(("page", "threads", "fault_around"), [
    pytest.param("4K", 8, "0", id="4k-8-threads-no-fault-around"),
    pytest.param("4K", 16, "256K", id="4k-16-threads"),
    pytest.param("2M", 8, "0", id="2m-8-threads"),
])
def test_many_threads_fault_the_same_pages(request, lineages, runs, page, threads, fault_around):
    """All threads read the same pages in the same order, so they fault each page at once:
    the page is installed once, the others are woken, no one reads a wrong byte."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    page_size = firecracker.PAGE_SIZES[page]
    lineage = lineages["zstd"]
    server = runs.server(lineage.newest, "--fault-around", fault_around)
    vm = runs.vm(server, expected=lineage.expected, size=SMALL, page_size=page,
                 threads=threads, shared_pages=True)
    stats = assert_served(server.finish(), vm.finish(), threads * SMALL // page_size)
    assert stats["pages_served"] == SMALL // page_size
    assert stats["faults"] >= SMALL // page_size if fault_around == "0" else stats["faults"] > 0


# -- load ------------------------------------------------------------------------------------


class RssSampler:
    """Samples a process's VmRSS and RssAnon every `interval` seconds, with time.monotonic()
    stamps (CLOCK_MONOTONIC: comparable with the stand-in's cycle_ends)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.anon: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            at, value, anon = time.monotonic(), rss(self.pid), rss(self.pid, "RssAnon")
            if value and anon:
                self.samples.append((at, value))
                self.anon.append((at, anon))
            self._stop.wait(self.interval)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(WAIT)
        return self.samples


@pytest.fixture(scope="module")
def big_lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineages(tmp_path_factory.mktemp("big"), GiB, 21, ("none",))["none"]


@pytest.mark.slow  # a 1 GiB lineage to build, then a minute of load: ~20 s on 2 cores
def test_load_1gib_eight_threads_balloon_cycles(big_lineage, runs) -> None:
    """A 1 GiB guest, eight threads faulting every page at random, three balloon cycles of
    16 MiB racing them, within the stand-in's 60 s deadline: every byte right, and the
    server's memory flat (nothing grows with the number of faults or events)."""
    lineage = big_lineage
    cycles = 3
    balloon = [(GiB // 4, 8 * MiB), (3 * GiB // 4 - 4 * MiB, 8 * MiB)]
    server = runs.server(lineage.newest)
    sampler = RssSampler(server.proc.pid)
    vm = runs.vm(server, expected=lineage.expected, threads=8, order="random",
                 regions=2, balloon=balloon, balloon_cycles=cycles, deadline=60)
    server.wait_handshake()
    handshake = time.monotonic()
    vm.finish(timeout=70)
    server.finish()
    samples = sampler.stop()
    ballooned = 16 * MiB // PAGE
    stats = assert_served(server, vm, cycles * (GiB // PAGE + ballooned))
    report = vm.report
    assert report is not None and report["balloon_ok"] is True
    assert stats["remove_events"] == cycles * ballooned
    first_pass = report["cycle_ends"][0]
    after = [value for at, value in samples if at >= first_pass]
    assert len(after) >= 3, "too few samples after the first pass"
    growth = max(after) - after[0]
    assert growth < 64 * MiB, f"server RSS grew by {growth / MiB:.1f} MiB after the first pass"
    # The mapped diff pages the kernel copies from count in VmRSS until the first pass has
    # touched them all; the server's own (anonymous) memory must be flat from the handshake
    # on: per-fault or per-event bookkeeping would grow it by megabytes over the run.
    anon = [value for at, value in sampler.anon if at >= handshake]
    assert len(anon) >= 3, "too few samples after the handshake"
    growth = max(anon) - anon[0]
    assert growth < 8 * MiB, f"server anonymous memory grew by {growth / MiB:.1f} MiB"


def test_eight_restores_of_one_build_at_once(lineages, runs) -> None:
    """Sandbox clones: eight servers of the same build, each its own socket and stats, each
    VM checking every byte."""
    lineage = lineages["none"]
    pairs = []
    for i in range(8):
        server = runs.server(lineage.newest, name=f"uffd{i}")
        pairs.append((server, runs.vm(server, name=f"vm{i}", expected=lineage.expected,
                                      size=SMALL, threads=2, order="random", seed=i)))
    for server, vm in pairs:
        assert_served(server.finish(), vm.finish(), SMALL // PAGE)
    assert len({s.stats["peer_pid"] for s, _ in pairs}) == 8
