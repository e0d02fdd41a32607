"""The real Firecracker (v1.12.1) restores fcguest from an E2B store served as it is.

A guest is snapshotted Full, then Diff as it runs; `pack` and `diff --sparse-diff` store both
generations and `export` writes the lineage as an E2B store (V4 headers, `memfile` or
`memfile.zstd` frames). `restore` serves the newest E2B build straight from that store (no
import) to a Firecracker loading the Diff snapshot's vmstate, and the guest goes on from its
last round, every page it checks right. Marked `firecracker` (run with `-m firecracker`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fcsnap

from fcsnap.testing.fcguest import GuestConfig
from fcsnap.testing.realvmm import Firecracker, RestoreProcess, Snapshot, take_snapshots

pytestmark = [pytest.mark.firecracker, pytest.mark.usefixtures("real_vmm")]

CONFIG = GuestConfig(fill=2048, ws=1024, sweep=512, write=64, seed=9)
ROUNDS = 3


@pytest.fixture(scope="module")
def lineage(real_vmm: None, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, list[Snapshot], str]:
    """An fcsnap store holding the two generations; the newest build's id."""
    tmp = tmp_path_factory.mktemp("e2bvmm")
    snaps = take_snapshots(tmp / "snaps", CONFIG, ("Full", "Diff"), mem_mib=64)
    store = tmp / "store"
    done = fcsnap("pack", "--init", snaps[0].mem, "--store", store, "--name", "vm", "--quiet")
    assert done.returncode == 0, done.stderr
    done = fcsnap("diff", snaps[1].mem, "--sparse-diff", "--base", "vm", "--store", store,
                  "--name", "vm", "--json")
    assert done.returncode == 0, done.stderr
    return store, snaps, json.loads(done.stdout)["build_id"]


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_restore_serves_an_exported_e2b_store(lineage, tmp_path: Path, compress: str) -> None:
    store, snaps, head = lineage
    e2b = tmp_path / "e2b"
    done = fcsnap("export", head, "--store", store, "-o", e2b, "--compress", compress, "-q")
    assert done.returncode == 0, done.stderr
    assert not (e2b / head / "build.json").exists()  # E2B's layout, served as it is
    stats = tmp_path / "stats.json"
    with RestoreProcess(tmp_path / "uffd.sock", "--vm", e2b / head, "--stats",
                        stats) as server, Firecracker(tmp_path, "clone") as vm:
        vm.load(snaps[-1].vmstate, uffd=server.socket, enable_diff_snapshots=True)
        vm.expect_progress(snaps[-1].last_round, ROUNDS)
        vm.kill()
        assert server.finish() == 0, server.tail()
    served = json.loads(stats.read_text())
    assert served["exit_reason"] == "vm exited" and served["pages_served"] > 0
    assert len(served["per_build_pages"]) == 2  # pages from both E2B builds
