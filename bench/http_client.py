"""Which HTTP library talks to Firecracker's API (and, later, the daemon's) over a Unix socket.

For each client candidate that is installed:
- import time: in a fresh interpreter, the seconds `import` takes (median of --runs); "bare"
  imports nothing else first, "after restore" first imports what `fcsnap restore` already has
  loaded (the CLI and the page server), so only what the client adds counts;
- PUT round trip: a fresh connection, `PUT /snapshot/load` with restore's JSON body, and the
  answer Firecracker gives (204, no reason phrase, no Content-Length, connection kept alive),
  against a server in another process; median and 90th percentile of --requests.

For the server side of the coming daemon API (issue 11), each server candidate that is
installed answers `GET /healthz` with a small JSON body on a Unix socket: its import time, and
the round trip measured with the stdlib client.

    python bench/http_client.py [--runs 15] [--requests 300] [--json]

Candidates that are not installed are listed as such; this script installs nothing (to
compare them all: pip install httpx requests-unixsocket h11 uvicorn). Results of a run are in
bench/results/http_client.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from machine import machine

BODY = {
    "snapshot_path": "/srv/vm/snapfile",
    "mem_backend": {"backend_type": "Uffd", "backend_path": "/srv/vm/uffd.sock"},
    "track_dirty_pages": False,
    "resume_vm": True,
}
RESTORE_IMPORTS = "import fcsnap.cli, fcsnap.uffd.server"
DEADLINE_S = 60.0

# name -> (modules to import, a factory of `put(socket_path) -> status`)
CLIENT_IMPORTS = {
    "stdlib http.client": "import http.client",
    "urllib3": "import urllib3",
    "requests + requests-unixsocket": "import requests_unixsocket",
    "httpx (HTTPTransport(uds=))": "import httpx",
}
SERVER_IMPORTS = {
    "stdlib http.server": "import http.server, socketserver",
    "h11 (sans-I/O)": "import h11",
    "uvicorn (ASGI)": "import uvicorn",
}


def import_seconds(statement: str, before: str, runs: int) -> float | None:
    """Median seconds `statement` takes in a fresh interpreter after `before` ran."""
    code = (
        f"{before}\nimport time\nt = time.perf_counter()\n{statement}\n"
        "print(time.perf_counter() - t)"
    )
    times = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=DEADLINE_S)
        if done.returncode != 0:
            return None
        times.append(float(done.stdout))
    return statistics.median(times)


def stdlib_put() -> Callable[[str], int]:
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def __init__(self, path: str) -> None:
            super().__init__("localhost", timeout=DEADLINE_S)
            self.unix_path = path

        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(self.unix_path)

    def put(path: str) -> int:
        conn = UnixConnection(path)
        try:
            conn.request("PUT", "/snapshot/load", json.dumps(BODY).encode(),
                         {"Content-Type": "application/json", "Accept": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    return put


def urllib3_put() -> Callable[[str], int]:
    import urllib3.connection

    class UnixConnection(urllib3.connection.HTTPConnection):
        def __init__(self, path: str) -> None:
            super().__init__("localhost", timeout=DEADLINE_S)
            self.unix_path = path

        def _new_conn(self) -> socket.socket:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(DEADLINE_S)
            sock.connect(self.unix_path)
            return sock

    def put(path: str) -> int:
        conn = UnixConnection(path)
        try:
            conn.request("PUT", "/snapshot/load", body=json.dumps(BODY).encode(),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    return put


def requests_put() -> Callable[[str], int]:
    from urllib.parse import quote

    import requests_unixsocket

    def put(path: str) -> int:
        with requests_unixsocket.Session() as session:
            url = f"http+unix://{quote(path, safe='')}/snapshot/load"
            return session.put(url, json=BODY, timeout=DEADLINE_S).status_code

    return put


def httpx_put() -> Callable[[str], int]:
    import httpx

    def put(path: str) -> int:
        transport = httpx.HTTPTransport(uds=path)
        with httpx.Client(transport=transport, timeout=DEADLINE_S) as client:
            return client.put("http://localhost/snapshot/load", json=BODY).status_code

    return put


CLIENTS = {
    "stdlib http.client": stdlib_put,
    "urllib3": urllib3_put,
    "requests + requests-unixsocket": requests_put,
    "httpx (HTTPTransport(uds=))": httpx_put,
}

FIRECRACKER_LIKE_SERVER = r"""
import socket, sys
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(64)
print("ready", flush=True)
while True:
    conn, _ = listener.accept()
    data = b""
    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
        data += chunk
    if not data:  # the readiness probe
        conn.close()
        continue
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                  if l.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
    conn.sendall(b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n")
    conn.close()
"""

STDLIB_SERVER = r"""
import http.server, json, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("local", 0)
server = Server(sys.argv[1], Handler)
print("ready", flush=True)
server.serve_forever()
"""

H11_SERVER = r"""
import json, socket, sys, h11
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1]); listener.listen(64)
print("ready", flush=True)
while True:
    sock, _ = listener.accept()
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = sock.recv(65536)
            if not data:
                break
            conn.receive_data(data)
            continue
        if isinstance(event, h11.EndOfMessage):
            body = json.dumps({"ok": True}).encode()
            sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])))
            sock.sendall(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            break
        if isinstance(event, h11.ConnectionClosed):
            break
    sock.close()
"""

UVICORN_SERVER = r"""
import json, sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"ok": True}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
print("ready", flush=True)
uvicorn.run(app, uds=sys.argv[1], log_level="error", access_log=False, lifespan="off")
"""

SERVERS = {
    "stdlib http.server": STDLIB_SERVER,
    "h11 (sans-I/O)": H11_SERVER,
    "uvicorn (ASGI)": UVICORN_SERVER,
}


def start_server(code: str, path: Path) -> subprocess.Popen[str]:
    """A server process listening on `path` (waits until it accepts connections)."""
    server = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                              text=True)
    assert server.stdout is not None
    server.stdout.readline()
    deadline = time.monotonic() + DEADLINE_S
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            return server
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"server on {path} never listened") from None
            time.sleep(0.02)
        finally:
            probe.close()


def round_trips(call: Callable[[], int], requests: int) -> dict[str, float]:
    """Median and p90 milliseconds of `call` (after 10 warm-up calls)."""
    for _ in range(10):
        call()
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(len(times) * 0.9)]}


def stdlib_get(path: str) -> int:
    import http.client

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(DEADLINE_S)
            self.sock.connect(path)

    conn = UnixConnection("localhost")
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        json.loads(response.read())
        return response.status
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="fresh interpreters per import")
    parser.add_argument("--requests", type=int, default=300, help="timed round trips")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {"clients": {}, "servers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fake = Path(tmp) / "fc.sock"
        firecracker = start_server(FIRECRACKER_LIKE_SERVER, fake)
        try:
            for name, statement in CLIENT_IMPORTS.items():
                bare = import_seconds(statement, "", args.runs)
                if bare is None:
                    results["clients"][name] = {"installed": False}
                    continue
                put = CLIENTS[name]()
                assert put(str(fake)) == 204
                results["clients"][name] = {
                    "installed": True,
                    "import_bare_ms": bare * 1000,
                    "import_after_restore_ms": 1000 * (
                        import_seconds(statement, RESTORE_IMPORTS, args.runs) or 0.0
                    ),
                    **round_trips(lambda put=put: put(str(fake)), args.requests),
                }
        finally:
            firecracker.kill()
            firecracker.wait(DEADLINE_S)
        for name, code in SERVERS.items():
            bare = import_seconds(SERVER_IMPORTS[name], "", args.runs)
            if bare is None:
                results["servers"][name] = {"installed": False}
                continue
            path = Path(tmp) / f"{len(results['servers'])}.sock"
            server = start_server(code, path)
            try:
                assert stdlib_get(str(path)) == 200
                results["servers"][name] = {
                    "installed": True, "import_bare_ms": bare * 1000,
                    **round_trips(lambda path=path: stdlib_get(str(path)), args.requests),
                }
            finally:
                server.kill()
                server.wait(DEADLINE_S)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"machine: {machine()}; load average after: {os.getloadavg()[0]:.2f}")
    print("client                           import bare  after restore  PUT median  PUT p90")
    for name, row in results["clients"].items():
        if not row["installed"]:
            print(f"{name:32} not installed")
            continue
        print(f"{name:32} {row['import_bare_ms']:8.1f} ms  {row['import_after_restore_ms']:9.1f} ms"
              f"  {row['median_ms']:7.3f} ms {row['p90_ms']:7.3f} ms")
    print("server                           import bare  GET median  GET p90")
    for name, row in results["servers"].items():
        if not row["installed"]:
            print(f"{name:32} not installed")
            continue
        print(f"{name:32} {row['import_bare_ms']:8.1f} ms  {row['median_ms']:7.3f} ms"
              f" {row['p90_ms']:7.3f} ms")


if __name__ == "__main__":
    main()
