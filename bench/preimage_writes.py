"""What a background checkpoint's copy costs the guest's writes: the first write to a page still
pending (its pre-image kept in Python, then unprotected) against one to a page merely
write-protected again (unprotected by the compiled loop).

A synthetic guest (fcsnap.testing.memimage) is packed raw and served by the daemon to the
Firecracker stand-in with track_writes; the stand-in, one thread, writes PAGES pages, says so,
and once let go writes them all again, timing that pass (`write_s`). Between the two:

    pending    POST checkpoint {"background": true, "copy_rate": 4096}: every page written is
               pending, and the copy, a page a second, reaches almost none of them
    protected  GET written?new_interval=1: the same pages write-protected again, no copy

Medians of --repeat runs of each, in rotation; microseconds per page as the guest sees them.

    python3 bench/preimage_writes.py [--pages 4096] [--repeat 3]

Results: bench/results/preimage-writes.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fcsnap.daemon.client import checkpoint_via_daemon  # noqa: E402
from fcsnap.store.operations import ops  # noqa: E402
from fcsnap.store.operations.builder import BuildOptions  # noqa: E402
from fcsnap.testing import firecracker  # noqa: E402
from fcsnap.testing.memimage import synthetic_memory, write_full  # noqa: E402
from fcsnap.testing.realvmm import Daemon  # noqa: E402
from fcsnap.units import PAGE  # noqa: E402
from fcsnap.unix_http import UnixHTTPConnection, exchange  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEADLINE_S = 120.0
SIZE = 64 << 20


def wait_for(report: Path, key: str, vm: object) -> dict:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if report.exists() and (r := firecracker.read_report(report)).get(key):
            return r
        if vm.poll() is not None or time.monotonic() > deadline:  # type: ignore[attr-defined]
            raise SystemExit(f"the stand-in never said {key}")
        time.sleep(0.01)


def one_run(work: Path, mode: str, pages: int) -> float:
    """Microseconds per page of the second write pass, after `mode`."""
    run = Path(tempfile.mkdtemp(dir=work, prefix=mode))
    report, gate, hold = run / "vm.json", run / "gate", run / "hold"
    with Daemon(work / "store", run) as daemon:
        restore = daemon.restore("vm", run / "vm.sock", "--track-writes")
        ranges = [(0, pages * PAGE)]
        vm = firecracker.spawn(run / "vm.sock", size=SIZE, threads=1, verify_bytes=False,
                               write=ranges, second_write=ranges, gate=gate, last_gate=hold,
                               report=report, deadline=DEADLINE_S)
        try:
            wait_for(report, "first_write_done", vm)
            if mode == "pending":
                checkpoint_via_daemon(daemon.api, restore, "cp", True, PAGE)
            else:
                connection = UnixHTTPConnection(daemon.api, DEADLINE_S)
                try:
                    answer, _ = exchange(connection, "GET",
                                         f"/restores/{restore}/written?new_interval=1", b"",
                                         {}, 1 << 20)
                finally:
                    connection.close()
                assert answer.status == 200
            gate.touch()
            r = wait_for(report, "second_write_done", vm)
        finally:
            hold.touch()
            vm.wait(DEADLINE_S)
    return r["write_s"] / pages * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--pages", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fcsnap-preimage-") as tmp:
        work = Path(tmp)
        write_full(work / "vm.mem", synthetic_memory(SIZE, seed=1))
        ops.pack(work / "vm.mem", work / "store", BuildOptions(name="vm"))
        runs: dict[str, list[float]] = {"pending": [], "protected": []}
        for i in range(a.repeat):
            for mode in list(runs)[:: -1 if i % 2 else 1]:
                runs[mode].append(one_run(work, mode, a.pages))
    medians = {mode: statistics.median(v) for mode, v in runs.items()}
    load = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "preimage-writes.json").write_text(json.dumps(
        {"pages": a.pages, "repeat": a.repeat, "load_average": load, "runs_us": runs,
         "median_us": medians}, indent=1) + "\n")
    text = "\n".join([
        "# First writes during a background checkpoint's copy", "",
        f"{a.pages} pages rewritten by one thread; medians of {a.repeat} runs; load average "
        f"{load:.1f}.", "",
        "| the page is | µs per first write |", "|---|---:|",
        *(f"| {mode} | {us:.1f} |" for mode, us in medians.items())]) + "\n"
    (RESULTS / "preimage-writes.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
