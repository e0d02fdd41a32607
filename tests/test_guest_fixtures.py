"""Golden tests on real guest memory (fixtures/guest, made by fixtures/make_guest.py).

Three generations of a Linux guest's RAM (the last 32 MiB of an 80 MiB QEMU guest) are packed
and diffed with the current code; build stats, header bytes and `inspect --json` must match
what was recorded, with random build ids normalised to one fixed id per generation, and every
generation must unpack to its image byte for byte. No QEMU needed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from pathlib import Path

import pytest
from helpers import Lineage

from fcsnap.header import parse_header
from fcsnap.store.operations import ops
from fcsnap.testing import guest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
import make_guest  # noqa: E402

EXPECTED = json.loads(guest.EXPECTED.read_text())
GENERATIONS = range(EXPECTED["generations"])


def _lineage(root: Path, compression: str) -> Lineage:
    root.mkdir()
    images = guest.read_lineage(root)
    builds = make_guest.build_lineage(images, root / "store", compression)
    return Lineage(root / "store", [path for _, path in builds], images)


def ids(lineage: Lineage) -> dict[uuid.UUID, uuid.UUID]:
    """Each build's id -> the fixed id of its generation, as in the golden files."""
    return make_guest.id_map(lineage.manifests)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return _lineage(tmp_path_factory.mktemp("guest") / "raw", "none")


@pytest.fixture(scope="module")
def zstd(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return _lineage(tmp_path_factory.mktemp("guest") / "zstd", "zstd")


def test_fixture_is_small_and_decompresses_to_the_recorded_images(raw: Lineage) -> None:
    total = sum(p.stat().st_size for p in guest.HERE.iterdir())
    assert total < 5_000_000, f"fixtures/guest has grown to {total} bytes"
    for image, want in zip(raw.images, EXPECTED["sha256"], strict=True):
        assert image.stat().st_size == EXPECTED["size"]
        assert hashlib.sha256(image.read_bytes()).hexdigest() == want


def test_build_stats_match_golden(raw: Lineage) -> None:
    assert make_guest.build_stats(raw.manifests) == EXPECTED["stats"]


@pytest.mark.parametrize("gen", GENERATIONS)
def test_header_bytes_match_golden(raw: Lineage, gen: int) -> None:
    build = raw.builds[gen]
    blob = (build / "memfile.header").read_bytes()
    golden = make_guest.header_path(gen).read_bytes()
    assert make_guest.normalise_header(blob, ids(raw)) == golden
    meta = parse_header(golden).metadata
    assert (meta.version, meta.generation, meta.size) == (3, gen, EXPECTED["size"])
    assert meta.build_id == make_guest.normal_id(gen)
    assert meta.base_build_id == make_guest.normal_id(0)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_inspect_json_matches_golden(raw: Lineage, gen: int) -> None:
    report = make_guest.inspect_json(raw.builds[gen], EXPECTED["lookups"])
    golden = json.loads(make_guest.inspect_path(gen).read_text())
    assert make_guest.normalise_json(report, ids(raw)) == golden


@pytest.mark.parametrize("gen", GENERATIONS)
def test_every_generation_unpacks_byte_for_byte(raw: Lineage, gen: int, tmp_path: Path) -> None:
    out = tmp_path / "unpacked.mem"
    ops.unpack(raw.builds[gen], out)
    assert out.read_bytes() == raw.images[gen].read_bytes()
    assert ops.verify(raw.builds[gen])["ok"]


@pytest.mark.parametrize("gen", GENERATIONS)
def test_zstd_lineage_has_the_same_headers_and_bytes(
    zstd: Lineage, gen: int, tmp_path: Path
) -> None:
    blob = (zstd.builds[gen] / "memfile.header").read_bytes()
    assert make_guest.normalise_header(blob, ids(zstd)) == make_guest.header_path(gen).read_bytes()
    stats = make_guest.build_stats(zstd.manifests)[gen]
    assert {**stats, "bytes_written": 0} == {**EXPECTED["stats"][gen], "bytes_written": 0}
    assert 0 < stats["bytes_written"] < stats["bytes_stored"]
    out = tmp_path / "unpacked.mem"
    ops.unpack(zstd.builds[gen], out)
    assert out.read_bytes() == zstd.images[gen].read_bytes()


def test_normalisation_refuses_a_build_outside_the_lineage(raw: Lineage) -> None:
    blob = (raw.builds[1] / "memfile.header").read_bytes()
    partial = {k: v for k, v in ids(raw).items() if v != make_guest.normal_id(0)}
    with pytest.raises(ValueError, match="not part of the lineage"):
        make_guest.normalise_header(blob, partial)
