"""`fcsnap demo`: the whole product in one command on a fresh machine.

Packs two generations of guest memory into a temporary store, inspects the newest, restores it
over userfaultfd to the test suite's Firecracker stand-in (a separate process that registers its
memory, hands over the uffd, faults from several threads and balloons), and checks every byte.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from fcsnap.api import Build, Store
from fcsnap.errors import FcsnapError
from fcsnap.render import table
from fcsnap.testing import firecracker, guest
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.units import format_bytes


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


def run_demo(threads: int = 4) -> None:
    with tempfile.TemporaryDirectory(prefix="fcsnap-demo-") as tmp:
        work = Path(tmp)
        store = Store(work / "store")
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
        sock, report_path = work / "uffd.sock", work / "vm.json"
        vm = firecracker.spawn(
            sock, expected=gen1, threads=threads, order="random",
            balloon=[(0, 1 << 20)], report=report_path, deadline=120,
        )
        started = time.monotonic()
        try:
            served = store.restore(b1.path, sock)
        finally:
            if vm.poll() is None:
                vm.kill()
            vm.wait(timeout=30)
        elapsed = time.monotonic() - started
        vm_report = firecracker.read_report(report_path)
        if vm.returncode != 0 or vm_report["mismatches"]:
            raise FcsnapError(
                f"demo failed: the VM saw {vm_report['mismatches']} wrong pages "
                f"(exit {vm.returncode})"
            )
        s = served.stats
        print(
            f"   {s.faults} faults, {s.pages_served} pages installed "
            f"({format_bytes(s.bytes_served)}, {s.zero_pages} zero), {s.remove_events} "
            f"balloon REMOVE events, in {elapsed:.2f}s"
        )
        print(
            f"   every byte matched: {vm_report['pages_touched']} page reads "
            f"checked against the snapshot, balloon pages read zero: {vm_report['balloon_ok']}"
        )
