"""README's "Quickstart with Firecracker" is run as written: the shell block after its
`<!-- quickstart: ... -->` marker, by bash, with the real Firecracker and fcguest as the kernel.

The block's only inputs are DIR, KERNEL and BOOT_ARGS, and `firecracker` and `fcsnap` on PATH
(here: the cached binary, and this tree's fcsnap run by this interpreter). After the restore the
guest's console must show it went on from where the snapshot left it (its round counter, kept
in guest RAM, from the last round printed before the pause), every round ok. Marked
`firecracker`; the script has a deadline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fcsnap.testing import fcguest
from fcsnap.testing.fcbinary import firecracker_binary
from fcsnap.testing.fcguest import GuestConfig, parse_round

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- quickstart: [^\n]*-->\n```sh\n(.*?)```", re.DOTALL)
WAIT = 120.0  # seconds the whole quickstart may take
CONFIG = GuestConfig(fill=256, ws=64, sweep=16, write=8, seed=5)  # rounds of a few ms


def quickstart() -> str:
    blocks = BLOCK.findall(README.read_text())
    assert len(blocks) == 1, "README must hold exactly one quickstart block"
    return blocks[0]


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "firecracker").symlink_to(firecracker_binary())
    shim = bin_dir / "fcsnap"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fcsnap "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "qs"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DIR": str(work),
           "KERNEL": str(fcguest.build()), "BOOT_ARGS": CONFIG.cmdline()}
    try:
        done = subprocess.run(["bash", "-c", quickstart()], env=env, capture_output=True,
                              text=True, timeout=WAIT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the quickstart did not finish within {WAIT:g}s")
    assert done.returncode == 0, done.stderr
    before = [r for line in (work / "vm1.console").read_text().splitlines()
              if (r := parse_round(line))]
    after = [r for line in (work / "vm2.console").read_text().splitlines()
             if (r := parse_round(line))]
    last = before[-1].number if before else 0  # a loaded machine: still filling at the pause
    assert len(after) >= 2, f"the restored guest printed {len(after)} rounds"
    assert after[0].number in (last + 1, last + 2)
    assert [r.number for r in after] == list(range(after[0].number,
                                                   after[0].number + len(after)))
    assert all(r.ok for r in after), [r.line for r in after if not r.ok][:1]
    assert "Firecracker loaded the snapshot (HTTP 204)" in (work / "restore.log").read_text()
