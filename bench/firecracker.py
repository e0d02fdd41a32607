"""Restores with the real Firecracker: the load call, and the time to the guest's progress.

fcguest (fcsnap/testing/fcguest) boots in Firecracker v1.12.1 (fcsnap.testing.fcbinary) with
SIZE of memory, fills 20% of its pages scattered above 32 MiB and then, round after round, reads
a word of each page of its working set (the first 10% of all pages, in its scattered fill
order), rewrites 16 pages and prints a progress line. It is paused right after a line and
snapshotted Full; each run loads that snapshot into a new Firecracker and measures

- load: `PUT /snapshot/load` sent to its 204;
- progress: from the load call to the guest's first progress line after resume (the round it
  began at the pause: every page of its working set read once);

and waits for a second line to check that the guest went on with its memory right. Modes:

    file (warm)             Firecracker's File backend on the snapshot's memory file, its
                            page cache warm (read just before)
    file (cold)             the same after dropping the page cache
    restore                 `fcsnap restore` (default options) of the packed build, then
                            Firecracker's Uffd backend on its socket
    restore (cold)          the same after dropping the page cache
    restore --prefetch-ws   the working set a `--record-ws` run recorded, on a build packed
                            with `--working-set` (its pages stored first)
    daemon                  `fcsnap serve`: `restore --daemon` (default options), then the load
    daemon --prefetch-ws    the same with the recorded working set
    daemon, 4 clones        four Firecrackers load the template from the daemon at once; each
                            clone's figures
    file, 4 clones          the same with the File backend (page cache warm): what four guests
                            at once cost this machine without fcsnap

Firecracker and fcsnap are started before the load (not timed). The modes run in rotation,
--repeat times; medians count. Results: bench/results/firecracker.{md,json} and, with
matplotlib, firecracker.png.

    python3 bench/firecracker.py [--sizes 256M,1G] [--repeat 3] [--workdir /var/tmp]
    python3 bench/firecracker.py --replot     # the .md and .png again from the .json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import drop_caches, filesystem, machine  # noqa: E402

from fcsnap.testing.fcguest import GuestConfig  # noqa: E402
from fcsnap.testing.realvmm import (  # noqa: E402
    Daemon,
    Firecracker,
    RestoreProcess,
    Snapshot,
    take_snapshot,
)

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = 4096
TIMEOUT = 120.0  # seconds a load, a round or a boot may take
CLONES = 4
MODES = ("file-warm", "file-cold", "file-clones", "restore", "restore-cold", "restore-ws",
         "daemon", "daemon-ws", "daemon-clones")
LABELS = {
    "file-warm": "Firecracker File backend, page cache warm",
    "file-cold": "Firecracker File backend, page cache cold",
    "file-clones": f"Firecracker File backend, warm, {CLONES} clones at once (each)",
    "restore": "fcsnap restore (default)",
    "restore-cold": "fcsnap restore (default), page cache cold",
    "restore-ws": "fcsnap restore --prefetch-ws",
    "daemon": "fcsnap serve (daemon, default)",
    "daemon-ws": "fcsnap serve (daemon) --prefetch-ws",
    "daemon-clones": f"fcsnap serve (daemon), {CLONES} clones at once (each)",
}
SHORT = {  # the chart's labels
    "file-warm": "File\nwarm", "file-cold": "File\ncold", "file-clones": f"File\n{CLONES} clones",
    "restore": "restore", "restore-cold": "restore\ncold", "restore-ws": "restore\n--prefetch-ws",
    "daemon": "daemon", "daemon-ws": "daemon\n--prefetch-ws",
    "daemon-clones": f"daemon\n{CLONES} clones",
}


@dataclass
class Guest:
    """One size's template, its store ("vm", and "vm-ws" with the working set first)."""

    mib: int
    work: Path
    template: Snapshot
    store: Path
    ws: Path


@dataclass
class Timings:
    load: list[float] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)


def config_for(mib: int) -> GuestConfig:
    pages = (mib << 20) // PAGE
    return GuestConfig(fill=pages // 5, ws=pages // 10, sweep=0, write=16, seed=3)


def fcsnap(*args: object) -> None:
    import subprocess

    done = subprocess.run([sys.executable, "-m", "fcsnap", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=TIMEOUT * 5)
    if done.returncode != 0:
        raise SystemExit(f"fcsnap {args[0]} failed: {done.stderr.strip()}")


def prepare(mib: int, work: Path) -> Guest:
    """Boot, snapshot and pack the guest; record its working set with one restore."""
    started = time.monotonic()
    template = take_snapshot(work / "template", config_for(mib), mem_mib=mib, timeout=TIMEOUT * 3)
    print(f"{mib} MiB: booted and snapshotted in {time.monotonic() - started:.0f}s",
          file=sys.stderr)
    store = work / "store"
    fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
           "--name", "vm")
    ws = work / "vm.ws"
    with Firecracker(work / "record", "rec") as vm, RestoreProcess(
            work / "record" / "uffd.sock", "--vm", "vm", "--store", store, "--record-ws", ws
    ) as server:
        vm.load(template.vmstate, uffd=server.socket, timeout=TIMEOUT)
        vm.expect_progress(template.last_round, 2, TIMEOUT)
        vm.kill()
        server.finish(TIMEOUT)
    fcsnap("pack", template.mem, "--vmstate", template.vmstate, "--store", store, "--name",
           "vm-ws", "--working-set", ws)
    return Guest(mib, work, template, store, ws)


def timed_load(vm: Firecracker, guest: Guest, **backend: Path) -> tuple[float, float]:
    """(load call to its 204, load call to the first progress line), the guest checked to go
    on right for a second line."""
    load = vm.load(guest.template.vmstate, timeout=TIMEOUT, **backend)
    vm.expect_progress(guest.template.last_round, 2, TIMEOUT)
    first = vm.timed_rounds()[0][0]
    return load, first - vm.load_started


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def run_file(guest: Guest, run_dir: Path, cold: bool, clones: int = 1
             ) -> list[tuple[float, float]]:
    if cold:
        drop_caches()
    else:
        warm(guest.template.mem)
    vms = [Firecracker(run_dir, f"fc{i}").start() for i in range(clones)]
    try:
        return at_once(guest, vms, [{"mem_file": guest.template.mem}] * clones)
    finally:
        for vm in vms:
            vm.kill()


def run_restore(guest: Guest, run_dir: Path, ws: bool, cold: bool) -> list[tuple[float, float]]:
    args = ["--vm", "vm-ws", "--prefetch-ws", guest.ws] if ws else ["--vm", "vm"]
    with Firecracker(run_dir, "fc") as vm, RestoreProcess(
            run_dir / "uffd.sock", *args, "--store", guest.store) as server:
        if cold:
            drop_caches()
        result = timed_load(vm, guest, uffd=server.socket)
        vm.kill()
        server.finish(TIMEOUT)
    return [result]


def run_daemon(guest: Guest, daemon: Daemon, run_dir: Path, ws: bool, clones: int
               ) -> list[tuple[float, float]]:
    args = ["--prefetch-ws", str(guest.ws)] if ws else []
    vms = [Firecracker(run_dir, f"fc{i}").start() for i in range(clones)]
    try:
        for i in range(clones):
            daemon.restore("vm-ws" if ws else "vm", run_dir / f"uffd{i}.sock", *args)
        return at_once(guest, vms, [{"uffd": run_dir / f"uffd{i}.sock"} for i in range(clones)])
    finally:
        for vm in vms:
            vm.kill()


def at_once(guest: Guest, vms: list[Firecracker], backends: list[dict[str, Path]]
            ) -> list[tuple[float, float]]:
    """`timed_load` of each VM from its backend, all started together (one: in this thread)."""
    if len(vms) == 1:
        return [timed_load(vms[0], guest, **backends[0])]
    results: list[tuple[float, float] | BaseException] = [RuntimeError("not run")] * len(vms)

    def one(i: int) -> None:
        try:
            results[i] = timed_load(vms[i], guest, **backends[i])
        except BaseException as e:  # noqa: BLE001 (raised below)
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(vms))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


def measure(guest: Guest, repeat: int, modes: list[str]) -> dict[str, Timings]:
    timings = {mode: Timings() for mode in modes}
    with Daemon(guest.store, guest.work) as daemon:
        for turn in range(repeat):
            for mode in modes:
                run_dir = guest.work / f"run-{mode}-{turn}"
                run_dir.mkdir()
                if mode.startswith("file"):
                    got = run_file(guest, run_dir, cold=mode == "file-cold",
                                   clones=CLONES if mode == "file-clones" else 1)
                elif mode.startswith("restore"):
                    got = run_restore(guest, run_dir, ws=mode == "restore-ws",
                                      cold=mode == "restore-cold")
                else:
                    got = run_daemon(guest, daemon, run_dir, ws=mode == "daemon-ws",
                                     clones=CLONES if mode == "daemon-clones" else 1)
                for load, progress in got:
                    timings[mode].load.append(load)
                    timings[mode].progress.append(progress)
                shutil.rmtree(run_dir, ignore_errors=True)
                print(f"{guest.mib} MiB {mode} run {turn + 1}: " + ", ".join(
                    f"load {load * 1000:.1f} ms, progress {p * 1000:.0f} ms" for load, p in got),
                    file=sys.stderr)
    return timings


def median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def targets(t: dict[str, Timings]) -> list[tuple[str, float, str, bool]]:
    """(what, ratio, target, met) of the targets, from the medians."""
    file_warm = statistics.median(t["file-warm"].progress)
    rows = []
    if "daemon-ws" in t:
        ratio = statistics.median(t["daemon-ws"].progress) / file_warm
        rows.append(("daemon --prefetch-ws / File warm (progress)", ratio, "<= 1", ratio <= 1))
    for mode in ("restore", "daemon"):
        if mode in t:
            ratio = statistics.median(t[mode].progress) / file_warm
            rows.append((f"{LABELS[mode]} / File warm (progress)", ratio, "<= 1.5",
                         ratio <= 1.5))
    if "daemon-clones" in t and "daemon" in t:
        alone = statistics.median(t["daemon"].progress)
        ratio = statistics.median(t["daemon-clones"].progress) / alone
        rows.append((f"daemon: a clone of {CLONES} at once / one alone (progress, medians)",
                     ratio, "<= 2", ratio <= 2))
    if "file-clones" in t:  # the machine's own share: four guests on its cores
        ratio = statistics.median(t["file-clones"].progress) / file_warm
        rows.append((f"File backend: a clone of {CLONES} at once / one alone (the machine's "
                     "share, no target)", ratio, "-", True))
    return rows


def markdown(results: dict[int, dict[str, Timings]], info: dict[str, Any]) -> str:
    m = info["machine"]
    lines = [
        "# Restores with the real Firecracker", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; files on {info['filesystem']}. Firecracker "
        f"{info['firecracker']}, /dev/kvm {info['kvm']}. Load average {info['load_before']} "
        f"before, {info['load_after']} after. {info['repeat']} runs per mode in rotation; "
        "medians (clones: every clone of every run).", "",
        "Guest: fcguest, 20% of its pages filled (scattered), a working set of 10% of its "
        "pages read a word a page each round. *load*: `PUT /snapshot/load` to its 204; "
        "*progress*: the load call to the guest's first progress line after resume.", "",
    ]
    for mib, t in results.items():
        lines += [f"## {mib} MiB guest", "",
                  "| Mode | load ms (median) | progress ms (median) | progress ms (min-max) |",
                  "|---|---:|---:|---:|"]
        for mode in MODES:
            if mode in t:
                p = t[mode].progress
                lines.append(f"| {LABELS[mode]} | {median_ms(t[mode].load)} | {median_ms(p)} "
                             f"| {min(p) * 1000:.0f}-{max(p) * 1000:.0f} |")
        lines += ["", "| Target | ratio | wanted | met |", "|---|---:|---|---|"]
        for what, ratio, wanted, met in targets(t):
            shown = '-' if wanted == '-' else 'yes' if met else 'no'
            lines.append(f"| {what} | {ratio:.2f} | {wanted} | {shown} |")
        lines.append("")
    return "\n".join(lines)


def chart(results: dict[int, dict[str, Timings]], path: Path) -> bool:
    """Bars of the median time to progress per mode and size; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(m in t for t in results.values())]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(results)
    for i, (mib, t) in enumerate(results.items()):
        values = [statistics.median(t[m].progress) * 1000 if m in t else 0 for m in modes]
        ax.bar([x + (i - (len(results) - 1) / 2) * width for x in range(len(modes))], values,
               width, label=f"{mib} MiB guest")
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels([SHORT[m] for m in modes], fontsize=8)
    ax.set_ylabel("load call to first progress line, ms (median)")
    ax.set_title("Restores with the real Firecracker v1.12.1 (fcguest, 10% working set)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_mib(text: str) -> int:
    units = {"M": 1, "G": 1024}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256M,1G", help="guest memory sizes (256M,1G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--replot", action="store_true",
                        help="write the table and chart again from firecracker.json, no runs")
    args = parser.parse_args()
    if args.replot:
        return write(*read_results())
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if "file-warm" not in modes:
        parser.error("file-warm is the anchor of every target: keep it")
    from fcsnap.testing.fcbinary import firecracker_binary

    info: dict[str, Any] = {
        "machine": machine(), "filesystem": filesystem(args.workdir), "repeat": args.repeat,
        "firecracker": firecracker_binary().parent.name,
        "kvm": Path("/sys/module/kvm_pvm").exists() and "kvm_pvm (no hardware "
               "virtualization: guest code runs through KVM's instruction emulator)" or "kvm",
        "load_before": load_average(),
    }
    results: dict[int, dict[str, Timings]] = {}
    work = Path(tempfile.mkdtemp(prefix="fcsnap-bench-fc-", dir=args.workdir))
    try:
        for mib in map(parse_mib, args.sizes.split(",")):
            guest = prepare(mib, work / f"{mib}M")
            results[mib] = measure(guest, args.repeat, modes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_after"] = load_average()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "firecracker.json").write_text(json.dumps({**info, "results": {
        mib: {mode: {"load_s": t.load, "progress_s": t.progress} for mode, t in r.items()}
        for mib, r in results.items()}}, indent=2) + "\n")
    return write(results, info)


def read_results() -> tuple[dict[int, dict[str, Timings]], dict[str, Any]]:
    """What firecracker.json holds, as `main` measured it."""
    data = json.loads((RESULTS / "firecracker.json").read_text())
    results = {int(mib): {mode: Timings(t["load_s"], t["progress_s"]) for mode, t in r.items()}
               for mib, r in data.pop("results").items()}
    return results, data


def write(results: dict[int, dict[str, Timings]], info: dict[str, Any]) -> int:
    """firecracker.md (printed too) and, with matplotlib, firecracker.png."""
    text = markdown(results, info)
    (RESULTS / "firecracker.md").write_text(text)
    if chart(results, RESULTS / "firecracker.png"):
        print(f"chart: {RESULTS / 'firecracker.png'}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
