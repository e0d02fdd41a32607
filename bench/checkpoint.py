"""A running VM's next generation with the real Firecracker: the guest's pause, and what
tracking its writes costs it.

fcguest (fcsnap/testing/fcguest) is booted, snapshotted Full and packed; each run restores it
from `fcsnap serve` into a new Firecracker, lets it print two rounds (each rewrites WRITE pages)
and then takes the next generation, timing the guest's pause from `PATCH /vm Paused` to the
answer to `Resumed`:

    full snapshot        Paused, `PUT /snapshot/create` Full (Firecracker reads all of memory:
                         the daemon serves every page the guest never needed), Resumed; the
                         generation is then `fcsnap diff` of the file, after the pause
    checkpoint           restored with track_writes and loaded with enable_diff_snapshots:
                         Paused, a Diff snapshot into a throwaway file (for the vmstate: only
                         the pages KVM logged dirty are written), `POST /restores/ID/checkpoint`
                         (the written pages read from the VM and stored), Resumed
    background           the same with `"background": true`: the checkpoint answers once the
                         written set is taken and protected again; Resumed; the copy's own
                         time (`copy_seconds`) and the pre-images it kept, after the pause

and the guest's own cost of each way of tracking writes: the median time between its progress
lines (steady rounds, after the first) restored plainly, with write-protect (track_writes) and
with KVM dirty logging (enable_diff_snapshots).

    python3 bench/checkpoint.py [--mib 256] [--repeat 3] [--write 512] [--no-rounds]

Results: bench/results/checkpoint-<mib>M.{md,json} (with --no-rounds: -pauses.{md,json}).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import machine, publish  # noqa: E402

from fcsnap.daemon.client import checkpoint_via_daemon, wait_checkpoint  # noqa: E402
from fcsnap.testing.fcguest import GuestConfig  # noqa: E402
from fcsnap.testing.realvmm import Daemon, Firecracker, Snapshot, take_snapshot  # noqa: E402
from fcsnap.units import PAGE  # noqa: E402

TIMEOUT = 120.0
RESULTS = Path(__file__).resolve().parent / "results"
STEADY = 4  # rounds timed for the guest's cost of tracking


def fcsnap(*args: object) -> None:
    done = subprocess.run([sys.executable, "-m", "fcsnap", *map(str, args), "--quiet"],
                          capture_output=True, text=True, timeout=TIMEOUT * 5)
    if done.returncode != 0:
        raise SystemExit(f"fcsnap {args[0]} failed: {done.stderr.strip()}")


def timed(fn: Any) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def one_run(template: Snapshot, store: Path, run: Path, mode: str) -> dict[str, float]:
    """Restore, two rounds, then the pause of `mode`; its parts in seconds."""
    run.mkdir(parents=True)
    tracking = mode != "full snapshot"
    with Daemon(store, run) as daemon, Firecracker(run, mode.replace(" ", "-")) as vm:
        restore = daemon.restore("vm", run / "uffd.sock",
                                 *(["--track-writes"] if tracking else []))
        vm.load(template.vmstate, uffd=run / "uffd.sock", enable_diff_snapshots=tracking,
                timeout=TIMEOUT)
        vm.wait_rounds(3, TIMEOUT)
        parts: dict[str, float] = {}
        started = time.monotonic()
        parts["pause"] = timed(lambda: vm.ask("PATCH", "/vm", {"state": "Paused"}))
        kind = "Diff" if tracking else "Full"
        parts["snapshot"] = timed(lambda: vm.snapshot(run / "s.state", run / "s.mem", kind,
                                                      TIMEOUT))
        if tracking:
            answer: dict[str, Any] = {}
            background = mode == "background"
            parts["checkpoint"] = timed(lambda: answer.update(
                checkpoint_via_daemon(daemon.api, restore, "vm-next", background)))
            parts["pages"] = answer["written_pages"]
        parts["resume"] = timed(vm.resume)
        parts["guest_paused"] = time.monotonic() - started
        if mode == "background":
            done = wait_checkpoint(daemon.api, restore, answer["checkpoint"], TIMEOUT)
            parts["copy"], parts["preimages"] = done["copy_seconds"], done["preimages"]
        if not tracking:  # the generation, after the guest is running again
            parts["diff_after"] = timed(lambda: fcsnap(
                "diff", run / "s.mem", "--base", "vm", "--store", store, "--name", "vm-next"))
        vm.wait_rounds(len(vm.rounds()) + 1, TIMEOUT)  # it goes on
    return parts


def round_time(template: Snapshot, store: Path, run: Path, how: str) -> float:
    """The median seconds between the guest's steady progress lines, restored `how`."""
    run.mkdir(parents=True)
    with Daemon(store, run) as daemon, Firecracker(run, how) as vm:
        daemon.restore("vm", run / "uffd.sock",
                       *(["--track-writes"] if how == "write-protect" else []))
        vm.load(template.vmstate, uffd=run / "uffd.sock",
                enable_diff_snapshots=how == "dirty-logging", timeout=TIMEOUT)
        vm.wait_rounds(STEADY + 2, TIMEOUT * 2)
        times = [t for t, _ in vm.timed_rounds()][1:]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--write", type=int, default=512, help="pages the guest rewrites a round")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--no-rounds", action="store_true",
                   help="time the pauses only, not the guest's cost of each tracking")
    a = p.parse_args()
    pages = (a.mib << 20) // PAGE
    config = GuestConfig(fill=pages // 5, ws=pages // 10, sweep=0, write=a.write, seed=3)
    with tempfile.TemporaryDirectory(dir=a.workdir, prefix="fcsnap-checkpoint-") as tmp:
        work = Path(tmp)
        template = take_snapshot(work / "template", config, mem_mib=a.mib, timeout=TIMEOUT * 3)
        store = work / "store"
        fcsnap("pack", "--init", template.mem, "--vmstate", template.vmstate, "--store", store,
               "--name", "vm")
        runs: dict[str, list[dict[str, float]]] = {"full snapshot": [], "checkpoint": [],
                                                   "background": []}
        rounds: dict[str, list[float]] = {} if a.no_rounds else {
            "plain": [], "write-protect": [], "dirty-logging": []}
        for i in range(a.repeat):  # in rotation, side by side
            for mode in runs:
                runs[mode].append(one_run(template, store, work / f"{mode}-{i}", mode))
            for how in rounds:
                rounds[how].append(round_time(template, store, work / f"{how}-{i}", how))
    result = {"mib": a.mib, "repeat": a.repeat, "write_pages_per_round": a.write,
              "machine": machine(), "runs": runs, "round_s": rounds}
    stem = RESULTS / f"checkpoint-{a.mib}M{'-pauses' if a.no_rounds else ''}"
    publish(stem, result, markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:.1f}"

    lines = [f"# Checkpoint of a running {r['mib']} MiB VM (Firecracker 1.12.1)", "",
             f"Medians of {r['repeat']} runs; the guest rewrites {r['write_pages_per_round']} "
             "pages a round.", "",
             "| path | guest paused ms | snapshot ms | checkpoint ms | diff after ms "
             "| copy after ms | pre-images |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, runs in r["runs"].items():
        cell = {k: ms([x[k] for x in runs]) if k in runs[0] else "-"
                for k in ("guest_paused", "snapshot", "checkpoint", "diff_after", "copy")}
        kept = (f"{statistics.median(x['preimages'] for x in runs):.0f}"
                if "preimages" in runs[0] else "-")
        lines.append(f"| {mode} | {cell['guest_paused']} | {cell['snapshot']} | "
                     f"{cell['checkpoint']} | {cell['diff_after']} | {cell['copy']} | {kept} |")
    if r["round_s"]:
        lines += ["", "| guest restored with | round ms (median) |", "|---|---:|"]
        lines += [f"| {how} | {ms(v)} |" for how, v in r["round_s"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
