"""`fcsnap demo`: the whole product in one command on a fresh machine.

Packs two generations of guest memory into a temporary store, inspects the newest, restores it
over userfaultfd to the test suite's Firecracker stand-in (a separate process that registers its
memory, hands over the uffd, faults from several threads and balloons), and checks every byte.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.inspection import inspect_report
from fcsnap.store import ops
from fcsnap.store.builder import BuildOptions
from fcsnap.testing import firecracker, guest
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.uffd.server import FaultServer, ServeOptions
from fcsnap.units import format_bytes


def _memory_files(work: Path, console: Console) -> tuple[Path, Path, str]:
    """Two consecutive memory files: the real-guest fixture when present, else synthetic."""
    if guest.available():
        images = guest.read_lineage(work)
        return images[-2], images[-1], "memory of a real Linux guest (fixtures/guest)"
    console.print("[yellow]guest fixture not found; using synthetic guest memory[/yellow]")
    mem0 = synthetic_memory(64 << 20, seed=1)
    mem1, _ = evolve(mem0, seed=2, dirty_share=0.05)
    write_full(work / "gen0.mem", mem0)
    write_full(work / "gen1.mem", mem1)
    return work / "gen0.mem", work / "gen1.mem", "synthetic guest memory (64 MiB)"


def run_demo(console: Console, threads: int = 4) -> None:
    with tempfile.TemporaryDirectory(prefix="fcsnap-demo-") as tmp:
        work = Path(tmp)
        store = work / "store"
        gen0, gen1, what = _memory_files(work, console)
        console.print(f"[bold]1. pack[/bold] {what}: {format_bytes(gen0.stat().st_size)}")
        m0, b0 = ops.pack(gen0, store, BuildOptions(name="demo"))
        console.print(
            f"   generation 0: {m0.stats.blocks_stored} blocks stored, {m0.stats.blocks_zero} "
            f"zero, {m0.stats.blocks_deduplicated} deduplicated -> "
            f"{format_bytes(m0.stats.bytes_written)}"
        )
        console.print("[bold]2. diff[/bold] the next snapshot, zstd-compressed")
        m1, b1 = ops.diff(gen1, b0, store, BuildOptions(compression="zstd", name="demo"))
        console.print(
            f"   generation 1: {m1.stats.blocks_stored} new blocks, {m1.stats.blocks_inherited}"
            f" inherited -> {format_bytes(m1.stats.bytes_written)} on disk"
        )
        console.print("[bold]3. inspect[/bold] the newest build")
        report = inspect_report(load_header(b1), store)
        table = Table("build", "generation", "blocks", "share")
        for row in report["builds"]:
            table.add_row(row["build_id"], str(row["generation"]), str(row["blocks"]),
                          f"{row['share']:.1%}")
        table.add_row("(zeros)", "", "", f"{report['zero']['share']:.1%}")
        console.print(table)
        console.print(
            f"[bold]4. restore[/bold] generation 1 to a Firecracker stand-in ({threads} "
            "faulting threads, balloon) and check every byte"
        )
        sock, report_path = work / "uffd.sock", work / "vm.json"
        vm = firecracker.spawn(
            sock, expected=gen1, threads=threads, order="random",
            balloon=[(0, 1 << 20)], report=report_path, deadline=120,
        )
        server = FaultServer(b1, ServeOptions(socket=sock))
        started = time.monotonic()
        try:
            server.run()
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
        s = server.stats
        console.print(
            f"   {s.faults} faults, {s.pages_served} pages installed "
            f"({format_bytes(s.bytes_served)}, {s.zero_pages} zero), {s.remove_events} "
            f"balloon REMOVE events, in {elapsed:.2f}s"
        )
        console.print(
            f"   [green]every byte matched[/green]: {vm_report['pages_touched']} page reads "
            f"checked against the snapshot, balloon pages read zero: {vm_report['balloon_ok']}"
        )
