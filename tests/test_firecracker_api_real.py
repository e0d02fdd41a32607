"""The fake Firecracker API (fcsnap.testing.firecracker_api and firecracker_schema) against
the real Firecracker, where they overlap: the release of the real binary (v1.12.1).

A bare `firecracker --api-sock S` (no VM configured) parses a `PUT /snapshot/load` body as it
always does, so it refuses a body it cannot parse with a 400 and stays up; a body it parses it
tries to load (here from a snapshot file that does not exist), which fails otherwise and ends
the process. Each body below goes to both; their verdicts, and the refusals' words (serde's
`at line L column C` aside), must be the same. No VM and no /dev/kvm are needed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fcsnap.testing.fcbinary import Unavailable, firecracker_binary
from fcsnap.testing.firecracker_api import answer
from fcsnap.testing.firecracker_schema import PREFIX, load_error, parse_version
from fcsnap.uffd.firecracker_api import call, load_body

pytestmark = pytest.mark.firecracker
WAIT = 10.0  # seconds Firecracker has to listen, answer or exit
POSITION = re.compile(r" at line \d+ column \d+(?=\.$)")
UFFD = {"backend_type": "Uffd", "backend_path": "/nonexistent/uffd.sock"}
BASE = {"snapshot_path": "/nonexistent/vm.state", "mem_backend": UFFD}


def body(**changes: Any) -> bytes:
    """BASE with `changes` (a None value removes that field)."""
    fields = {**BASE, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


BODIES: dict[str, bytes] = {
    "fcsnap-1.12": json.dumps(load_body(Path("/nonexistent/vm.state"), Path("/nonexistent/s"),
                                        True, (1, 12))).encode(),
    "fcsnap-1.13": json.dumps(load_body(Path("/nonexistent/vm.state"), Path("/nonexistent/s"),
                                        True, (1, 13))).encode(),
    "minimal": body(),
    "file-backend": body(mem_backend={"backend_type": "File", "backend_path": "/m"}),
    "mem-file-path": body(mem_backend=None, mem_file_path="/m"),
    "null-option": b'{"snapshot_path": "/v", "mem_file_path": null, "mem_backend": '
                   + json.dumps(UFFD).encode() + b"}",
    "network-overrides": body(network_overrides=[{"iface_id": "eth0", "host_dev_name": "t0",
                                                  "extra": 1}]),
    "track-dirty-pages": body(track_dirty_pages=True),
    "clock-realtime": body(clock_realtime=True),
    "vsock-override": body(vsock_override={"uds_path": "/v.sock"}),
    "unknown": body(resume=True),
    "backend-unknown": body(mem_backend={**UFFD, "x": 1}),
    "backend-enum": body(mem_backend={**UFFD, "backend_type": "uffd"}),
    "backend-no-path": body(mem_backend={"backend_type": "Uffd"}),
    "no-snapshot": body(snapshot_path=None),
    "no-memory": body(mem_backend=None),
    "two-memories": body(mem_file_path="/m"),
    "bool-as-string": body(resume_vm="yes"),
    "null-bool": body(resume_vm=None)[:-1] + b', "resume_vm": null}',
    "duplicate": body()[:-1] + b', "snapshot_path": "/w"}',
    "override-incomplete": body(network_overrides=[{"iface_id": "eth0"}]),
    "a-string": b'"x"',
    "empty-sequence": b"[]",
    "short-sequence": b'["/v", null]',
    "sequence": b'["/v", null, ' + json.dumps(UFFD).encode() + b", true]",
    "long-sequence": b'["/v", null, ' + json.dumps(UFFD).encode() + b", true, true, [], 1]",
    "backend-sequence": body(mem_backend=["/s", "Uffd"]),
    "backend-not-struct": body(mem_backend=1),
    "backend-variant-type": body(mem_backend={**UFFD, "backend_type": 1}),
    "path-type": body(snapshot_path=1),
    "backend-path-type": body(mem_backend={**UFFD, "backend_path": 1}),
    "float-bool": body(resume_vm=1.5),
    "overrides-map": body(network_overrides={}),
    "overrides-item": body(network_overrides=[1]),
    "overrides-sequence-item": body(network_overrides=[["a", "b"]]),
    "overrides-field-type": body(network_overrides=[{"iface_id": 1, "host_dev_name": "x"}]),
    "backend-duplicate": body()[:-2] + b', "backend_type": "File"}}',
}


class BareFirecracker:
    """Bare Firecracker processes on one API socket, a new one whenever the last has exited
    (a body it parsed ends it)."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary = binary
        self.socket = workdir / "fc.api"
        self.proc: subprocess.Popen[bytes] | None = None

    def api(self) -> Path:
        if self.proc is not None and self.proc.poll() is None:
            return self.socket
        self.close()
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen([str(self.binary), "--api-sock", str(self.socket)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while True:  # bound is not yet listening: wait for a connection to be taken
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(str(self.socket)) == 0:
                    return self.socket
            assert self.proc.poll() is None, f"firecracker exited ({self.proc.returncode})"
            assert time.monotonic() < deadline, "firecracker's API never listened"
            time.sleep(0.005)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(WAIT)
            self.proc = None


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareFirecracker]:
    try:
        binary = firecracker_binary()
    except Unavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-Firecracker tests: {e}")
        pytest.skip(f"the real Firecracker cannot run here: {e}")
    fc = BareFirecracker(binary, tmp_path_factory.mktemp("bare"))
    yield fc
    fc.close()


def real_put(real: BareFirecracker, raw: bytes) -> tuple[int, str]:
    """(status, fault_message) of the real binary's answer to a load of `raw`."""
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(WAIT)
    try:
        conn.connect(str(real.api()))
        conn.sendall(b"PUT /snapshot/load HTTP/1.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"Content-Length: (\d+)", data)[1]):  # type: ignore[index]
            chunk = conn.recv(65536)
            assert chunk, f"firecracker closed the connection: {data!r}"
            data += chunk
    finally:
        conn.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    message = json.loads(payload)["fault_message"]
    if not message.startswith(PREFIX):  # it tried the load, which ends it: let it end
        assert real.proc is not None
        real.proc.wait(WAIT)
    return int(head.split()[1]), message


def test_version_answer_is_the_real_ones(real: BareFirecracker) -> None:
    """GET /version: the fake's answer is the real binary's, byte for byte."""
    got = call(real.api(), "GET", "/version", None, WAIT)
    version = json.loads(got.body)["firecracker_version"]
    parse_version(version)  # a release the fake imitates
    assert (got.status, got.body) == (200, answer(200, {"firecracker_version": version})[1])


@pytest.mark.parametrize("name", list(BODIES))
def test_fake_refuses_what_the_real_binary_refuses(real: BareFirecracker, name: str) -> None:
    """The same verdict on each body, and the same words when refused."""
    version = parse_version(json.loads(call(real.api(), "GET", "/version", None, WAIT).body)
                            ["firecracker_version"])
    status, message = real_put(real, BODIES[name])
    assert status == 400  # refused, or accepted and then failed to load the missing file
    real_refusal = POSITION.sub("", message) if message.startswith(PREFIX) else None
    assert load_error(BODIES[name], version) == real_refusal, message
