"""The fault hot path: the compiled loop (fastpath.py, csrc/fastpath.c) against the pure-Python
installer, on real userfaultfd and real builds; and --verify installing only checked bytes.

The compiled path must give the same results as Python: the same pages installed from the same
sources, the same bookkeeping and stats. Both serve the same random fault sequences here, each
on its own uffd-registered copy of the guest, and the outcomes are compared page by page.
Whole restores (stand-in, threads, balloon, truncation) run on both paths too, through the
FCSNAP_PURE_PYTHON switch the server reads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import test_restore
from helpers import WAIT, Lineage, check_served, restore, wait_serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_restore import PAGE

from fcsnap.header import load_header
from fcsnap.store.format.layout import DIFF_RAW
from fcsnap.store.format.source import open_diffs
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd import abi, fastpath
from fcsnap.uffd.installer import DONE, RETRY, Installer, InstallStats, Outcome
from fcsnap.uffd.pages import PageSource, VerifyError, hash_tables
from fcsnap.uffd.regions import Region, RegionMap

GUEST = 16 << 20
lineages = test_restore.lineages  # the fixtures, shared
needs_compiled = pytest.mark.skipif(
    fastpath.lib is None, reason="the compiled fault path is not built (no C compiler)")


@dataclass(frozen=True)
class Guest:
    memory: np.ndarray  # (pages, PAGE) uint8
    build: Path
    store: Path


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """A 16 MiB guest with zero pages and repeated (deduplicated) pages, packed raw."""
    root = tmp_path_factory.mktemp("hotpath")
    memory = synthetic_memory(GUEST, seed=7)
    memory[100:140] = memory[10]  # one stored block serves many pages
    write_full(root / "mem", memory)
    _, build = ops.pack(root / "mem", root / "store", BuildOptions(block_size=PAGE))
    return Guest(memory, build, root / "store")


class Served:
    """One uffd-registered anonymous copy of the guest and an installer serving it."""

    def __init__(self, guest: Guest, fault_around: int, budget: int, verify: bool = False,
                 features: int = 0):
        self.header = load_header(guest.build)
        self.diffs = open_diffs(self.header, guest.store)
        hashes = hash_tables(self.diffs) if verify else None
        self.pages = PageSource(self.header, self.diffs, hashes, budget)
        self.uffd = abi.userfaultfd()
        abi.api_handshake(self.uffd, features)
        self.addr = abi.mmap_anonymous(GUEST)
        abi.register(self.uffd, self.addr, GUEST)
        self.stats = InstallStats()
        regions = RegionMap([Region(self.addr, GUEST, 0, PAGE)])
        self.installer = Installer(self.uffd, regions, self.pages, self.stats, fault_around)
        self.state = self.installer.states[self.addr]

    def remove(self, first: int, count: int) -> None:
        """What a balloon does (MADV_DONTNEED) and what the server does with its REMOVE."""
        abi.madvise(self.addr + first * PAGE, count * PAGE, abi.MADV_DONTNEED)
        self.installer.remove(self.addr + first * PAGE, self.addr + (first + count) * PAGE)

    def page(self, i: int) -> bytes:
        """A present page's bytes (reading a missing one would wait for a fault forever)."""
        assert self.state.present[i]
        return ctypes.string_at(self.addr + i * PAGE, PAGE)

    def close(self) -> None:
        os.close(self.uffd)
        abi.munmap(self.addr, GUEST)
        for diff in self.diffs.values():
            diff.close()


steps = st.lists(
    st.one_of(
        st.tuples(st.just("fault"), st.integers(0, GUEST // PAGE - 1), st.integers(0, PAGE - 1)),
        st.tuples(st.just("remove"), st.integers(0, GUEST // PAGE - 1), st.integers(1, 80)),
    ),
    min_size=1, max_size=60,
)


def assert_paths_agree(python: Served, compiled: Served, fast: fastpath.FastPath,
                       guest: Guest) -> None:
    """The Python and the compiled path left the same pages (each the guest's bytes, or zeros
    where ballooned) and the same stats."""
    fast.add_stats(compiled.stats)
    assert np.array_equal(python.state.present, compiled.state.present)
    assert np.array_equal(python.state.removed, compiled.state.removed)
    for i in np.flatnonzero(python.state.present).tolist():
        expected = bytes(PAGE) if python.state.removed[i] else guest.memory[i].tobytes()
        assert python.page(i) == compiled.page(i) == expected, f"page {i}"
    for name in ("pages_served", "bytes_served", "zero_pages", "installs",
                 "already_present", "per_build_pages"):
        assert getattr(python.stats, name) == getattr(compiled.stats, name), name


@needs_compiled
@pytest.mark.parametrize("fault_around", [0, 64 << 10, 256 << 10])
@pytest.mark.parametrize("budget", [64 << 20, 4 << 20], ids=["mapped", "bounded"])
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=steps)
def test_compiled_and_python_serve_the_same(guest, fault_around, budget, sequence) -> None:
    """The same faults and balloon removes through each path leave the same pages present,
    with the same bytes, and the same stats."""
    python = Served(guest, fault_around, budget)
    compiled = Served(guest, fault_around, budget)
    try:
        fast = fastpath.FastPath(compiled.installer)
        pages = GUEST // PAGE
        for kind, page, extra in sequence:
            if kind == "remove":
                count = min(extra, pages - page)
                python.remove(page, count)
                compiled.remove(page, count)
                continue
            address = python.addr + page * PAGE + extra
            assert python.installer.fault(address) is DONE
            outcome = fastpath.lib.fp_fault(fast.ctx, compiled.addr + page * PAGE + extra)
            if outcome == fastpath.lib.FP_DEFER:  # what the server does with it
                assert compiled.installer.fault(compiled.addr + page * PAGE + extra) is DONE
            else:
                assert outcome == fastpath.lib.FP_DONE
        assert_paths_agree(python, compiled, fast, guest)
    finally:
        python.close()
        compiled.close()


@needs_compiled
def test_huge_page_faults_go_back_to_python(guest) -> None:
    """A fault the compiled path does not handle (a huge-page region) comes back untouched."""
    s = Served(guest, 0, 64 << 20)
    try:
        huge = Installer(s.uffd, RegionMap([Region(s.addr, GUEST, 0, 2 << 20)]), s.pages,
                         s.stats, 0)
        fast = fastpath.FastPath(huge)
        assert fastpath.lib.fp_fault(fast.ctx, s.addr + 5) == fastpath.lib.FP_DEFER
        assert not huge.states[s.addr].present.any()
    finally:
        s.close()


@needs_compiled
def test_eagain_and_eexist_on_both_paths(guest) -> None:
    """A page already in place (EEXIST) counts as served; a fault met while a balloon's REMOVE
    is unread (EAGAIN) installs nothing and is left for a retry, which succeeds once the
    event is read; a removed page goes back to Python. Both paths end the same."""
    sides = [Served(guest, 0, 64 << 20, features=abi.UFFD_FEATURE_EVENT_REMOVE)
             for _ in range(2)]
    python, compiled = sides
    try:
        fast = fastpath.FastPath(compiled.installer)
        lib = fastpath.lib

        def fault_compiled(page: int) -> int:
            return lib.fp_fault(fast.ctx, compiled.addr + page * PAGE)

        def fault_python(page: int) -> Outcome:
            return python.installer.fault(python.addr + page * PAGE)

        for s in sides:  # page 20 put in place behind the installer's back
            abi.copy(s.uffd, s.addr + 20 * PAGE, abi.buffer_address(guest.memory[20]), PAGE)
        assert (fault_python(20), fault_compiled(20)) == (DONE, lib.FP_DONE)
        balloons = []
        for s in sides:  # madvise waits until the server has read its REMOVE
            balloons.append(threading.Thread(
                target=abi.madvise, args=(s.addr + 2 * PAGE, 5 * PAGE, abi.MADV_DONTNEED)))
            balloons[-1].start()
            poller = select.poll()
            poller.register(s.uffd, select.POLLIN)
            assert poller.poll(int(WAIT * 1000)), "no REMOVE event"
        assert (fault_python(12), fault_compiled(12)) == (RETRY, lib.FP_RETRY)
        assert not python.state.present[12] and not compiled.state.present[12]
        for s, balloon in zip(sides, balloons, strict=True):
            [event] = abi.read_events(s.uffd)
            assert type(event) is abi.Remove
            s.installer.remove(event.start, event.end)
            balloon.join(WAIT)
            assert not balloon.is_alive()
        assert (fault_python(12), fault_compiled(12)) == (DONE, lib.FP_DONE)
        assert (fault_python(3), fault_compiled(3)) == (DONE, lib.FP_DEFER)
        assert compiled.installer.fault(compiled.addr + 3 * PAGE) is DONE
        assert_paths_agree(python, compiled, fast, guest)
        assert (python.stats.already_present, python.stats.pages_served) == (1, 2)
    finally:
        for s in sides:
            s.close()


def test_verify_installs_exactly_the_checked_bytes(guest) -> None:
    """Under --verify a deduplicated block is checked again at each install, and installed
    from the copy that was checked: bytes changed in the diff after the first check never
    reach the guest."""
    s = Served(guest, 0, 64 << 20, verify=True)
    try:
        assert s.installer.fault(s.addr + 100 * PAGE) is DONE  # block of page 10, checked
        assert s.page(100) == guest.memory[10].tobytes()
        m = s.header.mappings[s.header.mapping_index(100 * PAGE)]
        storage = m.storage_offset + (100 * PAGE - m.offset)
        diff = guest.build / DIFF_RAW
        original = os.pread(os.open(diff, os.O_RDONLY), PAGE, storage)
        changed = bytes(b ^ 0xFF for b in original)
        source = s.pages.locate(101 * PAGE, PAGE)  # checked, not yet installed
        _write(diff, storage, changed)
        try:
            # The file changed between the check and the install: the copy holds the check.
            assert ctypes.string_at(source.address, PAGE) == original
            with pytest.raises(VerifyError, match="does not match its hash"):
                s.installer.fault(s.addr + 102 * PAGE)  # same block, after the change
            assert not s.state.present[102]
            with pytest.raises(VerifyError):  # fault-around windows are checked as well
                s.installer.fault_around = 256 << 10
                s.installer.fault(s.addr + 120 * PAGE)
            assert s.state.present[100] and not s.state.present[101:140].any()
        finally:
            _write(diff, storage, original)
    finally:
        s.close()


def _write(path: Path, offset: int, data: bytes) -> None:
    """Write into a (read-only) build file in place, as a damaging process would."""
    path.chmod(0o644)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# -- whole restores on both paths ------------------------------------------------------------


@pytest.fixture(params=["compiled", "python"])
def path(request, monkeypatch) -> str:
    """Run the server (a subprocess, which inherits the environment) on one path."""
    if request.param == "compiled" and fastpath.lib is None:
        pytest.skip("the compiled fault path is not built (no C compiler)")
    monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1" if request.param == "python" else "0")
    return request.param


def compiled_share(stats: dict, path: str) -> None:
    """The compiled path served the faults it could, the Python one none."""
    if path == "compiled":
        assert stats["compiled_faults"] > 0
    else:
        assert stats["compiled_faults"] == 0


@pytest.mark.parametrize("fault_around", ["0", "256K"])
def test_restore_on_both_paths(lineages, procs, path, fault_around) -> None:
    lineage: Lineage = lineages[("none", PAGE)]
    out = restore(procs, lineage, ("--fault-around", fault_around), threads=1)
    check_served(out, lineage)
    compiled_share(out.stats, path)
    if fault_around == "0":
        assert out.stats["pages_served"] == out.stats["faults"]


def test_threads_and_balloon_on_both_paths(lineages, procs, path) -> None:
    """Threads faulting the same pages (EEXIST, waking) and REMOVE events mid-run."""
    lineage: Lineage = lineages[("none", PAGE)]
    out = restore(procs, lineage, ("--fault-around", "64K"), threads=4, shared_pages=True,
                  balloon=[(64 * PAGE, 32 * PAGE)], balloon_cycles=3, order="random")
    check_served(out, lineage)
    assert out.stats["remove_events"] >= 1
    compiled_share(out.stats, path)


def test_truncated_diff_on_both_paths(lineages, procs, path, tmp_path) -> None:
    """A diff cut short under a running server: one error line, the VM killed, never zeros."""
    lineage = lineages[("none", PAGE)].writable_copy(tmp_path / "store")
    server = procs.server(lineage.newest.name, lineage.store, "--fault-around", "0",
                          quiet=False)
    wait_serving(server)  # cut after the server opened it
    gate = tmp_path / "start-gate"  # the VM touches once the diff is cut
    vm = procs.vm(expected=lineage.expected, threads=1, start_gate=gate)
    diff = lineage.newest / DIFF_RAW
    os.truncate(diff, diff.stat().st_size // 2)
    gate.touch()
    out = procs.outcome(server, vm)
    assert out.status == 1
    assert "truncated" in out.error or "changed size" in out.error
    assert out.vm_status != 0


def test_pure_python_switch_in_a_subprocess() -> None:
    """FCSNAP_PURE_PYTHON=1 turns the compiled path off; otherwise it is on when built."""
    code = "from fcsnap.uffd import fastpath; print(fastpath.compiled())"
    env = {**os.environ, fastpath.PURE_PYTHON_ENV: "1"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=WAIT)
    assert off.stdout.strip() == "False"
    env[fastpath.PURE_PYTHON_ENV] = "0"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=WAIT)
    assert on.stdout.strip() == str(fastpath.lib is not None)


def test_missing_compiled_module_means_pure_python() -> None:
    """Installed without a C compiler, the module is absent: Python serves, nothing fails."""
    code = ("import sys; sys.modules['fcsnap.uffd._fastpath'] = None\n"
            "from fcsnap.uffd import fastpath; print(fastpath.compiled())")
    env = {k: v for k, v in os.environ.items() if k != fastpath.PURE_PYTHON_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=WAIT)
    assert (out.returncode, out.stdout.strip()) == (0, "False"), out.stderr


def test_build_without_a_c_compiler_goes_on(tmp_path) -> None:
    """The in-place build that `pip install -e .` runs, with a C compiler that fails: a
    warning, exit 0, no modules, and the tree then serves on the pure-Python path."""
    root = Path(__file__).resolve().parent.parent
    tree = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    for name in ("fcsnap", "csrc"):
        shutil.copytree(root / name, tree / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(root / name, tree / name)
    env = {k: v for k, v in os.environ.items() if k != fastpath.PURE_PYTHON_ENV}
    env["CC"] = shutil.which("false") or "false"
    built = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                           env=env, capture_output=True, text=True, timeout=WAIT * 4)
    assert built.returncode == 0, built.stderr
    assert "compiled modules not built" in built.stdout + built.stderr
    assert not list((tree / "fcsnap" / "uffd").glob("_fastpath*"))
    assert not list((tree / "fcsnap" / "store" / "operations").glob("_blockscan*"))
    code = ("import fcsnap; from fcsnap.uffd import fastpath; "
            "from fcsnap.store.operations import blockscan; "
            "print(fcsnap.__file__, fastpath.compiled(), blockscan.lib is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree,
                         env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                         timeout=WAIT)
    assert out.stdout.split() == [str(tree / "fcsnap" / "__init__.py"), "False", "True"], (
        out.stderr)


# -- the uffd bindings: architecture and features ---------------------------------------------


def test_syscall_number_by_architecture() -> None:
    assert abi.syscall_number("x86_64") == 323
    assert abi.syscall_number("aarch64") == 282
    with pytest.raises(abi.UffdError, match="userfaultfd on riscv64") as e:
        abi.syscall_number("riscv64")  # a wrong number would call another system call
    assert e.value.errno == errno.ENOSYS


def test_kernel_features_are_probed() -> None:
    """The features come from UFFDIO_API on this kernel, and a uffd accepts what it offers."""
    offered = abi.kernel_features()
    assert offered & abi.UFFD_FEATURE_EVENT_REMOVE  # 4.11+: every kernel fcsnap runs on
    fd = abi.userfaultfd()
    try:
        assert abi.api_handshake(fd, offered) == offered
    finally:
        os.close(fd)


@needs_compiled
def test_compiled_wait_releases_the_gil(guest) -> None:
    """While a reactor waits or serves in C (fp_wait), Python threads (other reactors) run."""
    s = Served(guest, 0, 64 << 20)
    poller = select.epoll()
    try:
        fast = fastpath.FastPath(s.installer)
        uffd = s.installer.uffd
        poller.register(uffd, select.EPOLLIN)
        table = fastpath.ffi.new("struct fp_ctx *[]", uffd + 1)
        table[uffd] = fast.ctx
        ready = fastpath.ffi.new("int[]", 8)
        timer = fastpath.lib.fp_timer()
        assert timer >= 0
        waited: list[int] = []
        t = threading.Thread(target=lambda: waited.append(
            fastpath.lib.fp_wait(poller.fileno(), table, len(table), 500, 10, timer, ready, 8)))
        start = time.monotonic()
        t.start()
        spins = 0
        while time.monotonic() - start < 0.3:  # inside fp_wait's epoll_wait the whole time
            spins += 1
        assert t.is_alive() and spins > 10_000
        t.join(WAIT)
        assert not t.is_alive() and waited == [0]  # a timeout: nothing for Python
        os.close(timer)
    finally:
        poller.close()
        s.close()
