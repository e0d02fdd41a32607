"""The daemon's API holds at most --max-api-connections connections (a thread each): clients
that connect and never finish a request cannot make it start threads without bound, and a
request beyond the cap is answered 503 at once. Every wait has a deadline."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
from pathlib import Path

from helpers import WAIT, one_build_store, wait_for
from test_daemon import Daemon

CAP = 8
HALF_SENT = 60
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def ask(api: Path) -> tuple[int, dict]:
    """One whole GET /healthz on a new connection: (status, JSON body)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(WAIT)
        s.connect(str(api))
        with contextlib.suppress(BrokenPipeError):  # over its cap, the daemon may answer 503
            s.sendall(GET)  # and close before the request arrives: the answer is still read
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(4096)
            assert chunk, f"the daemon closed after {data!r}"
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def answered(sockets: list[socket.socket]) -> list[socket.socket]:
    """Those with something to read (an answer, or the end of the connection)."""
    return select.select(sockets, [], [], 0)[0]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def test_half_sent_requests_hold_at_most_the_cap(tmp_path: Path) -> None:
    """60 connections that send half a request: the daemon's threads grow by at most the cap;
    a whole request then gets 503 with one line; once they hang up, requests are served."""
    store = one_build_store(tmp_path, 1 << 20, seed=3)
    daemon = Daemon(store, tmp_path, "--max-api-connections", str(CAP))
    held: list[socket.socket] = []
    try:
        before = threads(daemon.proc.pid)
        assert ask(daemon.api)[0] == 200
        wait_for(lambda: threads(daemon.proc.pid) <= before, "the first request's thread to end")
        for _ in range(HALF_SENT):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(WAIT)
            s.connect(str(daemon.api))
            s.sendall(b"POST /restores HTTP/1.1\r\nContent-Len")
            held.append(s)
        wait_for(lambda: len(answered(held)) == HALF_SENT - CAP,
                 "every connection beyond the cap to be answered")
        assert threads(daemon.proc.pid) <= before + CAP
        for s in answered(held):
            assert s.recv(4096).startswith(b"HTTP/1.1 503 ")
        status, answer = ask(daemon.api)
        assert status == 503 and f"at most {CAP}" in answer["error"], answer
        for s in held:
            s.close()
        held.clear()
        wait_for(lambda: threads(daemon.proc.pid) <= before, "the connection threads to end")
        assert ask(daemon.api) == (200, {"status": "ok", "restores_active": 0})
        code, lines = daemon.stop()
        assert code == 0, lines
    finally:
        for s in held:
            s.close()
        daemon.close()
