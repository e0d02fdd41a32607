"""Receiving Firecracker's handshake (fcsnap/uffd/handshake.py), fuzzed over a real socket.

`receive_handshake` is what a connected VM's bytes and fds meet first: any payload, cut into
any chunks, with no fd, the uffd, other fds or too many, the sender hanging up or going quiet,
a stop request. Each must end in regions and a uffd, a HandshakeError with a one-line message,
or None (stopped) - promptly, and with every fd that arrived either handed over (the uffd) or
closed: a server that leaks one fd per bad VM runs out of them on a busy host.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcsnap.uffd import abi
from fcsnap.uffd.handshake import MAX_FDS, MAX_PAYLOAD, UFFD_LINK, receive_handshake
from fcsnap.uffd.regions import MAX_REGIONS, PAGE_SIZES, HandshakeError

MiB = 1 << 20
MEMORY = 64 * MiB
TIMEOUT = 0.05  # seconds receive_handshake waits for a sender that went quiet
PROMPT = 2.0  # seconds any one receive may take, whatever the input
FD_KINDS = ("uffd", "pipe", "devnull")


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def fd_kind(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture(scope="module")
def uffd() -> Iterator[int]:
    """One userfaultfd; each example sends dups of it (a dup is a uffd too)."""
    fd = abi.userfaultfd()
    yield fd
    os.close(fd)


@dataclass
class Sent:
    """What the test side sends: payload chunks, which fd kinds go with which chunk, and how
    the sender ends (hang up, stay quiet, or the server is asked to stop first)."""

    chunks: list[bytes]
    fds: list[list[str]]  # per chunk
    ending: str  # "hangup", "quiet" or "stop"


@st.composite
def region_payloads(draw: st.DrawFn) -> bytes:
    """A region list some Firecracker version would send, sometimes slightly wrong."""
    page = draw(st.sampled_from(PAGE_SIZES))
    base, offset, out = 1 << 40, 0, []
    for n in draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)):
        out.append({"base_host_virt_addr": base, "size": n * page, "offset": offset,
                    "page_size": page, "page_size_kib": page})
        base += n * page
        offset += n * page
    if draw(st.booleans()):
        obj = out[draw(st.integers(0, len(out) - 1))]
        key = draw(st.sampled_from(sorted(obj)))
        obj[key] = draw(st.sampled_from([0, -1, 1, 4095, 1 << 64, MEMORY * 2, None, "x"]))
    return json.dumps(out).encode()


@st.composite
def sends(draw: st.DrawFn) -> Sent:
    payload = draw(st.one_of(
        st.binary(max_size=300),
        region_payloads(),
        st.sampled_from([b"[", b"[]", b"{}", b"[" * 5000, b"[" * 3000 + b"]" * 3000,
                         b"[" + b" " * (MAX_PAYLOAD + 10) + b"]"]),
    ))
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    bounds = [0, *cuts, len(payload)]
    chunks = [payload[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    chunks = [c for c in chunks if c] or [b""]
    fd_lists = [draw(st.lists(st.sampled_from(FD_KINDS), max_size=3)) for _ in chunks]
    if draw(st.integers(0, 20)) == 0:  # more fds than the server takes in one message
        fd_lists[0] = ["devnull"] * (MAX_FDS + 2) + ["uffd"]
    return Sent(chunks, fd_lists, draw(st.sampled_from(["hangup", "hangup", "quiet", "stop"])))


def make_fd(kind: str, uffd: int, made: list[int]) -> int:
    if kind == "uffd":
        fd = os.dup(uffd)
    elif kind == "pipe":
        r, fd = os.pipe()
        made.append(r)
    else:
        fd = os.open(os.devnull, os.O_RDONLY)
    made.append(fd)
    return fd


def send(sock: socket.socket, sent: Sent, uffd: int) -> None:
    """Send every chunk with its fds, then end as told; runs in its own thread, since a large
    payload fills the socket buffer until the server reads (or closes)."""
    made: list[int] = []
    try:
        for chunk, kinds in zip(sent.chunks, sent.fds, strict=True):
            fds = [make_fd(k, uffd, made) for k in kinds]
            if not chunk:  # no payload byte to carry them: fds alone are not sent on a stream
                continue
            socket.send_fds(sock, [chunk], fds)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server gave up on us first
    finally:
        for fd in made:
            os.close(fd)
        if sent.ending == "hangup":
            sock.shutdown(socket.SHUT_WR)


def check_received(sent: Sent, uffd: int) -> str:
    """Run receive_handshake on `sent`; check the result and that no fd was left behind.
    Returns "ok", "stopped" or the HandshakeError's message."""
    before = open_fds()
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop_r, stop_w = os.pipe()
    if sent.ending == "stop":
        os.write(stop_w, b"x")
    sender = threading.Thread(target=send, args=(client, sent, uffd))
    sender.start()
    started = time.monotonic()
    result = None
    try:
        try:
            result = receive_handshake(server, MEMORY, TIMEOUT, stop_r)
            outcome = "stopped" if result is None else "ok"
        except HandshakeError as e:
            outcome = str(e)
            assert outcome and "\n" not in outcome
        assert time.monotonic() - started < PROMPT
    finally:
        server.close()  # unblocks a sender still writing
        sender.join(PROMPT)
        assert not sender.is_alive()
        client.close()
        for fd in (stop_r, stop_w):
            os.close(fd)
    if result is not None:
        regions, received, extra = result
        try:
            assert fd_kind(received) == UFFD_LINK
            assert not os.get_blocking(received)
            assert 0 < len(regions) <= MAX_REGIONS and extra >= 0
            for r in regions:
                assert r.offset + r.size <= MEMORY and r.size > 0
                assert not (r.base | r.size | r.offset) % r.page_size
            for a, b in zip(regions, regions[1:], strict=False):
                assert a.end <= b.base
        finally:
            os.close(received)
    assert (outcome == "stopped") == (sent.ending == "stop")
    assert open_fds() == before, "fds leaked by receive_handshake"
    return outcome


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(sent=sends())
def test_fuzz_receive_handshake(uffd: int, sent: Sent) -> None:
    check_received(sent, uffd)


# -- the cases the fuzzer must be able to reach, pinned ---------------------------------------

REGIONS = json.dumps([{"base_host_virt_addr": 1 << 40, "size": MiB, "offset": 0}]).encode()


@pytest.mark.parametrize(("sent", "outcome"), [
    pytest.param(Sent([REGIONS], [["uffd"]], "quiet"), "ok", id="firecracker"),
    pytest.param(Sent([REGIONS[:5], REGIONS[5:]], [[], ["uffd"]], "quiet"), "ok",
                 id="fd-with-second-chunk"),
    pytest.param(Sent([REGIONS], [["pipe", "uffd", "devnull"]], "quiet"), "ok",
                 id="extra-fds-closed"),
    pytest.param(Sent([REGIONS], [["devnull"] * (MAX_FDS + 3) + ["uffd"]], "quiet"),
                 "none of the 8 fds", id="too-many-fds"),
    pytest.param(Sent([REGIONS], [[]], "quiet"), "did not send the uffd", id="no-fd"),
    pytest.param(Sent([REGIONS], [["pipe"]], "quiet"), "none of the 1 fds", id="pipe-not-uffd"),
    pytest.param(Sent([b""], [[]], "quiet"), "did not send its handshake", id="nothing"),
    pytest.param(Sent([b""], [[]], "hangup"), "closed the connection", id="hangup"),
    pytest.param(Sent([REGIONS[:-1]], [["uffd"]], "hangup"), "closed the connection",
                 id="cut-short"),
    pytest.param(Sent([b"[" * 100_000], [["uffd"]], "hangup"), "larger than",
                 id="deep-and-large"),
    pytest.param(Sent([b"[" * 30_000 + b"]" * 30_000], [["uffd"]], "quiet"),
                 "not a JSON region array", id="deep-nesting"),
    pytest.param(Sent([REGIONS[:1] + b" " * MAX_PAYLOAD + REGIONS[1:]], [["uffd"]], "quiet"),
                 "larger than", id="oversized"),
    pytest.param(Sent([REGIONS + b" " * MAX_PAYLOAD], [["uffd"]], "quiet"), "ok",
                 id="complete-then-padding-unread"),
    pytest.param(Sent([REGIONS], [["uffd"]], "stop"), "stopped", id="stopped"),
])
def test_pinned_handshakes(uffd: int, sent: Sent, outcome: str) -> None:
    """What each case must give; and, through check_received, no fd left behind."""
    assert outcome in check_received(sent, uffd)


def test_oversized_payload_is_refused_after_reading_at_most_twice_the_limit(uffd: int) -> None:
    """A VM streaming megabytes: the server stops reading past MAX_PAYLOAD, not at the end."""
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stop_r, stop_w = os.pipe()
    sent = [0]

    def flood() -> None:
        try:
            while sent[0] < 64 * MiB:
                sent[0] += client.send(b" " * 65536)
        except OSError:
            pass

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        with pytest.raises(HandshakeError, match="larger than"):
            receive_handshake(server, MEMORY, PROMPT, stop_r)
    finally:
        server.close()
        flooder.join(PROMPT)
        client.close()
        os.close(stop_r)
        os.close(stop_w)
    assert not flooder.is_alive()
    assert sent[0] < 64 * MiB
