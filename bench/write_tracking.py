"""Write tracking's cost: per fault with tracking against without, by kind of fault.

Two synthetic guests, one all data pages and one all zero pages, are packed raw and served to
the Firecracker stand-in, one page per fault (`--fault-around 0`: the server's cost per fault
in full), one thread touching every page in order and then writing every page (`--write`),
server and stand-in pinned to CPU 0 (`taskset -c 0`) and not pinned. Three sides, on the
compiled fault path (and with `--paths compiled,python` the pure-Python one too), --repeat
times in rotation, the order of the sides reversed every other round (medians count):

    untracked     memory registered MISSING (Firecracker), no tracking
    vmm-wp        memory registered MISSING|WP by the VMM (E2B's Firecracker)
    track-writes  registered MISSING, `restore --track-writes` adds WP after the handshake

Each side runs twice per round: reading every page (a read fault each: microseconds per fault
as the guest sees it, the touch pass's time over the faults, and as the server spends it, the
mean of its own fault-latency histogram, from reading a fault to waking the guest), and reading
then writing every page (microseconds per first write of a page the guest had read, the write
pass's time over its pages, which includes the stand-in's Python per page: a write-protect
fault each when tracking, none without; and the server's time per write-protect fault, its
histogram's total in this run less the read run's, over the write-protect faults).

Then the next generation from a written set: 5% of the pages (scattered, random) of a guest
with 60% zero pages changed in a Full memory file, `diff --written` of it against `diff` of
the whole file and against the copy floor (the written pages read with one pread per run and
written to a file, fsynced), page cache warm, medians of --repeat runs.

Last, the kernel's part of each install, timed in C (bench/c/wp_installs.c, compiled with cc
at bench time) on a range of its own registered MISSING|WP, no fault, best of 5: a data page
with UFFDIO_COPY with and without UFFDIO_COPY_MODE_WP; the ways to install a zero page
write-protected: UFFDIO_ZEROPAGE alone (not protected: the reference), UFFDIO_COPY of zeros
with UFFDIO_COPY_MODE_WP (what fcsnap does), UFFDIO_ZEROPAGE then UFFDIO_WRITEPROTECT (racy:
a write from another thread between the two is missed); and UFFDIO_WRITEPROTECT lifting the
protection of a page (what resolving a write-protect fault costs the kernel). One page per
ioctl, and 16 (a fault-around window).

    python3 bench/write_tracking.py [--size 64M] [--repeat 5] [--paths compiled] [--workdir DIR]
    python3 bench/write_tracking.py --diff-only [--size 256M] [--repeat 9] [--workdir DIR]

With --diff-only, only the next generation's table (bench/results/diff-written.{md,json}).
"""

from __future__ import annotations

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402

from fcsnap.store.format.layout import resolve_build  # noqa: E402
from fcsnap.store.operations import ops  # noqa: E402
from fcsnap.store.operations.builder import BuildOptions  # noqa: E402
from fcsnap.store.operations.scan import consecutive_runs  # noqa: E402
from fcsnap.testing import firecracker  # noqa: E402
from fcsnap.testing.memimage import synthetic_memory, write_full  # noqa: E402
from fcsnap.units import PAGE, parse_size  # noqa: E402
from fcsnap.workingset import write_working_set  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = {"untracked": ((), {}), "vmm-wp": ((), {"wp": True}),
         "track-writes": (("--track-writes",), {})}
DEADLINE_S = 300.0
GUESTS = ("data", "zeros")
INSTALLS_SOURCE = Path(__file__).resolve().parent / "c" / "wp_installs.c"


def serve_once(work: Path, size: int, build: str, side: str, path: str, pinned: bool,
               write: bool) -> dict[str, float]:
    """One restore of the whole guest `build`, read (then written, with `write`); its
    per-fault figures."""
    server_args, standin = SIDES[side]
    sock, stats, report = work / "uffd.sock", work / "stats.json", work / "vm.json"
    for path_ in (stats, report):
        path_.unlink(missing_ok=True)
    env = dict(os.environ, FCSNAP_PURE_PYTHON="1" if path == "python" else "0")
    pin = ["taskset", "-c", "0"] if pinned else []
    server = subprocess.Popen(
        [*pin, sys.executable, "-m", "fcsnap", "restore", "--vm", build, "--store",
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
    served_us = s["fault_latency"]["mean_us"] * s["fault_latency"]["count"]
    if write:
        return {"write_us": r["write_s"] / (size // PAGE) * 1e6, "wp_faults": s["wp_faults"],
                "served_total_us": served_us}
    return {"read_us": r["touch_s"] / s["faults"] * 1e6,
            "serve_us": s["fault_latency"]["mean_us"], "faults": s["faults"],
            "served_total_us": served_us}


def one_side(work: Path, size: int, build: str, side: str, path: str, pinned: bool
             ) -> dict[str, float]:
    """A read run and a read-then-write run of one side; the server's µs per write-protect
    fault is what the second served beyond the first, per write-protect fault."""
    read = serve_once(work, size, build, side, path, pinned, write=False)
    written = serve_once(work, size, build, side, path, pinned, write=True)
    extra = written.pop("served_total_us") - read.pop("served_total_us")
    wp = written["wp_faults"]
    return {**read, **written, "serve_wp_us": extra / wp if wp else float("nan")}


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


def installs(work: Path, run: int, pages: int = 4096, rounds: int = 5) -> dict[str, float]:
    """ns per page of each install (the module docstring), `run` pages per ioctl, best of
    `rounds`, timed by bench/c/wp_installs.c."""
    binary = work / "wp_installs"
    if not binary.exists():
        subprocess.run(["cc", "-O2", "-o", str(binary), str(INSTALLS_SOURCE)], check=True)
    done = subprocess.run([str(binary), str(pages), str(run), str(rounds)], check=True,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    return json.loads(done.stdout)


def ratio(row: dict[str, float], base: dict[str, float], key: str) -> str:
    return f"{row[key]:.2f} | {row[key] / base[key]:.2f}x"


def markdown(r: dict[str, Any]) -> str:
    size, repeat = r["size"], r["repeat"]
    before, after = r["load_average"]["before"][0], r["load_average"]["after"][0]
    lines = [
        "# Write tracking: cost per fault",
        "",
        f"`python3 bench/write_tracking.py --size {size >> 20}M --repeat {repeat} --paths "
        f"{','.join(r['paths'])}`: {size >> 20} MiB synthetic guests (all data pages, all zero "
        "pages), raw, one page per fault, one thread reading every page in order and then "
        f"writing every page; pinned to one CPU and not; medians of {repeat} runs in rotation "
        "(sides reversed every other round). Ratios are against `untracked` on the same "
        f"guest, path and pinning. Load average {before:.1f} before and {after:.1f} after, on "
        f"{os.cpu_count()} CPUs.",
        "",
        "| guest | pinned | side | path | µs per read fault, guest | ratio | µs per read "
        "fault, server | ratio | µs per first write, guest | µs per WP fault, server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in r["rows"].items():
        guest, pin, side, path = key.split("/")
        base = r["rows"][f"{guest}/{pin}/untracked/{path}"]
        wp = "-" if side == "untracked" else f"{row['serve_wp_us']:.2f}"
        lines.append(f"| {guest} | {pin} | {side} | {path} | {ratio(row, base, 'read_us')} | "
                     f"{ratio(row, base, 'serve_us')} | {row['write_us']:.2f} | {wp} |")
    lines += ["", *diff_markdown(size, repeat, r["diff_s"])]
    lines += ["", "The kernel's part of an install on a MISSING|WP range, timed in C (ns per "
              "4 KiB page, best of 5, no fault):", "",
              "| install | 1 page per ioctl | 16 pages per ioctl |", "|---|---|---|"]
    one, window = r["installs_ns"]["1"], r["installs_ns"]["16"]
    lines += [f"| {name} | {ns:.0f} | {window[name]:.0f} |" for name, ns in one.items()]
    return "\n".join(lines) + "\n"


def diff_markdown(size: int, repeat: int, diffs: dict[str, float]) -> list[str]:
    floor = diffs["copy floor"]
    lines = [f"The next generation, 5% of {size >> 20} MiB written (seconds, page cache "
             f"warm, median of {repeat}):", "", "| how | s | against the copy floor |",
             "|---|---|---|"]
    return lines + [f"| {name} | {s:.3f} | {s / floor:.1f}x |" for name, s in diffs.items()]


def diff_only(work: Path, size: int, repeat: int) -> int:
    """--diff-only: the next generation's table alone, in its own results file."""
    write_full(work / "vm.mem", synthetic_memory(size, seed=1))
    ops.pack(work / "vm.mem", work / "store", BuildOptions(name="vm"))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="64M")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--paths", default="compiled",
                        help="fault paths, comma-separated: compiled, python")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--diff-only", action="store_true",
                        help="only the next generation's costs (bench/results/diff-written.*)")
    args = parser.parse_args()
    size = parse_size(args.size)
    paths = args.paths.split(",")
    if not set(paths) <= {"compiled", "python"}:
        parser.error(f"--paths {args.paths}: compiled, python")
    load_before = os.getloadavg()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fcsnap-wt-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.diff_only:
        return diff_only(work, size, args.repeat)
    pages = size // PAGE
    data = synthetic_memory(size, seed=1, zero_share=0.0)
    data[:, :8] = np.arange(1, pages + 1, dtype=np.uint64).view(np.uint8).reshape(pages, 8)
    for name, memory in (("data", data), ("zeros", np.zeros((pages, PAGE), np.uint8)),
                         ("vm", synthetic_memory(size, seed=1))):
        write_full(work / f"{name}.mem", memory)
        ops.pack(work / f"{name}.mem", work / "store", BuildOptions(name=name))
    runs: dict[str, list[dict[str, float]]] = {}
    for i in range(args.repeat):
        for pin in ("pinned", "unpinned"):
            for guest in GUESTS:
                for path in paths:
                    for side in list(SIDES)[:: -1 if i % 2 else 1]:  # no side always first
                        print(f"{i + 1}/{args.repeat}: {guest} {pin} {side} ({path})",
                              file=sys.stderr)
                        runs.setdefault(f"{guest}/{pin}/{side}/{path}", []).append(
                            one_side(work, size, guest, side, path, pin == "pinned"))
    rows = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
            for key, rs in runs.items()}
    result = {"size": size, "repeat": args.repeat, "paths": paths, "machine": machine(),
              "rows": rows, "runs": runs, "diff_s": diff_costs(work, size, args.repeat),
              "installs_ns": {str(n): installs(work, n) for n in (1, 16)},
              "load_average": {"before": load_before, "after": os.getloadavg()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "write-tracking.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (RESULTS / "write-tracking.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
