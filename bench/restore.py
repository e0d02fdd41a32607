"""Restore speed: how soon a restored guest has its working set, and all of its memory.

One synthetic guest image (fcsnap.testing.memimage, 60% zero pages) is written as a Full memory
file on the real disk and packed raw with `fcsnap pack`. Each mode then serves it to the
Firecracker stand-in (fcsnap.testing.firecracker), a separate process whose threads first touch
a fixed random working set (--ws-fraction of the pages, random order) and then every page
(sequentially, each thread its own contiguous share). The stand-in starts touching right after
the handshake and reports `ws_s` and `all_s`, both from its first touch:

    (a)  fcsnap restore --fault-around 0            one page per fault
    (b)  fcsnap restore --fault-around 64K|256K|1M  install the window around a fault
    (c)  fcsnap restore --prefetch-ws WS            a build packed with --working-set WS (the
                                                    pages a recording run faulted) first
    (c2) the same plus --populate                   then every other page in the background
    (d)  fcsnap restore --eager                     every page before serving any fault
    (e)  the stand-in's --file-backend              Firecracker's File backend on the unpacked
                                                    memory file, page cache warm and cold

Every mode runs pinned (server and stand-in on CPU 0, `taskset -c 0`) and unpinned, --repeat
times in rotation; the median counts. Timed runs skip the stand-in's byte compare; one
correctness run per mode (unpinned, bytes compared, every touch timed) comes first. Last, an
RSS check serves a 4 GiB guest (sparse image, two regions) with --cache-mb 64.

The per-fault table (`--per-fault`, or alone with `--per-fault-only`) puts fcsnap next to a
minimal C page server (bench/c/fault_handler.c, compiled with cc at bench time: the memory file
in memory, one UFFDIO_COPY per fault, a poll loop) in the same run, with one thread touching
every page in order: one page per fault pinned (both on CPU 0; also the kernel floor, the
same C loop copying from one fixed buffer with no lookup), 256 KiB windows on both sides
unpinned, and one page per fault with 4 threads in random order. fcsnap runs with its compiled
fault path and with FCSNAP_PURE_PYTHON=1, and with `--baseline TREE` also with the compiled
path of another checkout (before and after a change, in one run).

The time-to-working-set table (`--time-to-ws`, or alone with `--time-to-ws-only`; bench/ttw.py)
puts fcsnap's default (adaptive fault-around), its fixed windows and --prefetch-ws next to the
same C server and to the copy floor (the working set's pages copied with UFFDIO_COPY from the
warm diff, no guest), all pinned, one stand-in thread.

With `--corpus DIR` (bench/corpus.py output: gen0.mem, gen1.mem, ... and manifest.json) the
guest is real: the newest generation's memory file, packed the same way, and the results
(restore-corpus.md/json/png) carry the corpus's own figures from its manifest.

    python bench/restore.py [--size 1G | --corpus DIR] [--workdir DIR] [--repeat 3]
                            [--rss-size 4G] [--keep] [--per-fault | --per-fault-only]
                            [--baseline TREE]
                            [--time-to-ws | --time-to-ws-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ttw
from machine import drop_caches, filesystem, machine

from fcsnap.testing import firecracker
from fcsnap.testing.memimage import synthetic_memory, write_full, write_sparse_diff
from fcsnap.units import parse_size
from fcsnap.workingset import parse_working_set

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20
QUIET_BUSY = 0.10  # timed runs wait until the CPUs are at most this busy (other work)...
QUIET_PATIENCE_S = 180.0  # ...for up to this long, then run anyway and record it
HOLD_S = 1.0  # the stand-in stays alive this long after its report: the server's RSS is read then
DEADLINE_S = 600.0  # a stand-in run that takes longer is stuck
SEED = 1


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    restore: tuple[str, ...] = ()  # fcsnap restore flags
    prefetch: bool = False  # --prefetch-ws the recorded working set, from the ws-first build
    file_backend: bool = False  # no server: the stand-in maps the unpacked memory file
    cold: bool = False  # drop the page cache first
    old_default: bool = False  # `restore` flags spell the old default: leave out if missing


MODES = [
    Mode("a", "(a) one page per fault", ("--fault-around", "0"), old_default=True),
    Mode("b64K", "(b) fault-around 64K", ("--fault-around", "64K")),
    Mode("b256K", "(b) fault-around 256K", ("--fault-around", "256K")),
    Mode("b1M", "(b) fault-around 1M", ("--fault-around", "1M")),
    Mode("c", "(c) ws prefetch, fault-around 256K", ("--fault-around", "256K"), prefetch=True),
    Mode("c2", "(c2) ws prefetch + populate", ("--fault-around", "256K", "--populate"),
         prefetch=True),
    Mode("d", "(d) eager", ("--eager",)),
    Mode("e-warm", "(e) File backend, cache warm", file_backend=True),
    Mode("e-cold", "(e) File backend, cache cold", file_backend=True, cold=True),
]


@dataclass
class Setup:
    """The files every run uses."""

    work: Path
    memfile: Path  # Full memory file
    unpacked: Path  # `fcsnap unpack` of the build: the File backend's memory file
    build: Path
    size: int
    data_share: float  # of pages non-zero
    threads: int
    ws_fraction: float
    ws_file: Path | None = None  # recorded working set
    ws_build: Path | None = None  # packed with --working-set
    restore_flags: set[str] = field(default_factory=set)

    @property
    def warm_files(self) -> list[Path]:
        builds = [b for b in (self.build, self.ws_build) if b is not None]
        return [self.unpacked, *(f for b in builds for f in b.iterdir() if f.is_file())]


@dataclass
class Run:
    """One stand-in run and, for uffd modes, what the server said about it."""

    ws_s: float
    all_s: float
    minor_faults: int
    faults: int | None = None
    installs: int | None = None
    pages_served: int | None = None
    prefetched_pages: int | None = None
    populated_pages: int | None = None
    retries: int | None = None
    prefetch_s: float | None = None  # the server's handshake to the end of its prefetch
    compiled_faults: int | None = None  # faults the compiled path served
    server_duration_s: float | None = None
    hwm_mib: float | None = None  # server VmHWM just before the VM exits
    anon_mib: float | None = None  # server RssAnon then
    file_mib: float | None = None  # server RssFile then (mapped diff file pages)
    latency: dict[str, Any] | None = None
    busy_before: float | None = None  # CPU busy share just before the run (other work)

    @property
    def faults_per_s(self) -> float | None:
        """Faults over the window they happen in: the guest's first touch to its last."""
        return None if self.faults is None else self.faults / self.all_s


@dataclass
class Result:
    mode: Mode
    pinned: bool
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None

    def median(self, name: str) -> float | None:
        values = [getattr(r, name) for r in self.runs]
        if not values or values[0] is None:
            return None
        return statistics.median(values)


# -- processes -------------------------------------------------------------------------------


def fcsnap(*args: str) -> str:
    """Run the fcsnap CLI; its stdout."""
    done = subprocess.run([sys.executable, "-m", "fcsnap", *args], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(f"fcsnap {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def pack(memfile: Path, store: Path, *options: str) -> Path:
    init = ["--init"] if "--init" in flags_of("pack") else []  # older trees made stores
    out = json.loads(fcsnap("pack", *init, str(memfile), "--store", str(store), "--json",
                            *options))
    return Path(out["path"]).resolve()


def flags_of(command: str) -> set[str]:
    """The long options `fcsnap COMMAND --help` lists."""
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}
    text = subprocess.run([sys.executable, "-m", "fcsnap", command, "--help"],
                          capture_output=True, text=True, env=env).stdout
    return {word.strip("│,[]") for word in text.split() if word.startswith("--")}


def memory_status(pid: int) -> dict[str, float]:
    """VmHWM, RssAnon and RssFile of a process, in MiB."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    return status


def busy_share(interval: float = 0.5) -> float:
    """The share of all CPUs' time spent busy over the next `interval` seconds."""

    def sample() -> tuple[int, int]:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(interval)
    idle1, total1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def wait_until_quiet() -> float:
    """Wait until nothing else keeps the CPUs busy (the machine may be shared), up to
    QUIET_PATIENCE_S; the busy share seen last."""
    deadline = time.monotonic() + QUIET_PATIENCE_S
    while (busy := busy_share()) > QUIET_BUSY and time.monotonic() < deadline:
        time.sleep(2)
    return busy




def warm(paths: list[Path]) -> None:
    """Read files into the page cache (holes too: reading them caches zero pages)."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(16 * MiB):
                pass


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def wait_for_socket(path: Path, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fcsnap restore did not listen (exit {server.poll()})")
        time.sleep(0.005)


def serve(
    work: Path, build: Path, restore: list[str], standin: dict[str, Any], pinned: bool
) -> Run:
    """One restore server and one stand-in; the stand-in holds at the end while we read the
    server's memory, then both must exit 0."""
    prefix = ["taskset", "-c", "0"] if pinned else []
    sock, stats, report = work / "uffd.sock", work / "stats.json", work / "vm.json"
    for path in (stats, report):
        path.unlink(missing_ok=True)
    with open(work / "server.log", "wb") as log:
        server = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fcsnap", "restore", "--vm", str(build),
             "--socket", str(sock), "--stats", str(stats), "--quiet", *restore],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
    vm: subprocess.Popen[bytes] | None = None
    try:
        wait_for_socket(sock, server)
        vm = subprocess.Popen([*prefix, *firecracker.command(
            sock, report=report, hold=HOLD_S, deadline=DEADLINE_S, **standin)])
        while vm.poll() is None and not report.exists():
            time.sleep(0.005)
        memory = memory_status(server.pid) if server.poll() is None else {}
        vm_status, server_status = vm.wait(), server.wait(timeout=60)
    finally:
        for proc in (vm, server):
            if proc is not None:
                stop(proc)
    log = (work / "server.log").read_text().strip()
    if vm_status or server_status:
        raise RuntimeError(f"stand-in exit {vm_status}, server exit {server_status}: {log}")
    r, s = firecracker.read_report(report), json.loads(stats.read_text())
    return Run(
        ws_s=r.get("ws_s", r["touch_s"]), all_s=r.get("all_s", r["touch_s"]),
        minor_faults=r["rusage"]["minor_faults"], faults=s["faults"], installs=s.get("installs"),
        pages_served=s["pages_served"], prefetched_pages=s.get("prefetched_pages"),
        populated_pages=s.get("populated_pages"), retries=s["retries"],
        prefetch_s=s.get("prefetch_s"), server_duration_s=s["duration_s"],
        compiled_faults=s.get("compiled_faults"),
        hwm_mib=memory.get("VmHWM"), anon_mib=memory.get("RssAnon"),
        file_mib=memory.get("RssFile"),
        latency=r.get("latency"),
    )


def run_file_backend(setup: Setup, standin: dict[str, Any], pinned: bool) -> Run:
    """The stand-in alone, on Firecracker's File backend."""
    prefix = ["taskset", "-c", "0"] if pinned else []
    report = setup.work / "vm.json"
    report.unlink(missing_ok=True)
    argv = [*prefix, *firecracker.command(None, file_backend=setup.unpacked, report=report,
                                          deadline=DEADLINE_S, **standin)]
    status = subprocess.run(argv).returncode
    if status:
        raise RuntimeError(f"stand-in exit {status}")
    r = firecracker.read_report(report)
    return Run(ws_s=r["ws_s"], all_s=r["all_s"], minor_faults=r["rusage"]["minor_faults"],
               latency=r.get("latency"))


def restore_args(setup: Setup, mode: Mode) -> list[str] | str:
    """The restore flags of a mode, or why it cannot run."""
    args = list(mode.restore)
    if mode.prefetch:
        if setup.ws_build is None or setup.ws_file is None:
            return "no working-set build (pack --working-set or restore --record-ws missing)"
        args += ["--prefetch-ws", str(setup.ws_file)]
    missing = {a for a in args if a.startswith("--")} - setup.restore_flags
    if missing and mode.old_default:
        return []
    if missing:
        return f"fcsnap restore lacks {', '.join(sorted(missing))}"
    return args


def run_mode(setup: Setup, mode: Mode, pinned: bool, check: bool) -> Run:
    """One run of a mode: timed (no byte compare), or a correctness run (`check`: every byte
    compared with the memory file, every touch timed)."""
    standin: dict[str, Any] = {
        "threads": setup.threads, "ws_fraction": setup.ws_fraction, "seed": SEED,
        "size": setup.size,
    }
    if check:
        standin.update(expected=setup.memfile, latency=True)
    else:
        standin.update(verify_bytes=False)
    if mode.cold:
        drop_caches()
    else:
        warm(setup.warm_files)
    if mode.file_backend:
        return run_file_backend(setup, standin, pinned)
    args = restore_args(setup, mode)
    assert isinstance(args, list)
    build = setup.ws_build if mode.prefetch else setup.build
    assert build is not None
    return serve(setup.work, build, args, standin, pinned)


# -- per fault -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultCase:
    key: str
    label: str
    window: int  # bytes installed per fault, both sides (0: one page)
    pinned: bool
    threads: int
    order: str


FAULT_CASES = [
    FaultCase("page-pinned", "one page per fault, pinned", 0, True, 1, "sequential"),
    FaultCase("window-256K", "256 KiB windows, unpinned", 256 << 10, False, 1, "sequential"),
    FaultCase("random-4t", "random order, 4 threads, one page per fault", 0, False, 4, "random"),
]
HANDLER_SOURCE = Path(__file__).resolve().parent / "c" / "fault_handler.c"


def build_handler(work: Path) -> Path:
    """Compile the minimal C page server."""
    binary = work / "fault_handler"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(HANDLER_SOURCE)], check=True)
    return binary


def serve_c(work: Path, handler: Path, memfile: Path, case: FaultCase, standin: dict[str, Any],
            floor: bool) -> Run:
    """One stand-in run against the C page server."""
    prefix = ["taskset", "-c", "0"] if case.pinned else []
    sock, report = work / "c.sock", work / "vm.json"
    report.unlink(missing_ok=True)
    argv = [*prefix, str(handler), str(sock), str(memfile), str(case.window)]
    server = subprocess.Popen([*argv, "floor"] if floor else argv, stdout=subprocess.PIPE)
    try:
        wait_for_socket(sock, server)  # type: ignore[arg-type]
        vm_status = subprocess.run([*prefix, *firecracker.command(
            sock, report=report, deadline=DEADLINE_S, **standin)], timeout=DEADLINE_S).returncode
        out, _ = server.communicate(timeout=60)
    finally:
        stop(server)  # type: ignore[arg-type]
    if vm_status or server.returncode:
        raise RuntimeError(f"C handler run: stand-in exit {vm_status}, handler "
                           f"{server.returncode}")
    r = firecracker.read_report(report)
    return Run(ws_s=r.get("ws_s", r["touch_s"]), all_s=r.get("all_s", r["touch_s"]),
               minor_faults=r["rusage"]["minor_faults"], faults=json.loads(out)["faults"])


def fcsnap_env(pure_python: bool, tree: Path | None = None) -> dict[str, str]:
    """The environment of an fcsnap side: pure Python or not, fcsnap from `tree` if given."""
    env = dict(os.environ)
    env.pop("FCSNAP_PURE_PYTHON", None)
    if pure_python:
        env["FCSNAP_PURE_PYTHON"] = "1"
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def per_fault(setup: Setup, repeat: int, baseline: Path | None = None) -> list[dict[str, Any]]:
    """The per-fault table's rows: each side of each case `repeat` times in rotation, the
    median of the guest's touch time and of microseconds per fault. With `baseline` (another
    fcsnap tree, its C extension built) its compiled path is one more side, `fcsnap-baseline`:
    a change's cost per fault, before and after in one run."""
    handler = build_handler(setup.work)
    rows = []
    for case in FAULT_CASES:
        standin = {"threads": case.threads, "order": case.order, "seed": SEED,
                   "size": setup.size, "verify_bytes": False}
        sides = ["c", *(["floor"] if case.pinned and not case.window else []), "fcsnap",
                 *(["fcsnap-baseline"] if baseline is not None else []),
                 *(["fcsnap-mapped"] if case.order == "random" else []), "fcsnap-python"]
        runs: dict[str, list[Run]] = {side: [] for side in sides}
        busy: list[float] = []
        for i in range(repeat):
            for side in sides:
                print(f"per-fault {i + 1}/{repeat}: {case.label}, {side}", file=sys.stderr)
                warm(setup.warm_files)
                busy.append(busy_share())
                if side in ("c", "floor"):
                    run = serve_c(setup.work, handler, setup.unpacked, case, standin,
                                  side == "floor")
                else:
                    saved = dict(os.environ)
                    os.environ.clear()
                    os.environ.update(fcsnap_env(
                        side == "fcsnap-python",
                        baseline if side == "fcsnap-baseline" else None))
                    try:
                        # mapped: --cache-mb as big as the diff, so scattered faults copy
                        # from the mapping (as the C server from memory), not through pread
                        mapped = ["--cache-mb", str(2 * (setup.size >> 20))]
                        run = serve(setup.work, setup.build,
                                    ["--fault-around", str(case.window),
                                     *(mapped if side == "fcsnap-mapped" else [])],
                                    standin, case.pinned)
                    finally:
                        os.environ.clear()
                        os.environ.update(saved)
                runs[side].append(run)
        medians = {}
        for side, side_runs in runs.items():
            us = statistics.median(r.all_s / max(1, r.faults or 0) * 1e6 for r in side_runs)
            medians[side] = {"touch_s": statistics.median(r.all_s for r in side_runs),
                             "faults": statistics.median(r.faults or 0 for r in side_runs),
                             "us_per_fault": us}
        c = medians["c"]
        for side in medians.keys() - {"c", "floor"}:
            medians[side]["vs_c"] = c["touch_s"] / medians[side]["touch_s"]
        rows.append({"case": case.key, "label": case.label, "sides": medians,
                     "busy_max": round(max(busy), 3)})
    return rows


def per_fault_markdown(rows: list[dict[str, Any]], repeat: int) -> list[str]:
    lines = [
        "## Per fault: fcsnap against a minimal C page server",
        "",
        f"Median of {repeat} runs; one thread touches every page in order unless the case says "
        "otherwise. `x C` is the C server's touch time over fcsnap's (its faults per second "
        "relative to C's, 1.0 = as fast). `floor`: the C loop copying from one fixed buffer, "
        "no lookup (the kernel's share of a copy per fault; fcsnap maps zero pages with "
        "UFFDIO_ZEROPAGE, cheaper still). `fcsnap-mapped`: `--cache-mb` as big as the diff, "
        "so scattered faults copy from the mapping rather than read the file first. "
        "`busy` is the highest share of the CPUs that other "
        "work kept busy just before a run (the machine may be shared).",
        "",
        "| case | side | touch s | faults | µs/fault | x C | busy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for side, m in row["sides"].items():
            ratio = f"{m['vs_c']:.2f}" if "vs_c" in m else ""
            lines.append(f"| {row['label']} | {side} | {m['touch_s']:.3f} | {m['faults']:.0f} "
                         f"| {m['us_per_fault']:.1f} | {ratio} | {row['busy_max']:.0%} |")
    return lines + [""]


# -- setup -----------------------------------------------------------------------------------


def synthetic_guest(work: Path, size: int) -> tuple[Path, float]:
    """A Full memory file of synthetic_memory(size, seed 0); its share of non-zero pages."""
    memfile = work / "mem.raw"
    mem = synthetic_memory(size, seed=0)
    write_full(memfile, mem)
    return memfile, float(mem.any(axis=1).mean())


def corpus_guest(corpus: Path) -> tuple[Path, int, float, dict[str, Any]]:
    """The newest generation of a bench/corpus.py corpus: its memory file, size, share of
    non-zero pages, and the corpus manifest."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    newest = manifest["generations"][-1]
    memfile = corpus / newest["file"]
    return memfile, memfile.stat().st_size, 1 - newest["zero_share"], manifest


def prepare(work: Path, memfile: Path, size: int, data_share: float, threads: int,
            ws_fraction: float) -> Setup:
    """The memory file's build and unpacked copy, then (if the server and pack can) the
    recorded working set and the build laid out with it first."""
    store = work / "store"
    build = pack(memfile, store)
    unpacked = work / "unpacked.mem"
    fcsnap("unpack", str(build), "-o", str(unpacked), "--quiet")
    setup = Setup(work, memfile, unpacked, build, size, data_share, threads, ws_fraction,
                  restore_flags=flags_of("restore"))
    if {"--record-ws", "--fault-around"} <= setup.restore_flags:
        ws_file = work / "ws.bin"
        # The recording run touches the working set only; recording serves one page per
        # fault (the default), so the file holds exactly the pages the guest faulted.
        serve(work, build, ["--record-ws", str(ws_file)],
              {"threads": threads, "ws_fraction": ws_fraction, "seed": SEED, "touch": 0,
               "size": size, "verify_bytes": False}, pinned=False)
        setup.ws_file = ws_file
        if "--working-set" in flags_of("pack"):
            setup.ws_build = pack(memfile, store, "--working-set", str(ws_file))
    return setup


def working_set_pages(path: Path | None) -> int | None:
    return None if path is None else len(parse_working_set(path.read_bytes())[1])


def rss_check(work: Path, size: int, threads: int, restore_flags: set[str]) -> list[dict]:
    """Serve a big sparse guest (two regions) with --cache-mb 64, raw and zstd; peak RSS."""
    image, store = work / "big.mem", work / "big-store"
    mem = synthetic_memory(size, seed=2)
    write_sparse_diff(image, mem, np.flatnonzero(mem.any(axis=1)))  # zero pages are holes
    data_share = float(mem.any(axis=1).mean())
    del mem
    fault_around = ["--fault-around", "256K"] if "--fault-around" in restore_flags else []
    rows = []
    for compress in ("none", "zstd"):
        build = pack(image, store, "--compress", compress)
        warm([f for f in build.iterdir() if f.is_file()])
        run = serve(work, build, ["--cache-mb", "64", *fault_around],
                    {"threads": threads, "regions": 2, "size": size, "verify_bytes": False},
                    pinned=False)
        rows.append({"compress": compress, "size": size, "data_share": data_share,
                     "cache_mb": 64, "target_mib": 100 + 64, **asdict(run),
                     "met": run.hwm_mib is not None and run.hwm_mib < 100 + 64})
        shutil.rmtree(build)
    image.unlink()
    return rows


# -- reporting -------------------------------------------------------------------------------






def ratios(results: list[Result]) -> list[dict[str, object]]:
    """Speed-ups against (a), pinned and unpinned."""
    by = {(r.mode.key, r.pinned): r for r in results}

    def ratio(key: str, pinned: bool, metric: str) -> float | None:
        base, other = by.get(("a", pinned)), by.get((key, pinned))
        if base is None or other is None or not other.runs or not base.runs:
            return None
        return round(base.median(metric) / other.median(metric), 2)

    checks = [(f"(a) / {k[1:]} fault-around: time to all", k, "all_s", 2.0)
              for k in ("b64K", "b256K", "b1M")]
    checks += [("(a) / (c) ws prefetch: time to ws", "c", "ws_s", 3.0),
               ("(a) / (c2) ws prefetch + populate: time to ws", "c2", "ws_s", 3.0),
               ("(a) / (c2) ws prefetch + populate: time to all", "c2", "all_s", None),
               ("(a) / (d) eager: time to all", "d", "all_s", None),
               ("(a) / (e) File backend warm: time to all", "e-warm", "all_s", None)]
    rows = []
    for name, key, metric, target in checks:
        pinned, unpinned = ratio(key, True, metric), ratio(key, False, metric)
        met = None if target is None or pinned is None or unpinned is None else (
            pinned >= target and unpinned >= target)
        rows.append({"ratio": name, "pinned": pinned, "unpinned": unpinned,
                     "target": None if target is None else f">= {target:g}x", "met": met})
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(info: dict[str, Any], results: list[Result], checks: list[dict[str, object]],
             checks_runs: dict[str, Run], rss: list[dict]) -> str:
    m = info["machine"]
    lines = [
        "# fcsnap restore speed",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}. Files in {info['workdir']} on {info['filesystem']}.",
        "",
        f"Guest: {guest_text(info)}, "
        f"{info['data_share']:.1%} of its pages non-zero, packed raw (`fcsnap pack`). Stand-in: "
        f"{info['threads']} threads touch a working set of {info['ws_fraction']:.0%} of the pages "
        f"({info['ws_pages']} pages, random, fixed seed) in random order, then every page "
        "(each thread a contiguous share, in order). Times are from the guest's first touch "
        "(right after the handshake) to the end of each pass. "
        + (f"The working set for (c) was recorded by a run with `--record-ws` (one page per "
           "fault while recording) "
           f"touching the working set only ({info['ws_recorded_pages']} pages recorded); the "
           "(c) build is `fcsnap pack --working-set` of the same memory file."
           if info["ws_build"] else "No working-set build could be made: (c) skipped."),
        "",
        f"Median of {info['repeat']} runs (modes in rotation); pinned = server and stand-in "
        "both `taskset -c 0`. uffd modes read a page-cache-warm build; (e) cold drops the page "
        "cache first. Faults/s = the server's faults over the guest's touch window (first "
        "touch to last page); installs = UFFDIO_COPY/ZEROPAGE calls that installed pages. "
        f"Server RSS read from /proc while the stand-in holds after its last touch: VmHWM "
        "(peak, includes mapped diff file pages) and RssAnon then. No byte compare in timed "
        "runs; a correctness run per mode (below) compared every byte. The machine may be "
        f"shared: each timed run waited for the CPUs to be under {QUIET_BUSY:.0%} busy (up to "
        f"{QUIET_PATIENCE_S:.0f} s); the busiest 0.5 s seen before a run was "
        f"{info['busy_before_max']:.0%}. Prefetch s = the server's own time from the "
        "handshake to the end of its working-set prefetch.",
        "",
        *corpus_lines(info),
        "| Mode | CPUs | Time to ws s | Time to all s | Faults | Faults/s | Installs "
        "| Prefetch s | Server VmHWM MiB | RssAnon MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cpus = "CPU 0" if r.pinned else "both"
        if r.skipped:
            lines.append(f"| {r.mode.label} | {cpus} | skipped: {r.skipped} | | | | | | | |")
            continue
        faults = r.median("faults")
        lines.append(
            f"| {r.mode.label} | {cpus} | {r.median('ws_s'):.3f} | {r.median('all_s'):.3f} | "
            f"{fmt(faults, '.0f')} | {fmt(r.median('faults_per_s'), ',.0f')} | "
            f"{fmt(r.median('installs'), '.0f')} | {fmt(r.median('prefetch_s'), '.3f')} | "
            f"{fmt(r.median('hwm_mib'), '.0f')} | {fmt(r.median('anon_mib'), '.0f')} |"
        )
    lines += ["", "| Speed-up (x) | Pinned | Unpinned | Target | Met |",
              "|---|---:|---:|---|---|"]
    for c in checks:
        met = {None: "-", True: "yes", False: "NO"}[c["met"]]
        lines.append(f"| {c['ratio']} | {fmt(c['pinned'], '.2f')} | "
                     f"{fmt(c['unpinned'], '.2f')} | {c['target'] or '-'} | {met} |")
    lines += [
        "",
        "Correctness runs (unpinned; every byte read compared with the memory file - a "
        "mismatch aborts the benchmark - and every touch timed: the latency of one 4 KiB read, "
        "its fault included):",
        "",
        "| Mode | ws p50 µs | ws p99 µs | ws max ms | all p99 µs | all max ms "
        "| Touches > 10 ms | Retries |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, run in checks_runs.items():
        lat = run.latency or {}
        ws, every = lat.get("ws", {}), lat.get("all", {})
        stalls = ws.get("over_10ms", 0) + every.get("over_10ms", 0)
        label = next(mo.label for mo in MODES if mo.key == key)
        lines.append(
            f"| {label} | {fmt(ws.get('p50_us'), '.1f')} | {fmt(ws.get('p99_us'), '.0f')} | "
            f"{fmt(ws.get('max_us', 0) / 1000, '.1f')} | {fmt(every.get('p99_us'), '.0f')} | "
            f"{fmt(every.get('max_us', 0) / 1000, '.1f')} | {stalls} | {fmt(run.retries, 'd')} |"
        )
    if rss:
        lines += [
            "",
            "RSS check: a sparse guest served with `--cache-mb 64` (fault-around 256K, "
            f"{info['threads']} threads touching every page, two regions), unpinned. "
            "Target: VmHWM < 100 MiB + cache budget. A raw build's diff is copied from a "
            "mapping of which the server keeps at most the cache budget mapped "
            "(fcsnap/uffd/mapped.py).",
            "",
            "| Guest | Build | Touch all s | Server VmHWM MiB | RssAnon MiB | RssFile MiB "
            "| Target MiB | Met |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in rss:
            lines.append(
                f"| {row['size'] / (1 << 30):g} GiB, {row['data_share']:.0%} data | "
                f"{row['compress']} | {row['all_s']:.2f} | {fmt(row['hwm_mib'], '.0f')} | "
                f"{fmt(row['anon_mib'], '.0f')} | {fmt(row['file_mib'], '.0f')} | "
                f"{row['target_mib']} | {'yes' if row['met'] else 'NO'} |"
            )
    return "\n".join(lines) + "\n"


def guest_text(info: dict[str, Any]) -> str:
    size = f"{info['size'] / (1 << 30):g} GiB"
    if info.get("corpus") is None:
        return f"{size} synthetic_memory (seed 0)"
    corpus = info["corpus"]
    return (f"{size} real Linux guest, {corpus['file']} of the bench/corpus.py corpus "
            f"{corpus['path']} (its newest generation; figures below)")


def corpus_lines(info: dict[str, Any]) -> list[str]:
    """The corpus's own figures, from its manifest.json, as a table (none for synthetic)."""
    corpus = info.get("corpus")
    if corpus is None:
        return []
    manifest = corpus["manifest"]
    lines = [
        f"Corpus: {manifest['size'] / (1 << 20):g} MiB guest ({manifest['kernel']}, "
        f"{manifest['qemu']}), stages {', '.join(manifest['stages'])}; figures from its "
        "manifest.json (changed: since the previous generation; zstd ratio: of the non-zero "
        "pages):",
        "",
        "| Generation | Zero share | Duplicate share | Changed share | zstd ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in manifest["generations"]:
        changed = "-" if g["changed_share"] is None else f"{g['changed_share']:.1%}"
        lines.append(f"| {g['file']} | {g['zero_share']:.1%} | {g['duplicate_share']:.1%} | "
                     f"{changed} | {g['zstd_ratio_nonzero']:.2f} |")
    return [*lines, ""]


def chart(results: list[Result], path: Path, title: str) -> None:
    """Grouped bars: time to ws and time to all per mode, pinned and unpinned (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r.mode == m and r.runs for r in results)]
    by = {(r.mode.key, r.pinned): r for r in results}
    series = [("ws", True, "#9ecae1", "time to ws, pinned"),
              ("all", True, "#2171b5", "time to all, pinned"),
              ("ws", False, "#fdae6b", "time to ws, unpinned"),
              ("all", False, "#d94801", "time to all, unpinned")]
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.2
    for i, (metric, pinned, color, label) in enumerate(series):
        values = [by[m.key, pinned].median(f"{metric}_s") or 0 for m in modes]
        xs = [x + (i - 1.5) * width for x in range(len(modes))]
        ax.bar(xs, values, width, color=color, label=label)
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels([m.label.replace(", ", ",\n") for m in modes], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median, log scale)")
    ax.set_title(title)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_fault_only(work: Path, memfile: Path, size: int, data_share: float, repeat: int,
                   stem: str, corpus: dict[str, Any] | None, baseline: Path | None) -> int:
    """Pack and unpack the guest, run the per-fault table alone, write STEM-perfault.*."""
    store = work / "store"
    build = pack(memfile, store)
    unpacked = work / "unpacked.mem"
    fcsnap("unpack", str(build), "-o", str(unpacked), "--quiet")
    setup = Setup(work, memfile, unpacked, build, size, data_share, 1, 0.0)
    rows = per_fault(setup, repeat, baseline)
    info = {"machine": machine(), "corpus": corpus, "size": size, "data_share": data_share,
            "filesystem": filesystem(work), "repeat": repeat}
    m = info["machine"]
    guest = f"{corpus['file']} (real guest)" if corpus else "synthetic"
    text = "\n".join([
        "# fcsnap restore: per-fault cost", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}.",
        f"Guest: {size / (1 << 30):g} GiB {guest}, {data_share:.1%} of its pages non-zero, "
        "packed raw.", "", *per_fault_markdown(rows, repeat)])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}-perfault.md").write_text(text)
    (RESULTS / f"{stem}-perfault.json").write_text(
        json.dumps({**info, "per_fault": rows}, indent=2) + "\n")
    print(text)
    return 0


def run_time_to_ws(setup: Setup, repeat: int) -> dict[str, Any]:
    """The time-to-working-set table's runs (bench/ttw.py)."""
    handler = build_handler(setup.work)

    def case(window: int) -> FaultCase:
        return FaultCase("ttw", "time to ws", window, True, 1, "random")

    return ttw.time_to_ws(setup, repeat, serve, serve_c, handler, case, warm, busy_share, SEED)


def time_to_ws_only(setup: Setup, repeat: int, stem: str, corpus: dict[str, Any] | None) -> int:
    """Only the time-to-working-set table: STEM-ttw.md/json."""
    result = run_time_to_ws(setup, repeat)
    m = machine()
    guest = f"{corpus['file']} (real guest)" if corpus else "synthetic"
    text = "\n".join([
        "# fcsnap restore: time to working set", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}.",
        f"Guest: {setup.size / (1 << 30):g} GiB {guest}, {setup.data_share:.1%} of its pages "
        "non-zero, packed raw; the working-set-first build is `pack --working-set` of the "
        "same memory file with the working set a `--record-ws` run recorded.", "",
        *ttw.markdown(result, repeat, working_set_pages(setup.ws_file))])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}-ttw.md").write_text(text)
    (RESULTS / f"{stem}-ttw.json").write_text(json.dumps(
        {"machine": m, "corpus": corpus, "size": setup.size, "repeat": repeat, **result},
        indent=2) + "\n")
    print(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="guest memory size (default 1G)")
    parser.add_argument("--corpus", type=Path, metavar="DIR",
                        help="serve the newest generation of this bench/corpus.py corpus "
                        "instead of synthetic memory (--size is then the corpus's)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="where to put the files: a real disk, not tmpfs (default /var/tmp)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--threads", type=int, default=4, help="stand-in touching threads")
    parser.add_argument("--ws-fraction", type=float, default=0.1, help="working-set share")
    parser.add_argument("--modes", help="comma-separated mode keys (default: all): "
                        + ",".join(m.key for m in MODES))
    parser.add_argument("--rss-size", default="4G", help="guest of the RSS check (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--per-fault", action="store_true",
                        help="add the per-fault table (fcsnap against a minimal C server)")
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="per-fault table: also serve with the fcsnap of TREE (a checkout "
                        "with its C extension built), side fcsnap-baseline")
    parser.add_argument("--per-fault-only", action="store_true",
                        help="only the per-fault table (results in STEM-perfault.md/json)")
    parser.add_argument("--time-to-ws", action="store_true",
                        help="add the time-to-working-set table (bench/ttw.py)")
    parser.add_argument("--time-to-ws-only", action="store_true",
                        help="only the time-to-working-set table (results in STEM-ttw.md/json)")
    args = parser.parse_args()
    size, rss_size = parse_size(args.size), parse_size(args.rss_size)
    stem = "restore-corpus" if args.corpus else "restore"
    modes = MODES if not args.modes else [m for m in MODES if m.key in args.modes.split(",")]
    if os.geteuid() != 0:
        modes = [m for m in modes if not m.cold]  # dropping the page cache needs root
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fcsnap-restore-bench-", dir=args.workdir))
    try:
        corpus = None
        if args.corpus is not None:
            memfile, size, data_share, manifest = corpus_guest(args.corpus)
            corpus = {"path": str(args.corpus), "file": memfile.name, "manifest": manifest}
        else:
            print(f"writing a {args.size} guest in {work}", file=sys.stderr)
            memfile, data_share = synthetic_guest(work, size)
        print(f"packing {memfile}", file=sys.stderr)
        if args.per_fault_only:
            return per_fault_only(work, memfile, size, data_share, args.repeat, stem, corpus,
                                  args.baseline)
        setup = prepare(work, memfile, size, data_share, args.threads, args.ws_fraction)
        if args.time_to_ws_only:
            return time_to_ws_only(setup, args.repeat, stem, corpus)
        skipped = {m.key: restore_args(setup, m) for m in modes if not m.file_backend}
        runnable = [m for m in modes if not isinstance(skipped.get(m.key), str)]
        results = [Result(m, pinned) for pinned in (True, False) for m in modes]
        for r in results:
            reason = skipped.get(r.mode.key)
            r.skipped = reason if isinstance(reason, str) else None
        checks_runs = {}
        for mode in runnable:
            print(f"correctness: {mode.label}", file=sys.stderr)
            checks_runs[mode.key] = run_mode(setup, mode, pinned=False, check=True)
        for i in range(args.repeat):
            for r in results:
                if r.skipped:
                    continue
                print(f"run {i + 1}/{args.repeat}: {r.mode.label}, "
                      f"{'pinned' if r.pinned else 'unpinned'}", file=sys.stderr)
                busy = wait_until_quiet()
                run = run_mode(setup, r.mode, r.pinned, check=False)
                run.busy_before = round(busy, 3)
                r.runs.append(run)
        rss = []
        if rss_size:
            print(f"RSS check: {args.rss_size} guest", file=sys.stderr)
            rss = rss_check(work, rss_size, args.threads, setup.restore_flags)
        info = {
            "machine": machine(),
            "corpus": corpus,
            "size": size,
            "data_share": setup.data_share,
            "workdir": str(work),
            "filesystem": filesystem(work),
            "repeat": args.repeat,
            "threads": args.threads,
            "ws_fraction": args.ws_fraction,
            "ws_pages": round(args.ws_fraction * size / 4096),
            "ws_recorded_pages": working_set_pages(setup.ws_file),
            "ws_build": None if setup.ws_build is None else str(setup.ws_build),
            "busy_before_max": max((run.busy_before or 0 for r in results for run in r.runs),
                                   default=None),
        }
        checks = ratios(results)
        text = markdown(info, results, checks, checks_runs, rss)
        fault_rows = per_fault(setup, args.repeat, args.baseline) if args.per_fault else []
        if fault_rows:
            text += "\n".join(["", *per_fault_markdown(fault_rows, args.repeat)])
        ttw_result = run_time_to_ws(setup, args.repeat) if args.time_to_ws else None
        if ttw_result is not None:
            text += "\n".join(["", *ttw.markdown(ttw_result, args.repeat,
                                                 working_set_pages(setup.ws_file))])
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.md").write_text(text)
        guest = f"{corpus['file']} (real guest)" if corpus else "synthetic"
        chart(results, RESULTS / f"{stem}.png",
              f"fcsnap restore, {size / (1 << 30):g} GiB {guest} guest, {args.threads} threads, "
              f"{args.ws_fraction:.0%} working set ({info['machine']['cores']} cores)")
        rows = [
            {"mode": r.mode.key, "label": r.mode.label, "pinned": r.pinned,
             "skipped": r.skipped,
             "median": {k: r.median(k) for k in ("ws_s", "all_s", "faults", "faults_per_s",
                                                 "installs", "hwm_mib", "anon_mib")},
             "runs": [{**asdict(run), "faults_per_s": run.faults_per_s} for run in r.runs]}
            for r in results
        ]
        correctness = {k: asdict(v) for k, v in checks_runs.items()}
        (RESULTS / f"{stem}.json").write_text(json.dumps(
            {**info, "results": rows, "ratios": checks, "correctness": correctness,
             "rss_check": rss, "per_fault": fault_rows, "time_to_ws": ttw_result},
            indent=2) + "\n")
        print(text)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
