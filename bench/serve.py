"""One daemon for many VMs against one `fcsnap restore` process per VM, in the same run.

One synthetic guest image (60% zero pages) is packed raw; every VM is the Firecracker stand-in
(its own process, real userfaultfd). Measured, daemon (`fcsnap serve`) beside processes
(`fcsnap restore`):

  start    time from asking to a listening socket: POST /restores until its 201 (the daemon
           answers once the socket listens) against exec of `fcsnap restore` until its socket
           file appears; --vms restores each, median and worst
  memory   PSS (/proc/PID/smaps_rollup) of the page servers (and their watchdogs) with --vms
           VMs connected and idle (each touched 1% of its memory): the daemon's growth per VM
           after its first (which maps the build's diff, page cache the later VMs share)
           against one restore process (+ watchdog) per VM
  touch    --touch-vms VMs touching all their memory at once, one thread each, no byte
           compare (each waits after its handshake for one start time): from the first VM's
           first touch to the last VM's last
  scale    1, 8, 32, 64 VMs of --scale-size touching all their memory at once through the
           daemon and through processes: aggregate MiB/s, median per-VM time, server PSS peak

    python bench/serve.py [--size 256M] [--vms 32] [--touch-vms 8] [--scale 1,8,32,64]
                          [--scale-size 32M] [--workdir DIR]
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
from fcsnap.store import ops
from fcsnap.store.builder import BuildOptions
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.units import parse_size

WAIT = 120.0
MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


def pss_kib(pid: int) -> int:
    """PSS of `pid` and its children (a server's watchdog), in KiB."""
    total = 0
    pids = [pid]
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids += [int(p) for p in f.read().split()]
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
    def __init__(self, store: Path, work: Path) -> None:
        self.api = work / "api.sock"
        self.work = work
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fcsnap", "serve", "--store", str(store), "--api",
             str(self.api)], stderr=subprocess.DEVNULL)
        wait_for(self.api.exists, "the daemon's API socket")

    def post(self, name: str) -> tuple[float, str]:
        started = time.perf_counter()
        status, answer = call_daemon(self.api, "POST", "/restores", {
            "vm": "tmpl", "socket": str(self.work / f"{name}.sock")}, WAIT)
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


def touch_all(n: int, size: int, start: Any, work: Path, tag: str) -> dict[str, float]:
    """n VMs touching all their memory at once; `start(name)` readies a server for each."""
    servers = [start(f"{tag}{i}") for i in range(n)]
    peak = [0]
    done = threading.Event()
    pids = servers[0] if isinstance(servers[0], int) else None

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], sum(pss_kib(p) for p in (
                [pids] if pids is not None else [s.pid for s in servers])))

    sampler = threading.Thread(target=sample, daemon=True)
    start_at = time.monotonic() + 3.0 + 0.3 * n  # every stand-in is up before any touches
    vms = [stand_in(work, f"{tag}{i}", size, 1.0, start_at=start_at) for i in range(n)]
    sampler.start()
    for vm in vms:
        assert vm.wait(WAIT) == 0
    done.set()
    sampler.join(WAIT)
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
            "pss_peak_mib": round(peak[0] / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256M")
    p.add_argument("--vms", type=int, default=32)
    p.add_argument("--touch-vms", type=int, default=8)
    p.add_argument("--scale", default="1,8,32,64")
    p.add_argument("--scale-size", default="32M")
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    size, scale_size = parse_size(args.size), parse_size(args.scale_size)
    work = Path(tempfile.mkdtemp(prefix="fcsnap-serve-", dir=args.workdir))
    store = work / "store"
    write_full(work / "tmpl.mem", synthetic_memory(size, seed=5))
    ops.pack(work / "tmpl.mem", store, BuildOptions(name="tmpl"))
    results: dict[str, Any] = {"machine": machine(), "size": size, "vms": args.vms,
                               "touch_vms": args.touch_vms,
                               "load_before": os.getloadavg()}

    # start + memory: the daemon
    daemon = Daemon(store, work)
    idle = pss_kib(daemon.proc.pid)
    starts = [daemon.post("d0")]
    vms = [stand_in(work, "d0", size, 0.01, hold=WAIT)]
    wait_for(lambda: daemon.serving() == 1, "the first VM to be served")
    time.sleep(2.0)  # it has touched its 1%
    first = pss_kib(daemon.proc.pid)
    starts += [daemon.post(f"d{i}") for i in range(1, args.vms)]
    listening = pss_kib(daemon.proc.pid)
    vms += [stand_in(work, f"d{i}", size, 0.01, hold=WAIT) for i in range(1, args.vms)]
    wait_for(lambda: daemon.serving() == args.vms, "every VM to be served")
    time.sleep(2.0)  # every stand-in has touched its 1%
    served = pss_kib(daemon.proc.pid)
    for vm in vms:
        vm.kill()
        vm.wait(WAIT)
    latencies = sorted(t for t, _ in starts)
    results["daemon"] = {
        "start_median_ms": round(statistics.median(latencies) * 1e3, 2),
        "start_worst_ms": round(latencies[-1] * 1e3, 2),
        "pss_idle_mib": round(idle / 1024, 1),
        "pss_listening_mib": round(listening / 1024, 1),
        "pss_first_vm_mib": round(first / 1024, 1),
        "pss_serving_mib": round(served / 1024, 1),
        "pss_per_vm_mib": round((served - first) / 1024 / (args.vms - 1), 2),
    }
    # start + memory: one process per VM
    procs = [restore_process(store, work, f"p{i}") for i in range(args.vms)]
    vms = [stand_in(work, f"p{i}", size, 0.01, hold=WAIT) for i in range(args.vms)]
    time.sleep(2.0 + args.vms * 0.1)
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
        "pss_per_vm_mib": round(served_p / 1024 / args.vms, 2),
    }

    # touch all memory at once, and the scaling table
    def via_daemon(name: str) -> int:
        daemon.post(name)
        return daemon.proc.pid

    def via_process(name: str) -> subprocess.Popen:
        return restore_process(store, work, name)[1]

    results["touch"] = {
        "daemon": touch_all(args.touch_vms, size, via_daemon, work, "td"),
        "processes": touch_all(args.touch_vms, size, via_process, work, "tp"),
    }
    write_full(work / "scale.mem", synthetic_memory(scale_size, seed=6))
    ops.pack(work / "scale.mem", store, BuildOptions(name="small"))
    results["scale_size"] = scale_size
    results["scale"] = []
    for n in [int(x) for x in args.scale.split(",")]:
        def small_daemon(name: str) -> int:
            status, answer = call_daemon(daemon.api, "POST", "/restores", {
                "vm": "small", "socket": str(work / f"{name}.sock")}, WAIT)
            assert status == 201, answer
            return daemon.proc.pid

        def small_process(name: str) -> subprocess.Popen:
            sock = work / f"{name}.sock"
            proc = subprocess.Popen([sys.executable, "-m", "fcsnap", "restore", "--vm", "small",
                                     "--store", str(store), "--socket", str(sock), "--quiet"],
                                    stderr=subprocess.DEVNULL)
            wait_for(sock.exists, str(sock))
            return proc

        results["scale"].append({
            "vms": n,
            "daemon": touch_all(n, scale_size, small_daemon, work, f"sd{n}-"),
            "processes": touch_all(n, scale_size, small_process, work, f"sp{n}-"),
        })
    daemon.stop()
    results["load_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "serve.md").write_text(render(results))
    print(render(results))


def render(r: dict[str, Any]) -> str:
    d, p = r["daemon"], r["processes"]
    t = r["touch"]
    lines = [
        f"# fcsnap serve vs fcsnap restore ({r['size'] // MiB} MiB build, {r['vms']} VMs; "
        f"{r['machine']['cores']} cores, load {r['load_before'][0]:.1f} before, "
        f"{r['load_after'][0]:.1f} after)",
        "",
        "| | daemon (`fcsnap serve`) | one `fcsnap restore` per VM |",
        "|---|---|---|",
        f"| ask to listening socket, median | {d['start_median_ms']} ms | "
        f"{p['start_median_ms']} ms |",
        f"| ask to listening socket, worst | {d['start_worst_ms']} ms | "
        f"{p['start_worst_ms']} ms |",
        f"| PSS, {r['vms']} VMs connected (servers + watchdogs) | {d['pss_serving_mib']} MiB | "
        f"{p['pss_serving_mib']} MiB |",
        f"| PSS idle / with its first VM served | {d['pss_idle_mib']} / "
        f"{d['pss_first_vm_mib']} MiB | |",
        f"| PSS per additional VM | {d['pss_per_vm_mib']} MiB | {p['pss_per_vm_mib']} MiB |",
        f"| {r['touch_vms']} VMs touching all memory at once: first touch to last | "
        f"{t['daemon']['wall_s']} s | {t['processes']['wall_s']} s |",
        "",
        f"Scaling ({r['scale_size'] // MiB} MiB guests, all touching all memory at once):",
        "",
        "| VMs | daemon MiB/s | processes MiB/s | daemon per-VM median | processes per-VM "
        "median | daemon PSS peak | processes PSS peak | touch start spread (d / p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["scale"]:
        dd, pp = row["daemon"], row["processes"]
        lines.append(f"| {row['vms']} | {dd['mib_s']} | {pp['mib_s']} | {dd['per_vm_median_s']} s"
                     f" | {pp['per_vm_median_s']} s | {dd['pss_peak_mib']} MiB | "
                     f"{pp['pss_peak_mib']} MiB | {dd['start_spread_s']} / "
                     f"{pp['start_spread_s']} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
