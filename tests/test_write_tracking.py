"""Write tracking: memory registered MISSING|WP (E2B's Firecracker) or given WP by
`restore --track-writes` is served so that every write of the guest is seen.

A stand-in VM reads its memory, writes a known set of pages from several threads, has a
balloon give pages back, then reads all of memory (as a Full snapshot) and reports which of its
present pages are write-protected (/proc/self/pagemap bit 57): exactly the ones it did not
write must be. The server's `written_pages` and `--written` file must say what the guest wrote,
and `diff --written` of the snapshot must unpack byte-exact. On both fault paths.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import test_hotpath
from helpers import WAIT, Procs, one_build_store, wait_for
from helpers import fcsnap_here as fcsnap  # in this process: diff and unpack of what was served
from test_daemon import Daemon
from test_restore import guest_memory
from test_restore_faults import KILLED

from fcsnap.daemon.client import call_daemon
from fcsnap.store.format.manifest import read_manifest
from fcsnap.testing import firecracker
from fcsnap.units import PAGE
from fcsnap.workingset import parse_page_set, read_working_set, write_working_set

path = test_hotpath.path  # the fixture that runs a test on both fault paths
MiB = 1 << 20
SIZE = 8 * MiB
PAGES = SIZE // PAGE
# Pages the guest writes: in both regions, a run across their border, single pages, zero
# pages of the build among them; and pages a balloon gives back, some written afterwards.
WRITES = [(0, 16 * PAGE), (1 * MiB, 16 * PAGE), (SIZE // 2 - 4 * PAGE, 8 * PAGE),
          (6 * MiB, 2 * PAGE), (7 * MiB + 5 * PAGE, PAGE)]
BALLOON = [(1 * MiB + 8 * PAGE, 16 * PAGE), (3 * MiB, 4 * PAGE)]


def offsets(ranges: list[tuple[int, int]]) -> list[int]:
    return sorted({o for start, n in ranges for o in range(start, start + n, PAGE)})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one raw build, "vm", of 8 MiB (its memory file next to the store)."""
    return one_build_store(tmp_path_factory.mktemp("wp"), SIZE, seed=23)


def run(procs: Procs, store: Path, server_args: tuple[str, ...], **vm: object
        ) -> tuple[dict, dict, list[str]]:
    """Serve "vm" to a stand-in that reads, balloons, writes WRITES, dumps and reports its
    pagemap; (stats, report, server stderr), both having exited 0."""
    written = procs.tmp / "written.ws"
    server = procs.server("vm", store, "--written", str(written), *server_args)
    options = dict(expected=store.parent / "vm.mem", threads=4, regions=2, order="random",
                   write=WRITES, balloon=BALLOON, dump=procs.tmp / "snapshot.mem",
                   pagemap=True)
    out = procs.outcome(server, procs.vm(**{**options, **vm}))
    assert out.vm_status == 0 and out.status == 0, (out.stderr, out.report)
    assert out.report is not None and out.report["mismatches"] == 0, out.report
    assert out.stats is not None
    return out.stats, out.report, out.stderr


def check_tracked(procs: Procs, store: Path, stats: dict, report: dict) -> None:
    """What the guest wrote is what the server says it wrote, every page it did not write is
    still write-protected, and the next generation made from the written set alone is the
    snapshot, byte for byte."""
    wrote = offsets(WRITES)
    assert report["written"] == wrote
    assert stats["written_pages"] == len(wrote)
    pagemap = report["pagemap"]
    assert pagemap["writable"] == wrote
    assert sorted(pagemap["protected"] + pagemap["writable"]) == list(range(0, SIZE, PAGE))
    written_set = read_working_set(procs.tmp / "written.ws", SIZE).tolist()
    assert written_set == sorted(set(wrote) | set(offsets(BALLOON)))  # balloon: zeros now
    served = (store / "vms" / "vm").read_text().strip()  # the set says what it differs from
    against = parse_page_set((procs.tmp / "written.ws").read_bytes(), "written set")[2]
    assert str(against) == served
    snapshot = procs.tmp / "snapshot.mem"
    done = fcsnap("diff", snapshot, "--base", "vm", "--written", procs.tmp / "written.ws",
                  "--store", store, "--json")
    assert done.returncode == 0, done.stderr
    build = store / json.loads(done.stdout)["build_id"]
    assert read_manifest(build).stats.bytes_stored <= len(written_set) * PAGE
    unpacked = procs.tmp / "next.mem"
    assert fcsnap("unpack", build, "-o", unpacked, "--store", store).returncode == 0
    assert unpacked.read_bytes() == snapshot.read_bytes()


@pytest.mark.parametrize("registration", ["vmm", "track-writes"])
def test_writes_are_seen_and_diff_written_is_byte_exact(store, procs, path, registration
                                                        ) -> None:
    """The VMM registered MISSING|WP (E2B), or MISSING only and the server adds WP."""
    stand_in = {"wp": True} if registration == "vmm" else {}
    args = ("--track-writes",) if registration == "track-writes" else ()
    stats, report, _ = run(procs, store, args, **stand_in)
    assert stats["write_tracking"] == ("registered" if registration == "vmm" else "added")
    assert stats["wp_faults"] > 0  # read first, then written: write-protect faults
    if path == "compiled":
        assert stats["compiled_faults"] > 0
    check_tracked(procs, store, stats, report)


INSTALLS = {"fault-around": ("--fault-around", "256K"), "adaptive": ("--fault-around", "adaptive"),
            "prefetch": ("--prefetch-ws", "WS"), "populate": ("--populate",),
            "eager": ("--eager",)}
OUTSIDE = {"prefetch", "populate", "eager"}


@pytest.mark.parametrize(("path", "how"), [
    pytest.param(path, how, id=f"{path}-{name}",
                 # by default, the Python path with its own fault-around windows; installs
                 # made outside the fault loop (working set, populate, eager) on it: slow
                 marks=[pytest.mark.slow] if path == "python" and name in OUTSIDE else [])
    for path in ("compiled", "python") for name, how in INSTALLS.items()
], indirect=["path"])
def test_every_kind_of_install_goes_in_protected(store, procs, path, how) -> None:
    """Windows around a fault, the working set, populate and eager install pages the guest
    did not ask for (zero pages among them): all write-protected; the guest writes some it
    never read (write faults on missing pages: installed writable, noted written)."""
    if how[-1] == "WS":  # every other page, in the region's border run and zero pages too
        write_working_set(procs.tmp / "ws", SIZE, range(0, SIZE, 2 * PAGE))
        how = (how[0], str(procs.tmp / "ws"))
    stats, report, _ = run(procs, store, how, wp=True, touch=0.3)
    assert stats["zero_pages"] > 0
    check_tracked(procs, store, stats, report)


@pytest.mark.parametrize("window", ["256K", "adaptive"])
def test_windows_leave_zero_pages_out(store, procs, path, window) -> None:
    """A fault-around window in write-protected memory brings the data pages around a fault
    but not its zero pages (each would be a page allocated and copied, where the guest mostly
    writes a zero page when it first uses it): the guest only writes WRITES, so the zero
    pages served are among those it wrote, and data pages it never touched came in
    protected."""
    stats, report, _ = run(procs, store, ("--track-writes", "--fault-around", window),
                           touch=0, balloon=None, dump=None)
    zero = ~np.fromfile(store.parent / "vm.mem", np.uint8).reshape(PAGES, PAGE).any(axis=1)
    wrote = offsets(WRITES)
    pagemap = report["pagemap"]
    assert pagemap["writable"] == wrote
    assert pagemap["protected"], "no window brought a page the guest did not ask for"
    # the build's zero runs are zero pages of the file; of them only the written came in
    assert 0 < stats["zero_pages"] <= int(zero[np.array(wrote) // PAGE].sum())
    assert read_working_set(procs.tmp / "written.ws", SIZE).tolist() == wrote


def test_tracked_vm_is_never_left_without_its_server(store, procs) -> None:
    """Every page installed (--populate) does not make a tracked VM independent: its next
    write to a protected page would wait for the server forever, so SIGTERM kills it."""
    server = procs.server("vm", store, "--populate", "--track-writes")
    vm = procs.vm(expected=store.parent / "vm.mem", touch=0.1, threads=1, hold=WAIT)
    wait_for(procs.report.exists, "the VM to finish its reads")
    wait_for(lambda: guest_memory(vm.pid) >= SIZE, "the server to populate all guest memory")
    server.send_signal(signal.SIGTERM)
    out = procs.outcome(server, vm)
    assert out.vm_status == KILLED
    assert out.stats is not None and out.stats["pages_served"] == PAGES


def test_hugetlb_memory_registered_wp_is_tracked(store, procs, hugepages) -> None:
    """2 MiB pages registered MISSING|WP (the Python path serves them): the pages written,
    in 4 KiB pages, and every other page still write-protected."""
    huge = 2 * MiB
    server = procs.server("vm", store, "--written", str(procs.tmp / "written.ws"))
    out = procs.outcome(server, procs.vm(
        expected=store.parent / "vm.mem", page_size="2M", wp=True, threads=2,
        write=[(huge, huge), (3 * huge, huge)], pagemap=True))
    assert out.vm_status == 0 and out.status == 0, (out.stderr, out.report)
    assert out.report is not None and out.report["mismatches"] == 0
    wrote = list(range(huge, 2 * huge, PAGE)) + list(range(3 * huge, 4 * huge, PAGE))
    assert out.stats is not None and out.stats["written_pages"] == len(wrote)
    assert out.report["pagemap"]["writable"] == wrote
    assert len(out.report["pagemap"]["protected"]) == SIZE // PAGE - len(wrote)
    assert read_working_set(procs.tmp / "written.ws", SIZE).tolist() == wrote


def test_hugetlb_memory_the_kernel_cannot_protect_is_refused(store, procs, hugepages) -> None:
    """--track-writes on hugetlb memory whose uffd lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
    one line, the VM killed rather than served untracked."""
    server = procs.server("vm", store, "--track-writes")
    out = procs.outcome(server, procs.vm(size=SIZE, page_size="2M", threads=1))
    assert out.status == 1
    assert "cannot write-protect the 2048 KiB-page region" in out.error
    assert out.vm_status != 0


def test_track_writes_is_refused_where_the_kernel_resolves_the_faults(store, procs) -> None:
    """A uffd made with UFFD_FEATURE_WP_ASYNC: no write-protect fault would reach the
    server, so --track-writes would track nothing: one line, the VM killed."""
    server = procs.server("vm", store, "--track-writes")
    out = procs.outcome(server, procs.vm(size=SIZE, wp_async=True, threads=1))
    assert out.status == 1
    assert "UFFD_FEATURE_WP_ASYNC" in out.error
    assert out.vm_status != 0


def test_diff_written_refuses_what_does_not_fit(store, tmp_path: Path) -> None:
    """A memory file of the wrong size, a written set of other geometry, a damaged written
    set, one taken against another build, or one given with --sparse-diff: one line each, no
    build."""
    builds = sorted(p.name for p in store.iterdir())
    memfile = store.parent / "vm.mem"
    good = tmp_path / "good.ws"
    write_working_set(good, SIZE, [0, PAGE])
    other = tmp_path / "other.ws"
    write_working_set(other, 2 * SIZE, [0])
    elsewhere = tmp_path / "elsewhere.ws"  # taken while another build was served
    write_working_set(elsewhere, SIZE, [0, PAGE], base=uuid.uuid4())
    truncated = tmp_path / "truncated.ws"
    truncated.write_bytes(good.read_bytes()[:-3])
    short = tmp_path / "short.mem"
    short.write_bytes(memfile.read_bytes()[: SIZE // 2])
    for args, status, says in [
        ((short, "--written", good), 1, f"{SIZE // 2} bytes, but base build"),
        ((memfile, "--written", other), 1, f"a written set of {2 * SIZE} bytes"),
        ((memfile, "--written", truncated), 1, "holds 13 bytes of offsets"),
        ((memfile, "--written", elsewhere), 1, "a written set of a VM restored from build"),
        ((memfile, "--written", tmp_path / "absent.ws"), 1, "absent.ws"),
        ((memfile, "--written", good, "--sparse-diff"), 2, "--written takes no --sparse-diff"),
    ]:
        done = fcsnap("diff", *args, "--base", "vm", "--store", store)
        assert done.returncode == status, (args, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and says in lines[0], (args, lines)
    assert sorted(p.name for p in store.iterdir()) == builds


def test_daemon_gives_the_written_set_and_starts_new_intervals(store, tmp_path: Path) -> None:
    """GET /restores/ID/written: the set so far; with new_interval=1 the pages in it are
    write-protected again with the take, so the next interval holds exactly its own writes,
    pages written again included."""
    daemon = Daemon(store, tmp_path)
    try:
        status, answer = daemon.call("POST", "/restores", {
            "vm": "vm", "socket": str(tmp_path / "vm.sock"), "track_writes": True})
        assert status == 201, answer
        first, second = [(0, 8 * PAGE), (2 * MiB, 4 * PAGE)], [(4 * PAGE, 8 * PAGE)]
        gate = tmp_path / "gate"
        vm = firecracker.spawn(tmp_path / "vm.sock", expected=store.parent / "vm.mem",
                               report=tmp_path / "vm.json", threads=2, write=first,
                               second_write=second, gate=gate, deadline=WAIT)
        deadline = time.monotonic() + WAIT
        while not (tmp_path / "vm.json").exists() or not firecracker.read_report(
                tmp_path / "vm.json").get("first_write_done"):
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        url = f"/restores/{answer['id']}/written"
        assert written(daemon.api, url, answer["build_id"]) == offsets(first)
        assert written(daemon.api, url + "?new_interval=1") == offsets(first)
        assert written(daemon.api, url) == []
        gate.touch()
        assert vm.wait(WAIT) == 0
        document = daemon.wait_ended(answer["id"])
        assert document["written_pages"] == len(offsets(second))
        status, error = daemon.call("GET", url)
        assert status == 409 and "has ended" in error["error"]
    finally:
        daemon.close()


def restore_writing_end_ws(daemon: Daemon, tmp_path: Path) -> dict:
    """POST a restore of "vm" that tracks writes and writes its written set to end.ws when it
    ends (the daemon started with --output-dir tmp_path); the daemon's answer."""
    status, answer = daemon.call("POST", "/restores", {
        "vm": "vm", "socket": str(tmp_path / "vm.sock"), "track_writes": True,
        "written": str(tmp_path / "end.ws")})
    assert status == 201, answer
    return answer


def test_a_new_interval_names_no_build(store, tmp_path: Path) -> None:
    """After GET written?new_interval=1 the pages differ from what its client made of the
    take, not from the build served: the sets, GET's and the `written` file at the end, name
    no build (version 1), so diff --written takes the client's build as --base and does not
    take the build served, which lacks the first interval's writes."""
    daemon = Daemon(store, tmp_path, "--output-dir", str(tmp_path))
    try:
        answer = restore_writing_end_ws(daemon, tmp_path)
        first, second = [(0, 8 * PAGE)], [(4 * PAGE, 8 * PAGE)]
        gate = tmp_path / "gate"
        vm = firecracker.spawn(tmp_path / "vm.sock", expected=store.parent / "vm.mem",
                               report=tmp_path / "vm.json", threads=2, write=first,
                               second_write=second, gate=gate, deadline=WAIT)
        wait_for(lambda: (tmp_path / "vm.json").exists() and firecracker.read_report(
            tmp_path / "vm.json").get("first_write_done"), "the first writes")
        url = f"/restores/{answer['id']}/written"
        assert written(daemon.api, url + "?new_interval=1", answer["build_id"]) == offsets(
            first)
        assert written_set(daemon.api, url) == ([], None)
        gate.touch()
        assert vm.wait(WAIT) == 0
        daemon.wait_ended(answer["id"])
        size, found, base = parse_page_set((tmp_path / "end.ws").read_bytes(), "end.ws")
        assert found.tolist() == offsets(second) and base is None
    finally:
        daemon.close()


def written(api: Path, url: str, against: str | None = None) -> list[int]:
    """The written set the daemon answers with, as offsets; with `against`, the build it
    must say its pages differ from."""
    found, base = written_set(api, url)
    assert against is None or base == uuid.UUID(against), (base, against)
    return found


def written_set(api: Path, url: str) -> tuple[list[int], uuid.UUID | None]:
    """The written set the daemon answers with: (offsets, the build they differ from, None
    where it names none)."""
    from fcsnap.unix_http import UnixHTTPConnection, exchange

    connection = UnixHTTPConnection(api, WAIT)
    try:
        answer, body = exchange(connection, "GET", url, b"", {}, 1 << 20)
    finally:
        connection.close()
    assert answer.status == 200, body
    size, found, base = parse_page_set(body, url)
    assert size == SIZE
    assert int(answer.getheader("X-Fcsnap-Written-Pages")) == len(found)
    return found.tolist(), base


def test_daemon_written_set_is_refused_where_writes_are_not_tracked(store, tmp_path: Path
                                                                     ) -> None:
    daemon = Daemon(store, tmp_path)
    try:
        status, answer = daemon.call("POST", "/restores", {
            "vm": "vm", "socket": str(tmp_path / "vm.sock")})
        assert status == 201
        status, error = call_daemon(daemon.api, "GET", f"/restores/{answer['id']}/written",
                                    None, WAIT)
        assert status == 409 and "does not track writes" in error["error"]
        status, error = daemon.call("GET", f"/restores/{answer['id']}/written?new_interval=2")
        assert status == 400 and "new_interval must be 1 or 0" in error["error"]
    finally:
        daemon.close()


def test_python_api_tracks_writes_and_diffs_the_written_set(tmp_path: Path) -> None:
    """restore(track_writes=..., written=...) and Store.diff(written=...), as the CLI."""
    import fcsnap

    store = fcsnap.Store(one_build_store(tmp_path, SIZE, seed=5))
    sock, written_set, snapshot = tmp_path / "uffd.sock", tmp_path / "w.ws", tmp_path / "s.mem"
    vms: list = []

    def listening(_build_dir: Path) -> None:
        vms.append(firecracker.spawn(sock, expected=tmp_path / "vm.mem", threads=2,
                                     write=WRITES, dump=snapshot, deadline=WAIT))

    try:
        served = store.restore("vm", sock, on_listening=listening, track_writes=True,
                               written=written_set, handshake_timeout=WAIT)
    finally:
        for vm in vms:
            if vm.poll() is None:
                vm.kill()
            vm.wait(timeout=WAIT)
    assert (served.status, vms[0].returncode) == (0, 0)
    assert served.stats.wp_faults == len(offsets(WRITES))
    assert read_working_set(written_set, SIZE).tolist() == offsets(WRITES)
    build = store.diff(snapshot, base="vm", written=written_set)
    unpacked = fcsnap.unpack(build.path, tmp_path / "next.mem", store=store.path)
    assert unpacked.read_bytes() == snapshot.read_bytes()


@pytest.mark.parametrize("where", ["missing/written.ws", "."], ids=["no-directory", "a-directory"])
def test_a_written_file_that_cannot_be_written_is_refused_before_listening(
        store, procs, where) -> None:
    target = procs.tmp / where
    server = procs.server("vm", store, "--written", str(target))
    out = procs.outcome(server, None)
    assert out.status == 1
    assert out.error.startswith(f"fcsnap: error: cannot write --written {target}")
    assert not procs.socket.exists()
