"""`fcsnap export` read back by E2B's own reader (fixtures/e2b_export/: exports of an
E2B-written lineage, uncompressed, zstd- and LZ4-framed, with the answers E2B's header loader
and frame decoder gave on them). A re-export must be those very bytes, fcsnap's reader must
agree with every recorded answer, and where Go and E2B's source are at hand the reader is
built and run on fresh exports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from helpers import fcsnap as fcsnap_cli
from test_e2b_import import generations
from test_e2b_store import FIXTURES as E2B_FIXTURES

from fcsnap.header import load_header
from fcsnap.header.format import NIL
from fcsnap.store.format.layout import HEADER
from fcsnap.testing.fcbinary import cache_root
from fcsnap.units import PAGE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
from make_e2b import build_reader  # noqa: E402
from make_e2b_export import SCENARIOS, export, lineage, read_with_e2b  # noqa: E402

FIXTURES = ROOT / "fixtures" / "e2b_export"
ANSWERS = json.loads((FIXTURES / "answers.json").read_text())
MEMORY = {g["build_id"]: g["memory_sha256"] for g in generations("v3-4k")}
"""The SHA-256 of each generation's memory, as E2B wrote it."""
GO_ENV, MIRROR_ENV = "FCSNAP_GO", "FCSNAP_E2B_MIRROR"


def files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("export")
    return {name: export(work, name, options) for name, options in SCENARIOS.items()}


@pytest.fixture(scope="module")
def e2b_reader(tmp_path_factory) -> Path:
    """E2B's reader built from its source; skipped where that cannot be done here."""
    go = os.environ.get(GO_ENV) or shutil.which("go")
    if not go:
        pytest.skip(f"no Go toolchain to build E2B's reader ({GO_ENV} or go on PATH)")
    mirror = os.environ.get(MIRROR_ENV)
    if not mirror or not (Path(mirror) / "e2b-dev+infra" / "repo").is_dir():
        pytest.skip(f"no copy of E2B's source to build its reader from ({MIRROR_ENV}, as "
                    "fixtures/make_e2b.py --mirror takes)")
    return build_reader(Path(mirror), go, tmp_path_factory.mktemp("go"),
                        cache_root() / "go-build", timeout=900)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_reexport_is_the_very_bytes_e2bs_reader_accepted(scenario, exported):
    got, want = files(exported[scenario]), files(FIXTURES / scenario)
    assert sorted(got) == sorted(want)
    for name in want:  # after a codec library update: fixtures/make_e2b_export.py records anew
        assert got[name] == want[name], name


def _fcsnap_reads(store: Path, build_id: str) -> dict:
    """What fcsnap's reader makes of an exported header, in the reader's terms."""
    header = load_header(store / build_id / HEADER)
    meta = header.metadata
    return {
        "version": meta.version, "block_size": meta.block_size, "size": meta.size,
        "generation": meta.generation, "base_build_id": str(meta.base_build_id),
        "incomplete_pending_upload": header.builds_section.incomplete,
        "builds": {
            str(b.build_id): {
                "size": b.size, "checksum": b.checksum.hex(), "compression": b.compression,
                "frames": [{"start_u": f.start_u, "end_u": f.end_u, "start_c": f.start_c,
                            "end_c": f.end_c} for f in b.frames]}
            for b in header.builds_section.builds.values()},
        "mappings": [[m.offset, m.length, str(m.build_id), m.storage_offset]
                     for m in header.mappings],
    }


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_e2bs_reader_accepted_every_build_and_fcsnap_agrees_with_it(scenario):
    store = FIXTURES / scenario
    assert [a["build_id"] for a in ANSWERS[scenario]] == lineage(store) == list(MEMORY)
    for answer in ANSWERS[scenario]:
        me = answer["build_id"]
        # E2B reads back, through the headers and frames fcsnap wrote, the memory E2B wrote
        assert answer["memory_sha256"] == MEMORY[me]
        data = answer["data"]
        assert data["checksum_ok"] and data["frame_table_problems"] == []
        assert answer["ancestor_sizes_agree"]
        entry = answer["builds"][me]
        assert entry["compression"] == scenario and data["size"] == entry["size"]
        assert data["frames_read"] == len(entry["frames"]) == (
            0 if scenario == "none" else -(-entry["size"] // (64 << 10)))
        assert data["uncompressed_size_file"] == (None if scenario == "none" else entry["size"])
        wanted = {k: answer[k] for k in _fcsnap_reads(store, me)}
        wanted["mappings"] = [m if m[2] != str(NIL) else [*m[:3], 0] for m in wanted["mappings"]]
        assert _fcsnap_reads(store, me) == wanted
        header = load_header(store / me / HEADER)
        for want in answer["lookups"]:
            found = header.lookup(want["offset"])
            assert (str(found.build_id), found.remaining) == (want["build_id"],
                                                              want["remaining_length"])
            if found.build_id == NIL:
                continue
            assert found.storage_offset == want["build_storage_offset"]
            frame = header.builds_section.builds[found.build_id].frame_at(found.storage_offset)
            assert (None if frame is None else {
                "start_u": frame.start_u, "end_u": frame.end_u, "start_c": frame.start_c,
                "end_c": frame.end_c}) == want["frame"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_e2bs_reader_run_now_gives_the_recorded_answers(scenario, exported, e2b_reader):
    assert read_with_e2b(e2b_reader, exported[scenario]) == ANSWERS[scenario]


@pytest.mark.parametrize(("scenario", "options"), [
    ("v5-zstd-2m", ["--compress", "zstd"]),
    ("v5-zstd-2m", ["--compress", "lz4"]),
    ("v5-zstd-2m", ["--compress", "lz4", "--frame-size", "1M"]),
    ("v3-4k", ["--compress", "zstd", "--frame-size", "4K"]),  # ancestors' tables trimmed
], ids=["2m-zstd", "2m-lz4", "2m-lz4-1m-frames", "4k-zstd-4k-frames"])
def test_e2bs_reader_reads_other_exports(scenario, options, tmp_path, e2b_reader):
    source = E2B_FIXTURES / scenario
    head = max((p for p in source.iterdir() if p.is_dir()), key=lambda p: p.name)
    out = export(tmp_path, "out", options, head)
    memory = {g["build_id"]: g["memory_sha256"] for g in generations(scenario)}
    answers = read_with_e2b(e2b_reader, out)
    assert [a["build_id"] for a in answers] == list(memory)
    for answer in answers:
        assert answer["memory_sha256"] == memory[answer["build_id"]]
        assert answer["data"]["checksum_ok"] and answer["data"]["frame_table_problems"] == []
        assert answer["data"]["frames_read"] == len(answer["builds"][answer["build_id"]]["frames"])
        assert answer["ancestor_sizes_agree"]


def test_a_childs_header_keeps_only_the_ancestor_frames_it_reads(tmp_path):
    """As E2B writes a child's header: an ancestor's frame table trimmed to the frames its
    mappings read; the ancestor's own header keeps the whole table."""
    out = export(tmp_path, "out", ["--compress", "zstd", "--frame-size", "4K"])
    ids = lineage(out)
    whole = load_header(out / ids[0] / HEADER).builds_section.builds
    template = whole[uuid.UUID(ids[0])]
    for child in ids[1:]:
        header = load_header(out / child / HEADER)
        kept = header.builds_section.builds[uuid.UUID(ids[0])]
        read = {m.storage_offset + i for m in header.mappings if str(m.build_id) == ids[0]
                for i in range(0, m.length, PAGE)}
        assert {f.start_u for f in kept.frames} == read  # one 4K frame per block read
        assert set(kept.frames) < set(template.frames)
        result = fcsnap_cli("unpack", out / child, "-o", tmp_path / "memory", "--force")
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256((tmp_path / "memory").read_bytes()).hexdigest() == MEMORY[child]
