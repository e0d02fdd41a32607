"""Scratch directories (fcsnap/scratch.py: the S3 mirror, staged builds) do not outlive their
process: removed at exit, and one left by a process killed outright is removed by the next
process that makes one; another process's or another user's is left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import WAIT

from fcsnap import scratch

HOLDER = (
    "import sys, time\n"
    "from fcsnap.scratch import scratch_dir\n"
    "path = scratch_dir('mirror')\n"
    "(path / 'header').write_bytes(b'x' * 4096)\n"
    "print(path, flush=True)\n"
    "if sys.argv[1] == 'wait':\n    time.sleep(60)\n"
)


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory of this test and of the processes it starts."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def holder(how: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, how], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("fcsnap-"))


def test_removed_when_its_process_exits(tmp: Path) -> None:
    proc, path = holder("exit")
    assert proc.wait(WAIT) == 0
    assert path.parent == tmp and not path.exists() and leftovers(tmp) == []


def test_one_left_by_a_killed_process_goes_with_the_next(tmp: Path) -> None:
    proc, killed = holder("wait")
    proc.kill()
    proc.wait(WAIT)
    assert (killed / "header").exists()  # exit handlers do not run on SIGKILL
    mine = scratch.scratch_dir("mirror")
    try:
        assert not killed.exists() and leftovers(tmp) == [mine.name]
    finally:
        scratch.release(mine)
    assert not mine.exists()


def test_a_living_process_keeps_its_own(tmp: Path) -> None:
    proc, theirs = holder("wait")
    try:
        with scratch.scratch("stage") as mine:
            assert theirs.exists() and (theirs / "header").exists() and mine.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
    assert not mine.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make another user's directory")
def test_another_users_or_a_symlink_is_left(tmp: Path) -> None:
    others = tmp / f"{scratch.PREFIX}mirror-other"
    others.mkdir()
    (others / "file").write_bytes(b"theirs")
    os.chown(others, 65534, 65534)
    target = tmp / "kept"
    target.mkdir()
    (target / "file").write_bytes(b"mine")
    (tmp / f"{scratch.PREFIX}mirror-link").symlink_to(target)
    scratch.sweep(tmp)
    assert (others / "file").read_bytes() == b"theirs"
    assert (target / "file").read_bytes() == b"mine"
    assert (tmp / f"{scratch.PREFIX}mirror-link").is_symlink()
