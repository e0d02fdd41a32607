"""squash stores its flat generation the way the source build is stored: one definition of
those options (BuildOptions.of_build), used by the CLI and the library alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fcsnap_here

from fcsnap.store.format.layout import VMS
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full

MIB = 1 << 20


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_squash_keeps_the_source_storage_options(tmp_path: Path, compression: str) -> None:
    write_full(tmp_path / "mem", synthetic_memory(8 * MIB, seed=5))
    options = BuildOptions(2 * MIB, compression, level=7, frame_size=64 << 10)
    store = tmp_path / "store"
    source, build = ops.pack(tmp_path / "mem", store, options)
    flat, path = ops.squash(build, store, "flat")
    kept = ("block_size", "compression", "compression_level", "frame_size")
    assert [getattr(flat, k) for k in kept] == [getattr(source, k) for k in kept]
    assert flat.generation == 0 and flat.source == f"squash of {build.name}"
    assert (store / VMS / "flat").read_text().strip() == path.name


def test_cli_squash_is_the_library_squash(tmp_path: Path) -> None:
    write_full(tmp_path / "mem", synthetic_memory(4 * MIB, seed=6))
    store = tmp_path / "store"
    source, build = ops.pack(tmp_path / "mem", store,
                             BuildOptions(compression="zstd", level=9, frame_size=128 << 10))
    result = fcsnap_here("squash", build.name, "--store", store, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    flat = read_manifest(Path(json.loads(result.stdout)["path"]))
    assert (flat.compression, flat.compression_level, flat.frame_size) == ("zstd", 9, 128 << 10)
    assert BuildOptions.of_build(flat) == BuildOptions.of_build(source)
