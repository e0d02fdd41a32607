"""`fcsnap demo`: the whole product in one command on a fresh machine.

Packs two generations of guest memory into a temporary store, inspects the newest, restores it
over userfaultfd to the test suite's Firecracker stand-in (a separate process that registers its
memory, hands over the uffd, faults from several threads and balloons), and checks every byte.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fcsnap.api import Build, Store
from fcsnap.errors import FcsnapError
from fcsnap.render import table
from fcsnap.testing import firecracker, guest
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.uffd.installer import InstallStats
from fcsnap.uffd.server import FaultServer, ServeOptions
from fcsnap.uffd.support import userfaultfd_problem
from fcsnap.units import format_bytes

DEADLINE = 120.0  # seconds the restore step may take; the stand-in gives up at this too


def _memory_files(work: Path) -> tuple[Path, Path, str]:
    """Two consecutive memory files: the real-guest fixture when present, else synthetic."""
    if guest.available():
        images = guest.read_lineage(work)
        return images[-2], images[-1], "memory of a real Linux guest (fixtures/guest)"
    print("guest fixture not found; using synthetic guest memory")
    mem0 = synthetic_memory(64 << 20, seed=1)
    mem1, _ = evolve(mem0, seed=2, dirty_share=0.05)
    write_full(work / "gen0.mem", mem0)
    write_full(work / "gen1.mem", mem1)
    return work / "gen0.mem", work / "gen1.mem", "synthetic guest memory (64 MiB)"


def _counts(build: Build) -> str:
    """Where every block of the generation went: the counts add up to its total."""
    s = build.stats
    return (
        f"{s.blocks_total} blocks: {s.blocks_stored} stored, {s.blocks_zero} zero, "
        f"{s.blocks_deduplicated} deduplicated, {s.blocks_inherited} inherited -> "
        f"{format_bytes(s.bytes_written)} on disk"
    )


def _last_line(log: Path) -> str:
    """The stand-in's last line of output (its error), for a one-line failure."""
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no output"


class _StandIn:
    """The stand-in VM, started once the server listens (as a real restore starts
    Firecracker), and a thread watching it through a pidfd: if it exits with a failure or
    outlives DEADLINE, the server is stopped with one line instead of waiting on."""

    def __init__(self, work: Path, expected: Path, threads: int) -> None:
        self.work, self.expected, self.threads = work, expected, threads
        self.report = work / "vm.json"
        self.log = work / "vm.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: FaultServer | None = None
        self._done_r, self._done_w = os.pipe()

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = firecracker.spawn(
                self.work / "uffd.sock", popen={"stdout": out, "stderr": out},
                expected=self.expected, threads=self.threads, order="random",
                balloon=[(0, 1 << 20)], report=self.report, deadline=DEADLINE,
            )
        threading.Thread(target=self._watch, args=(self.proc,), daemon=True).start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([pidfd, self._done_r], [], [], DEADLINE + 10)
        finally:
            os.close(pidfd)
        if self._done_r in ready or self.server is None:
            return
        if not ready:
            self.server.fail(FcsnapError(
                f"demo failed: the stand-in VM was not done within {DEADLINE + 10:g}s"
            ))
        elif proc.poll():  # exited with a failure: a VM the server may still be waiting for
            self.server.fail(FcsnapError(
                f"demo failed: the stand-in VM exited with status {proc.returncode}: "
                f"{_last_line(self.log)}"
            ))

    def end(self) -> int | None:
        """Stop the watch, kill the stand-in if it still runs; its exit status (None if it
        was never started)."""
        os.write(self._done_w, b"x")
        status = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            status = self.proc.wait(timeout=30)
        os.close(self._done_r)
        os.close(self._done_w)
        return status


def _restore(build: Path, expected: Path, work: Path, threads: int
             ) -> tuple[InstallStats, dict[str, Any], float]:
    """Serve `build` to the stand-in; (the server's stats, the stand-in's report, seconds)."""
    vm = _StandIn(work, expected, threads)
    server = vm.server = FaultServer(
        build, ServeOptions(socket=work / "uffd.sock", on_listening=vm.start)
    )
    started = time.monotonic()
    try:
        server.run()
    finally:
        status = vm.end()
    elapsed = time.monotonic() - started
    if server.exit_reason == "signal":  # Ctrl-C or SIGTERM: the stand-in was killed
        raise KeyboardInterrupt
    if not vm.report.exists():
        raise FcsnapError(
            f"demo failed: the stand-in VM exited with status {status} without a report: "
            f"{_last_line(vm.log)}"
        )
    report = firecracker.read_report(vm.report)
    if status != 0 or report["mismatches"]:
        raise FcsnapError(
            f"demo failed: the VM saw {report['mismatches']} wrong pages (exit {status})"
        )
    return server.stats, report, elapsed


def run_demo(threads: int = 4) -> None:
    problem = userfaultfd_problem()
    if problem is not None:
        raise FcsnapError(f"demo needs userfaultfd: {problem}")
    with tempfile.TemporaryDirectory(prefix="fcsnap-demo-") as tmp:
        work = Path(tmp)
        store = Store.init(work / "store")
        gen0, gen1, what = _memory_files(work)
        print(f"1. pack {what}: {format_bytes(gen0.stat().st_size)}")
        b0 = store.pack(gen0, name="demo")
        print(f"   generation 0, {_counts(b0)}")
        print("2. diff the next snapshot, zstd-compressed")
        b1 = store.diff(gen1, base=b0.path, compress="zstd", name="demo")
        print(f"   generation 1, {_counts(b1)}")
        print("3. inspect the newest build")
        report = store.inspect(b1.path).report
        rows = [
            (row["build_id"], str(row["generation"]), str(row["blocks"]), f"{row['share']:.1%}")
            for row in report["builds"]
        ]
        zero = report["zero"]
        rows.append(("(zeros)", "", str(zero["bytes"] // b1.block_size), f"{zero['share']:.1%}"))
        print(table(("build", "generation", "blocks", "share"), rows, left=("build",)))
        print(
            f"4. restore generation 1 to a Firecracker stand-in ({threads} faulting threads, "
            "balloon) and check every byte"
        )
        s, vm_report, elapsed = _restore(b1.path, gen1, work, threads)
        print(
            f"   {s.faults} faults, {s.pages_served} pages installed "
            f"({format_bytes(s.bytes_served)}, {s.zero_pages} zero), {s.remove_events} "
            f"balloon REMOVE events, in {elapsed:.2f}s"
        )
        print(
            f"   every byte matched: {vm_report['pages_touched']} page reads "
            f"checked against the snapshot, balloon pages read zero: {vm_report['balloon_ok']}"
        )
