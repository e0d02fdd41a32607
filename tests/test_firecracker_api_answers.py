"""What the snapshot load makes of every kind of answer from Firecracker's API socket.

A real Unix-socket server (fcsnap.testing.firecracker_api.RawAnswer) takes the request and
answers with exact bytes, one byte per write unless a case says otherwise, and keeps the
connection open after them as Firecracker does: a good answer must be read by its framing, not
up to EOF, and a bad one must end in one clear line, never a hang or a traceback. These pin the
parts of http.client's behaviour that fcsnap relies on (fcsnap.unix_http), on every Python the
suite runs on. Every wait has a deadline.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fcsnap.errors import FcsnapError
from fcsnap.testing.firecracker_api import FAULT, RawAnswer, answer
from fcsnap.testing.firecracker_schema import load_error
from fcsnap.uffd.firecracker_api import MAX_BODY, Response, SnapshotLoad, call, load_body

WAIT = 30.0  # seconds any one exchange may take before the test fails
VERSION = (1, 12)  # the Firecracker release the bodies are written for
NO_CONTENT = answer(204)[0]
REFUSAL = b"".join(answer(400, {"fault_message": FAULT}))


def exchange(tmp_path: Path, raw: bytes, piece: int = 1, close: bool = False) -> Response:
    """`PUT /snapshot/load` against a server that answers `raw` (`piece` bytes per write, then
    closing the connection if `close`); the request it got must be one Firecracker accepts."""
    fake = RawAnswer(tmp_path / "api.sock", raw, piece=piece, close=close)
    try:
        body = load_body(Path("vm.state"), Path("uffd.sock"), False, VERSION)
        return call(tmp_path / "api.sock", "PUT", "/snapshot/load", body, timeout=WAIT)
    finally:
        fake.close()
        assert fake.request is not None and fake.request.problems == []
        assert load_error(fake.request.body, VERSION) is None


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        (NO_CONTENT, 204, b""),
        (REFUSAL, 400, REFUSAL.partition(b"\r\n\r\n")[2]),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokTRAILING", 200, b"ok"),
        (b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n1\r\n!\r\n0\r\n\r\n",
         200, b"ok!"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + NO_CONTENT, 204, b""),
    ],
    ids=["firecracker-204", "firecracker-400", "length-bounds-body", "chunked", "after-100"],
)
def test_answer_read_by_its_framing_on_a_kept_alive_connection(
    tmp_path: Path, raw: bytes, status: int, body: bytes
) -> None:
    """Byte by byte, with the connection left open: a 204 ends with its head, a body ends at
    its Content-Length (or last chunk), whatever follows it."""
    response = exchange(tmp_path, raw)
    assert (response.status, response.body) == (status, body)


def test_refusal_gives_firecrackers_fault_message(tmp_path: Path) -> None:
    assert exchange(tmp_path, REFUSAL).fault_message() == FAULT
    (tmp_path / "plain").mkdir()
    plain = exchange(tmp_path / "plain", b"HTTP/1.1 500 \r\nContent-Length: 9\r\n\r\nno\r\nluck!",
                     piece=64)
    assert plain.fault_message() == "HTTP 500: no luck!"


MALFORMED = "fcsnap: error: Firecracker's API sent a malformed answer: "


@pytest.mark.parametrize(
    ("raw", "close", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", False,
         MALFORMED + "not an HTTP/1.x status line: 'SSH-2.0-OpenSSH_9.2'"),
        (b"HTTP/2 204 \r\n\r\n", False, MALFORMED + "not an HTTP/1.x status line: 'HTTP/2'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\nok", False,
         MALFORMED + "bad Content-Length '2x'"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!", False,
         MALFORMED + "bad Content-Length '2, 3'"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\nok", False,
         MALFORMED + "a header line that is not `Name: value`"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", False,
         MALFORMED + "got more than 65536 bytes when reading header line"),
        (f"HTTP/1.1 400 \r\nContent-Length: {MAX_BODY + 1}\r\n\r\n".encode(), False,
         MALFORMED + f"a body of {MAX_BODY + 1} bytes (at most {MAX_BODY} expected)"),
        (b"HTTP/1.1 400 \r\nContent-Length: 10\r\n\r\nshort", True,
         MALFORMED + "the body ended after 5 of 10 bytes"),
        (b"HTTP/1.1 400 \r\n\r\n" + b"x" * (MAX_BODY + 1), True,
         MALFORMED + f"a body of more than {MAX_BODY} bytes"),
        (b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False,
         MALFORMED + "a malformed chunked body (IncompleteRead(0 bytes read))"),
        (b"", True,
         "fcsnap: error: Firecracker closed its API connection without answering (did it exit?)"),
        (b"HTTP/1.1 20", True,
         "fcsnap: error: Firecracker's API sent a malformed answer: not an HTTP/1.x status "
         "line: 'HTTP/1.1 20'"),
    ],
    ids=["not-http", "http2", "bad-length", "two-lengths", "no-colon", "long-header",
         "oversize-length", "short-body", "oversize-to-eof", "bad-chunk", "closed-silently",
         "cut-status-line"],
)
def test_malformed_answer_is_one_clear_line(
    tmp_path: Path, raw: bytes, close: bool, error: str
) -> None:
    """Malformed, oversize or cut-short answers fail fast with one line: none waits for the
    timeout (the connection stays open unless the case closes it)."""
    started = time.monotonic()
    with pytest.raises(FcsnapError) as caught:
        exchange(tmp_path, raw, piece=1 if len(raw) < 4096 else 1 << 16, close=close)
    assert f"fcsnap: error: {caught.value}" == error
    assert time.monotonic() - started < WAIT / 2


def test_timeout_bounds_the_whole_answer(tmp_path: Path) -> None:
    """An answer trickling in a byte at a time never lets one read time out; the timeout of
    the snapshot load still ends the wait for all of it."""
    fake = RawAnswer(tmp_path / "api.sock", REFUSAL, gap=0.2)
    failures: list[FcsnapError] = []
    done = threading.Event()
    load = SnapshotLoad(tmp_path / "api.sock",
                        load_body(Path("vm.state"), Path("uffd.sock"), False, VERSION), timeout=1.0)
    started = time.monotonic()
    load.start(lambda e: (failures.append(e), done.set()), lambda r: done.set())
    assert done.wait(WAIT)
    elapsed = time.monotonic() - started
    fake.close()
    assert [str(e) for e in failures] == [
        "Firecracker did not answer PUT /snapshot/load within 1s"
    ]
    assert elapsed < 5, f"the 1s timeout took {elapsed:.1f}s"
    assert load.finish(grace=WAIT) is failures[0]


def test_finish_cuts_an_unanswered_load_short(tmp_path: Path) -> None:
    """Serving ended and Firecracker never answered: finish() waits its grace, not the
    timeout, and says the load had no answer."""
    fake = RawAnswer(tmp_path / "api.sock", b"")
    body = load_body(Path("vm.state"), Path("uffd.sock"), False, VERSION)
    load = SnapshotLoad(tmp_path / "api.sock", body, timeout=WAIT)
    outcomes: list[object] = []
    load.start(outcomes.append, outcomes.append)
    assert fake.requested.wait(WAIT)
    started = time.monotonic()
    error = load.finish(grace=0.2)
    elapsed = time.monotonic() - started
    fake.close()
    assert str(error) == "Firecracker had not answered the snapshot load when serving ended"
    assert outcomes == [error]
    assert elapsed < WAIT / 3
