"""Scaffolding the test modules share: lineages of builds, the restore command line, hugepages,
the processes a test starts, and what a clean serving run must leave behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from fcsnap.store.format.layout import diff_path
from fcsnap.store.format.manifest import Manifest, read_manifest
from fcsnap.store.operations import ops
from fcsnap.testing import firecracker
from fcsnap.units import PAGE

WAIT = 30.0  # seconds any one process may take before the test fails
CLI_WAIT = 120.0  # seconds one fcsnap command may take (a pack on a loaded machine)
STATS_KEYS = {
    "faults", "pages_served", "bytes_served", "zero_pages", "remove_events", "retries",
    "per_build_pages", "duration_s",
}


@dataclass(frozen=True)
class Lineage:
    """Generations of one VM in one store, oldest first, and each one's memory as a full
    memory file (`images[-1]`, the newest's, is what a restore must serve)."""

    store: Path
    builds: list[Path]
    images: list[Path]
    block_size: int = PAGE

    @property
    def newest(self) -> Path:
        return self.builds[-1]

    @property
    def expected(self) -> Path:
        return self.images[-1]

    @property
    def build_ids(self) -> list[str]:
        return [b.name for b in self.builds]

    @property
    def manifests(self) -> list[Manifest]:
        return [read_manifest(b) for b in self.builds]

    @property
    def base_diff(self) -> Path:
        """Generation 0's diff file: most of the newest generation's pages come from it."""
        return diff_path(self.builds[0])

    def writable_copy(self, dest: Path) -> Lineage:
        """A copy of the store that a test may damage (builds are read-only once written)."""
        shutil.copytree(self.store, dest)
        for path in dest.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        return replace(self, store=dest, builds=[dest / b.name for b in self.builds])


def fcsnap(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None,
           timeout: float = CLI_WAIT) -> subprocess.CompletedProcess[str]:
    """Run the `fcsnap` command line of this tree (this interpreter) to the end, with a
    deadline, stdin closed, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "fcsnap", *map(str, args)], capture_output=True, text=True,
        timeout=timeout, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
    )


_HERE = threading.Lock()


def fcsnap_here(*args: object, env: dict[str, str] | None = None, cwd: Path | None = None,
                timeout: float = CLI_WAIT) -> subprocess.CompletedProcess[str]:
    """Run one `fcsnap` command in this process, as `fcsnap()` runs it in its own: the same
    entry point (fcsnap.cli.main), so the same exit status, stdout and stderr, without the
    half second an interpreter and its imports cost. For a command a test runs to set up or
    to look at a store; tests of the process itself (signals, pipes, exit codes) use `fcsnap()`.
    The command runs on a thread, so that it has a deadline; `env` replaces the environment
    and `cwd` the working directory while it runs."""
    from fcsnap import cli, scratch
    from fcsnap.cli import common

    argv = list(map(str, args))
    out, err = io.StringIO(), io.StringIO()
    status: list[int] = []

    def command() -> None:
        try:
            cli.main(argv)
        except SystemExit as e:
            code = e.code
            status.append(0 if code is None else code if isinstance(code, int) else 1)

    with _HERE:  # one at a time: stdout, stderr, the environment and cwd are the process's
        saved, saved_cwd = dict(os.environ), os.getcwd()
        saved_state = dict(cli._state), dict(common.state)  # what one command line sets
        # what the command leaves for its process's exit to remove goes when it returns
        saved_tempdir, tempfile.tempdir = tempfile.tempdir, tempfile.mkdtemp(prefix="fcsnap-here-")
        try:
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                thread = threading.Thread(target=command, name=f"fcsnap {' '.join(argv[:1])}")
                thread.start()
                thread.join(timeout)
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved)
            cli._state.update(saved_state[0])
            common.state.update(saved_state[1])
            scratch.release_all(Path(tempfile.tempdir))  # as the process's exit would
            shutil.rmtree(tempfile.tempdir, ignore_errors=True)
            tempfile.tempdir = saved_tempdir
    if thread.is_alive():
        pytest.fail(f"fcsnap {' '.join(argv)} did not end within {timeout:g}s")
    assert status, f"fcsnap {' '.join(argv)} ended without an exit status: {err.getvalue()}"
    return subprocess.CompletedProcess(["fcsnap", *argv], status[0], out.getvalue(),
                                       err.getvalue())


def wait_serving(server: subprocess.Popen[bytes]) -> None:
    """Wait (with a deadline) until a restore run without --quiet announces that it serves:
    its build open, pinned and held (its socket listens earlier, while the build opens). The
    announcement is read off its stderr, so what it prints after is all its outcome sees."""
    assert server.stderr is not None
    if not select.select([server.stderr], [], [], WAIT)[0]:
        raise AssertionError("the restore did not announce that it serves in time")
    line = server.stderr.readline().decode()
    assert line.startswith("fcsnap: serving "), line + server.communicate(timeout=WAIT)[1].decode()


def restore_argv(vm: str | Path, socket: Path, *args: str, store: Path | str | None = None,
                 stats: Path | None = None, quiet: bool = True) -> list[str]:
    """The `fcsnap restore` command line, run by this interpreter (and so this tree)."""
    argv = [sys.executable, "-m", "fcsnap", "restore", "--vm", str(vm), "--socket", str(socket),
            *args]
    if store is not None:
        argv += ["--store", str(store)]
    if stats is not None:
        argv += ["--stats", str(stats)]
    if quiet:
        argv.append("--quiet")
    return argv


HUGEPAGE_POOL = Path("/proc/sys/vm/nr_hugepages")


def free_hugepages() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def top_up_hugepages(count: int) -> bool:
    """Grow the pool until `count` 2 MiB hugepages are free (True if it had to), or skip the
    test saying why. Checked before each test that needs them: the pool is machine-wide, and
    other processes change it."""
    if free_hugepages() >= count:
        return False
    try:
        HUGEPAGE_POOL.write_text(str(int(HUGEPAGE_POOL.read_text()) + count - free_hugepages()))
    except OSError as e:
        pytest.skip(f"cannot reserve 2 MiB hugepages ({HUGEPAGE_POOL}: {e.strerror})")
    if free_hugepages() < count:
        pytest.skip(f"the kernel granted only {free_hugepages()} free 2 MiB hugepages, "
                    f"{count} needed")
    return True


class Processes:
    """The processes one test starts: whatever is still running at teardown is killed."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=WAIT)


def one_build_store(root: Path, size: int, seed: int) -> Path:
    """root/store holding one raw build of synthetic memory, named "vm" (no snapfile)."""
    from fcsnap.store.operations.builder import BuildOptions
    from fcsnap.testing.memimage import synthetic_memory, write_full

    write_full(root / "vm.mem", synthetic_memory(size, seed=seed))
    ops.pack(root / "vm.mem", root / "store", BuildOptions(name="vm"))
    return root / "store"


def in_a_fault(pid: int) -> bool:
    """Whether a thread of process `pid` waits in a userfaultfd fault (its page not served)."""
    return any(task.joinpath("wchan").read_text() == "handle_userfault"
               for task in Path(f"/proc/{pid}/task").iterdir())


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def assert_served(vm_status: int | None, status: int | None, stderr: list[str],
                  report: dict[str, Any] | None, stats: dict[str, Any] | None,
                  pages: int | None = None) -> dict[str, Any]:
    """A clean serving run: the VM exited 0 having read only right bytes (`pages` of them, if
    given), the server exited 0 because the VM did, and its page counts add up. Returns the
    server's stats."""
    assert vm_status == 0, (vm_status, report)
    assert status == 0, stderr
    assert report is not None and report["mismatches"] == 0, report
    if pages is not None:
        assert report["pages_touched"] == pages
    assert stats is not None and stats["exit_reason"] == "vm exited", stats
    assert sum(stats["per_build_pages"].values()) + stats["zero_pages"] == stats["pages_served"]
    return stats


def unpacked(build: Path, tmp_path: Path) -> bytes:
    """The memory file `build` unpacks to."""
    out = tmp_path / f"unpacked-{build.name}"
    ops.unpack(build, out)
    data = out.read_bytes()
    out.unlink()
    return data


# -- one restore: the server and a stand-in VM that checks every byte it reads ----------


@dataclass
class Outcome:
    """How one restore ended: the server's status, stderr lines and stats; the VM's status
    and report (None when it wrote none, e.g. because it was killed)."""

    status: int
    stderr: list[str]
    stats: dict[str, Any] | None
    vm_status: int | None
    report: dict[str, Any] | None

    @property
    def error(self) -> str:
        """The server's one error line (it must print exactly one, and no traceback)."""
        assert len(self.stderr) == 1, self.stderr
        assert self.stderr[0].startswith("fcsnap: error: "), self.stderr
        return self.stderr[0]


class Procs(Processes):
    """Starts the server and the VM for a test and kills whatever is left at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.tmp = tmp_path
        self.socket = tmp_path / "uffd.sock"
        self.stats = tmp_path / "stats.json"
        self.report = tmp_path / "vm.json"

    def server(self, vm: str | Path, store: Path | None, *args: str,
               stats: bool = True, quiet: bool = True) -> subprocess.Popen[bytes]:
        argv = restore_argv(vm, self.socket, *args, store=store,
                            stats=self.stats if stats else None, quiet=quiet)
        return self.track(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    def vm(self, **options: Any) -> subprocess.Popen[bytes]:
        options.setdefault("deadline", WAIT)
        options.setdefault("report", self.report)
        return self.track(firecracker.spawn(
            self.socket, popen={"stdout": subprocess.PIPE, "stderr": subprocess.PIPE},
            **options))

    def outcome(self, server: subprocess.Popen[bytes],
                vm: subprocess.Popen[bytes] | None) -> Outcome:
        """Wait (with deadlines) for both processes and collect what they left behind."""
        vm_status = None
        if vm is not None:
            vm.communicate(timeout=WAIT + 10)
            vm_status = vm.returncode
        _, err = server.communicate(timeout=WAIT)
        stats = json.loads(self.stats.read_text()) if self.stats.exists() else None
        report = firecracker.read_report(self.report) if self.report.exists() else None
        return Outcome(server.returncode, err.decode().splitlines(), stats, vm_status, report)


def restore(procs: Procs, lineage: Lineage, server_args: tuple[str, ...] = (),
            **vm_options: Any) -> Outcome:
    """Serve the newest build of `lineage` to a stand-in that checks every byte it reads."""
    server = procs.server(lineage.newest.name, lineage.store, *server_args)
    vm = procs.vm(expected=lineage.expected, **vm_options)
    return procs.outcome(server, vm)


def check_served(out: Outcome, lineage: Lineage, page_size: int = PAGE) -> None:
    """A clean run: the VM saw only right bytes, the server exited 0 by itself, and its stats
    are complete and add up."""
    stats = assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)
    assert stats.keys() >= STATS_KEYS
    assert set(stats["per_build_pages"]) <= set(lineage.build_ids)
    assert stats["bytes_served"] == stats["pages_served"] * page_size
    assert stats["faults"] > 0 and 0 < stats["installs"] <= stats["pages_served"]
    assert stats["duration_s"] > 0


# The start of a hand-written VM (python -c SCRIPT SOCKET MEMFILE): 30 s to live, the memory
# file it must read mapped as `expected`, and its guest memory in two regions.
VM_PREAMBLE = """
import json, mmap, os, random, select, signal, socket, sys, threading
from fcsnap.testing.firecracker import Guest, Reader, Tally, connect, handshake
from fcsnap.uffd import abi
signal.alarm(30)
sock_path, expected_path = sys.argv[1:]
with open(expected_path, "rb") as f:
    expected = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
guest = Guest(len(expected), 4096, 2)
"""

# Four threads fault every page in random orders while the main thread balloons a quarter of
# them away page by page, so REMOVE events arrive amid faults (installs then fail with EAGAIN
# and must be retried, not stranded). Afterwards every ballooned page must read zero and every
# other page as the snapshot says, whatever order things happened in.
BALLOON_RACE_VM = VM_PREAMBLE + """
handshake(connect(sock_path, 10), guest, "v1.12", None)
pages = list(range(0, len(expected), 4096))
ballooned = sorted(random.Random(0).sample(pages, len(pages) // 4))
def touch(seed):
    order = random.Random(seed).sample(pages, len(pages))
    Reader(guest, None, Tally()).check(order)
threads = [threading.Thread(target=touch, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for offset in ballooned:
    abi.madvise(guest.host(offset), 4096, abi.MADV_DONTNEED)
for t in threads:
    t.join()
data, zeros = Tally(), Tally()
Reader(guest, expected, data).check(sorted(set(pages) - set(ballooned)))
Reader(guest, expected, zeros).check(ballooned, want_zero=True)
print(json.dumps({"data": [data.touched, data.mismatches],
                  "zeros": [zeros.touched, zeros.mismatches]}))
"""


def race_the_balloon(procs: Procs, server: subprocess.Popen[bytes],
                     memfile: Path) -> dict[str, Any]:
    """Run BALLOON_RACE_VM against `server`, which serves `memfile`: every page must read
    right, every ballooned one zero, and the server count one REMOVE event per ballooned page.
    Returns the server's stats."""
    vm = procs.track(subprocess.Popen(
        [sys.executable, "-c", BALLOON_RACE_VM, str(procs.socket), str(memfile)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    vm_out, vm_err = vm.communicate(timeout=WAIT + 10)
    out = procs.outcome(server, None)
    assert vm.returncode == 0, vm_err.decode()
    pages = memfile.stat().st_size // PAGE
    assert json.loads(vm_out) == {"data": [pages - pages // 4, 0], "zeros": [pages // 4, 0]}
    assert out.status == 0, out.stderr
    assert out.stats is not None and out.stats["remove_events"] == pages // 4
    return out.stats
