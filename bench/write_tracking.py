"""Write tracking's cost: per fault with tracking against without, and per first write.

One synthetic guest (fcsnap.testing.memimage, 60% zero pages) is packed raw and served to the
Firecracker stand-in, server and stand-in pinned to CPU 0 (`taskset -c 0`), one page per fault
(`--fault-around 0`: the server's cost per fault in full), one thread touching every page in
order and then writing every page (`--write`). Three sides, each on the compiled fault path
and on the pure-Python one, --repeat times in rotation, the order of the sides reversed every
other round (the median counts):

    untracked     memory registered MISSING (Firecracker), no tracking
    vmm-wp        memory registered MISSING|WP by the VMM (E2B's Firecracker)
    track-writes  registered MISSING, `restore --track-writes` adds WP after the handshake

Each side runs twice per round: reading every page (microseconds per read fault as the
guest sees it, the touch pass's time over the faults, and as the server spends it, the mean
of its own fault-latency histogram, from reading a fault to waking the guest), and reading
then writing every page (microseconds per first write of a page the guest had read, the
write pass's time over its pages: a write-protect fault each when tracking, none without).

Then the next generation from a written set: 5% of the pages (scattered, random) changed
in a Full memory file, `diff --written` of it against `diff` of the whole file and against the
copy floor (the written pages read with one pread per run and written to a file, fsynced),
page cache warm, medians of --repeat runs.

Last, the kernel's part of an install, timed in this process on its own uffd (one ioctl
sequence per 4 KiB page, 4096 pages, best of 5, no fault): a data page with UFFDIO_COPY, with
and without UFFDIO_COPY_MODE_WP; and the ways to install a zero page write-protected:
UFFDIO_ZEROPAGE alone (not protected: the reference), UFFDIO_COPY of a zero buffer with
UFFDIO_COPY_MODE_WP (what fcsnap does), and UFFDIO_ZEROPAGE then UFFDIO_WRITEPROTECT (racy: a
write between the two is missed).

    python bench/write_tracking.py [--size 256M] [--repeat 3] [--workdir DIR] [--diff-only]

With --diff-only, only the next generation's table (bench/results/diff-written.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fcsnap.store.format.layout import resolve_build
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.store.operations.scan import consecutive_runs
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd import abi
from fcsnap.units import PAGE, parse_size
from fcsnap.workingset import write_working_set

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = {"untracked": ((), {}), "vmm-wp": ((), {"wp": True}),
         "track-writes": (("--track-writes",), {})}
DEADLINE_S = 300.0


def serve_once(work: Path, size: int, side: str, pure_python: bool, write: bool
               ) -> dict[str, float]:
    """One pinned restore of the whole guest, read (then written, with `write`); its
    per-fault figures."""
    server_args, standin = SIDES[side]
    sock, stats, report = work / "uffd.sock", work / "stats.json", work / "vm.json"
    for path in (stats, report):
        path.unlink(missing_ok=True)
    env = dict(os.environ, FCSNAP_PURE_PYTHON="1" if pure_python else "0")
    pin = ["taskset", "-c", "0"]
    server = subprocess.Popen(
        [*pin, sys.executable, "-m", "fcsnap", "restore", "--vm", "vm", "--store",
         str(work / "store"), "--socket", str(sock), "--stats", str(stats), "--quiet",
         "--fault-around", "0", *server_args], env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"restore did not listen (exit {server.poll()})")
            time.sleep(0.005)
        status = subprocess.run([*pin, *firecracker.command(
            sock, size=size, threads=1, verify_bytes=False,
            write=[(0, size)] if write else None, report=report,
            deadline=DEADLINE_S, **standin)], timeout=DEADLINE_S).returncode
        server_status = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if status or server_status:
        raise RuntimeError(f"{side}: stand-in exit {status}, server exit {server_status}")
    r, s = firecracker.read_report(report), json.loads(stats.read_text())
    if write:
        return {"write_us": r["write_s"] / (size // PAGE) * 1e6, "wp_faults": s["wp_faults"]}
    return {"read_us": r["touch_s"] / s["faults"] * 1e6,
            "serve_us": s["fault_latency"]["mean_us"], "faults": s["faults"]}


def diff_costs(work: Path, size: int, repeat: int, share: float = 0.05) -> dict[str, float]:
    """Seconds (medians) of `diff --written`, `diff` and the copy floor for `share` of the
    pages changed; the module docstring says how."""
    pages = size // PAGE
    changed = np.array(sorted(random.Random(7).sample(range(pages), int(pages * share))))
    memory = np.fromfile(work / "vm.mem", np.uint8).reshape(pages, PAGE)
    memory[changed] = np.random.default_rng(7).integers(0, 256, (len(changed), PAGE), np.uint8)
    memory.tofile(work / "next.mem")
    write_working_set(work / "written.ws", size, (changed * PAGE).tolist())
    base = resolve_build("vm", work / "store")
    times: dict[str, list[float]] = {"diff --written": [], "diff": [], "copy floor": []}
    for _ in range(repeat):
        began = time.perf_counter()
        ops.diff(work / "next.mem", base, work / "store", BuildOptions(),
                 written=work / "written.ws")
        times["diff --written"].append(time.perf_counter() - began)
        began = time.perf_counter()
        ops.diff(work / "next.mem", base, work / "store", BuildOptions())
        times["diff"].append(time.perf_counter() - began)
        began = time.perf_counter()
        copy_floor(work / "next.mem", changed, work / "floor.out")
        times["copy floor"].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_floor(memfile: Path, pages: np.ndarray, out: Path) -> None:
    """The written pages read (a pread per run) and written to `out`, fsynced."""
    fd = os.open(memfile, os.O_RDONLY)
    try:
        with open(out, "wb") as f:
            for first, count in consecutive_runs(pages):
                f.write(os.pread(fd, count * PAGE, first * PAGE))
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)


def installs(pages: int = 4096, rounds: int = 5) -> dict[str, float]:
    """ns per page of each install (the module docstring), best of `rounds`, on a
    MISSING|WP range of this process."""
    zeros = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    zeros_addr = abi.buffer_address(zeros)
    data = mmap.mmap(-1, PAGE)
    data.write(os.urandom(PAGE))
    data_addr = abi.buffer_address(data)
    ways = {
        "data: copy": lambda fd, at: abi.copy(fd, at, data_addr, PAGE),
        "data: copy, MODE_WP": lambda fd, at: abi.copy(fd, at, data_addr, PAGE,
                                                       abi.UFFDIO_COPY_MODE_WP),
        "zeros: zeropage (not protected)": lambda fd, at: abi.zeropage(fd, at, PAGE),
        "zeros: copy of zeros, MODE_WP": lambda fd, at: abi.copy(fd, at, zeros_addr, PAGE,
                                                                 abi.UFFDIO_COPY_MODE_WP),
        "zeros: zeropage then writeprotect": lambda fd, at: (
            abi.zeropage(fd, at, PAGE),
            abi.writeprotect(fd, at, PAGE, abi.UFFDIO_WRITEPROTECT_MODE_WP)),
    }
    best: dict[str, float] = {}
    for name, install in ways.items():
        for _ in range(rounds):
            fd = abi.userfaultfd()
            abi.api_handshake(fd, 0)
            base = abi.mmap_anonymous(pages * PAGE)
            abi.register(fd, base, pages * PAGE,
                         abi.UFFDIO_REGISTER_MODE_MISSING | abi.UFFDIO_REGISTER_MODE_WP)
            began = time.perf_counter_ns()
            for k in range(pages):
                install(fd, base + k * PAGE)
            ns = (time.perf_counter_ns() - began) / pages
            abi.munmap(base, pages * PAGE)
            os.close(fd)
            best[name] = min(best.get(name, ns), ns)
    return best


def markdown(size: int, repeat: int, rows: dict[str, dict[str, float]],
             diffs: dict[str, float], zeros: dict[str, float], load: float) -> str:
    lines = [
        "# Write tracking: cost per fault",
        "",
        f"`python3 bench/write_tracking.py --size {size >> 20}M --repeat {repeat}`: a "
        f"{size >> 20} MiB synthetic guest (60% zero pages), raw, pinned to one CPU, one page "
        "per fault, one thread reading every page in order and then writing every page; "
        f"medians of {repeat} runs in rotation (sides reversed every other round). Ratios are "
        f"against `untracked` on the same path. Load average at the end: {load:.1f} on "
        f"{os.cpu_count()} CPUs (other work on the machine): single runs spread widely.",
        "",
        "| side | path | µs per read fault, guest | ratio | µs per fault, server | ratio "
        "| µs per first write | WP faults |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        side, path = key.split("/")
        base = rows[f"untracked/{path}"]
        lines.append(f"| {side} | {path} | {row['read_us']:.2f} | "
                     f"{row['read_us'] / base['read_us']:.2f}x | {row['serve_us']:.2f} | "
                     f"{row['serve_us'] / base['serve_us']:.2f}x | {row['write_us']:.2f} | "
                     f"{row['wp_faults']:.0f} |")
    lines += ["", *diff_markdown(size, repeat, diffs)]
    lines += ["", "The kernel's part of an install on a MISSING|WP range (ns per 4 KiB page, "
              "best of 5, no fault):", "", "| install | ns per page |", "|---|---|"]
    lines += [f"| {name} | {ns:.0f} |" for name, ns in zeros.items()]
    return "\n".join(lines) + "\n"


def diff_markdown(size: int, repeat: int, diffs: dict[str, float]) -> list[str]:
    floor = diffs["copy floor"]
    lines = [f"The next generation, 5% of {size >> 20} MiB written (seconds, page cache "
             f"warm, median of {repeat}):", "", "| how | s | against the copy floor |",
             "|---|---|---|"]
    return lines + [f"| {name} | {s:.3f} | {s / floor:.1f}x |" for name, s in diffs.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--diff-only", action="store_true",
                        help="only the next generation's costs (bench/results/diff-written.*)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fcsnap-wt-"))
    work.mkdir(parents=True, exist_ok=True)
    write_full(work / "vm.mem", synthetic_memory(size, seed=1))
    ops.pack(work / "vm.mem", work / "store", BuildOptions(name="vm"))
    if args.diff_only:
        return diff_only(work, size, args.repeat)
    runs: dict[str, list[dict[str, float]]] = {}
    for i in range(args.repeat):
        for path in ("compiled", "python"):
            for side in list(SIDES)[:: -1 if i % 2 else 1]:  # no side always runs first
                print(f"{i + 1}/{args.repeat}: {side} ({path})", file=sys.stderr)
                read = serve_once(work, size, side, path == "python", write=False)
                runs.setdefault(f"{side}/{path}", []).append(
                    {**read, **serve_once(work, size, side, path == "python", write=True)})
    rows: dict[str, Any] = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
                            for key, rs in runs.items()}
    diffs = diff_costs(work, size, args.repeat)
    zeros = installs()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "write-tracking.json").write_text(json.dumps(
        {"size": size, "repeat": args.repeat, "load_average": os.getloadavg(), "rows": rows,
         "diff_s": diffs, "installs_ns": zeros}, indent=2) + "\n")
    text = markdown(size, args.repeat, rows, diffs, zeros, os.getloadavg()[0])
    (RESULTS / "write-tracking.md").write_text(text)
    print(text)
    return 0



def diff_only(work: Path, size: int, repeat: int) -> int:
    """--diff-only: the next generation's table alone, in its own results file."""
    diffs = diff_costs(work, size, repeat)
    load = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "diff-written.json").write_text(json.dumps(
        {"size": size, "repeat": repeat, "load_average": load, "diff_s": diffs}, indent=2) + "\n")
    text = "\n".join([
        "# diff --written against the copy floor", "",
        f"`python3 bench/write_tracking.py --diff-only --size {size >> 20}M --repeat {repeat}` "
        f"(in one process; load average at the end {load:.1f} on {os.cpu_count()} CPUs).", "",
        *diff_markdown(size, repeat, diffs)]) + "\n"
    (RESULTS / "diff-written.md").write_text(text)
    print(text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
