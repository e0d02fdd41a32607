"""The header byte format: golden fixtures, validation messages, foreign versions, the CLI."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the builds are tested here
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.header import NIL, PAGE, HeaderError, Mapping, parse_header
from fcsnap.header.format import MAPPING, METADATA

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "headers"
sys.path.insert(0, str(ROOT / "fixtures"))
import make_headers  # noqa: E402

BUILD = uuid.UUID("12345678-1234-4234-8234-123456789abc")


def meta(version=3, block_size=PAGE, size=4 * PAGE, generation=0) -> bytes:
    return METADATA.pack(version, block_size, size, generation, BUILD.bytes, BUILD.bytes)


def rec(offset, length, build=BUILD, storage=0) -> bytes:
    return MAPPING.pack(offset, length, build.bytes, storage)


@pytest.mark.parametrize("name", sorted(make_headers.fixtures()))
def test_fixture_bytes_are_what_the_code_writes(name):
    committed = (FIXTURES / f"{name}.header").read_bytes()
    assert make_headers.fixtures()[name] == committed


@pytest.mark.parametrize("name", sorted(make_headers.fixtures()))
def test_inspect_json_matches_golden(name):
    expected = json.loads((FIXTURES / f"{name}.inspect.json").read_text())
    at = [arg for offset in make_headers.LOOKUPS for arg in ("--at", hex(offset))]
    result = fcsnap("inspect", str(FIXTURES / f"{name}.header"), "--mappings", *at, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"schema": 1, **expected}  # the CLI's version key


def test_golden_metadata_layout_byte_for_byte():
    blob = (FIXTURES / "lineage-gen1.header").read_bytes()
    assert blob[:8] == (3).to_bytes(8, "little")
    assert blob[8:16] == (4096).to_bytes(8, "little")
    assert blob[16:24] == (4 << 20).to_bytes(8, "little")
    assert blob[24:32] == (1).to_bytes(8, "little")
    assert blob[32:48] == uuid.UUID("00000002-0000-4000-8000-000000000002").bytes
    assert blob[48:64] == uuid.UUID("00000001-0000-4000-8000-000000000001").bytes
    assert (len(blob) - 64) % 40 == 0
    gen0 = uuid.UUID("00000001-0000-4000-8000-000000000001").bytes
    gen1 = uuid.UUID("00000002-0000-4000-8000-000000000002").bytes
    # blocks 0-1 from generation 0's storage 0, then block 2 from generation 1's storage 0
    assert blob[64:104] == (0).to_bytes(8, "little") + (0x2000).to_bytes(
        8, "little"
    ) + gen0 + bytes(8)
    assert blob[104:144] == (0x2000).to_bytes(8, "little") + (0x1000).to_bytes(
        8, "little"
    ) + gen1 + bytes(8)


def test_no_mappings_means_own_build_over_everything():
    header = parse_header(meta())
    assert header.mappings == (Mapping(0, 4 * PAGE, BUILD, 0),)
    assert header.lookup(PAGE + 5).storage_offset == PAGE + 5


def test_nil_storage_offset_is_ignored_on_read():
    blob = meta(version=1) + rec(0, PAGE) + rec(PAGE, 3 * PAGE, NIL, 12345)
    header = parse_header(blob)
    assert header.mappings[1] == Mapping(PAGE, 3 * PAGE, NIL, 0)
    assert header.lookup(2 * PAGE).build_id == NIL


def test_lookup_reports_storage_of_exact_byte_and_run_remainder():
    blob = meta(size=8 * PAGE) + rec(0, 3 * PAGE, storage=10 * PAGE) + rec(3 * PAGE, 5 * PAGE, NIL)
    found = parse_header(blob).lookup(PAGE + 7)
    assert (found.build_id, found.storage_offset, found.remaining) == (
        BUILD,
        11 * PAGE + 7,
        2 * PAGE - 7,
    )


BAD = {
    "too short": (meta()[:63], "too short"),
    "partial record": (meta() + rec(0, 4 * PAGE)[:39], "not a whole number"),
    "unknown version": (meta(version=9) + rec(0, 4 * PAGE), "unsupported header version 9"),
    "v4 without a body": (meta(version=4), "flags and size need 5"),
    "bad block size": (meta(block_size=8192) + rec(0, 4 * PAGE), "neither 4 KiB nor 2 MiB"),
    "unaligned size": (meta(size=4 * PAGE + 1) + rec(0, 4 * PAGE), "not a positive multiple"),
    "zero length": (meta() + rec(0, 0) + rec(0, 4 * PAGE), "zero length"),
    "unaligned": (meta() + rec(0, 4 * PAGE, storage=7), "not 4096-aligned"),
    "gap": (meta() + rec(0, PAGE) + rec(2 * PAGE, 2 * PAGE), "leaves a gap"),
    "overlap": (meta() + rec(0, 2 * PAGE) + rec(PAGE, 3 * PAGE), "overlapping"),
    "unsorted": (meta() + rec(2 * PAGE, 2 * PAGE) + rec(0, 2 * PAGE), "unsorted"),
    "short cover": (meta() + rec(0, 2 * PAGE), "not the memory size"),
    "long cover": (meta() + rec(0, 8 * PAGE), "not the memory size"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_headers_name_the_problem(case):
    blob, message = BAD[case]
    with pytest.raises(HeaderError, match=message):
        parse_header(blob)


@pytest.mark.parametrize("case", ["too short", "gap", "v4 without a body"])
def test_cli_prints_one_line_and_exits_1(case, tmp_path):
    path = tmp_path / "memfile.header"
    path.write_bytes(BAD[case][0])
    result = fcsnap("inspect", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_cli_truncated_fixture_and_missing_file(tmp_path):
    blob = (FIXTURES / "lineage-gen2.header").read_bytes()
    path = tmp_path / "cut.header"
    path.write_bytes(blob[:-17])
    result = fcsnap("inspect", str(path))
    assert result.returncode == 1 and "mapping records" in result.stderr
    missing = fcsnap("inspect", str(tmp_path / "nope"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_cli_lookup_outside_memory_is_a_clear_error():
    result = fcsnap("inspect", str(FIXTURES / "wrenn-v1.header"), "--at", "1G")
    assert result.returncode == 1 and "outside guest memory" in result.stderr


def test_a_wrenn_build_directory_is_inspected_verified_unpacked_and_verify_refused(tmp_path):
    """docs/store.md's claim, exactly: inspect, verify and unpack read an E2B/Wrenn build
    directory (memfile.header beside memfile); `restore --verify` refuses it with one line
    (there are no block hashes to check pages against), before writing anything."""
    build = tmp_path / "11111111-2222-4333-8444-555555555555"
    build.mkdir()
    header = (FIXTURES / "wrenn-v1.header").read_bytes()
    (build / "memfile.header").write_bytes(header)
    size = parse_header(header).metadata.size
    (build / "memfile").write_bytes(bytes(range(256)) * (size // 256))
    shown = fcsnap("inspect", build, "--mappings", "--at", "0x1000")
    assert shown.returncode == 0, shown.stderr
    assert "11111111-2222-4333-8444-555555555555" in shown.stdout and "Lookups" in shown.stdout
    verified = fcsnap("verify", build)
    assert verified.returncode == 0 and "SHA-256 not checked" in verified.stdout, verified.stderr
    out = tmp_path / "memory"
    assert fcsnap("unpack", build, "-o", out).returncode == 0
    want = bytearray(size)
    for m in parse_header(header).mappings:
        if not m.is_zero:
            want[m.offset : m.end] = (build / "memfile").read_bytes()[
                m.storage_offset : m.storage_offset + m.length]
    assert out.read_bytes() == bytes(want)
    out.unlink()
    result = fcsnap("restore", "--vm", build, "--socket", tmp_path / "uffd.sock", "--verify")
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("fcsnap: error: ") and "block hash" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [build.name]


def test_cli_usage_error_exits_2():
    assert fcsnap("inspect").returncode == 2


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_clear_error_or_valid(blob):
    try:
        header = parse_header(meta(size=4 * PAGE) + blob)
    except HeaderError as e:
        assert str(e)
        return
    assert sum(m.length for m in header.mappings) == header.metadata.size


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_fuzz_mutated_fixture(data):
    blob = bytearray((FIXTURES / "lineage-gen2.header").read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        header = parse_header(bytes(blob[:cut]))
    except HeaderError:
        return
    for m in header.mappings:
        found = header.lookup(m.offset)
        assert found.remaining == m.length
