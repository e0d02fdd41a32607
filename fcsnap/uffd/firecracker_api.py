"""Just enough of Firecracker's API for a restore: `PUT /snapshot/load` over HTTP/1.1 on its
Unix socket (SPEC.md section 6; the schema is SnapshotLoadParams in Firecracker's swagger).

Firecracker answers the load only after it has connected to the page server and sent its
handshake, so the request runs in a background thread (`SnapshotLoad`) while the server
accepts the VM; a refusal reaches the server through a callback. Firecracker keeps API
connections alive, so a response ends where its Content-Length says, not at EOF.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.threads import start_signal_free

MAX_HEAD = 64 << 10  # status line and headers
MAX_BODY = 1 << 20  # error bodies are a short JSON object
ANSWER_GRACE = 1.0  # seconds to wait, once serving ended, for an answer already on its way


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def fault_message(self) -> str:
        """Firecracker's `{"fault_message": ...}`, or the raw body when it is not one."""
        try:
            message = json.loads(self.body).get("fault_message")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str):
            return message
        text = self.body.decode(errors="replace").strip()
        return f"HTTP {self.status} {self.reason}" + (f": {text[:500]}" if text else "")


def build_request(method: str, path: str, body: dict[str, Any]) -> bytes:
    """An HTTP/1.1 request with a JSON body, as Firecracker's API server parses it."""
    data = json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\n"
        "Host: localhost\r\n"
        "Accept: application/json\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + data


def parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """(status, reason, headers) of a response head (without its final blank line)."""
    lines = head.decode("iso-8859-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
        raise FcsnapError(f"Firecracker's API answered something not HTTP: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise FcsnapError(f"malformed header in Firecracker's answer: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(code), reason, headers


def read_response(sock: socket.socket, deadline: float) -> Response:
    """Read one response: the head, then Content-Length bytes of body (none for 1xx, 204
    and 304 without one; up to EOF when the server gives no length)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD:
            raise FcsnapError(f"Firecracker's answer has more than {MAX_HEAD} bytes of headers")
        chunk = _recv(sock, deadline)
        if not chunk:
            raise FcsnapError("Firecracker closed its API connection without answering "
                              "(did it exit?)")
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status, reason, headers = parse_head(head)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise FcsnapError("Firecracker's answer uses chunked encoding, which fcsnap does not read")
    length_text = headers.get("content-length")
    if length_text is None:
        if status in (204, 304) or status < 200:
            return Response(status, reason, headers, b"")
        length = None
    elif length_text.isdigit() and int(length_text) <= MAX_BODY:
        length = int(length_text)
    else:
        raise FcsnapError(f"bad Content-Length in Firecracker's answer: {length_text!r}")
    while length is None or len(body) < length:
        chunk = _recv(sock, deadline)
        if not chunk:
            if length is None:
                break
            raise FcsnapError(
                f"Firecracker's answer ended after {len(body)} of {length} body bytes"
            )
        body += chunk
        if len(body) > MAX_BODY:
            raise FcsnapError(f"Firecracker's answer is larger than {MAX_BODY} bytes")
    return Response(status, reason, headers, body if length is None else body[:length])


def _recv(sock: socket.socket, deadline: float) -> bytes:
    sock.settimeout(_left(deadline))
    return sock.recv(65536)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def call(
    api_socket: Path, method: str, path: str, body: dict[str, Any], timeout: float,
    on_connect: Callable[[socket.socket], None] | None = None,
) -> Response:
    """One request on a fresh connection to Firecracker's API socket, answered within
    `timeout` seconds. `on_connect` gets the socket, so another thread can cut the wait short
    by shutting it down."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(api_socket))
        except OSError as e:
            raise FcsnapError(
                f"cannot reach Firecracker's API at {api_socket}: {e.strerror or 'timed out'} "
                "(is Firecracker running with this --api-sock?)"
            ) from None
        if on_connect is not None:
            on_connect(sock)
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(build_request(method, path, body))
            return read_response(sock, deadline)
        except TimeoutError:
            raise FcsnapError(
                f"Firecracker did not answer {method} {path} within {timeout:g}s"
            ) from None
        except OSError as e:
            raise FcsnapError(
                f"Firecracker's API connection failed: {e.strerror or e} (did it exit?)"
            ) from None


def load_body(snapshot_path: Path, uffd_socket: Path, track_dirty_pages: bool) -> dict[str, Any]:
    """SnapshotLoadParams for a UFFD restore that resumes the VM. Paths are made absolute:
    Firecracker resolves relative ones against its own working directory, not ours."""
    return {
        "snapshot_path": os.path.abspath(snapshot_path),
        "mem_backend": {"backend_type": "Uffd", "backend_path": os.path.abspath(uffd_socket)},
        "track_dirty_pages": track_dirty_pages,
        "resume_vm": True,
    }


def check_load(response: Response) -> Response:
    """The response of an accepted load (2xx); FcsnapError with Firecracker's reason if not."""
    if 200 <= response.status < 300:
        return response
    raise FcsnapError(f"Firecracker refused the snapshot load: {response.fault_message()}")


class SnapshotLoad:
    """`PUT /snapshot/load` in a background thread: Firecracker answers only once it has
    connected to the page server, so the request must not hold up the server's accept."""

    def __init__(self, api_socket: Path, body: dict[str, Any], timeout: float) -> None:
        self.api_socket = api_socket
        self.body = body
        self.timeout = timeout
        self.error: FcsnapError | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._cancelled = False
        self._thread: threading.Thread | None = None

    def start(
        self, on_failure: Callable[[FcsnapError], None], on_success: Callable[[Response], None]
    ) -> None:
        """Send the request; exactly one of the callbacks runs (in the thread) when it ends."""
        self._thread = start_signal_free(threading.Thread(
            target=self._run, args=(on_failure, on_success), name="snapshot-load", daemon=True
        ))

    def _run(
        self, on_failure: Callable[[FcsnapError], None], on_success: Callable[[Response], None]
    ) -> None:
        try:
            response = check_load(
                call(self.api_socket, "PUT", "/snapshot/load", self.body, self.timeout,
                     self._connected)
            )
        except FcsnapError as e:
            self.error = e if not self._cancelled else FcsnapError(
                "Firecracker had not answered the snapshot load when serving ended"
            )
            on_failure(self.error)
            return
        on_success(response)

    def _connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._cancelled:
                sock.shutdown(socket.SHUT_RDWR)

    def finish(self, grace: float = ANSWER_GRACE) -> FcsnapError | None:
        """Once serving has ended: give an answer already on its way `grace` seconds, then
        stop waiting; the load's error (a missing answer is one), or None if it succeeded."""
        assert self._thread is not None, "finish() before start()"
        self._thread.join(grace)
        if self._thread.is_alive():
            with self._lock, contextlib.suppress(OSError):  # OSError: already closed
                self._cancelled = True
                if self._sock is not None:
                    self._sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(self.timeout)
        return self.error
