"""Scratch directories (fcsnap/scratch.py: the S3 mirror, staged builds) do not outlive their
process: removed at exit, and those left by a process killed outright are removed by the next
process that makes one; another process's or another user's are left alone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import WAIT

from fcsnap import scratch

HOLDER = (
    "import sys, time\n"
    "from fcsnap.scratch import scratch_dir\n"
    "paths = [scratch_dir('mirror'), scratch_dir('chunks')]\n"
    "(paths[0] / 'header').write_bytes(b'x' * 4096)\n"
    "print(*paths, flush=True)\n"
    "if sys.argv[1] == 'wait':\n    time.sleep(60)\n"
)


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The temporary directory of this test and of the processes it starts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path
    scratch.release_all(tmp_path)


def holder(how: str) -> tuple[subprocess.Popen[str], list[Path]]:
    """A process that makes two scratch directories and exits, or waits."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, how], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    return proc, [Path(p) for p in proc.stdout.readline().split()]


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("fcsnap-"))


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_removed_when_its_process_exits(tmp: Path) -> None:
    proc, paths = holder("exit")
    assert proc.wait(WAIT) == 0
    assert all(p.parent.parent == tmp and not p.exists() for p in paths)
    assert leftovers(tmp) == []


def test_those_left_by_a_killed_process_go_with_the_next(tmp: Path) -> None:
    proc, killed = holder("wait")
    proc.kill()
    proc.wait(WAIT)
    assert (killed[0] / "header").exists()  # exit handlers do not run on SIGKILL
    mine = scratch.scratch_dir("mirror")
    assert not any(p.exists() for p in killed)
    assert leftovers(tmp) == [mine.parent.name]
    scratch.release_all(tmp)
    assert not mine.exists() and leftovers(tmp) == []


def test_a_living_process_keeps_its_own(tmp: Path) -> None:
    proc, theirs = holder("wait")
    try:
        with scratch.scratch("stage") as mine:
            assert all(p.exists() for p in theirs) and mine.exists()
        assert not mine.exists() and all(p.exists() for p in theirs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)


def test_one_descriptor_however_many_directories(tmp: Path) -> None:
    """A long-lived process (the daemon, a program using the Python API) opening many stores
    holds one lock, not one per directory; what it removes is made again."""
    before = open_fds()
    made = [scratch.scratch_dir("mirror") for _ in range(50)]
    assert len(open_fds() - before) == 1 and len({p.parent for p in made}) == 1
    scratch.release_all(tmp)
    assert open_fds() == before and not any(p.exists() for p in made)
    again = scratch.scratch_dir("mirror")
    assert again.is_dir() and again.parent != made[0].parent


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's directory")
def test_another_users_or_a_symlink_is_left(tmp: Path) -> None:
    others = tmp / f"{scratch.PREFIX}other"
    others.mkdir()
    (others / "file").write_bytes(b"theirs")
    os.chown(others, 65534, 65534)
    target = tmp / "kept"
    target.mkdir()
    (target / "file").write_bytes(b"mine")
    (tmp / f"{scratch.PREFIX}link").symlink_to(target)
    scratch.sweep(tmp)
    assert (others / "file").read_bytes() == b"theirs"
    assert (target / "file").read_bytes() == b"mine"
    assert (tmp / f"{scratch.PREFIX}link").is_symlink()


FORKER = (
    "import os, sys\n"
    "from fcsnap.scratch import scratch_dir\n"
    "mine = scratch_dir('mirror')\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    theirs = scratch_dir('stage')\n"
    "    print(theirs, flush=True)\n"
    "    sys.exit(0)\n"  # an ordinary exit: the child's exit handlers run
    "os.waitpid(pid, 0)\n"
    "print(mine, mine.exists(), flush=True)\n"
)


def test_a_forked_child_leaves_its_parent_s(tmp: Path) -> None:
    """A child of a fork (a program using the Python API) that exits removes what it made,
    not its parent's directories, which the parent still uses."""
    out = subprocess.run([sys.executable, "-c", FORKER], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr
    theirs, mine = out.stdout.split("\n")[:2]
    assert mine.endswith(" True"), out.stdout  # the parent's, after its child exited
    assert not Path(theirs).exists() and Path(theirs).parent != Path(mine.split()[0]).parent
    assert leftovers(tmp) == []


def test_threads_making_their_first_at_once_share_one_directory(
        tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads (restores through the Python API) making the process's first scratch
    directories at the same moment: one locked directory, removed at exit, not one each (the
    other's left to the next process, its descriptor held until then)."""
    import threading

    meet = threading.Barrier(2, timeout=1)
    sweep = scratch.sweep

    def slow_sweep(root: Path) -> None:  # the two threads meet in the sweep, if both get there
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait()
        sweep(root)

    monkeypatch.setattr(scratch, "sweep", slow_sweep)
    before = open_fds()
    made: list[Path] = []
    threads = [threading.Thread(target=lambda: made.append(scratch.scratch_dir("mirror")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert len(made) == 2 and made[0].parent == made[1].parent, made
    assert len(open_fds() - before) == 1
    scratch.release_all(tmp)
    assert leftovers(tmp) == [] and open_fds() == before
