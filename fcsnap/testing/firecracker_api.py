"""A fake of Firecracker's API socket, for tests of `restore --firecracker-api` (and anything
else that asks Firecracker to load a snapshot from fcsnap).

`FakeFirecracker` imitates one Firecracker release (1.1 to 1.16) in a thread: it answers
`GET /version`, then serves one `PUT /snapshot/load`, checking the request as Firecracker's
HTTP server (micro_http) parses headers and as that release deserializes the body
(fcsnap.testing.firecracker_schema: a field the release does not know is refused with a 400, as
Firecracker refuses it), then behaves as Firecracker does - it connects a VM (the stand-in, its
own process) to the page server and answers only once the server has accepted that VM. Answers
have Firecracker's bytes: `HTTP/1.1 204 ` with no reason phrase, `Server: Firecracker API`,
`Connection: keep-alive`, no Content-Length on a 204, JSON bodies (errors as
`{"fault_message": ...}`) with Content-Type and Content-Length; connections stay open.

`RawAnswer` answers one request with any bytes, in pieces, for a client's malformed-answer
paths. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.testing import firecracker
from fcsnap.testing.firecracker_schema import load_error, parse_version
from fcsnap.uffd import unixdiag

WAIT = 30.0  # seconds any one step may take before the fake gives up
FAULT = "Load snapshot error: Cannot restore microvm state: the vmstate file is for another CPU"
BEHAVIOURS = ("load", "refuse-early", "refuse-late", "silent", "hang")
VERSION = "1.12.1"  # the release imitated unless a test says otherwise

MEDIA_TYPES = ("application/json", "text/plain")  # the only ones micro_http knows


@dataclass
class Request:
    line: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    problems: list[str] = field(default_factory=list)  # what micro_http would reject


def read_request(conn: socket.socket) -> Request | None:
    """One HTTP/1.1 request (None: the client closed the connection before another), with
    what Firecracker's HTTP server would refuse in its header lines: one without a colon, a
    Content-Length that is not a u32, an Accept-Encoding that refuses identity. The body is
    read by Content-Length, as micro_http reads it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            if not data:
                return None
            raise ConnectionError("the client closed the connection mid-request")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line, *fields = head.decode("ascii").split("\r\n")
    problems, headers = [], {}
    for text in fields:
        name, colon, value = text.partition(":")
        if not colon:
            problems.append(f"header line without a colon: {text!r}")
        headers[name.strip().lower()] = value.strip()
    length_text = headers.get("content-length", "0")
    if not (length_text.isdigit() and int(length_text) < 1 << 32):
        return Request(line, headers, body, [*problems, f"Content-Length {length_text!r}"])
    if any(v.strip() in ("identity;q=0", "*;q=0")
           for v in headers.get("accept-encoding", "").split(",")):
        problems.append("Accept-Encoding refuses identity")
    for name in ("content-type", "accept"):
        if name in headers and headers[name] not in MEDIA_TYPES:
            problems.append(f"{name} {headers[name]!r}")
    while len(body) < int(length_text):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the client closed the connection mid-body")
        body += chunk
    if len(body) != int(length_text):
        problems.append("the client sent more than Content-Length")
    return Request(line, headers, body, problems)


def answer(status: int, document: dict[str, str] | None = None) -> tuple[bytes, bytes]:
    """(head, body) as Firecracker writes an answer, with a JSON body unless `document` is
    None (its errors are `{"fault_message": ...}`)."""
    head = f"HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
    if document is None:
        return (head + "\r\n").encode(), b""
    body = json.dumps(document, separators=(",", ":")).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode(), body


def listening(path: str) -> bool:
    """Whether a socket listens on the file at `path`: a page server's does until it has
    accepted its VM. Asked of the kernel (sock_diag), not by connecting, which a page server
    would take for its VM; by file, not by process, as a daemon listens on many."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return bool(unixdiag.listening(st.st_dev, st.st_ino))


def api_listener(path: Path) -> socket.socket:
    """A Unix socket listening on `path` for a connection at a time, each accepted within
    WAIT."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(WAIT)
    return listener


class FakeFirecracker:
    """The API socket of Firecracker `version`, for `GET /version`s and one
    `PUT /snapshot/load`. `behaviour`: "load" connects a VM and answers 204; "refuse-late"
    connects a VM (that then stays alive) and answers 400; "refuse-early" answers 400 without
    connecting one; "silent" connects a VM and never answers; "hang" neither connects a VM nor
    answers. A request that release refuses gets its 400. The VM checks its bytes against
    `expected` and writes `report`; it stays `hold` seconds after its work, as a running VM
    would."""

    def __init__(self, path: Path, behaviour: str, expected: Path, report: Path,
                 hold: float = 1.0, version: str = VERSION) -> None:
        assert behaviour in BEHAVIOURS, behaviour
        self.version_text = version
        self.version = parse_version(version)
        self.behaviour = behaviour
        self.expected = expected
        self.report = report
        self.hold = hold
        self.request: Request | None = None
        self.versions_asked = 0
        self.body: Any = None
        self.problems: list[str] = []
        self.vm: subprocess.Popen[bytes] | None = None
        self.conn: socket.socket | None = None
        self.error: BaseException | None = None
        self.listener = api_listener(path)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _next_load(self) -> Request:
        """Answer `GET /version`s, on as many connections as come, until a load request."""
        while True:
            if self.conn is not None:
                self.conn.close()
            self.conn, _ = self.listener.accept()
            self.conn.settimeout(WAIT)
            while (request := read_request(self.conn)) is not None:
                if request.line != "GET /version HTTP/1.1":
                    return request
                self.versions_asked += 1
                self._answer(200, {"firecracker_version": self.version_text})

    def _run(self) -> None:
        try:
            self.request = self._next_load()
            self.problems = self._request_problems(self.request)
            if self.problems:
                self._answer(400, {"fault_message": self.problems[0]})
                return
            if self.behaviour in ("refuse-early", "hang"):
                if self.behaviour == "refuse-early":
                    self._answer(400, {"fault_message": FAULT})
                return
            self.vm = firecracker.spawn(
                self.body["mem_backend"]["backend_path"], expected=self.expected,
                threads=2, report=self.report, deadline=WAIT,
                hold=WAIT if self.behaviour == "refuse-late" else self.hold,
            )
            self._wait_accepted(self.vm, self.body["mem_backend"]["backend_path"])
            if self.behaviour == "load":
                self._answer(204)
            elif self.behaviour == "refuse-late":
                self._answer(400, {"fault_message": FAULT})
        except BaseException as e:
            self.error = e

    def _request_problems(self, request: Request) -> list[str]:
        problems = list(request.problems)
        if request.line != "PUT /snapshot/load HTTP/1.1":
            problems.append(f"request line {request.line!r}")
        if request.headers.get("content-type") != "application/json":
            problems.append(f"Content-Type {request.headers.get('content-type')!r}")
        refused = load_error(request.body, self.version)
        if refused is not None:
            return [*problems, refused]
        self.body = json.loads(request.body)
        return problems

    def _wait_accepted(self, vm: subprocess.Popen[bytes], backend_path: str) -> None:
        """Firecracker answers the load only after the page server took its handshake."""
        deadline = time.monotonic() + WAIT
        while listening(backend_path):
            assert vm.poll() is None, f"the stand-in exited ({vm.returncode}) unserved"
            assert time.monotonic() < deadline, "the page server never accepted the VM"
            time.sleep(0.01)

    def _answer(self, status: int, document: dict[str, str] | None = None) -> None:
        """Firecracker's answer, head and body in separate writes (a client must not expect
        them in one read); the connection stays open."""
        assert self.conn is not None
        head, body = answer(status, document)
        self.conn.sendall(head)
        if body:
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


class RawAnswer:
    """Answers one request on `path` with `raw`, `piece` bytes per write (`gap` seconds
    apart), then closes the connection if `close`, else keeps it open until the client
    closes it, as Firecracker does."""

    def __init__(self, path: Path, raw: bytes, piece: int = 1, gap: float = 0.0,
                 close: bool = False) -> None:
        self.raw, self.piece, self.gap, self.close_after = raw, piece, gap, close
        self.request: Request | None = None
        self.requested = threading.Event()  # set once the whole request has arrived
        self.error: BaseException | None = None
        self.listener = api_listener(path)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(WAIT)
                self.request = read_request(conn)
                self.requested.set()
                for start in range(0, len(self.raw), self.piece):
                    conn.sendall(self.raw[start : start + self.piece])
                    time.sleep(self.gap)
                if not self.close_after:
                    while conn.recv(65536):  # until the client closes
                        pass
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on the answer
            pass
        except BaseException as e:
            self.error = e

    def close(self) -> None:
        """Wait for the exchange to end; raise what went wrong in the thread."""
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the raw answer never finished"
        self.listener.close()
        if self.error is not None:
            raise self.error
