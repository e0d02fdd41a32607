"""HTTP/1.1 over a Unix stream socket, spoken by the standard library's http.client.

Firecracker's API listens on a Unix socket (and so will fcsnap's own daemon API). http.client
does the protocol: the request, the status line, headers (with its limits: 64 KiB a line, 100
headers), bodies framed by Content-Length or chunked, none for a 204. It was chosen over httpx,
requests and urllib3 by bench/http_client.py (import time and round trip), and because it lets
the caller hold the socket, which cancelling a wait from another thread needs.

What http.client tolerates and a client must not is checked here: header lines it could not
parse (it would take them, and every header after them, for body), a Content-Length that is
not one number (it would read to EOF, which never comes on a kept-alive connection), and a
body larger than the caller allows.
"""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Callable, Mapping

OnConnect = Callable[[socket.socket], None]


class AnswerError(Exception):
    """An answer that is not well-formed HTTP/1.1, or is larger than allowed (one-line text)."""


class UnixHTTPConnection(http.client.HTTPConnection):
    """An http.client connection to a Unix socket. `on_connect` gets the connected socket, so
    that another thread can cut a wait short by shutting it down."""

    def __init__(self, path: str | os.PathLike[str], timeout: float,
                 on_connect: OnConnect | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = os.fspath(path)
        self.on_connect = on_connect

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        if self.on_connect is not None:
            self.on_connect(sock)


def exchange(
    connection: http.client.HTTPConnection, method: str, path: str, body: bytes,
    headers: Mapping[str, str], limit: int,
) -> tuple[http.client.HTTPResponse, bytes]:
    """Send one request and read its answer with a body of at most `limit` bytes. The
    connection stays usable (kept alive) when the answer said so. Raises AnswerError for a
    malformed or oversize answer, ConnectionError when the server closed without answering,
    TimeoutError and other OSErrors as the socket gives them."""
    connection.request(method, path, body, dict(headers))
    try:
        response = connection.getresponse()
    except http.client.RemoteDisconnected as e:  # also a BadStatusLine: keep it a ConnectionError
        raise ConnectionError(str(e)) from None
    except http.client.HTTPException as e:
        raise AnswerError(_one_line(e)) from None
    try:
        _check_framing(response)
        return response, _read_body(response, limit)
    except BaseException:
        response.close()  # its file holds the socket open, whatever the connection does
        raise


def _check_framing(response: http.client.HTTPResponse) -> None:
    message = response.msg
    if message.defects or message.get_payload():
        raise AnswerError("a header line that is not `Name: value`")
    declared = message.get_all("Content-Length") or []
    if declared and (len(set(declared)) > 1 or not declared[0].strip().isdigit()):
        raise AnswerError(f"bad Content-Length {', '.join(declared)[:80]!r}")


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    if response.length is not None:  # framed by Content-Length (0 for 1xx, 204 and 304)
        if response.length > limit:
            raise AnswerError(f"a body of {response.length} bytes (at most {limit} expected)")
        try:
            return response.read()
        except http.client.IncompleteRead as e:
            raise AnswerError(
                f"the body ended after {len(e.partial)} of "
                f"{len(e.partial) + (e.expected or 0)} bytes"
            ) from None
    try:
        body = response.read(limit + 1)  # chunked, or up to the end of the connection
    except http.client.HTTPException as e:  # IncompleteRead, a bad chunk size
        raise AnswerError(f"a malformed chunked body ({_one_line(e)})") from None
    if len(body) > limit:
        raise AnswerError(f"a body of more than {limit} bytes")
    return body


def _one_line(error: http.client.HTTPException) -> str:
    """http.client's text for a parse failure, quoted and on one line."""
    if isinstance(error, http.client.BadStatusLine | http.client.UnknownProtocol):
        return f"not an HTTP/1.x status line: {error.args[0].strip()[:80]!r}"
    return " ".join(str(error).split())[:200]
