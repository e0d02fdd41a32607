"""Helpers of the store tests that run fcsnap as real, concurrent processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import fcsnap_here

from fcsnap.store.format.locks import STOP_ENV
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

MIB = 1 << 20
TIMEOUT = 120  # seconds any one command may take


def stopping_at(point: str) -> dict[str, str]:
    """The environment of a command that stops itself (SIGSTOP) at `point` (locks.stop_point)."""
    return {**os.environ, STOP_ENV: point}


def start_stopped(*args: object, point: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `fcsnap ARGS` and return once it has stopped itself at `point`."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "fcsnap", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=stopping_at(point),
    )
    wait_stopped(proc.pid if not prefix else fcsnap_pid_under(proc))
    return proc


def state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def wait_stopped(pid: int, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while state(pid) != "T":
        assert state(pid) != "Z", f"process {pid} exited instead of stopping"
        assert time.monotonic() < end, f"process {pid} did not stop within {deadline} s"
        time.sleep(0.02)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # it exited meanwhile
            text = stat.read_text()
            parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    return parents


def fcsnap_pid_under(proc: subprocess.Popen, deadline: float = 60) -> int:
    """The host pid of the `python -m fcsnap` process among `proc`'s descendants."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        parents = _parents()
        family = {proc.pid}
        for _ in range(8):  # unshare -> sh -> python: a few generations deep
            family |= {pid for pid, parent in parents.items() if parent in family}
        for pid in family - {proc.pid}:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if cmdline[1:3] == [b"-m", b"fcsnap"]:
                    return pid
        time.sleep(0.02)
    raise AssertionError(f"no fcsnap process under {proc.pid} within {deadline} s")


def resume(proc: subprocess.Popen, pid: int | None = None) -> subprocess.CompletedProcess:
    """SIGCONT a stopped command and wait for it to finish (with a deadline)."""
    os.kill(pid or proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def visible_builds(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and p.name[0] != "." and
                  p.name != "vms")


def hidden_entries(store: Path) -> list[str]:
    """Staging and trash left behind (vms/ and its lock are the store's own)."""
    return sorted(p.name for p in store.iterdir() if p.name.startswith("."))


def make_lineage(tmp_path: Path, store: Path, name: str = "web", seed: int = 1) -> list[str]:
    """Generations 0 and 1 under `name`, from 4 MiB memory files m0, m1 (also left in
    tmp_path, with m2 for a next diff); returns the build ids. Made in this process: the
    lineage is what the test starts from, not what it tests."""
    mem = synthetic_memory(4 * MIB, seed=seed)
    ids = []
    for gen in range(3):
        if gen:
            mem, _ = evolve(mem, seed=seed + gen)
        write_full(tmp_path / f"m{gen}", mem)
    for gen in range(2):
        args = ("pack", "--init") if gen == 0 else ("diff", "--base", name)
        r = fcsnap_here(*args[:1], tmp_path / f"m{gen}", *args[1:], "--store", store,
                        "--name", name, "--json")
        assert r.returncode == 0, r.stderr
        ids.append(json.loads(r.stdout)["build_id"])
    return ids
