"""`fcsnap restore` end to end: the real CLI in one process, a Firecracker stand-in in another.

Every run checks each byte the guest reads against the generation being served, and the
server's --stats against itself. Every wait has a deadline: a server that stops answering must
fail a test, never hang the suite. Failure paths check that the VM is killed (a guest whose
page server gave up would otherwise freeze) and that the server says why in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    VM_PREAMBLE,
    WAIT,
    Lineage,
    Outcome,
    Procs,
    assert_served,
    check_served,
    race_the_balloon,
    restore,
    wait_for,
    wait_serving,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcsnap.header import load_header
from fcsnap.store.format.layout import DIFF_RAW, HASHES
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full, write_sparse_diff
from fcsnap.uffd.installer import Installer, InstallStats
from fcsnap.uffd.pages import PageSource
from fcsnap.uffd.regions import PAGE_SIZES, HandshakeError, Region, RegionMap, parse_regions
from fcsnap.uffd.server import FaultServer, ServeOptions
from fcsnap.units import PAGE
from fcsnap.workingset import read_working_set, write_working_set

MiB = 1 << 20
HUGE = 2 * MiB
SIZE = 4 * MiB  # guest memory per test: two hugepages, 1024 small pages
KILLED = -signal.SIGKILL


# -- stores ----------------------------------------------------------------------------------


def make_lineage(root: Path, compression: str, block_size: int, seed: int) -> Lineage:
    """gen0 packed from a Full snapshot, gen1 diffed from a Full one, gen2 from a sparse
    Diff snapshot; the newest is unpacked with `ops.unpack` and checked against the source.
    With 2 MiB blocks the guest writes only its first block, so that the newest generation
    still reads the second one from gen0."""
    root.mkdir()
    store = root / "store"
    options = BuildOptions(block_size=block_size, compression=compression)
    writable = slice(0, block_size // PAGE) if block_size > PAGE else slice(None)
    mem = synthetic_memory(SIZE, seed=seed)
    write_full(root / "gen0.mem", mem)
    builds = [ops.pack(root / "gen0.mem", store, options)[1]]
    for gen in (1, 2):
        new, dirty = evolve(mem, seed=seed + gen, dirty_share=0.1)
        mem = mem.copy()
        mem[writable] = new[writable]
        dirty = dirty[dirty < len(mem[writable])]
        if gen == 1:
            write_full(root / "gen1.mem", mem)
        else:
            write_sparse_diff(root / "gen2.mem", mem, dirty)
        builds.append(ops.diff(root / f"gen{gen}.mem", builds[-1], store, options,
                               sparse_diff=gen == 2)[1])
    expected = root / "expected.mem"
    ops.unpack(builds[-1], expected)
    assert expected.read_bytes() == mem.tobytes()
    return Lineage(store, builds, [root / "gen0.mem", root / "gen1.mem", expected],
                   block_size)


@pytest.fixture(scope="module")
def lineages(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Lineage]:
    """Raw and zstd lineages with 4 KiB and 2 MiB blocks, keyed (compression, block size)."""
    root = tmp_path_factory.mktemp("lineages")
    return {
        (compression, bs): make_lineage(root / f"{compression}-{bs}", compression, bs, seed)
        for seed, (compression, bs) in enumerate(
            [("none", PAGE), ("zstd", PAGE), ("none", HUGE), ("zstd", HUGE)]
        )
    }


# -- running the server and the VM -----------------------------------------------------------


# -- serving ---------------------------------------------------------------------------------

LINEAGE_CASES = [
    pytest.param("none", PAGE, "4K", (), id="raw-4k"),
    pytest.param("zstd", PAGE, "4K", ("--verify",), id="zstd-4k-verify"),
    pytest.param("none", HUGE, "2M", ("--verify",), id="raw-2m-verify"),
    pytest.param("zstd", HUGE, "2M", (), id="zstd-2m"),
    pytest.param("none", PAGE, "2M", (), id="raw-4k-blocks-2m-pages"),
    pytest.param("zstd", PAGE, "2M", ("--verify",), id="zstd-4k-blocks-2m-pages-verify"),
]


@pytest.mark.parametrize(("compression", "block_size", "page", "args"), LINEAGE_CASES)
def test_newest_generation_with_balloon(
    request: pytest.FixtureRequest, lineages: dict[tuple[str, int], Lineage], procs: Procs,
    compression: str, block_size: int, page: str, args: tuple[str, ...],
) -> None:
    """Four threads fault random pages over two regions, then a balloon range (spanning the
    region border) is given back and must read zero."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    lineage = lineages[compression, block_size]
    page_size = firecracker.PAGE_SIZES[page]
    balloon = [(SIZE // 2 - page_size, 2 * page_size)] if page == "4K" else [(HUGE, HUGE)]
    out = restore(procs, lineage, args, page_size=page, regions=2, threads=4,
                  order="random", seed=3, balloon=balloon)
    check_served(out, lineage, page_size)
    assert out.report is not None and out.report["balloon_ok"] is True
    assert out.report["pages_touched"] >= SIZE // page_size
    stats = out.stats
    assert stats is not None and stats["remove_events"] >= 1
    assert stats["zero_pages"] >= 1  # the ballooned pages came back as zeros
    if page_size == block_size:  # (a 2 MiB page of 4 KiB blocks counts for one build)
        assert len(stats["per_build_pages"]) >= 2  # pages came from several generations


@pytest.mark.parametrize("payload", firecracker.PAYLOADS)
def test_payload_versions_and_three_regions(lineages, procs, payload: str) -> None:
    lineage = lineages["none", PAGE]
    out = restore(procs, lineage, payload=payload, regions=3, threads=2)
    check_served(out, lineage)
    assert out.report is not None and out.report["pages_touched"] == SIZE // PAGE
    assert out.stats is not None and out.stats["regions"] == 3


@pytest.mark.parametrize("page", ["4K", "2M"])
def test_threads_fault_the_same_pages(request, lineages, procs, page: str) -> None:
    """Four threads read the same pages in the same order, so they fault the same page at
    once: the losers' installs find the page present, which must count once, not fail."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    lineage = lineages["zstd", PAGE]
    page_size = firecracker.PAGE_SIZES[page]
    out = restore(procs, lineage, page_size=page, threads=4, shared_pages=True)
    check_served(out, lineage, page_size)
    assert out.report is not None and out.report["pages_touched"] == 4 * SIZE // page_size
    assert out.stats is not None and out.stats["pages_served"] == SIZE // page_size


@pytest.mark.parametrize(("compression", "page"), [
    ("none", "4K"), pytest.param("zstd", "4K", marks=pytest.mark.slow),
    pytest.param("none", "2M", marks=pytest.mark.slow), ("zstd", "2M"),
])
def test_kvm_vcpu_faults(request, lineages, procs, compression: str, page: str) -> None:
    """A KVM vCPU reads guest memory, so the faults are kernel-mode ones, as Firecracker's."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm")
    if page == "2M":
        request.getfixturevalue("hugepages")
    lineage = lineages[compression, HUGE if page == "2M" else PAGE]
    out = restore(procs, lineage, page_size=page, kvm=True, threads=0, regions=2)
    check_served(out, lineage, firecracker.PAGE_SIZES[page])
    assert out.report is not None and out.report["kvm"]["ok"] is True


def test_late_handshake_within_the_timeout(lineages, procs) -> None:
    lineage = lineages["none", PAGE]
    out = restore(procs, lineage, ("--handshake-timeout", "3"), misbehave="late:0.5",
                  touch=0.2, threads=2)
    check_served(out, lineage)


# Sends the uffd and the write end of a pipe, then reads every page: the pipe reaches EOF only
# once the server has closed its copy of the extra fd (while it is still serving us).
TWO_FDS_VM = VM_PREAMBLE + """
sock = connect(sock_path, 10)
r, w = os.pipe()
socket.send_fds(sock, [json.dumps(guest.region_objects("v1.12")).encode()], [guest.uffd, w])
os.close(w)
closed = bool(select.select([r], [], [], 10)[0]) and os.read(r, 1) == b""
tally = Tally()
Reader(guest, expected, tally).check(range(0, len(expected), 4096))
print(json.dumps({"closed": closed, "touched": tally.touched, "mismatches": tally.mismatches}))
"""


def test_two_fds_extra_is_closed_and_serving_works(lineages, procs) -> None:
    lineage = lineages["none", PAGE]
    server = procs.server(lineage.newest.name, lineage.store)
    vm = procs.track(subprocess.Popen(
        [sys.executable, "-c", TWO_FDS_VM, str(procs.socket), str(lineage.expected)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = procs.outcome(server, None)
    vm_out, vm_err = vm.communicate(timeout=WAIT)
    assert vm.returncode == 0, vm_err.decode()
    assert json.loads(vm_out) == {"closed": True, "touched": SIZE // PAGE, "mismatches": 0}
    assert out.status == 0, out.stderr
    assert out.stats is not None and out.stats["extra_fds_closed"] == 1


def test_balloon_while_threads_fault(lineages, procs) -> None:
    lineage = lineages["zstd", PAGE]
    server = procs.server(lineage.newest.name, lineage.store)
    stats = race_the_balloon(procs, server, lineage.expected)
    assert sum(stats["per_build_pages"].values()) + stats["zero_pages"] == stats["pages_served"]


# -- bad handshakes --------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "message"), [
    ("nothing", "did not send its handshake in 0.5s"),
    ("garbage", "not a JSON region array"),
    ("no-fd", "did not send the uffd in 0.5s"),
    ("oversize-region", "beyond the snapshot"),
    ("bad-page-size", "neither 4 KiB nor 2 MiB"),
    ("overlap", "overlap"),
    ("hangup", "closed the connection before the handshake ended"),
    ("wrong-fd", "none of the 1 fds the VM sent is a userfaultfd"),
    ("huge", "handshake larger than 65536 bytes"),
])
def test_bad_handshake_kills_the_vm(lineages, procs, mode: str, message: str) -> None:
    """One error line, exit 1, and the VM (which would wait for its pages forever) killed."""
    lineage = lineages["none", PAGE]
    server = procs.server(lineage.newest.name, lineage.store, "--handshake-timeout", "0.5")
    vm = procs.vm(expected=lineage.expected, misbehave=mode, hold=WAIT)
    out = procs.outcome(server, vm)
    assert out.status == 1
    assert message in out.error
    assert out.vm_status == KILLED
    assert not procs.socket.exists()


# -- --verify --------------------------------------------------------------------------------


def corrupt_touched_block(lineage: Lineage) -> tuple[str, int, int]:
    """Flip a byte in the middle of a stored block the newest generation serves from an
    ancestor's raw diff; returns (build id, storage offset, guest offset) of that block."""
    header = load_header(lineage.newest)
    bs = lineage.block_size
    ancestor = uuid.UUID(lineage.builds[0].name)
    m = next(m for m in header.mappings if m.build_id == ancestor and m.length >= 4 * bs)
    storage = m.storage_offset + 2 * bs
    diff = lineage.builds[0] / DIFF_RAW
    with open(diff, "r+b") as f:
        f.seek(storage + bs // 2)
        byte = f.read(1)[0]
        f.seek(storage + bs // 2)
        f.write(bytes([byte ^ 0xFF]))
    return str(ancestor), storage, m.offset + 2 * bs


def test_verify_refuses_a_corrupt_block(lineages, procs, tmp_path) -> None:
    lineage = lineages["none", PAGE].writable_copy(tmp_path / "store")
    build_id, storage, _ = corrupt_touched_block(lineage)
    out = restore(procs, lineage, ("--verify",), threads=2, hold=WAIT)
    assert out.status == 1
    assert build_id in out.error and f"storage offset {storage:#x}" in out.error
    assert out.vm_status == KILLED
    assert out.report is None or out.report["mismatches"] == 0
    assert out.stats is not None and out.stats["exit_reason"].startswith("error")


def test_without_verify_the_corruption_reaches_the_guest(lineages, procs, tmp_path) -> None:
    """The control for the test above: the corrupt block is one the guest reads."""
    lineage = lineages["none", PAGE].writable_copy(tmp_path / "store")
    _, _, guest_offset = corrupt_touched_block(lineage)
    out = restore(procs, lineage, threads=2)
    assert out.vm_status == firecracker.EXIT_MISMATCH
    assert out.report is not None and out.report["first_mismatches"] == [guest_offset]


def test_verify_without_hashes_fails_before_serving(lineages, procs, tmp_path) -> None:
    lineage = lineages["none", PAGE].writable_copy(tmp_path / "store")
    (lineage.builds[1] / HASHES).unlink()
    out = procs.outcome(procs.server(lineage.newest.name, lineage.store, "--verify"), None)
    assert out.status == 1 and HASHES in out.error


# -- stopping --------------------------------------------------------------------------------


def test_sigterm_while_the_vm_holds(lineages, procs) -> None:
    """SIGTERM: exit 0 with stats written; the VM, which cannot go on without its page
    server, is killed rather than left to freeze at its next fault."""
    lineage = lineages["none", PAGE]
    server = procs.server(lineage.newest.name, lineage.store, "--fault-around", "0")
    vm = procs.vm(expected=lineage.expected, touch=0.25, threads=2, hold=WAIT)
    wait_for(procs.report.exists, "the VM to finish its reads")
    server.send_signal(signal.SIGTERM)
    out = procs.outcome(server, vm)
    assert out.status == 0, out.stderr
    assert out.stats is not None and out.stats["exit_reason"] == "signal"
    assert out.stats["pages_served"] > 0
    assert out.vm_status == KILLED
    assert out.report is not None and out.report["mismatches"] == 0
    assert not procs.socket.exists()


def test_sigterm_before_any_vm(lineages, procs) -> None:
    lineage = lineages["none", PAGE]
    server = procs.server(lineage.newest.name, lineage.store, quiet=False)
    wait_serving(server)
    server.send_signal(signal.SIGTERM)
    out = procs.outcome(server, None)
    assert out.status == 0, out.stderr
    assert out.stats is not None and out.stats["pages_served"] == 0
    assert not procs.socket.exists()


def test_unexpected_error_kills_the_vm(lineages, tmp_path, monkeypatch) -> None:
    """Any exception in the serve loop, not only FcsnapError, must kill the VM first."""
    lineage = lineages["none", PAGE]

    def broken(self: PageSource, offset: int, length: int) -> None:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(PageSource, "locate", broken)
    monkeypatch.setenv("FCSNAP_PURE_PYTHON", "1")  # the compiled path does not call locate
    sock, stats = tmp_path / "uffd.sock", tmp_path / "stats.json"
    vms: list[subprocess.Popen[bytes]] = []
    server = FaultServer(lineage.newest, ServeOptions(
        socket=sock, stats_path=stats,
        on_listening=lambda: vms.append(firecracker.spawn(
            sock, expected=lineage.expected, deadline=WAIT, hold=WAIT)),
    ))
    guard = threading.Timer(WAIT, server.stop)  # the test fails, not hangs, if serving does
    guard.start()
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            server.run()
        assert vms[0].wait(WAIT) == KILLED
    finally:
        guard.cancel()
        for vm in vms:
            vm.kill()
            vm.wait(WAIT)
    assert "injected failure" in json.loads(stats.read_text())["exit_reason"]


# -- the socket and the build ----------------------------------------------------------------


def test_stale_socket_is_replaced(lineages, procs) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(procs.socket))
    stale.close()  # the file stays behind, as after a crash
    lineage = lineages["none", PAGE]
    check_served(restore(procs, lineage, touch=0.1), lineage)


def test_regular_file_at_socket_path_is_refused(lineages, procs) -> None:
    procs.socket.write_text("not a socket\n")
    lineage = lineages["none", PAGE]
    out = procs.outcome(procs.server(lineage.newest.name, lineage.store), None)
    assert out.status == 1 and "not a socket" in out.error
    assert procs.socket.read_text() == "not a socket\n"


def test_error_without_quiet_is_still_one_line(lineages, procs) -> None:
    """Without --quiet the server announces itself first; the failure is still one line."""
    lineage = lineages["none", PAGE]
    server = procs.server(lineage.newest.name, lineage.store, quiet=False)
    out = procs.outcome(server, procs.vm(expected=lineage.expected, misbehave="garbage"))
    assert out.status == 1 and out.vm_status == KILLED
    assert out.stderr[0].startswith("fcsnap: serving ")
    assert out.stderr[1:] == [out.stderr[-1]] and "not a JSON region array" in out.stderr[-1]


def test_missing_build_fails_before_serving(lineages, procs) -> None:
    missing = str(uuid.uuid4())
    out = procs.outcome(procs.server(missing, lineages["none", PAGE].store), None)
    assert out.status == 1 and missing in out.error


def test_missing_ancestor_fails_before_serving(lineages, procs, tmp_path) -> None:
    """A VM already waiting for the socket is never hung: it connects while the build is
    opened and is killed, or finds no socket (test_opening.py makes the first case sure)."""
    lineage = lineages["zstd", PAGE].writable_copy(tmp_path / "store")
    shutil.rmtree(lineage.builds[0])
    vm = procs.vm(expected=lineage.expected, connect_timeout=1)
    out = procs.outcome(procs.server(lineage.newest.name, lineage.store), vm)
    assert out.status == 1 and lineage.build_ids[0] in out.error
    assert out.vm_status in (KILLED, 1) and out.report is None
    assert not procs.socket.exists()


# -- parse_regions ---------------------------------------------------------------------------

MEMORY = 64 * MiB
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
KEYS = ["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"]


@st.composite
def valid_regions(draw: st.DrawFn) -> list[dict[str, int]]:
    """What some Firecracker version would send: consecutive regions over guest memory."""
    page = draw(st.sampled_from(PAGE_SIZES))
    version = draw(st.sampled_from(firecracker.PAYLOADS))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    base, offset, out = 1 << 40, 0, []
    for n in sizes:
        obj = {"base_host_virt_addr": base, "size": n * page, "offset": offset}
        if version == "v1.12":
            obj["page_size"] = page
        if version != "v1.1":
            obj["page_size_kib"] = page
        out.append(obj)
        base += n * page + draw(st.sampled_from([0, page]))
        offset += n * page
    return out


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid payload with its JSON or its bytes changed a little."""
    regions = draw(valid_regions())
    for _ in range(draw(st.integers(1, 3))):
        obj = regions[draw(st.integers(0, len(regions) - 1))]
        key = draw(st.sampled_from(KEYS))
        action = draw(st.sampled_from(["set", "delete", "nudge"]))
        if action == "delete":
            obj.pop(key, None)
        elif action == "nudge" and isinstance(obj.get(key), int):
            obj[key] += draw(st.sampled_from([-PAGE, -1, 1, PAGE, HUGE, 1 << 64]))
        else:
            obj[key] = draw(JSON_VALUES)
    data = bytearray(json.dumps(regions).encode())
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


def check_parse(payload: bytes) -> None:
    """parse_regions returns regions that fit and do not overlap, or raises HandshakeError."""
    try:
        regions = parse_regions(payload, MEMORY)
    except HandshakeError:
        return
    assert regions and all(isinstance(r, Region) for r in regions)
    for r in regions:
        assert r.page_size in PAGE_SIZES and r.size > 0
        assert (r.base | r.size | r.offset) % r.page_size == 0
        assert r.offset + r.size <= MEMORY and r.end < 1 << 64
    for a, b in zip(regions, regions[1:], strict=False):
        assert a.end <= b.base
    spans = sorted((r.offset, r.offset + r.size) for r in regions)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_parse_regions_arbitrary_bytes(payload: bytes) -> None:
    check_parse(payload)


@FUZZ
@given(mutated_payloads())
def test_parse_regions_mutated_payloads(payload: bytes) -> None:
    check_parse(payload)


@FUZZ
@given(st.one_of(JSON_VALUES, st.lists(JSON_VALUES, max_size=3),
                 st.lists(st.dictionaries(st.sampled_from(KEYS), JSON_VALUES), max_size=3)))
def test_parse_regions_arbitrary_json(value: object) -> None:
    check_parse(json.dumps(value).encode())


@given(valid_regions())
def test_parse_regions_accepts_what_firecracker_sends(regions: list[dict[str, int]]) -> None:
    parsed = parse_regions(json.dumps(regions).encode(), MEMORY)
    assert [(r.base, r.size, r.offset) for r in parsed] == [
        (o["base_host_virt_addr"], o["size"], o["offset"]) for o in regions
    ]
    assert all(r.page_size == regions[0].get("page_size_kib", PAGE) for r in parsed)


def test_lineage_fixture_spans_generations(lineages) -> None:
    """The newest generation reads blocks from gen0 and gen2 (and gen1 with 4 KiB blocks)."""
    for lineage in lineages.values():
        used = {str(b) for b in load_header(lineage.newest).build_ids()}
        ids = lineage.build_ids
        assert used == (set(ids) if lineage.block_size == PAGE else {ids[0], ids[2]})
        assert np.any(np.fromfile(lineage.expected, np.uint8))


@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16)), max_size=20),
       st.lists(st.integers(0, 95), max_size=20))
def test_removed_pages_match_a_plain_list(adds: list[tuple[int, int]], probes: list[int]) -> None:
    """Balloon bookkeeping: a page is removed (and no longer present) exactly when a REMOVE
    range touched it; ranges may straddle the two regions."""
    regions = [Region(0x10000, 48 * PAGE, 0, PAGE), Region(0x80000, 48 * PAGE, 48 * PAGE, PAGE)]
    installer = Installer(-1, RegionMap(regions), None, InstallStats())  # type: ignore[arg-type]
    for state in installer.states.values():
        state.present[:] = True
    host = [r.base + p * PAGE for r in regions for p in range(48)]
    for start, length in adds:
        installer.remove(host[start], host[start] + length * PAGE)
    for probe in probes:
        address = host[probe]
        state = installer.states[regions[probe // 48].base]
        expected = any(
            host[s] <= address < host[s] + n * PAGE for s, n in adds
        )
        assert state.removed[probe % 48] == expected
        assert state.present[probe % 48] == (not expected)


# -- restore speed: fault-around, working sets, populate, eager ------------------------------


def served_everything(out: Outcome, pages: int) -> dict[str, Any]:
    """The VM saw only right bytes and the server installed each page exactly once."""
    stats = assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)
    assert stats["pages_served"] == pages
    return stats


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_fault_around_installs_runs_in_one_copy(lineages, procs, compression: str) -> None:
    """One thread reading in order: without fault-around every page is its own install and
    fault; with it, a fault brings its contiguous run, and no page is installed twice."""
    lineage = lineages[compression, PAGE]
    single = served_everything(
        restore(procs, lineage, ("--fault-around", "0"), threads=1), SIZE // PAGE
    )
    assert single["installs"] == SIZE // PAGE
    procs.stats.unlink()
    around = served_everything(
        restore(procs, lineage, ("--fault-around", "256K"), threads=1), SIZE // PAGE
    )
    assert around["faults"] * 16 < single["faults"]


def test_record_then_prefetch_working_set(lineages, procs, tmp_path) -> None:
    """A recorded working set, prefetched on the next restore, spares the guest its faults."""
    lineage = lineages["none", PAGE]
    ws = tmp_path / "ws"
    first = restore(procs, lineage, ("--record-ws", str(ws), "--fault-around", "0"),
                    touch=0.3, order="random", seed=5, threads=2)
    assert first.status == 0 and first.report["mismatches"] == 0
    recorded = read_working_set(ws, SIZE)
    assert len(recorded) == first.stats["pages_served"] > 0
    procs.stats.unlink()
    # Firecracker restores the vCPU state after the handshake before the guest runs again;
    # the delay stands in for that window, in which the prefetch gets ahead of the guest.
    second = restore(procs, lineage, ("--prefetch-ws", str(ws), "--fault-around", "0"),
                     touch=0.3, order="random", seed=5, threads=2, start_delay=0.3)
    assert second.status == 0 and second.vm_status == 0
    assert second.report["mismatches"] == 0
    stats = second.stats
    assert stats["prefetched_pages"] > 0
    assert stats["faults"] < first.stats["faults"] / 2


def test_working_set_from_another_size_is_refused(lineages, procs, tmp_path) -> None:
    ws = tmp_path / "ws"
    write_working_set(ws, 2 * SIZE, [0])
    lineage = lineages["none", PAGE]
    server = procs.server(lineage.newest.name, lineage.store, "--prefetch-ws", str(ws))
    out = procs.outcome(server, None)
    assert out.status == 1 and "recorded for" in out.error


@pytest.mark.parametrize("page", ["4K", "2M"])
def test_populate_makes_the_vm_independent(request, lineages, procs, page: str) -> None:
    """With --populate every page ends up installed while the guest touches only a tenth;
    a SIGTERM then leaves the VM running, since it no longer needs its page server."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    lineage = lineages["zstd", PAGE]
    page_size = firecracker.PAGE_SIZES[page]
    server = procs.server(lineage.newest.name, lineage.store, "--populate",
                          "--fault-around", "0")
    gate = procs.tmp / "end-gate"  # the VM stays until the server has ended
    vm = procs.vm(expected=lineage.expected, page_size=page, touch=0.1, threads=2,
                  end_gate=gate)
    wait_for(procs.report.exists, "the VM to finish its reads")
    wait_for(lambda: guest_memory(vm.pid) >= SIZE, "the server to populate all guest memory")
    server.send_signal(signal.SIGTERM)
    server.wait(WAIT)
    gate.touch()
    out = procs.outcome(server, vm)
    assert out.vm_status == 0, "a fully populated VM must not be killed"
    stats = out.stats
    assert stats is not None and stats["exit_reason"] == "signal"
    assert stats["pages_served"] == SIZE // page_size
    assert stats["populated_pages"] > 0


def guest_memory(pid: int) -> int:
    """Bytes of anonymous and hugetlb memory resident in process `pid` (its guest memory)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines())
    return sum(int(fields[key].split()[0]) << 10 for key in ("RssAnon", "HugetlbPages"))


def test_eager_installs_everything_before_serving(lineages, procs) -> None:
    lineage = lineages["none", PAGE]
    stats = served_everything(
        restore(procs, lineage, ("--eager",), threads=4, order="random"), SIZE // PAGE
    )
    assert stats["populated_pages"] == SIZE // PAGE
    assert stats["faults"] <= 8  # only the guests' first touches, while it was installing


def test_balloon_with_fault_around_and_populate(lineages, procs) -> None:
    """REMOVE'd ranges are never covered by fault-around or populate: they read zero."""
    lineage = lineages["none", PAGE]
    out = restore(procs, lineage, ("--fault-around", "1M", "--populate"), threads=2,
                  balloon=[(PAGE * 3, 5 * PAGE), (SIZE // 2, 64 * PAGE)])
    assert out.status == 0 and out.vm_status == 0
    assert out.report["mismatches"] == 0 and out.report["balloon_ok"] is True
