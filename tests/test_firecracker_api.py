"""`fcsnap restore --firecracker-api`: the snapshot load request, against a fake Firecracker.

The fake serves Firecracker's API socket in a thread of the test: it checks the request
against Firecracker's API definition (swagger SnapshotLoadParams and MemoryBackend), then
behaves as Firecracker does - it connects a VM (the stand-in, its own process) to the page
server and answers only once the server has accepted that VM, so a restore that waited for the
answer before accepting would hang. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import restore_argv

from fcsnap.store import ops
from fcsnap.store.builder import BuildOptions
from fcsnap.store.layout import SNAPFILE
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd.firecracker_api import load_body, read_response

SIZE = 1 << 20  # guest memory: 256 pages
WAIT = 30.0  # seconds any one step may take before the test fails
VM_HOLD = 1.0  # seconds a loaded VM stays after its work, as a running VM would
SO_ACCEPTCON = 1 << 16  # /proc/net/unix flag of a listening socket
FAULT = "Load snapshot error: Cannot restore microvm state: the vmstate file is for another CPU"

# Firecracker's swagger (src/firecracker/swagger/firecracker.yaml): property -> (type, required).
SNAPSHOT_LOAD_PARAMS: dict[str, tuple[type, bool]] = {
    "snapshot_path": (str, True),
    "enable_diff_snapshots": (bool, False),
    "track_dirty_pages": (bool, False),
    "mem_file_path": (str, False),
    "mem_backend": (dict, False),
    "resume_vm": (bool, False),
    "network_overrides": (list, False),
    "vsock_override": (dict, False),
    "clock_realtime": (bool, False),
}
MEMORY_BACKEND: dict[str, tuple[type, bool]] = {
    "backend_type": (str, True),
    "backend_path": (str, True),
}
BACKEND_TYPES = ("File", "Uffd")


def schema_problems(obj: Any, schema: dict[str, tuple[type, bool]], name: str) -> list[str]:
    """What makes `obj` not an instance of the object schema `name` (no unknown fields)."""
    if not isinstance(obj, dict):
        return [f"{name} is not an object"]
    problems = [f"{name}: unknown field {key!r}" for key in obj if key not in schema]
    for key, (kind, required) in schema.items():
        if key not in obj:
            if required:
                problems.append(f"{name}: missing required field {key!r}")
        elif not isinstance(obj[key], kind):
            problems.append(f"{name}.{key}: not a {kind.__name__}")
    return problems


def load_problems(body: Any) -> list[str]:
    """Why Firecracker would reject `body` as SnapshotLoadParams (empty: it is valid)."""
    problems = schema_problems(body, SNAPSHOT_LOAD_PARAMS, "SnapshotLoadParams")
    if not isinstance(body, dict):
        return problems
    if ("mem_backend" in body) == ("mem_file_path" in body):
        problems.append("exactly one of mem_backend and mem_file_path must be present")
    backend = body.get("mem_backend")
    if isinstance(backend, dict):
        problems += schema_problems(backend, MEMORY_BACKEND, "MemoryBackend")
        if backend.get("backend_type") not in BACKEND_TYPES:
            problems.append(f"MemoryBackend.backend_type: not one of {BACKEND_TYPES}")
    return problems


def read_request(conn: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """(request line, headers with lower-case names, body) of one HTTP/1.1 request."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, "the client closed the connection mid-request"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line, *fields = head.decode("ascii").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the client closed the connection mid-body"
        body += chunk
    assert len(body) == length, "the client sent more than Content-Length"
    return line, headers, body


def listening(pid: int) -> bool:
    """Whether process `pid` holds a listening Unix socket: the page server does until it has
    accepted its VM (and taken the handshake)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in inodes and int(fields[3], 16) & SO_ACCEPTCON:
            return True
    return False


class FakeFirecracker:
    """Firecracker's API socket for one `PUT /snapshot/load`. `behaviour`: "load" connects a
    VM and answers 204; "refuse-late" connects a VM (that then stays alive) and answers 400;
    "refuse-early" answers 400 without connecting one; "silent" connects a VM and never
    answers. Invalid requests get a 400."""

    def __init__(self, path: Path, behaviour: str, expected: Path, report: Path) -> None:
        self.behaviour = behaviour
        self.expected = expected
        self.report = report
        self.request_line = ""
        self.headers: dict[str, str] = {}
        self.body: Any = None
        self.problems: list[str] = []
        self.vm: subprocess.Popen[bytes] | None = None
        self.conn: socket.socket | None = None
        self.error: BaseException | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(WAIT)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn, _ = self.listener.accept()
            self.conn.settimeout(WAIT)
            restore_pid, _, _ = struct.unpack("3i", self.conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            ))
            self.request_line, self.headers, raw = read_request(self.conn)
            self.problems = self._request_problems(raw)
            if self.problems:
                self._answer(400, {"fault_message": "; ".join(self.problems)})
                return
            if self.behaviour != "refuse-early":
                self.vm = firecracker.spawn(
                    self.body["mem_backend"]["backend_path"], expected=self.expected,
                    threads=2, report=self.report, deadline=WAIT,
                    hold=WAIT if self.behaviour == "refuse-late" else VM_HOLD,
                )
                self._wait_accepted(self.vm, restore_pid)
            if self.behaviour == "load":
                self._answer(204)
            elif self.behaviour != "silent":
                self._answer(400, {"fault_message": FAULT})
        except BaseException as e:
            self.error = e

    def _request_problems(self, raw: bytes) -> list[str]:
        problems = []
        if self.request_line != "PUT /snapshot/load HTTP/1.1":
            problems.append(f"request line {self.request_line!r}")
        if self.headers.get("content-type") != "application/json":
            problems.append(f"Content-Type {self.headers.get('content-type')!r}")
        try:
            self.body = json.loads(raw)
        except ValueError:
            return [*problems, "the body is not JSON"]
        return problems + load_problems(self.body)

    def _wait_accepted(self, vm: subprocess.Popen[bytes], server_pid: int) -> None:
        """Firecracker answers the load only after the page server took its handshake."""
        deadline = time.monotonic() + WAIT
        while listening(server_pid):
            assert vm.poll() is None, f"the stand-in exited ({vm.returncode}) unserved"
            assert time.monotonic() < deadline, "the page server never accepted the VM"
            time.sleep(0.01)

    def _answer(self, status: int, error: dict[str, str] | None = None) -> None:
        """As Firecracker's HTTP server answers: no reason phrase, the connection kept alive,
        a 204 without Content-Length; head and body in separate writes."""
        assert self.conn is not None
        head = f"HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
        if error is None:
            self.conn.sendall(head.encode() + b"\r\n")
            return
        body = json.dumps(error).encode()
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        self.conn.sendall(head.encode())
        self.conn.sendall(body)

    def close(self) -> None:
        """Stop, kill a VM left behind, and raise what went wrong in the thread."""
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the fake Firecracker API never finished"
        if self.vm is not None and self.vm.poll() is None:
            self.vm.kill()
            self.vm.wait(WAIT)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        if self.error is not None:
            raise self.error


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(build directory packed with a snapfile, the memory file it serves)."""
    root = tmp_path_factory.mktemp("api")
    memfile, vmstate = root / "mem.bin", root / "vm.state"
    write_full(memfile, synthetic_memory(SIZE, seed=7))
    vmstate.write_bytes(b"vmstate")
    _, path = ops.pack(memfile, root / "store", BuildOptions(vmstate=vmstate))
    assert (path / SNAPFILE).is_file()
    return path, memfile


@pytest.fixture
def fakes() -> Iterator[list[FakeFirecracker]]:
    """Fake APIs made by a test, closed (and their VMs killed) at its end."""
    made: list[FakeFirecracker] = []
    yield made
    for fake in made:
        fake.close()


def restore(cwd: Path, build_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `fcsnap restore` on uffd.sock in `cwd` to its end (it serves one VM, or fails)."""
    argv = restore_argv(build_dir, Path("uffd.sock"), *args, quiet=False)
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"restore did not finish in {WAIT}s: {argv}")


@pytest.mark.parametrize("explicit", [False, True], ids=["snapfile", "vmstate"])
def test_load_resumes_vm_served_by_restore(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker], explicit: bool
) -> None:
    """The request matches the API definition, paths are sent absolute, and the VM it makes
    Firecracker connect is served every byte while the request waits for its answer."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", "load", memfile, tmp_path / "vm.json")
    fakes.append(fake)
    (tmp_path / "other.state").write_bytes(b"other")
    extra = ["--vmstate", "other.state", "--track-dirty-pages"] if explicit else []
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", *extra)
    fake.close()
    assert result.returncode == 0, result.stderr
    assert "fcsnap: Firecracker loaded the snapshot (HTTP 204)" in result.stderr
    assert fake.problems == []
    assert fake.body == {
        "snapshot_path": str(tmp_path / "other.state" if explicit else build_dir / SNAPFILE),
        "mem_backend": {"backend_type": "Uffd", "backend_path": str(tmp_path / "uffd.sock")},
        "track_dirty_pages": explicit,
        "resume_vm": True,
    }
    assert fake.vm is not None and fake.vm.wait(WAIT) == 0
    report = firecracker.read_report(tmp_path / "vm.json")
    assert report["mismatches"] == 0
    assert report["pages_touched"] == SIZE // 4096


@pytest.mark.parametrize("behaviour", ["refuse-early", "refuse-late"])
def test_refused_load_fails_restore_and_kills_vm(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker], behaviour: str
) -> None:
    """Firecracker's 400 ends the restore with its fault_message, before a VM connected or
    after: a connected VM is killed, as it will never run."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", behaviour, memfile, tmp_path / "vm.json")
    fakes.append(fake)
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", "--quiet")
    fake.close()
    assert fake.problems == []
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"fcsnap: error: Firecracker refused the snapshot load: {FAULT}"
    ]
    assert not (tmp_path / "uffd.sock").exists()
    if behaviour == "refuse-late":
        assert fake.vm is not None and fake.vm.wait(WAIT) == -signal.SIGKILL
    else:
        assert fake.vm is None


def test_unanswered_load_fails_restore(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker]
) -> None:
    """A VM served to its end while Firecracker never answered the load: restore cannot say
    the snapshot loaded, so it fails (after a short grace, not the whole --api-timeout)."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", "silent", memfile, tmp_path / "vm.json")
    fakes.append(fake)
    started = time.monotonic()
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", "--quiet")
    assert time.monotonic() - started < WAIT / 2
    fake.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "fcsnap: error: Firecracker had not answered the snapshot load when serving ended"
    ]
    assert fake.vm is not None and fake.vm.wait(WAIT) == 0


def test_missing_api_socket_fails_clearly(build: tuple[Path, Path], tmp_path: Path) -> None:
    build_dir, _ = build
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "nowhere.sock", "--quiet")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "fcsnap: error: cannot reach Firecracker's API at nowhere.sock: No such file or "
        "directory (is Firecracker running with this --api-sock?)"
    ]
    assert not (tmp_path / "uffd.sock").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--vmstate", "vm.state"],
        ["--track-dirty-pages"],
        ["--firecracker-api", "api.sock", "--api-timeout", "0"],
    ],
    ids=["vmstate-alone", "track-alone", "zero-timeout"],
)
def test_option_misuse_is_a_usage_error(
    build: tuple[Path, Path], tmp_path: Path, args: list[str]
) -> None:
    build_dir, _ = build
    result = restore(tmp_path, build_dir, *args)
    assert result.returncode == 2, result.stderr


def test_build_without_snapfile_needs_vmstate(tmp_path: Path) -> None:
    memfile = tmp_path / "mem.bin"
    write_full(memfile, synthetic_memory(64 << 10, seed=1))
    _, build_dir = ops.pack(memfile, tmp_path / "store", BuildOptions())
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock")
    assert result.returncode == 2
    assert "has no snapfile" in result.stderr


def test_load_body_is_valid_snapshot_load_params(tmp_path: Path) -> None:
    body = load_body(Path("vm.state"), Path("uffd.sock"), track_dirty_pages=False)
    assert load_problems(body) == []
    assert Path(body["snapshot_path"]).is_absolute()


@pytest.mark.parametrize(
    "body",
    [
        {"mem_backend": {"backend_type": "Uffd", "backend_path": "/s"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "uffd", "backend_path": "/s"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
         "resume_vm": "yes"},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
         "resume": True},
        {"snapshot_path": "/v"},
        {"snapshot_path": "/v", "mem_file_path": "/m",
         "mem_backend": {"backend_type": "File", "backend_path": "/m"}},
    ],
    ids=["no-snapshot", "enum", "no-path", "type", "unknown", "no-memory", "two-memories"],
)
def test_validator_rejects_what_firecracker_rejects(body: dict[str, Any]) -> None:
    """The fake's validator is only worth its passes if it catches these."""
    assert load_problems(body) != []


@pytest.mark.parametrize(
    ("response", "status", "body"),
    [
        (b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n", 204, b""),
        (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 5\r\n\r\nhello", 400, b"hello"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokTRAILING", 200, b"ok"),
    ],
    ids=["204", "400", "length-bounds-body"],
)
def test_read_response_byte_by_byte(response: bytes, status: int, body: bytes) -> None:
    """The answer can arrive in any pieces; the connection stays open after it, so the
    body ends at Content-Length (or with the head, for a 204)."""
    def send() -> None:
        for i in range(len(response)):
            theirs.send(response[i : i + 1])
            time.sleep(0.0005)

    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=send)
        sender.start()
        got = read_response(ours, time.monotonic() + WAIT)
        sender.join(WAIT)
    assert (got.status, got.body) == (status, body)
