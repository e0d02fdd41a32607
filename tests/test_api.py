"""The Python API (fcsnap.Store and friends): the README's example runs as written, results are
typed, failures are FcsnapError, and the CLI prints what the API returns."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fcsnap_here

import fcsnap
from fcsnap.testing import firecracker
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 << 20
WAIT = 120  # seconds any process of these tests may take


def readme_example() -> str:
    """The one python code block of the README's "Use from Python" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one python example"
    return blocks[0]


@pytest.fixture
def memfiles(tmp_path: Path) -> tuple[Path, Path]:
    mem = synthetic_memory(SIZE, seed=21)
    write_full(tmp_path / "mem.snap", mem)
    write_full(tmp_path / "mem2.snap", evolve(mem, seed=22, dirty_share=0.2)[0])
    return tmp_path / "mem.snap", tmp_path / "mem2.snap"


def test_readme_example_runs(tmp_path: Path, memfiles: tuple[Path, Path]) -> None:
    """Verbatim, in a fresh interpreter, against a real stand-in VM for its restore."""
    _, mem2 = memfiles
    (tmp_path / "vm.state").write_bytes(b"vmstate")
    report = tmp_path / "vm.json"
    vm = firecracker.spawn(tmp_path / "web.uffd", expected=mem2, threads=2, report=report,
                           deadline=WAIT)
    try:
        result = subprocess.run(
            [sys.executable, "-c", readme_example()], cwd=tmp_path, capture_output=True,
            text=True, timeout=WAIT,
        )
        assert vm.wait(timeout=WAIT) == 0
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait(timeout=WAIT)
    assert result.returncode == 0, result.stderr
    assert "refused: invalid compression 'gzip'" in result.stdout
    assert re.search(r"vm exited: [1-9]\d* faults", result.stdout), result.stdout
    assert (tmp_path / "full.mem").read_bytes() == mem2.read_bytes()
    vm_report = firecracker.read_report(report)
    assert vm_report["mismatches"] == 0 and vm_report["pages_touched"] > 0


def test_results_are_typed_and_agree_with_the_store(
    tmp_path: Path, memfiles: tuple[Path, Path]
) -> None:
    mem, mem2 = memfiles
    store = fcsnap.Store.init(tmp_path / "store")
    gen0 = store.pack(mem, name="vm")
    gen1 = store.diff(mem2, base="vm", name="vm", compress="zstd:5")
    assert isinstance(gen1, fcsnap.Build)
    assert (gen0.generation, gen1.generation) == (0, 1)
    assert gen1.parent_build_id == gen0.build_id == gen1.base_build_id
    assert gen1.path == tmp_path / "store" / str(gen1.build_id)
    assert gen1.compression == "zstd" and gen1.manifest.compression_level == 5
    assert store.build("vm") == gen1  # the VM name now means the newest generation
    s = gen1.stats
    assert s.blocks_total == SIZE // 4096 == (
        s.blocks_stored + s.blocks_zero + s.blocks_deduplicated + s.blocks_inherited
    )
    checked = store.verify("vm")
    assert isinstance(checked, fcsnap.Verification)
    assert (checked.build_id, checked.builds_checked) == (gen1.build_id, 2)
    assert checked.blocks_checked == gen0.stats.blocks_stored + s.blocks_stored
    flat = store.squash("vm", name="flat")
    assert (flat.generation, flat.parent_build_id, flat.base_build_id) == (
        0, None, flat.build_id)
    assert store.unpack("flat", tmp_path / "out") == tmp_path / "out"
    assert (tmp_path / "out").read_bytes() == mem2.read_bytes()
    inspection = store.inspect(gen1.build_id, mappings=True, at=[0, "0x1000"])
    assert (inspection.parent_build_id, inspection.base_build_id) == (gen0.build_id,
                                                                        gen0.build_id)
    assert [look["offset"] for look in inspection.report["lookups"]] == [0, 0x1000]


def test_progress_reports_every_byte_against_its_total(
    tmp_path: Path, memfiles: tuple[Path, Path]
) -> None:
    mem, _ = memfiles
    calls: list[tuple[int, int]] = []
    fcsnap.Store.init(tmp_path / "store").pack(
        mem, progress=lambda n, total: calls.append((n, total)))
    assert calls[0] == (0, SIZE)  # the total is known before any work
    assert {total for _, total in calls} == {SIZE}
    assert sum(n for n, _ in calls) == SIZE


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s, m: s.pack(m, compress="gzip"), fcsnap.UsageError, "invalid compression"),
        (lambda s, m: s.pack(m, block_size="3K"), fcsnap.UsageError, "invalid block size"),
        (lambda s, m: s.pack(m, frame_size=5000), fcsnap.UsageError, "invalid frame size"),
        (lambda s, m: s.inspect("vm", at=["hello"]), fcsnap.UsageError, "invalid offset"),
        (lambda s, m: s.restore("vm", "x.sock", vmstate="v"), fcsnap.UsageError,
         "need --firecracker-api"),
        (lambda s, m: s.unpack("vm", m.parent), fcsnap.FcsnapError, "is a directory"),
        (lambda s, m: s.unpack("vm", m), fcsnap.FcsnapError, r"exists \(use --force"),
        (lambda s, m: s.diff(m, base="nope"), fcsnap.FcsnapError, "no build or VM named"),
        (lambda s, m: s.diff(m, base="vm", block_size="2M"), fcsnap.FcsnapError,
         "block size 2M differs from the base build's 4K"),
        (lambda s, m: s.verify("vm"), fcsnap.FcsnapError, "does not match its hash"),
    ],
    ids=["compress", "block-size", "frame-size", "offset", "vmstate-alone", "output-dir",
         "output-exists", "unknown-base", "block-size-mismatch", "corrupt"],
)
def test_failures_are_fcsnap_errors(
    tmp_path: Path, memfiles: tuple[Path, Path], call, error: type, message: str
) -> None:
    mem, _ = memfiles
    store = fcsnap.Store.init(tmp_path / "store")
    build = store.pack(mem, name="vm")
    diff = build.path / "memfile.diff"
    data = bytearray(diff.read_bytes())
    data[100] ^= 0xFF
    diff.write_bytes(bytes(data))  # only `verify` reads every block
    with pytest.raises(error, match=message):
        call(store, mem)


def test_cli_json_is_the_api_result(tmp_path: Path, memfiles: tuple[Path, Path]) -> None:
    """One path per job: `pack --json` prints Build.to_json() of the build the API reads."""
    mem, _ = memfiles
    store = tmp_path / "store"
    result = fcsnap_here("pack", "--init", mem, "--store", store, "--json", timeout=WAIT)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == {"schema": 1, **fcsnap.Store(store).build(printed["build_id"]).to_json()}


def test_restore_is_a_library_call(tmp_path: Path, memfiles: tuple[Path, Path]) -> None:
    """on_listening gets the build being served: the moment to start the VM."""
    mem, _ = memfiles
    store = fcsnap.Store.init(tmp_path / "store")
    build = store.pack(mem, name="vm")
    sock, stats = tmp_path / "uffd.sock", tmp_path / "stats.json"
    started: list[Path] = []
    vms: list = []

    def listening(build_dir: Path) -> None:
        started.append(build_dir)
        vms.append(firecracker.spawn(sock, expected=mem, threads=2, deadline=WAIT))

    try:
        served = store.restore("vm", sock, on_listening=listening, stats_path=stats,
                               handshake_timeout=WAIT)
    finally:
        for vm in vms:
            if vm.poll() is None:
                vm.kill()
            vm.wait(timeout=WAIT)
    assert started == [build.path]
    assert isinstance(served, fcsnap.Served)
    assert (served.status, served.exit_reason, vms[0].returncode) == (0, "vm exited", 0)
    assert served.stats.faults > 0
    assert json.loads(stats.read_text())["faults"] == served.stats.faults
