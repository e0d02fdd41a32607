"""Concurrent commands on one store, as real processes, interleaved on purpose.

Each test stops one command at a chosen point (FCSNAP_STOP_AT makes it SIGSTOP itself there),
runs another to completion, then lets the first go on: the interleaving is forced, not hoped
for, and every wait has a deadline.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import fcsnap, restore_argv
from store_procs import (
    fcsnap_pid_under,
    hidden_entries,
    make_lineage,
    resume,
    start_stopped,
    visible_builds,
)

from fcsnap.store.format.locks import lock_dir
from fcsnap.store.format.names import read_vm_pointer


def new_build(store: Path, before: list[str]) -> str:
    (added,) = set(visible_builds(store)) - set(before)
    return added


def assert_holds_lock(build: Path) -> None:
    lock = lock_dir(build, exclusive=True, block=False)
    if lock is not None:
        lock.release()
    assert lock is None, f"nothing holds {build.name} locked"


@pytest.mark.parametrize("first,second", [("diff", "diff"), ("squash", "diff"), ("diff", "squash")])
def test_name_publication_is_a_compare_and_swap(tmp_path, first, second):
    """The command that started from web's old head and finishes last loses: exit 1, one line,
    its build gone; web keeps the winner's build."""
    store = tmp_path / "store"
    _, g1 = make_lineage(tmp_path, store)
    argv = {
        "diff": ("diff", tmp_path / "m2", "--base", "web", "--store", store, "--name", "web"),
        "squash": ("squash", "web", "--store", store, "--name", "web"),
    }
    before = visible_builds(store)
    loser = start_stopped(*argv[first], point="publish")
    loser_build = new_build(store, before)  # published under its id, the name not yet moved
    assert_holds_lock(store / loser_build)  # kept from gc until the name is settled
    winner = fcsnap(*argv[second], "--json")
    assert winner.returncode == 0, winner.stderr
    winner_build = new_build(store, [*before, loser_build])
    assert str(read_vm_pointer(store, "web")) == winner_build
    lost = resume(loser)
    assert lost.returncode == 1
    assert lost.stderr == f"fcsnap: error: web moved to {winner_build} while this {first} ran\n"
    assert str(read_vm_pointer(store, "web")) == winner_build
    assert visible_builds(store) == sorted([*before, winner_build])
    assert hidden_entries(store) == []
    assert g1 in before


def test_a_name_created_meanwhile_is_not_overwritten(tmp_path):
    store = tmp_path / "store"
    make_lineage(tmp_path, store, name="base")
    loser = start_stopped("pack", "--init", tmp_path / "m0", "--store", store, "--name", "new",
                          point="publish")
    winner = fcsnap("squash", "base", "--store", store, "--name", "new", "--json")
    assert winner.returncode == 0, winner.stderr
    lost = resume(loser)
    assert lost.returncode == 1
    assert lost.stderr == (
        f"fcsnap: error: new moved to {read_vm_pointer(store, 'new')} while this pack ran\n"
    )


def dead_host_pid() -> int:
    """A pid no process has on the host, for a namespaced process to be given."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, pid_max // 2, -1):
        if not Path(f"/proc/{pid}").exists():
            return pid
    pytest.skip("no free pid found")


def in_other_pid_namespace(pid: int) -> tuple[str, ...]:
    """The command prefix running the rest in a new pid namespace, as pid `pid` there."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a pid namespace")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot create a pid namespace here: {probe.stderr.decode().strip()}")
    # sh is pid 1 there; the next process it forks gets ns_last_pid + 1.
    script = f'echo {pid - 1} > /proc/sys/kernel/ns_last_pid && "$@"; exit $?'
    return ("unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script, "sh")


def test_staging_of_a_pack_in_another_pid_namespace_survives_cleanup(tmp_path):
    """A pack in a container (another pid namespace) has a pid that is dead here: its staging
    directory must still be left alone while it runs, and removed once it is killed."""
    store = tmp_path / "store"
    make_lineage(tmp_path, store)
    pid = dead_host_pid()
    prefix = in_other_pid_namespace(pid)
    builds = visible_builds(store)
    contained = start_stopped("pack", "--init", tmp_path / "m2", "--store", store, "--name",
                              "boxed",
                              point="staged", prefix=prefix)
    (staging,) = hidden_entries(store)
    assert staging.startswith(f".staging-{pid}-")  # the pid of the other namespace
    assert not Path(f"/proc/{pid}").exists()  # looks dead from here
    host = fcsnap("pack", "--init", tmp_path / "m1", "--store", store, "--name", "host")
    assert host.returncode == 0, host.stderr  # it cleaned up stale staging on the way
    assert hidden_entries(store) == [staging]
    done = resume(contained, fcsnap_pid_under(contained))
    assert done.returncode == 0, done.stderr
    assert read_vm_pointer(store, "boxed") is not None
    assert len(visible_builds(store)) == len(builds) + 2
    assert hidden_entries(store) == []


def test_staging_of_a_killed_pack_is_removed(tmp_path):
    store = tmp_path / "store"
    make_lineage(tmp_path, store)
    killed = start_stopped("pack", "--init", tmp_path / "m2", "--store", store, point="staged")
    assert len(hidden_entries(store)) == 1
    killed.kill()
    killed.wait(timeout=60)
    r = fcsnap("pack", "--init", tmp_path / "m1", "--store", store)
    assert r.returncode == 0, r.stderr
    assert hidden_entries(store) == []


@pytest.mark.parametrize("command", ["verify", "unpack", "squash", "diff"])
def test_readers_hold_the_lineage_locked_while_they_work(tmp_path, command):
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    argv = {
        "verify": ("verify", "web", "--store", store),
        "unpack": ("unpack", "web", "--store", store, "-o", tmp_path / "out"),
        "squash": ("squash", "web", "--store", store),
        "diff": ("diff", tmp_path / "m2", "--base", "web", "--store", store),
    }[command]
    proc = start_stopped(*argv, point="lineage")
    for build in (g0, g1):
        assert_holds_lock(store / build)
        shared = lock_dir(store / build, exclusive=False, block=False)  # other readers may
        assert shared is not None
        shared.release()
    done = resume(proc)
    assert done.returncode == 0, done.stderr
    for build in (g0, g1):
        free = lock_dir(store / build, exclusive=True, block=False)
        assert free is not None
        free.release()


def test_restore_holds_the_lineage_locked_for_its_life(tmp_path):
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    sock = tmp_path / "uffd.sock"
    proc = subprocess.Popen(
        restore_argv("web", sock, store=store, quiet=False),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready, "restore did not start listening within 60 s"
        line = proc.stderr.readline()  # "fcsnap: serving ... on SOCK" once listening
        assert "serving" in line, line + proc.stderr.read()
        for build in (g0, g1):
            assert_holds_lock(store / build)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    for build in (g0, g1):
        free = lock_dir(store / build, exclusive=True, block=False)
        assert free is not None
        free.release()
