"""Time to working set: fcsnap restore beside the minimal C page server, and the copy floor.

Used by `bench/restore.py --time-to-ws` (see its docstring). Every run is pinned (server and
stand-in on CPU 0): unpinned runs vary several-fold on a shared 2-core machine. One stand-in
thread; the sides of a case run in rotation, `repeat` times, and the medians count:

- scattered: the guest touches a fixed random 10% of its pages in random order, then the
  rest in order; time to working set. C one page per fault; fcsnap default (adaptive);
  fcsnap fixed windows; fcsnap --prefetch-ws on the working-set-first build;
- in order: one thread touches every page in order; fcsnap default against each fixed window;
- floor: the working set's pages copied with UFFDIO_COPY (DONTWAKE, from C: fp_copy_runs)
  from the warm working-set-first diff into a registered anonymous area, no guest: each page
  to its own guest address (scattered, one copy per page: what any server must do at least),
  and the same bytes to one contiguous range in 1 MiB copies (bytes); beside it fcsnap's own
  prefetch of that working set into such an area, no guest;
- the guest alone: --prefetch-ws with the stand-in starting 0.5 s after the handshake, when
  the working set is in place: the stand-in's own share of every time to working set.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fcsnap.header import load_header
from fcsnap.options import ADAPTIVE
from fcsnap.store.format.layout import DIFF_RAW
from fcsnap.store.format.source import open_diffs
from fcsnap.uffd import abi, fastpath
from fcsnap.uffd.installer import Installer, InstallStats
from fcsnap.uffd.pages import PageSource
from fcsnap.uffd.prefetch import Prefetch
from fcsnap.uffd.regions import Region, RegionMap
from fcsnap.workingset import read_working_set

PAGE = 4096
WINDOWS = ["0", "16K", "64K", "256K", "1M", "2M"]
GUEST_ALONE = "the guest alone: --prefetch-ws done before it starts"


def copy_floor(build: Path, ws_file: Path) -> dict[str, float]:
    """Seconds to install the working set's pages with UFFDIO_COPY from the warm diff of the
    working-set-first build, no guest, pinned to CPU 0: scattered and contiguous."""
    assert fastpath.lib is not None, "the floor uses the compiled module (fp_copy_runs)"
    size = load_header(build).metadata.size
    offsets = read_working_set(ws_file, size)
    count = len(offsets)
    diff = build / DIFF_RAW
    data = np.memmap(diff, np.uint8, "r")
    src_base = data.ctypes.data
    span = min(count * PAGE, len(data) - len(data) % PAGE)  # the ws is stored first
    sources = src_base + (np.arange(count, dtype=np.uint64) * PAGE) % span
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        times = {}
        for kind in ("scattered", "contiguous"):
            uffd = abi.userfaultfd()
            abi.api_handshake(uffd, 0)
            addr = abi.mmap_anonymous(size)
            try:
                abi.register(uffd, addr, size)
                if kind == "scattered":
                    dst = (addr + offsets).astype(np.uint64)
                    src = sources
                    lengths = np.full(count, PAGE, np.uint64)
                else:
                    step = (1 << 20) // PAGE
                    firsts = np.arange(0, count, step, dtype=np.uint64)
                    dst = addr + firsts * PAGE
                    src = src_base + (firsts * PAGE) % span
                    lengths = (np.minimum(firsts + step, count) - firsts) * PAGE
                ffi = fastpath.ffi
                err, part = ffi.new("int *"), ffi.new("int64_t *")
                start = time.perf_counter()
                done = fastpath.lib.fp_copy_runs(
                    uffd, ffi.from_buffer("uint64_t[]", dst), ffi.from_buffer("uint64_t[]", src),
                    ffi.from_buffer("uint64_t[]", lengths), len(dst), err, part)
                times[kind] = time.perf_counter() - start
                assert done == len(dst), f"floor copy stopped: errno {err[0]}"
            finally:
                os.close(uffd)
                abi.munmap(addr, size)
        times["prefetch"] = prefetch_alone(build, offsets)
        return times
    finally:
        os.sched_setaffinity(0, old)
        del data


def prefetch_alone(build: Path, offsets: np.ndarray) -> float:
    """Seconds fcsnap's prefetch (prefetch.py, as the server runs it) takes to install the
    working set into a registered anonymous area, no guest: the floor's counterpart."""
    header = load_header(build)
    diffs = open_diffs(header, build.parent)
    size = header.metadata.size
    uffd = abi.userfaultfd()
    abi.api_handshake(uffd, 0)
    addr = abi.mmap_anonymous(size)
    try:
        abi.register(uffd, addr, size)
        pages = PageSource(header, diffs)
        pages.mapping_arrays()  # the server makes them before the handshake
        installer = Installer(uffd, RegionMap([Region(addr, size, 0, PAGE)]), pages,
                              InstallStats(), ADAPTIVE)
        start = time.perf_counter()
        prefetch = Prefetch(installer, offsets, 1 << 20)
        while prefetch.step():
            pass
        return time.perf_counter() - start
    finally:
        os.close(uffd)
        abi.munmap(addr, size)
        for diff in diffs.values():
            diff.close()


def sides(setup: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(case, side, how) of every run; `how` says which server and its options."""
    out: list[tuple[str, str, dict[str, Any]]] = [("scattered", "C, one page per fault",
                                                   {"c": 0})]
    out.append(("scattered", "fcsnap default", {"args": []}))
    for w in WINDOWS:
        out.append(("scattered", f"fcsnap --fault-around {w}", {"args": ["--fault-around", w]}))
    if setup.ws_build is not None:
        prefetch = {"args": ["--prefetch-ws", str(setup.ws_file)], "build": setup.ws_build}
        out.append(("scattered", "fcsnap --prefetch-ws, ws-first build", prefetch))
        out.append(("scattered", GUEST_ALONE, {**prefetch, "delay": 0.5}))
    out.append(("in order", "fcsnap default", {"args": []}))
    for w in WINDOWS:
        out.append(("in order", f"fcsnap --fault-around {w}", {"args": ["--fault-around", w]}))
    out.append(("in order", "C, 1M windows", {"c": 1 << 20}))
    return out


def time_to_ws(setup: Any, repeat: int, serve: Any, serve_c: Any, handler: Path,
               fault_case: Any, warm: Any, busy_share: Any, seed: int) -> dict[str, Any]:
    """Every side `repeat` times in rotation, pinned; the medians and the targets."""
    scattered = {"threads": 1, "ws_fraction": setup.ws_fraction, "seed": seed,
                 "size": setup.size, "verify_bytes": False}
    in_order = {"threads": 1, "order": "sequential", "seed": seed, "size": setup.size,
                "verify_bytes": False}
    plan = sides(setup)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(c, s): [] for c, s, _ in plan}
    floors: list[dict[str, float]] = []
    busy: list[float] = []
    for i in range(repeat):
        for case, side, how in plan:
            print(f"time to ws {i + 1}/{repeat}: {case}, {side}", file=sys.stderr)
            warm(setup.warm_files)
            busy.append(busy_share())
            standin = scattered if case == "scattered" else in_order
            if "delay" in how:
                standin = {**standin, "start_delay": how["delay"]}
            if "c" in how:
                run = serve_c(setup.work, handler, setup.unpacked,
                              fault_case(how["c"]), standin, False)
                stats: dict[str, Any] = {}
            else:
                run = serve(setup.work, how.get("build", setup.build), how["args"], standin,
                            True)
                stats = {"compiled": run.compiled_faults}
            runs[case, side].append({"ws_s": run.ws_s, "all_s": run.all_s,
                                     "faults": run.faults, "pages": run.pages_served,
                                     "prefetch_s": run.prefetch_s, **stats})
        if setup.ws_build is not None:
            warm(setup.warm_files)
            floors.append(copy_floor(setup.ws_build, setup.ws_file))
    rows = []
    for (case, side), side_runs in runs.items():
        metric = "ws_s" if case == "scattered" else "all_s"

        def median(key: str, side_runs: list[dict[str, Any]] = side_runs) -> float | None:
            values = [r[key] for r in side_runs if r.get(key) is not None]
            return statistics.median(values) if values else None

        rows.append({"case": case, "side": side, "time_s": median(metric),
                     "all_s": median("all_s"), "faults": median("faults"),
                     "pages": median("pages"), "prefetch_s": median("prefetch_s"),
                     "compiled_faults": median("compiled"), "runs": side_runs})
    floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]} if floors else {}
    return {"rows": rows, "floor": floor, "floors": floors, "busy_max": max(busy),
            "targets": targets(rows, floor)}


def targets(rows: list[dict[str, Any]], floor: dict[str, float]) -> list[dict[str, Any]]:
    """The targets, from the medians."""
    t = {(r["case"], r["side"]): r["time_s"] for r in rows}
    c = t.get(("scattered", "C, one page per fault"))
    default_ws = t.get(("scattered", "fcsnap default"))
    prefetch = t.get(("scattered", "fcsnap --prefetch-ws, ws-first build"))
    fixed = {s: v for (case, s), v in t.items()
             if case == "in order" and s.startswith("fcsnap --fault-around")}
    best = min(fixed, key=fixed.__getitem__) if fixed else None
    default_order = t.get(("in order", "fcsnap default"))
    out = []

    def add(name: str, value: float | None, target: str, met: bool | None) -> None:
        out.append({"check": name, "value": value, "target": target, "met": met})

    if c and default_ws:
        add("scattered: default / C one page per fault", default_ws / c, "<= 1.25",
            default_ws / c <= 1.25)
    if best and default_order:
        add(f"in order: default / best fixed ({best.split()[-1]})",
            default_order / fixed[best], "<= 1.1", default_order / fixed[best] <= 1.1)
    if c and prefetch:
        add("scattered: C / --prefetch-ws (x sooner)", c / prefetch, ">= 3", c / prefetch >= 3)
    if prefetch and floor.get("scattered"):
        add("--prefetch-ws / floor (scattered copies)", prefetch / floor["scattered"], "<= 2",
            prefetch / floor["scattered"] <= 2)
    if prefetch and floor.get("contiguous"):
        add("--prefetch-ws / floor (contiguous copies)", prefetch / floor["contiguous"], "-",
            None)
    if floor.get("prefetch") and floor.get("scattered"):
        add("prefetch alone / floor (scattered copies), no guest",
            floor["prefetch"] / floor["scattered"], "<= 2",
            floor["prefetch"] / floor["scattered"] <= 2)
    return out


def markdown(result: dict[str, Any], repeat: int, ws_pages: int | None) -> list[str]:
    lines = [
        "## Time to working set",
        "",
        f"Pinned (server and stand-in on CPU 0), one stand-in thread, median of {repeat} runs "
        "(sides in rotation). scattered: the guest touches a fixed random 10% of its pages "
        f"({ws_pages} pages recorded) in random order, then the rest; the time is to the end "
        "of the working set (all: to the end of the rest). in order: one thread touches every "
        "page in order; the time is to the last page. The machine is shared with other work "
        f"(busiest 0.5 s before a run: {result['busy_max']:.0%}): figures are noisy.",
        "",
        "| case | server | time s | all s | faults | pages installed | prefetch s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['side']} | {f(r['time_s'], '.3f')} | "
                     f"{f(r['all_s'], '.3f')} | {f(r['faults'], '.0f')} | "
                     f"{f(r['pages'], '.0f')} | {f(r['prefetch_s'], '.3f')} |")
    floor = result["floor"]
    if floor:
        lines += ["", f"Copy floor (no guest, pinned, median): the working set's pages one "
                  f"UFFDIO_COPY each to their guest addresses {floor['scattered'] * 1e3:.1f} ms; "
                  f"the same bytes in 1 MiB copies to one range {floor['contiguous'] * 1e3:.1f} "
                  f"ms; fcsnap's prefetch (prefetch.py) of the same working set, no guest, "
                  f"{floor['prefetch'] * 1e3:.1f} ms (its zero pages go in with "
                  "UFFDIO_ZEROPAGE). The guest-alone row is the stand-in touching a working set "
                  "already in place: its own share of every time to working set."]
    lines += ["", "| target | value | wanted | met |", "|---|---:|---|---|"]
    for t in result["targets"]:
        met = {None: "-", True: "yes", False: "NO"}[t["met"]]
        lines.append(f"| {t['check']} | {f(t['value'], '.2f')} | {t['target']} | {met} |")
    return [*lines, ""]
