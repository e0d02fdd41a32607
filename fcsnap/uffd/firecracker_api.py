"""Just enough of Firecracker's API for a restore: `GET /version`, then `PUT /snapshot/load`
over HTTP/1.1 on its Unix socket (docs/FORMAT.md §9.1; the schema is SnapshotLoadParams in
Firecracker's swagger). The HTTP is fcsnap.unix_http's (the standard library's http.client);
this module says what to send and puts every failure in Firecracker's terms, on one line.

Firecracker refuses a body with a field its version does not know, and the field that turns on
dirty page tracking was renamed in 1.13, so the body is written for the version the VMM says
it is (`load_body`).

Firecracker answers the load only after it has connected to the page server and sent its
handshake, so the request runs in a background thread (`SnapshotLoad`) while the server
accepts the VM; a refusal reaches the server through a callback. Firecracker keeps API
connections alive, so a response ends where its Content-Length says, not at EOF.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.threads import start_signal_free
from fcsnap.unix_http import AnswerError, OnConnect, UnixHTTPConnection, exchange

MAX_BODY = 1 << 20  # Firecracker's answers are a short JSON object, or nothing
ANSWER_GRACE = 1.0  # seconds to wait, once serving ended, for an answer already on its way
HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
OLDEST = (1, 1)  # the first Firecracker with the Uffd memory backend
TRACK_DIRTY_PAGES = (1, 13)  # `track_dirty_pages` replaces `enable_diff_snapshots` (deprecated)
VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:[-+][0-9A-Za-z.+-]*)?")

Version = tuple[int, int]  # (major, minor): what decides the load body


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    body: bytes

    def fault_message(self) -> str:
        """Firecracker's `{"fault_message": ...}`, or the raw body when it is not one."""
        try:
            message = json.loads(self.body).get("fault_message")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str):
            return " ".join(message.split())
        text = " ".join(self.body.decode(errors="replace").split())
        return f"HTTP {self.status} {self.reason}".rstrip() + (f": {text[:500]}" if text else "")


def call(
    api_socket: Path, method: str, path: str, body: dict[str, Any] | None, timeout: float,
    on_connect: OnConnect | None = None,
) -> Response:
    """One request (with a JSON body unless `body` is None) on a fresh connection to
    Firecracker's API socket; every socket operation has `timeout` seconds. `on_connect` gets
    the socket (see SnapshotLoad)."""
    connection = UnixHTTPConnection(api_socket, timeout, on_connect)
    try:
        try:
            connection.connect()
        except OSError as e:
            raise FcsnapError(
                f"cannot reach Firecracker's API at {api_socket}: {e.strerror or 'timed out'} "
                "(is Firecracker running with this --api-sock?)"
            ) from None
        try:
            data = b"" if body is None else json.dumps(body).encode()
            answer, data = exchange(connection, method, path, data, HEADERS, MAX_BODY)
        except TimeoutError:
            raise FcsnapError(
                f"Firecracker did not answer {method} {path} within {timeout:g}s"
            ) from None
        except AnswerError as e:
            raise FcsnapError(f"Firecracker's API sent a malformed answer: {e}") from None
        except ConnectionError:
            raise FcsnapError(
                "Firecracker closed its API connection without answering (did it exit?)"
            ) from None
        except OSError as e:
            raise FcsnapError(
                f"Firecracker's API connection failed: {e.strerror or e} (did it exit?)"
            ) from None
        return Response(answer.status, answer.reason, data)
    finally:
        connection.close()


def parse_version(text: object) -> Version | None:
    """(major, minor) of a `firecracker_version` such as "1.12.1" or "1.13.0-dev"."""
    match = VERSION.fullmatch(text) if isinstance(text, str) else None
    return (int(match[1]), int(match[2])) if match else None


def firecracker_version(api_socket: Path, timeout: float) -> Version:
    """The version of the Firecracker at `api_socket` (`GET /version`); FcsnapError when it
    cannot be asked, gives no version, or is too old to load from a page server."""
    response = call(api_socket, "GET", "/version", None, timeout)
    if response.status != 200:
        raise FcsnapError(f"Firecracker did not give its version: {response.fault_message()}")
    try:
        text = json.loads(response.body).get("firecracker_version")
    except (ValueError, AttributeError):
        text = None
    version = parse_version(text)
    if version is None:
        shown = " ".join(response.body.decode(errors="replace").split())[:200]
        raise FcsnapError(f"Firecracker's API answered GET /version without a version: {shown}")
    if version < OLDEST:
        raise FcsnapError(
            f"Firecracker {text} cannot load a snapshot from a page server (the Uffd memory "
            f"backend needs Firecracker {OLDEST[0]}.{OLDEST[1]} or later)")
    return version


def load_body(snapshot_path: Path, uffd_socket: Path, track_dirty_pages: bool,
              version: Version) -> dict[str, Any]:
    """SnapshotLoadParams for a UFFD restore that resumes the VM, in the fields Firecracker
    `version` accepts (dirty page tracking: `enable_diff_snapshots` before 1.13,
    `track_dirty_pages` from 1.13, where the old name is deprecated). Paths are made absolute:
    Firecracker resolves relative ones against its own working directory, not ours."""
    dirty = "track_dirty_pages" if version >= TRACK_DIRTY_PAGES else "enable_diff_snapshots"
    return {
        "snapshot_path": os.path.abspath(snapshot_path),
        "mem_backend": {"backend_type": "Uffd", "backend_path": os.path.abspath(uffd_socket)},
        dirty: track_dirty_pages,
        "resume_vm": True,
    }


def check_load(response: Response) -> Response:
    """The response of an accepted load (2xx); FcsnapError with Firecracker's reason if not."""
    if 200 <= response.status < 300:
        return response
    raise FcsnapError(f"Firecracker refused the snapshot load: {response.fault_message()}")


class SnapshotLoad:
    """`PUT /snapshot/load` in a background thread: Firecracker answers only once it has
    connected to the page server, so the request must not hold up the server's accept.

    Two things cut the wait short by shutting the socket down, each with its own reason: the
    `timeout` for the whole exchange (http.client's socket timeout bounds each read, not the
    sum), and `finish()` once serving has ended."""

    def __init__(self, api_socket: Path, body: dict[str, Any], timeout: float) -> None:
        self.api_socket = api_socket
        self.body = body
        self.timeout = timeout
        self.error: FcsnapError | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._cut_reason: str | None = None
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None
        self._settled = threading.Event()  # set once the callback of the outcome has run

    def start(
        self, on_failure: Callable[[FcsnapError], None], on_success: Callable[[Response], None]
    ) -> None:
        """Send the request; exactly one of the callbacks runs (in the thread) when it ends."""
        self._deadline = threading.Timer(
            self.timeout, self._cut,
            (f"Firecracker did not answer PUT /snapshot/load within {self.timeout:g}s",),
        )
        self._deadline.daemon = True
        self._thread = threading.Thread(
            target=self._run, args=(on_failure, on_success), name="snapshot-load", daemon=True
        )
        start_signal_free(self._deadline)
        start_signal_free(self._thread)

    def _run(
        self, on_failure: Callable[[FcsnapError], None], on_success: Callable[[Response], None]
    ) -> None:
        try:
            response = call(self.api_socket, "PUT", "/snapshot/load", self.body, self.timeout,
                            self._connected)
        except FcsnapError as e:
            # A cut shows up as EOF or a shut-down socket: say why it was cut instead.
            self.error = FcsnapError(self._cut_reason) if self._cut_reason else e
        else:
            try:
                check_load(response)
            except FcsnapError as e:
                self.error = e
        finally:
            assert self._deadline is not None
            self._deadline.cancel()
        try:
            if self.error is not None:
                on_failure(self.error)
            else:
                on_success(response)
        finally:
            self._settled.set()

    def settled(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the outcome (its callback has run once this is
        True; `error` is then the refusal, or None if Firecracker loaded the snapshot)."""
        return self._settled.wait(timeout)

    def _connected(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self._cut_reason is not None:
                sock.shutdown(socket.SHUT_RDWR)

    def _cut(self, reason: str) -> None:
        with self._lock:
            if self._cut_reason is None:
                self._cut_reason = reason
            if self._sock is not None:
                with contextlib.suppress(OSError):  # already closed
                    self._sock.shutdown(socket.SHUT_RDWR)

    def finish(self, grace: float = ANSWER_GRACE) -> FcsnapError | None:
        """Once serving has ended: give an answer already on its way `grace` seconds, then
        stop waiting; the load's error (a missing answer is one), or None if it succeeded."""
        assert self._thread is not None, "finish() before start()"
        self._thread.join(grace)
        if self._thread.is_alive():
            self._cut("Firecracker had not answered the snapshot load when serving ended")
            self._thread.join(self.timeout)
        return self.error
