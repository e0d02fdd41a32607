"""The whole loop on a freshly booted real guest: bench/corpus.py boots a Debian cloud kernel
under QEMU and snapshots its RAM after each of 3 stages; fcsnap packs, diffs, unpacks and
lazily restores every generation, and every byte must come back as the guest left it.

Slow (a guest boots under TCG, ~128 MiB is packed and served three times): runs only with
`pytest --runslow`. Installs QEMU, the kernel and busybox with apt-get if they are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from helpers import Lineage, restore_argv

from fcsnap.testing import firecracker
from fcsnap.units import PAGE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import corpus as corpus_mod  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.qemu]

MIB = 1 << 20
SIZE = 128 * MIB
STAGES = 3
WAIT = 300.0  # seconds one restore may take before the test fails


def fcsnap(*args: str) -> dict:
    result = helpers.fcsnap(*args, "--json", timeout=WAIT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> corpus_mod.Corpus:
    """A fresh corpus: its own cache directory, so the guest really boots."""
    return corpus_mod.build_corpus(SIZE, STAGES, cache=tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def lineage(corpus: corpus_mod.Corpus, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    """The corpus packed with the CLI: gen0 with pack, then each next generation diffed over
    the previous one."""
    store = tmp_path_factory.mktemp("store")
    images = corpus.images
    builds = [fcsnap("pack", "--init", str(images[0]), "--store", str(store), "--compress", "zstd")]
    for image in images[1:]:
        builds.append(fcsnap("diff", str(image), "--base", builds[-1]["build_id"],
                             "--store", str(store), "--compress", "zstd",
                             "--holes-are-zeros"))  # corpus images: zero pages are holes
    return Lineage(store, [store / b["build_id"] for b in builds], corpus.images)


def test_corpus_has_real_guest_figures(corpus: corpus_mod.Corpus) -> None:
    manifest = corpus.manifest
    assert manifest["size"] == SIZE and manifest["stages"] == ["boot", "files", "compute"]
    gens = manifest["generations"]
    assert [g["file"] for g in gens] == [f"gen{n}.mem" for n in range(STAGES)]
    for g in gens:
        assert g["pages"] == SIZE // PAGE
        assert 0 < g["zero_share"] < 1 and g["zstd_ratio_nonzero"] > 1
    assert gens[0]["changed_pages"] is None
    assert all(g["changed_pages"] > 0 for g in gens[1:])
    # cached: a second call finds the same corpus without booting
    again = corpus_mod.build_corpus(SIZE, STAGES, cache=corpus.path.parent)
    assert again.path == corpus.path and again.manifest == manifest


@pytest.mark.parametrize("gen", range(STAGES))
def test_unpack_byte_for_byte(lineage: Lineage, gen: int, tmp_path: Path) -> None:
    out = tmp_path / "unpacked.mem"
    subprocess.run([sys.executable, "-m", "fcsnap", "unpack", lineage.build_ids[gen],
                    "--store", str(lineage.store), "-o", str(out), "--quiet"],
                   check=True, timeout=WAIT)
    assert out.read_bytes() == lineage.images[gen].read_bytes()


@pytest.mark.parametrize("gen", range(STAGES))
def test_restore_serves_every_byte(lineage: Lineage, gen: int, tmp_path: Path) -> None:
    sock, stats, report = tmp_path / "uffd.sock", tmp_path / "stats.json", tmp_path / "vm.json"
    server = subprocess.Popen(
        restore_argv(lineage.build_ids[gen], sock, store=lineage.store, stats=stats),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    vm = firecracker.spawn(sock, expected=lineage.images[gen], threads=4,
                           report=report, deadline=WAIT)
    try:
        assert vm.wait(timeout=WAIT + 10) == 0
        _, err = server.communicate(timeout=60)
        assert server.returncode == 0, err.decode()
    finally:
        for proc in (vm, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result = firecracker.read_report(report)
    assert result["mismatches"] == 0
    assert result["pages_touched"] == SIZE // PAGE
    served = json.loads(stats.read_text())
    assert served["pages_served"] == SIZE // PAGE
    assert set(served["per_build_pages"]) <= set(lineage.build_ids[: gen + 1])
