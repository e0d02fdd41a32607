"""A running VM's next generation with the real Firecracker: what each way of tracking the
guest's writes costs the guest, and its pause for the next generation.

fcguest (fcsnap/testing/fcguest) is booted, snapshotted Full and packed; each run restores it
from `fcsnap serve` into a new Firecracker one of three ways:

    plain            no tracking; the next generation: Paused, `PUT /snapshot/create` Full
                     (Firecracker reads all of memory: the daemon serves every page the guest
                     never needed), Resumed, then `fcsnap diff` of the file
    dirty-logging    loaded with `enable_diff_snapshots` (KVM dirty logging for the VM's
                     life); Paused, a Diff snapshot (the pages KVM logged dirty), Resumed, then
                     `fcsnap diff --sparse-diff` of it
    write-protect    `--track-writes`, loaded with `enable_diff_snapshots` only for the
                     vmstate: Paused, a Diff snapshot into a throwaway file, `POST
                     /restores/ID/checkpoint` (the written pages read from the VM and
                     stored), Resumed

and measures what the guest sees: the load call to its first progress line (its working set
faulted in, WRITE pages written), the time of each of its next ROUNDS rounds (each rewrites
WRITE pages picked at random among its filled ones, most of them first writes since the
restore in the early rounds: a write-protect fault each, or a KVM dirty-logging fault), and
the pause for the next generation (`PATCH /vm Paused` to the answer to `Resumed`), plus the
work left after the pause. The three ways run in rotation, their order reversed every other
round, --repeat times; medians, with the range of single runs.

    python3 bench/dirty_tracking.py [--mib 256] [--repeat 5] [--write 1024] [--rounds 6]

Results: bench/results/dirty-tracking-<mib>M.{md,json}, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import TIMEOUT, fcsnap, timed  # noqa: E402  (the same helpers)
from machine import machine, publish  # noqa: E402

from fcsnap.daemon.client import checkpoint_via_daemon  # noqa: E402
from fcsnap.testing.fcguest import GuestConfig  # noqa: E402
from fcsnap.testing.realvmm import Daemon, Firecracker, Snapshot, take_snapshot  # noqa: E402
from fcsnap.units import PAGE  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HOWS = ("plain", "dirty-logging", "write-protect")


def one_run(template: Snapshot, store: Path, run: Path, how: str, rounds: int
            ) -> dict[str, Any]:
    """Restore `how`, time the guest's first progress and `rounds` rounds, then the pause of
    `how`'s next generation; seconds."""
    run.mkdir(parents=True)
    tracking, logging = how == "write-protect", how != "plain"
    with Daemon(store, run) as daemon, Firecracker(run, how) as vm:
        restore = daemon.restore("vm", run / "uffd.sock",
                                 *(["--track-writes"] if tracking else []))
        vm.load(template.vmstate, uffd=run / "uffd.sock", enable_diff_snapshots=logging,
                timeout=TIMEOUT)
        vm.wait_rounds(rounds + 1, TIMEOUT * 2)
        times = [t for t, _ in vm.timed_rounds()]
        parts: dict[str, Any] = {
            "first_round": times[0] - vm.load_started,
            "rounds": [b - a for a, b in zip(times, times[1:rounds + 1], strict=False)]}
        started = time.monotonic()
        parts["pause"] = timed(lambda: vm.ask("PATCH", "/vm", {"state": "Paused"}))
        parts["snapshot"] = timed(lambda: vm.snapshot(
            run / "s.state", run / "s.mem", "Diff" if logging else "Full", TIMEOUT))
        if tracking:
            answer: dict[str, Any] = {}
            parts["checkpoint"] = timed(lambda: answer.update(
                checkpoint_via_daemon(daemon.api, restore, "vm-next")))
            parts["pages"] = answer["written_pages"]
        parts["resume"] = timed(vm.resume)
        parts["guest_paused"] = time.monotonic() - started
        if not tracking:  # the generation, after the guest is running again
            sparse = ["--sparse-diff"] if logging else []
            parts["diff_after"] = timed(lambda: fcsnap(
                "diff", run / "s.mem", "--base", "vm", "--store", store, "--name", "vm-next",
                *sparse))
        vm.wait_rounds(len(vm.rounds()) + 1, TIMEOUT)  # it goes on
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--write", type=int, default=1024, help="pages the guest rewrites a round")
    p.add_argument("--rounds", type=int, default=6, help="rounds timed after the first")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    a = p.parse_args()
    pages = (a.mib << 20) // PAGE
    config = GuestConfig(fill=pages // 5, ws=pages // 10, sweep=0, write=a.write, seed=3)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {how: [] for how in HOWS}
    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="fcsnap-dirty-tracking-") as tmp:
        work = Path(tmp)
        template = take_snapshot(work / "template", config, mem_mib=a.mib, timeout=TIMEOUT * 3)
        store = work / "store"
        fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
               "--name", "vm")
        for i in range(a.repeat):  # in rotation, side by side
            for how in HOWS[:: -1 if i % 2 else 1]:
                runs[how].append(one_run(template, store, work / f"{how}-{i}", how, a.rounds))
                print(f"{i + 1}/{a.repeat} {how}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in runs[how][-1].items() if k != "rounds"),
                    file=sys.stderr)
    result = {"mib": a.mib, "repeat": a.repeat, "write_pages_per_round": a.write,
              "rounds": a.rounds, "machine": machine(),
              "load_average": {"before": load_before, "after": os.getloadavg()}, "runs": runs}
    publish(RESULTS / f"dirty-tracking-{a.mib}M", result, markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    def ms(values: list[float]) -> str:
        """median (min-max) in ms"""
        return (f"{statistics.median(values) * 1e3:.0f} "
                f"({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})")

    before, after = r["load_average"]["before"][0], r["load_average"]["after"][0]
    lines = [f"# Tracking a running {r['mib']} MiB VM's writes (Firecracker 1.12.1)", "",
             f"`python3 bench/dirty_tracking.py --mib {r['mib']} --repeat {r['repeat']} --write "
             f"{r['write_pages_per_round']} --rounds {r['rounds']}`: medians of {r['repeat']} "
             "runs per way in rotation (in brackets, the range of single runs); the guest "
             "rewrites "
             f"{r['write_pages_per_round']} pages a round. Load average {before:.1f} before, "
             f"{after:.1f} after, on {r['machine']['cores']} CPUs.", "",
             "| way | load to first round ms | a round ms (all rounds) | guest paused ms "
             "| snapshot ms | checkpoint ms | diff after ms | pages written |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    def cell(runs: list[dict[str, Any]], key: str) -> str:
        return ms([x[key] for x in runs]) if key in runs[0] else "-"

    for how, runs in r["runs"].items():
        pages = (f"{statistics.median(x['pages'] for x in runs):.0f}" if "pages" in runs[0]
                 else "-")
        cells = [cell(runs, "first_round"), ms([t for x in runs for t in x["rounds"]]),
                 *(cell(runs, k) for k in ("guest_paused", "snapshot", "checkpoint",
                                           "diff_after")), pages]
        lines.append(f"| {how} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
