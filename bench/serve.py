"""One daemon for many VMs against one `fcsnap restore` process per VM, in the same run.

One synthetic guest image (60% zero pages) is packed raw; every VM is the Firecracker stand-in
(its own process, real userfaultfd). Measured, daemon (`fcsnap serve`) beside processes
(`fcsnap restore`):

  start    time from asking to a listening socket: POST /restores until its 201 (the daemon
           answers once the socket listens) against exec of `fcsnap restore` until its socket
           file appears; --vms restores each, median and worst; and the same POSTs to a
           second daemon started with `--preload` of the build (opened before it listens)
  memory   PSS (/proc/PID/smaps_rollup) of the page servers (and their watchdogs) with --vms
           VMs connected and idle (each touched 1% of its memory): the daemon's growth per VM
           after its first (which maps the build's diff, page cache the later VMs share)
           against one restore process (+ watchdog) per VM
  touch    --touch-vms VMs touching all their memory at once, one thread each, no byte
           compare (each waits after its handshake for one start time): from the first VM's
           first touch to the last VM's last
  scale    1, 8, 32, 64 VMs of --scale-size touching all their memory at once through the
           daemon and through processes: aggregate MiB/s, median per-VM time, server PSS peak;
           and the same counts of VMs resumed at once with --prefetch-ws: a working set
           (--ws-fraction of the pages, random) recorded once through the daemon
           (record_ws), then every stand-in up and waiting for its socket before all the
           servers are asked for at once (POSTs to the daemon; `fcsnap restore` processes
           started back to back), each VM touching that working set right after its
           handshake: per-VM time to working set (the stand-in's ws_s, from its first touch),
           median and worst
  chart    bench/results/serve.png: the scaling table's MiB/s, time to working set and PSS
           against the number of VMs (needs matplotlib: `pip install fcsnap[bench]`; without
           it the tables are still written)

    python bench/serve.py [--size 256M] [--vms 32] [--touch-vms 8] [--scale 1,8,32,64]
                          [--scale-size 32M] [--ws-fraction 0.1] [--scale-only]
                          [--workdir DIR]

  --size        the start/memory/touch build's guest size     --vms         VMs of start/memory
  --touch-vms   VMs of the touch row                          --scale       the scaling rows
  --scale-size  the scaling build's guest size                --ws-fraction its working set
  --scale-only  only the scaling table and chart (no start, memory or touch rows)
  --workdir     where the stores, sockets and reports go (a new directory in it)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from machine import machine

from fcsnap.daemon.client import call_daemon
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.units import parse_size

WAIT = 120.0
MiB = 1 << 20
WS_SEED = 11  # the working set every scaling VM touches (and the recording run touched)
RESULTS = Path(__file__).resolve().parent / "results"


def pss_kib(pid: int) -> int:
    """PSS of `pid` and its children (a server's watchdog), in KiB; 0 once it has exited."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        return 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def wait_for(predicate: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


class Daemon:
    def __init__(self, store: Path, work: Path, *args: str, api: str = "api.sock") -> None:
        self.api = work / api
        self.work = work
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fcsnap", "serve", "--store", str(store), "--api",
             str(self.api), *args], stderr=subprocess.DEVNULL)
        wait_for(self.api.exists, "the daemon's API socket")

    def post(self, name: str, vm: str = "tmpl", **options: str) -> tuple[float, str]:
        started = time.perf_counter()
        status, answer = call_daemon(self.api, "POST", "/restores", {
            "vm": vm, "socket": str(self.work / f"{name}.sock"), **options}, WAIT)
        took = time.perf_counter() - started
        assert status == 201, answer
        return took, answer["id"]

    def serving(self) -> int:
        _, listed = call_daemon(self.api, "GET", "/restores", None, WAIT)
        return sum(r["state"] == "serving" for r in listed)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(WAIT)


def restore_process(store: Path, work: Path, name: str) -> tuple[float, subprocess.Popen]:
    sock = work / f"{name}.sock"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fcsnap", "restore", "--vm", "tmpl",
                             "--store", str(store), "--socket", str(sock), "--quiet"],
                            stderr=subprocess.DEVNULL)
    wait_for(sock.exists, f"{sock}")
    return time.perf_counter() - started, proc


def stand_in(work: Path, name: str, size: int, touch: float, hold: float = 0.0,
             start_at: float | None = None) -> subprocess.Popen:
    return firecracker.spawn(work / f"{name}.sock", size=size, touch=touch, threads=1,
                             hold=hold, verify_bytes=False, deadline=WAIT, start_at=start_at,
                             report=work / f"{name}.json",
                             popen={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL})


class PssPeak:
    """The highest PSS of the servers (a daemon's pid, or restore processes), sampled every
    50 ms on a thread of its own until `stop`."""

    def __init__(self, servers: list[Any]) -> None:
        self.pids = [s if isinstance(s, int) else s.pid for s in servers]
        self.pids = list(dict.fromkeys(self.pids))  # the daemon once
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, sum(pss_kib(p) for p in self.pids))

    def stop(self) -> float:
        """The peak, MiB."""
        self._done.set()
        self._thread.join(WAIT)
        return round(self.peak / 1024, 1)


def touch_all(n: int, size: int, start: Any, work: Path, tag: str) -> dict[str, float]:
    """n VMs touching all their memory at once; `start(name)` readies a server for each."""
    servers = [start(f"{tag}{i}") for i in range(n)]
    start_at = time.monotonic() + 3.0 + 0.3 * n  # every stand-in is up before any touches
    vms = [stand_in(work, f"{tag}{i}", size, 1.0, start_at=start_at) for i in range(n)]
    pss = PssPeak(servers)
    for vm in vms:
        assert vm.wait(WAIT) == 0
    peak = pss.stop()
    reports = [firecracker.read_report(work / f"{tag}{i}.json") for i in range(n)]
    per_vm = [r["touch_s"] for r in reports]
    for s in servers:
        if not isinstance(s, int):
            s.wait(WAIT)
    # From the first VM's first touch to the last VM's last (CLOCK_MONOTONIC, system-wide).
    first = min(r["touch_start"] for r in reports)
    wall = max(r["touch_start"] + r["touch_s"] for r in reports) - first
    spread = max(r["touch_start"] for r in reports) - first
    return {"wall_s": round(wall, 3), "mib_s": round(n * size / MiB / wall, 1),
            "start_spread_s": round(spread, 3),
            "per_vm_median_s": round(statistics.median(per_vm), 3),
            "pss_peak_mib": peak}


def waiting_to_connect(pid: int) -> bool:
    """The stand-in sleeps between attempts to connect (and nowhere before): it is up, its
    memory mapped and its touches planned, waiting for its server's socket."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "nanosleep" in f.read()
    except OSError:
        return False


def ws_stand_in(work: Path, name: str, size: int, ws_fraction: float) -> subprocess.Popen:
    """A stand-in touching the working set of WS_SEED (only) from its handshake."""
    return firecracker.spawn(work / f"{name}.sock", size=size, touch=0.0, threads=1,
                             ws_fraction=ws_fraction, seed=WS_SEED, verify_bytes=False,
                             deadline=WAIT, connect_timeout=WAIT, report=work / f"{name}.json",
                             popen={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL})


def record_working_set(daemon: Daemon, work: Path, build: str, size: int,
                       ws_fraction: float) -> Path:
    """The pages a VM touching the WS_SEED working set faults, recorded once by the daemon."""
    ws = work / f"{build}.ws"
    status, answer = call_daemon(daemon.api, "POST", "/restores", {
        "vm": build, "socket": str(work / "record.sock"), "record_ws": str(ws)}, WAIT)
    assert status == 201, answer
    assert ws_stand_in(work, "record", size, ws_fraction).wait(WAIT) == 0
    wait_for(lambda: call_daemon(daemon.api, "GET", f"/restores/{answer['id']}", None, WAIT)[1]
             ["state"] == "ended", "the recording restore to end")
    return ws


def time_to_ws(n: int, size: int, ws_fraction: float, start: Any, work: Path, tag: str
               ) -> dict[str, float]:
    """n VMs resumed at once with the working set prefetched: every stand-in waits for its
    socket before `start(name)` asks for any server, so the n handshakes (and prefetches)
    overlap; each VM's time from its first touch (right after its handshake) to the end of
    its working set."""
    vms = [ws_stand_in(work, f"{tag}{i}", size, ws_fraction) for i in range(n)]
    wait_for(lambda: all(waiting_to_connect(vm.pid) for vm in vms),
             "the stand-ins to wait for their sockets")
    servers = [start(f"{tag}{i}") for i in range(n)]
    pss = PssPeak(servers)
    for vm in vms:
        assert vm.wait(WAIT) == 0
    peak = pss.stop()
    for s in servers:
        if not isinstance(s, int):
            assert s.wait(WAIT) == 0
    ws_s = sorted(firecracker.read_report(work / f"{tag}{i}.json")["ws_s"] for i in range(n))
    return {"ws_median_s": round(statistics.median(ws_s), 4), "ws_worst_s": round(ws_s[-1], 4),
            "pss_peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256M", help="start/memory/touch guest size (256M)")
    p.add_argument("--vms", type=int, default=32, help="VMs of the start and memory rows (32)")
    p.add_argument("--touch-vms", type=int, default=8, help="VMs of the touch row (8)")
    p.add_argument("--scale", default="1,8,32,64", help="VM counts of the scaling rows")
    p.add_argument("--scale-size", default="32M", help="scaling guest size (32M)")
    p.add_argument("--ws-fraction", type=float, default=0.1,
                   help="share of the scaling guest's pages in its working set (0.1)")
    p.add_argument("--scale-only", action="store_true",
                   help="only the scaling table and chart")
    p.add_argument("--workdir", type=Path, help="where the run's files go (a new directory)")
    args = p.parse_args()
    size, scale_size = parse_size(args.size), parse_size(args.scale_size)
    work = Path(tempfile.mkdtemp(prefix="fcsnap-serve-", dir=args.workdir))
    store = work / "store"
    results: dict[str, Any] = {"machine": machine(), "size": size, "vms": args.vms,
                               "touch_vms": args.touch_vms,
                               "load_before": os.getloadavg()}
    write_full(work / "scale.mem", synthetic_memory(scale_size, seed=6))
    ops.pack(work / "scale.mem", store, BuildOptions(name="small"))
    if not args.scale_only:
        write_full(work / "tmpl.mem", synthetic_memory(size, seed=5))
        ops.pack(work / "tmpl.mem", store, BuildOptions(name="tmpl"))
    daemon = Daemon(store, work)
    if not args.scale_only:
        results.update(start_memory_touch(daemon, store, work, size, args.vms, args.touch_vms))
    results["scale_size"] = scale_size
    results["ws_fraction"] = args.ws_fraction
    results["scale"] = scaling(daemon, store, work, scale_size, args.ws_fraction,
                               [int(x) for x in args.scale.split(",")])
    daemon.stop()
    results["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "serve.md").write_text(render(results))
    print(render(results))
    try:
        chart(results, RESULTS / "serve.png")
    except ImportError:
        print("matplotlib is not installed (pip install fcsnap[bench]): no chart",
              file=sys.stderr)


def start_memory_touch(daemon: Daemon, store: Path, work: Path, size: int, n: int,
                       touch_vms: int) -> dict[str, Any]:
    """The start, memory and touch rows: daemon, daemon with --preload, processes."""
    idle = pss_kib(daemon.proc.pid)
    starts = [daemon.post("d0")]
    vms = [stand_in(work, "d0", size, 0.01, hold=WAIT)]
    wait_for(lambda: daemon.serving() == 1, "the first VM to be served")
    time.sleep(2.0)  # it has touched its 1%
    first = pss_kib(daemon.proc.pid)
    starts += [daemon.post(f"d{i}") for i in range(1, n)]
    listening = pss_kib(daemon.proc.pid)
    vms += [stand_in(work, f"d{i}", size, 0.01, hold=WAIT) for i in range(1, n)]
    wait_for(lambda: daemon.serving() == n, "every VM to be served")
    time.sleep(2.0)  # every stand-in has touched its 1%
    served = pss_kib(daemon.proc.pid)
    for vm in vms:
        vm.kill()
        vm.wait(WAIT)
    latencies = sorted(t for t, _ in starts)
    results: dict[str, Any] = {"daemon": {
        "start_median_ms": round(statistics.median(latencies) * 1e3, 2),
        "start_worst_ms": round(latencies[-1] * 1e3, 2),
        "pss_idle_mib": round(idle / 1024, 1),
        "pss_listening_mib": round(listening / 1024, 1),
        "pss_first_vm_mib": round(first / 1024, 1),
        "pss_serving_mib": round(served / 1024, 1),
        "pss_per_vm_mib": round((served - first) / 1024 / (n - 1), 2),
    }}
    # start: a second daemon that opened the build before its API listened (--preload)
    preloaded = Daemon(store, work, "--preload", "tmpl", api="api-preload.sock")
    latencies = sorted(preloaded.post(f"pre{i}")[0] for i in range(n))
    preloaded.stop()  # ends the restores, none of them with a VM
    results["daemon"].update(preload_start_median_ms=round(statistics.median(latencies) * 1e3, 2),
                             preload_start_worst_ms=round(latencies[-1] * 1e3, 2))
    # start + memory: one process per VM
    procs = [restore_process(store, work, f"p{i}") for i in range(n)]
    vms = [stand_in(work, f"p{i}", size, 0.01, hold=WAIT) for i in range(n)]
    time.sleep(2.0 + n * 0.1)
    served_p = sum(pss_kib(proc.pid) for _, proc in procs)
    for vm in vms:
        vm.kill()
    for vm in vms:
        vm.wait(WAIT)
    for _, proc in procs:
        proc.wait(WAIT)
    latencies = sorted(t for t, _ in procs)
    results["processes"] = {
        "start_median_ms": round(statistics.median(latencies) * 1e3, 2),
        "start_worst_ms": round(latencies[-1] * 1e3, 2),
        "pss_serving_mib": round(served_p / 1024, 1),
        "pss_per_vm_mib": round(served_p / 1024 / n, 2),
    }

    def via_daemon(name: str) -> int:
        daemon.post(name)
        return daemon.proc.pid

    def via_process(name: str) -> subprocess.Popen:
        return restore_process(store, work, name)[1]

    results["touch"] = {
        "daemon": touch_all(touch_vms, size, via_daemon, work, "td"),
        "processes": touch_all(touch_vms, size, via_process, work, "tp"),
    }
    return results


def scaling(daemon: Daemon, store: Path, work: Path, size: int, ws_fraction: float,
            counts: list[int]) -> list[dict[str, Any]]:
    """The scaling rows: all memory touched at once, and time to the working set with
    --prefetch-ws, through the daemon and through processes."""
    ws = record_working_set(daemon, work, "small", size, ws_fraction)

    def restore_argv(name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "fcsnap", "restore", "--vm", "small", "--store",
                str(store), "--socket", str(work / f"{name}.sock"), "--quiet", *extra]

    def small_daemon(name: str) -> int:
        daemon.post(name, vm="small")
        return daemon.proc.pid

    def small_process(name: str) -> subprocess.Popen:
        proc = subprocess.Popen(restore_argv(name), stderr=subprocess.DEVNULL)
        wait_for((work / f"{name}.sock").exists, name)
        return proc

    def ws_daemon(name: str) -> int:
        daemon.post(name, vm="small", prefetch_ws=str(ws))
        return daemon.proc.pid

    def ws_process(name: str) -> subprocess.Popen:  # not waiting: its VM waits for it
        return subprocess.Popen(restore_argv(name, "--prefetch-ws", str(ws)),
                                stderr=subprocess.DEVNULL)

    rows = []
    for n in counts:
        print(f"scale: {n} VMs", file=sys.stderr)
        rows.append({
            "vms": n,
            "daemon": touch_all(n, size, small_daemon, work, f"sd{n}-"),
            "processes": touch_all(n, size, small_process, work, f"sp{n}-"),
            "ws_daemon": time_to_ws(n, size, ws_fraction, ws_daemon, work, f"wd{n}-"),
            "ws_processes": time_to_ws(n, size, ws_fraction, ws_process, work, f"wp{n}-"),
        })
    return rows


def render(r: dict[str, Any]) -> str:
    lines = [
        f"# fcsnap serve vs fcsnap restore ({r['machine']['cores']} cores, load "
        f"{r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after)",
        "",
    ]
    if "daemon" in r:
        d, p = r["daemon"], r["processes"]
        t = r["touch"]
        lines += [
            f"{r['size'] // MiB} MiB build, {r['vms']} VMs:",
            "",
            "| | daemon (`fcsnap serve`) | one `fcsnap restore` per VM |",
            "|---|---|---|",
            f"| ask to listening socket, median | {d['start_median_ms']} ms | "
            f"{p['start_median_ms']} ms |",
            f"| ask to listening socket, worst | {d['start_worst_ms']} ms | "
            f"{p['start_worst_ms']} ms |",
            f"| the same with `--preload`, median / worst | {d['preload_start_median_ms']} / "
            f"{d['preload_start_worst_ms']} ms | |",
            f"| PSS, {r['vms']} VMs connected (servers + watchdogs) | "
            f"{d['pss_serving_mib']} MiB | {p['pss_serving_mib']} MiB |",
            f"| PSS idle / with its first VM served | {d['pss_idle_mib']} / "
            f"{d['pss_first_vm_mib']} MiB | |",
            f"| PSS per additional VM | {d['pss_per_vm_mib']} MiB | {p['pss_per_vm_mib']} MiB |",
            f"| {r['touch_vms']} VMs touching all memory at once: first touch to last | "
            f"{t['daemon']['wall_s']} s | {t['processes']['wall_s']} s |",
            "",
        ]
    lines += [
        f"Scaling ({r['scale_size'] // MiB} MiB guests; d: daemon, p: one process per VM). "
        "All memory: every VM touching all its memory at once. Working set: every VM "
        f"resumed at once with `--prefetch-ws` (a recorded {r['ws_fraction']:.0%} of its "
        "pages, random), time from its first touch (right after its handshake) to the end of "
        "its working set:",
        "",
        "| VMs | all memory MiB/s (d / p) | all memory per-VM median (d / p) | working set "
        "per-VM median (d / p) | working set worst (d / p) | PSS peak (d / p) | touch start "
        "spread (d / p) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["scale"]:
        dd, pp, wd, wp = row["daemon"], row["processes"], row["ws_daemon"], row["ws_processes"]
        lines.append(
            f"| {row['vms']} | {dd['mib_s']} / {pp['mib_s']} | {dd['per_vm_median_s']} / "
            f"{pp['per_vm_median_s']} s | {wd['ws_median_s'] * 1e3:.1f} / "
            f"{wp['ws_median_s'] * 1e3:.1f} ms | {wd['ws_worst_s'] * 1e3:.1f} / "
            f"{wp['ws_worst_s'] * 1e3:.1f} ms | {max(dd['pss_peak_mib'], wd['pss_peak_mib'])}"
            f" / {max(pp['pss_peak_mib'], wp['pss_peak_mib'])} MiB | {dd['start_spread_s']} / "
            f"{pp['start_spread_s']} s |")
    return "\n".join(lines) + "\n"


def chart(r: dict[str, Any], path: Path) -> None:
    """The scaling table against the number of VMs, daemon beside processes, in three
    panels; ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["scale"]
    vms = [row["vms"] for row in rows]
    panels = [
        ("all memory at once: aggregate MiB/s", "MiB/s",
         lambda side: [row[side]["mib_s"] for row in rows], ("daemon", "processes")),
        ("--prefetch-ws: per-VM time to working set (median)", "ms",
         lambda side: [row[side]["ws_median_s"] * 1e3 for row in rows],
         ("ws_daemon", "ws_processes")),
        ("page servers' PSS, peak", "MiB",
         lambda side: [max(row[side]["pss_peak_mib"], row[f"ws_{side}"]["pss_peak_mib"])
                       for row in rows], ("daemon", "processes")),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (title, unit, values, sides) in zip(axes, panels, strict=True):
        for side, label, color in zip(sides, ("fcsnap serve (one daemon)",
                                              "fcsnap restore (a process per VM)"),
                                      ("#2171b5", "#e6550d"), strict=True):
            ax.plot(vms, values(side), marker="o", label=label, color=color)
        ax.set_xscale("log", base=2)
        ax.set_xticks(vms, [str(v) for v in vms])
        ax.set_xlabel("VMs at once")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{r['scale_size'] // MiB} MiB guests, {r['machine']['cores']} cores",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
