"""E2B and Wrenn build directories as they are (fixtures/e2b/, written by E2B's own code):
`unpack` rebuilds each generation's memory byte for byte, `verify` checks what the data carries
and says what it could not, and damaged data is refused with one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the builds are tested here
from helpers import one_build_store
from hypothesis import given, settings
from hypothesis import strategies as st
from test_e2b_headers import body_of, wrap

from fcsnap.header.e2b import BUILD_INFO, FRAME, FRAME_TABLE

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "e2b"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
BUILDS = [h for headers in EXPECTED.values() for h in headers if "peer-" not in h["file"]]


def build_dir(expected: dict) -> Path:
    return (FIXTURES / expected["file"]).parent


def copy_store(tmp_path: Path, scenario: str) -> Path:
    store = tmp_path / scenario
    shutil.copytree(FIXTURES / scenario, store)
    return store


@pytest.mark.parametrize("expected", BUILDS, ids=[h["file"] for h in BUILDS])
def test_unpack_gives_the_memory_e2b_wrote(expected, tmp_path):
    out = tmp_path / "memory"
    result = fcsnap("unpack", build_dir(expected), "-o", out)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected["memory_sha256"]


@pytest.mark.parametrize("expected", BUILDS, ids=[h["file"] for h in BUILDS])
def test_verify_checks_every_recorded_sha256_and_names_the_rest(expected):
    result = fcsnap("verify", build_dir(expected), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["format"] == "e2b" and report["block_hashes"] is False
    read = {m[2] for m in expected["mappings"]} - {"00000000-0000-0000-0000-000000000000"}
    assert report["builds_checked"] == len(read)
    recorded = {b for headers in EXPECTED.values() for h in headers
                for b, x in h["builds"].items() if x["checksum"] != "0" * 64}
    assert sorted(report["sha256_checked"]) == sorted(read & recorded)
    assert set(report["sha256_unchecked"]) == read - recorded


def test_verify_by_id_in_a_store_and_its_line():
    result = fcsnap("verify", "--store", FIXTURES / "v4-on-v3-4k",
                    "e2b00006-0000-4000-8000-000000000002")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("ok: E2B build e2b00006-0000-4000-8000-000000000002 (generation 2)")
    assert "e2b00006-0000-4000-8000-000000000001: SHA-256 not checked (the header records " \
        "none)" in line and "no per-block hashes" in line


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _recorded_checksum_changed(store: Path) -> Path:
    header = store / "e2b00002-0000-4000-8000-000000000001" / "memfile.header"
    meta, flags, body = body_of(header)
    at = 4 + BUILD_INFO.size - 32  # the first (only) build's checksum
    body = body[:at] + bytes(31) + b"\1" + body[at + 32 :]
    header.write_bytes(wrap(meta, body, flags))
    return header.parent


def _zstd_frame_damaged(store: Path) -> Path:
    _flip(store / "e2b00002-0000-4000-8000-000000000001" / "memfile.zstd", 700)
    return store / "e2b00002-0000-4000-8000-000000000003"


def _lz4_frame_damaged(store: Path) -> Path:
    _flip(store / "e2b00003-0000-4000-8000-000000000001" / "memfile.lz4", 40)
    return store / "e2b00003-0000-4000-8000-000000000003"


def _object_truncated(store: Path) -> Path:
    path = store / "e2b00002-0000-4000-8000-000000000001" / "memfile.zstd"
    path.write_bytes(path.read_bytes()[:-100])
    return store / "e2b00002-0000-4000-8000-000000000002"


def _ancestor_missing(store: Path) -> Path:
    (store / "e2b00002-0000-4000-8000-000000000001" / "memfile.zstd").unlink()
    return store / "e2b00002-0000-4000-8000-000000000003"


def _uncompressed_short(store: Path) -> Path:
    path = store / "e2b00004-0000-4000-8000-000000000001" / "memfile"
    path.write_bytes(path.read_bytes()[:4096])
    return store / "e2b00004-0000-4000-8000-000000000002"


def _frame_claims_too_much(store: Path) -> Path:
    header = store / "e2b00002-0000-4000-8000-000000000001" / "memfile.header"
    meta, flags, body = body_of(header)
    table = 4 + BUILD_INFO.size
    kind, count = FRAME_TABLE.unpack_from(body, table)
    last = table + FRAME_TABLE.size + (count - 1) * FRAME.size
    start_u, start_c, _, size_c = FRAME.unpack_from(body, last)
    body = body[:last] + FRAME.pack(start_u, start_c, 65 << 20, size_c) + body[last + FRAME.size:]
    header.write_bytes(wrap(meta, body, flags))
    return header.parent


def _head_table_disagrees(store: Path) -> Path:
    _frame_claims_too_much(store)
    return store / "e2b00002-0000-4000-8000-000000000003"


DAMAGE = {
    "frame beyond the size cap": ("v4-zstd-4k", _frame_claims_too_much, ("verify", "unpack"),
                                  "uncompressed is beyond"),
    "frame tables disagree": ("v4-zstd-4k", _head_table_disagrees, ("verify", "unpack"),
                              "disagrees with that build's own header"),
    "recorded SHA-256 differs": ("v4-zstd-4k", _recorded_checksum_changed, ("verify",),
                                 "SHA-256"),
    "zstd frame damaged": ("v4-zstd-4k", _zstd_frame_damaged, ("verify", "unpack"), "frame"),
    "LZ4 frame damaged": ("v5-lz4-4k", _lz4_frame_damaged, ("verify", "unpack"), "frame"),
    "compressed object truncated": ("v4-zstd-4k", _object_truncated, ("verify", "unpack"),
                                    "frame table ends"),
    "ancestor's object missing": ("v4-zstd-4k", _ancestor_missing, ("verify", "unpack"),
                                  "memfile.zstd"),
    "uncompressed object short": ("v4-none-4k", _uncompressed_short, ("verify", "unpack"),
                                  "the header maps"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_data_is_refused_with_one_line_and_no_output(name, tmp_path):
    scenario, damage, commands, words = DAMAGE[name]
    build = damage(copy_store(tmp_path, scenario))
    for command in commands:
        out = tmp_path / "memory"
        argv = (command, build, *(("-o", out) if command == "unpack" else ()))
        result = fcsnap(*argv)
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and len(lines) == 1, (command, result.stderr)
        assert lines[0].startswith("fcsnap: error: ") and words in lines[0], (command, lines)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir()] == [scenario]  # no partial output left


def test_header_checksum_offset_is_the_build_entry_checksum():
    """The damage helper above edits the right 32 bytes: they are what E2B recorded."""
    _, _, body = body_of(FIXTURES / "v4-zstd-4k" / "e2b00002-0000-4000-8000-000000000001"
                         / "memfile.header")
    (count,) = struct.unpack_from("<I", body)
    checksum = body[4 + BUILD_INFO.size - 32 : 4 + BUILD_INFO.size].hex()
    want = EXPECTED["v4-zstd-4k"][0]["builds"]["e2b00002-0000-4000-8000-000000000001"]
    assert count == 1 and checksum == want["checksum"]


def test_an_fcsnap_build_without_its_build_json_is_not_taken_for_an_e2b_build(tmp_path):
    store = one_build_store(tmp_path, 64 * 4096, seed=3)
    build = next(p for p in store.iterdir() if (p / "memfile.header").exists())
    (build / "build.json").unlink()
    for argv in (("verify", build), ("unpack", build, "-o", tmp_path / "out.mem")):
        result = fcsnap(*argv)
        assert result.returncode == 1 and "build.json" in result.stderr, result.stderr


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["v4-zstd-4k", "v5-lz4-4k"]), st.data())
def test_fuzz_damaged_objects_give_the_right_memory_or_one_error(scenario, data):
    """Any byte of any data object changed or cut: unpack either writes exactly E2B's memory
    (the change touched nothing read) or fails with an FcsnapError; never other bytes."""
    import tempfile

    from fcsnap.errors import FcsnapError
    from fcsnap.store.operations.e2b import unpack_e2b

    expected = EXPECTED[scenario][2]
    with tempfile.TemporaryDirectory() as tmp:
        store = copy_store(Path(tmp), scenario)
        objects = sorted(p for p in store.rglob("memfile.*") if p.suffix in (".zstd", ".lz4"))
        target = data.draw(st.sampled_from(objects))
        blob = bytearray(target.read_bytes())
        for _ in range(data.draw(st.integers(1, 3))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        target.write_bytes(bytes(blob[: data.draw(st.integers(0, len(blob)))]))
        out = Path(tmp) / "memory"
        try:
            unpack_e2b(store / Path(expected["file"]).parent.name, out)
        except FcsnapError as e:
            assert str(e) and "\n" not in str(e)
            assert not out.exists()
            return
        assert hashlib.sha256(out.read_bytes()).hexdigest() == expected["memory_sha256"]


def test_gc_never_removes_e2b_builds(tmp_path):
    """gc of a store holding E2B builds beside fcsnap's, and of a directory of E2B builds
    alone, with no grace: the unreferenced fcsnap build goes, every E2B build stays whole."""
    store = one_build_store(tmp_path, 64 * 4096, seed=5)
    (fcsnap_build,) = (p for p in store.iterdir() if (p / "build.json").exists())
    assert fcsnap("rm", "vm", "--store", store).returncode == 0
    shutil.copytree(FIXTURES / "v4-zstd-4k", store, dirs_exist_ok=True)
    alone = copy_store(tmp_path, "v5-lz4-4k")
    for where, scenario in ((store, "v4-zstd-4k"), (alone, "v5-lz4-4k")):
        before = sorted(str(p.relative_to(where)) for p in where.rglob("memfile*"))
        result = fcsnap("gc", "--store", where, "--grace", "0", "--json")
        assert result.returncode == 0, result.stderr
        deleted = {d["build_id"] for d in json.loads(result.stdout)["deleted"]}
        assert deleted == ({fcsnap_build.name} if where == store else set())
        assert sorted(str(p.relative_to(where)) for p in where.rglob("memfile*")) == [
            p for p in before if not p.startswith(fcsnap_build.name)]
        head = [h for h in EXPECTED[scenario] if "peer-" not in h["file"]][-1]
        assert fcsnap("verify", where / head["build_id"]).returncode == 0
