"""The daemon's API: HTTP/1.1 with JSON bodies on a Unix socket, in Firecracker's style.

    POST   /restores        {"vm": BUILD, "socket": PATH, ...restore's options}
                            -> 201 {"id", "socket", "build_id"} once the socket listens
                               (with "firecracker_api": once Firecracker loaded the
                               snapshot; 502 {"error", "id"} if it did not)
    GET    /restores        -> 200 [{"id", "vm", "build_id", "state", "vm_pid", counters}]
    GET    /restores/ID     -> 200 the live --stats document
    DELETE /restores/ID     -> 200 the final --stats document (VM killed unless every page
                               is installed, as SIGTERM does for `restore`)
    GET    /restores/ID/written[?new_interval=1]
                            -> 200 the written set (application/octet-stream, the working-set
                               file format); new_interval=1 starts the next interval with
                               the take: the pages in it are write-protected again
    POST   /restores/ID/checkpoint {"name": NAME[, "background": true, "copy_rate": N]}
                            -> 201 {"build_id", "name", "written_pages", ...}: the next
                               generation from the pages written since the last checkpoint
                               (read from the paused VM), published as NAME; a new interval;
                               "checkpoint": its number (1, 2, ... in the restore).
                               Background: 202 {"checkpoint", "name", "state": "copying", ...}
                               at the resume
    GET    /restores/ID/checkpoints/N
                            -> 200 background checkpoint N's state ("copying", then "done"
                               with its "build_id", or "failed" with its "error"; also GET
                               /restores/ID's last_checkpoint)
    GET    /metrics         -> 200 Prometheus text format
    GET    /healthz         -> 200 {"status": "ok", ...}

Errors are {"error": "<one line>"} with a 4xx (5xx for a bug, which ends nothing else). The
HTTP is the standard library's http.server, one thread per connection: requests are few and
small next to the faults, which never wait for them. Connections are capped
(--max-api-connections): one beyond the cap is answered 503 at once by the accepting thread,
so clients that connect and never finish a request hold at most that many threads. The socket
is made by the restore socket's own `listen` (0600 from the start, --socket-owner/
--socket-mode), and each connection's uid is checked as a VM's is (SO_PEERCRED, --allow-uid).
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from fcsnap.daemon.checkpoint import checkpoint, parse_checkpoint
from fcsnap.daemon.metrics import CONTENT_TYPE, DaemonMetrics
from fcsnap.daemon.request import RequestError
from fcsnap.daemon.restores import Restores, log
from fcsnap.errors import FcsnapError, redact
from fcsnap.uffd.handshake import peer_credentials
from fcsnap.uffd.listener import SocketAccess

MAX_BODY = 64 << 10
MAX_CONNECTIONS = 64  # API connections served at once (each a thread); more are answered 503
BACKLOG = 128  # API clients queued at once (listen() makes the VM sockets' 1)
CLIENT_TIMEOUT = 30.0  # seconds an idle or slow API connection may hold its thread


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """http.server over a socket that `listen` already made, admitting only allowed uids."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: socket.socket, access: SocketAccess, restores: Restores,
                 metrics: DaemonMetrics, max_connections: int = MAX_CONNECTIONS) -> None:
        super().__init__("", _Handler, bind_and_activate=False)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.socket.close()
        self.socket = sock
        sock.listen(BACKLOG)
        self.access = access
        self.restores = restores
        self.metrics = metrics

    def verify_request(self, request: Any, client_address: Any) -> bool:
        pid, uid = peer_credentials(request)
        if self.access.admits(uid):
            return True
        log(f"refused an API connection from uid {uid} (pid {pid})")
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the connection if one of the `max_connections` slots is free; a 503
        from this (the accepting) thread otherwise, without waiting for the client."""
        if not self._slots.acquire(blocking=False):
            self._busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _busy(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"too many API connections (at most "
                                    f"{self.max_connections}): try again"}).encode() + b"\n"
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            request.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                request.recv(MAX_BODY)  # what it sent already: closing unread would cut it off
            request.send(head.encode() + body)
        self.shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fcsnap"
    timeout = CLIENT_TIMEOUT
    server: ApiServer

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        """Quiet: a daemon's stderr carries one line per restore, not one per request."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def _route(self, method: str) -> None:
        self._body_read = False
        try:
            self._dispatch(method, self.path.split("?", 1)[0].rstrip("/") or "/")
        except RequestError as e:
            self._json(e.status, {"error": redact(str(e))})
        except FcsnapError as e:
            self._json(400, {"error": redact(str(e))})
        except Exception as e:  # a bug answers 500 and ends nothing else
            traceback.print_exc()
            self._json(500, {"error": redact(f"internal error ({type(e).__name__}: {e})")})

    def _dispatch(self, method: str, path: str) -> None:
        restores = self.server.restores
        parts = path.strip("/").split("/")
        if path == "/restores":
            if method == "POST":
                restore = restores.start(self._body())
                if restore.load is not None and (error := restores.wait_loaded(restore)):
                    self._json(502, {"error": str(error), "id": restore.id})
                    return
                self._json(201, {"id": restore.id, "socket": restore.summary()["socket"],
                                 "build_id": str(restore.build.build_id)},
                           {"Location": f"/restores/{restore.id}"})
                return
            self._allow(method, "GET, POST")
            self._json(200, [r.summary() for r in restores.all()])
        elif len(parts) == 2 and parts[0] == "restores":
            self._allow(method, "GET, DELETE")
            restore = restores.get(parts[1])
            if restore is None:
                raise RequestError(f"no restore {parts[1]!r}", 404)
            if method == "DELETE" and not restores.end(restore):
                raise RequestError(f"restore {restore.id} did not end in time", 504)
            self._json(200, restore.document())
        elif len(parts) == 3 and parts[0] == "restores" and parts[2] == "written":
            self._allow(method, "GET")
            restore = restores.get(parts[1])
            if restore is None:
                raise RequestError(f"no restore {parts[1]!r}", 404)
            data, count = restore.written(self._flag("new_interval"))
            self._send(200, data, "application/octet-stream",
                       {"X-Fcsnap-Written-Pages": str(count)})
        elif len(parts) == 3 and parts[0] == "restores" and parts[2] == "checkpoint":
            self._allow(method, "POST")
            restore = restores.get(parts[1])
            if restore is None:
                raise RequestError(f"no restore {parts[1]!r}", 404)
            if not isinstance(restores.store, Path):
                raise RequestError("checkpoint needs a local store (the daemon serves object "
                                   "storage)", 409)
            self._json(*checkpoint(restore, restores.store, parse_checkpoint(self._body())))
        elif (len(parts) == 4 and parts[0] == "restores" and parts[2] == "checkpoints"
              and parts[3].isdigit() and parts[3].isascii()):
            self._allow(method, "GET")
            restore = restores.get(parts[1])
            if restore is None:
                raise RequestError(f"no restore {parts[1]!r}", 404)
            self._json(200, restore.checkpoint_state(parts[3]))
        elif path == "/metrics":
            self._allow(method, "GET")
            self._send(200, self.server.metrics.render(), CONTENT_TYPE)
        elif path == "/healthz":
            self._allow(method, "GET")
            self._json(200, {"status": "ok", "restores_active": len(restores.live())})
        else:
            raise RequestError(f"no such resource {path!r}", 404)

    def _flag(self, name: str) -> bool:
        """A query parameter that is a switch: 1/true, 0/false or absent."""
        query = urllib.parse.parse_qs(self.path.partition("?")[2], keep_blank_values=True)
        values = query.get(name, ["0"])
        if len(values) != 1 or values[0].lower() not in ("0", "1", "true", "false"):
            raise RequestError(f"{name} must be 1 or 0 (true or false)")
        return values[0].lower() in ("1", "true")

    def _allow(self, method: str, allowed: str) -> None:
        if method not in allowed.split(", "):
            raise RequestError(f"{method} is not allowed here (allowed: {allowed})", 405)

    def _body(self) -> object:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError("a JSON body with a Content-Length is required", 411)
        if int(length) > MAX_BODY:
            raise RequestError(f"a body of {length} bytes (at most {MAX_BODY})", 413)
        data = self.rfile.read(int(length))
        self._body_read = True
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not JSON: {e}") from None

    def _drain_body(self) -> None:
        """Read a small body the request was refused before reading: closing with it unread
        would reset the connection while the client may still be sending it (EPIPE there)."""
        length = self.headers.get("Content-Length", "")
        if not self._body_read and length.strip().isdigit() and int(length) <= MAX_BODY:
            self._body_read = True
            with contextlib.suppress(OSError):
                self.rfile.read(int(length))

    def _json(self, status: int, document: object, headers: dict[str, str] | None = None
              ) -> None:
        self._send(status, json.dumps(document).encode() + b"\n", "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        if status >= 400:
            self.close_connection = True  # a body this request left unread must not be parsed
            self._drain_body()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
