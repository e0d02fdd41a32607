"""E2B's V4 and V5 headers, held to what E2B's own code wrote and answered (fixtures/e2b/):
every header decodes to E2B's metadata, flags, builds section and mappings, every lookup and
frame agrees with E2B's, and each kind of damage is refused with one line."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import lz4.frame
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the builds are tested here
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.header import NIL, PAGE, HeaderError, encode, load_header, parse_header, to_records
from fcsnap.header.e2b import BUILD_INFO, FRAME, FRAME_TABLE, PREFIX
from fcsnap.header.format import METADATA

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures" / "e2b"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
HEADERS = [h for headers in EXPECTED.values() for h in headers]
V4 = FIXTURES / "v4-zstd-4k" / "e2b00002-0000-4000-8000-000000000003" / "memfile.header"
V5 = FIXTURES / "v5-lz4-4k" / "e2b00003-0000-4000-8000-000000000003" / "memfile.header"
BUILD = uuid.UUID("e2b00009-0000-4000-8000-000000000001")


def _mapping(offset: int, length: int, build: str, storage: int) -> tuple:
    """E2B keeps whatever storage offset a nil mapping was written with; it means nothing."""
    return (offset, length, build, 0 if build == str(NIL) else storage)


@pytest.mark.parametrize("expected", HEADERS, ids=[h["file"] for h in HEADERS])
def test_every_header_decodes_as_e2b_decodes_it(expected):
    header = load_header(FIXTURES / expected["file"])
    meta = header.metadata
    assert (meta.version, meta.block_size, meta.size, meta.generation) == (
        expected["version"], expected["block_size"], expected["size"], expected["generation"])
    assert (str(meta.build_id), str(meta.base_build_id)) == (
        expected["build_id"], expected["base_build_id"])
    assert [(m.offset, m.length, str(m.build_id), m.storage_offset) for m in header.mappings] == [
        _mapping(*m) for m in expected["mappings"]]
    section = header.builds_section
    if expected["version"] < 4:
        assert section is None and not expected["builds"]
        return
    assert section.incomplete == expected["incomplete_pending_upload"]
    got = {
        str(b.build_id): {
            "size": b.size, "checksum": b.checksum.hex(), "compression": b.compression,
            "frames": [{"start_u": f.start_u, "end_u": f.end_u, "start_c": f.start_c,
                        "end_c": f.end_c} for f in b.frames],
        }
        for b in section.builds.values()
    }
    assert got == expected["builds"]


@pytest.mark.parametrize("expected", HEADERS, ids=[h["file"] for h in HEADERS])
def test_every_lookup_and_frame_agrees_with_e2b(expected):
    header = load_header(FIXTURES / expected["file"])
    section = header.builds_section
    for want in expected["lookups"]:
        found = header.lookup(want["offset"])
        assert str(found.build_id) == want["build_id"], want
        assert found.remaining == want["remaining_length"], want
        if found.build_id == NIL:
            continue
        assert found.storage_offset == want["build_storage_offset"], want
        info = section.builds.get(found.build_id) if section else None
        frame = info.frame_at(found.storage_offset) if info else None
        got = None if frame is None else {
            "start_u": frame.start_u, "end_u": frame.end_u, "start_c": frame.start_c,
            "end_c": frame.end_c}
        assert got == want["frame"], want


def test_the_fixtures_cover_what_they_claim():
    """Both versions, both codecs, both block sizes, the flag, trimmed tables, missing entries:
    if a regeneration lost one, the tests above would prove less than they say."""
    v4plus = [h for h in HEADERS if h["version"] >= 4]
    assert {h["version"] for h in HEADERS} == {3, 4, 5}
    assert {b["compression"] for h in v4plus for b in h["builds"].values()} == {
        "none", "zstd", "lz4"}
    assert {h["block_size"] for h in HEADERS} == {PAGE, 2 << 20}
    assert any(h["incomplete_pending_upload"] and h["build_id"] not in h["builds"]
               for h in v4plus)
    assert any({m[2] for m in h["mappings"]} - {str(NIL)} - set(h["builds"]) for h in v4plus)
    assert any(any(b["checksum"] == "0" * 64 and b["compression"] == "none"
                   for b in h["builds"].values()) for h in v4plus)
    sizes = {b: len(x["frames"]) for h in v4plus for b, x in h["builds"].items()
             if h["build_id"] == b}
    assert any(len(x["frames"]) < sizes[b] for h in v4plus for b, x in h["builds"].items()
               if h["build_id"] != b and x["frames"])


def test_inspect_shows_the_builds_section_flags_and_the_frame_of_a_lookup():
    offset = next(w for w in EXPECTED["v4-zstd-4k"][2]["lookups"] if w["frame"])
    result = fcsnap("inspect", V4, "--at", hex(offset["offset"]), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    section = report["e2b"]
    assert section["incomplete_pending_upload"] is False and section["flags"] == 0
    rows = {b["build_id"]: b for b in section["builds"]}
    want = EXPECTED["v4-zstd-4k"][2]["builds"]
    assert set(rows) == set(want)
    for build_id, row in rows.items():
        frames = want[build_id]["frames"]
        assert row["frames"] == len(frames) and row["compression"] == "zstd"
        assert row["frames_compressed_bytes"] == sum(f["end_c"] - f["start_c"] for f in frames)
        assert row["sha256"] == want[build_id]["checksum"]
        assert row["file_size"] == want[build_id]["size"]
    frame = report["lookups"][0]["frame"]
    f = offset["frame"]
    assert (frame["uncompressed_offset"], frame["uncompressed_length"],
            frame["compressed_offset"], frame["compressed_length"]) == (
        f["start_u"], f["end_u"] - f["start_u"], f["start_c"], f["end_c"] - f["start_c"])
    text = fcsnap("inspect", V4, "--at", hex(offset["offset"]), "--mappings")
    assert text.returncode == 0, text.stderr
    for words in ("E2B builds section (flags 0x00)", "Frames holding the looked-up offsets",
                  "zstd", hex(f["start_c"])):
        assert words in text.stdout, words


def test_inspect_of_a_peer_header_says_its_upload_is_incomplete():
    peer = FIXTURES / "v5-lz4-4k" / "peer-e2b00003-0000-4000-8000-000000000003.header"
    report = json.loads(fcsnap("inspect", peer, "--json").stdout)
    assert report["e2b"]["incomplete_pending_upload"] is True and report["e2b"]["flags"] == 1
    assert "(flags 0x01) (incomplete, pending upload" in fcsnap("inspect", peer).stdout


# -- damage -----------------------------------------------------------------------------------


def body_of(path: Path) -> tuple[bytes, int, bytes]:
    """metadata, flags and the decompressed body of a V4/V5 header."""
    data = path.read_bytes()
    flags, size = PREFIX.unpack_from(data, METADATA.size)
    body = lz4.frame.decompress(data[METADATA.size + PREFIX.size :])
    assert len(body) == size
    return data[: METADATA.size], flags, body


def wrap(meta: bytes, body: bytes, flags: int = 0) -> bytes:
    """A header around `body`, LZ4-framed as E2B frames it (block and content checksums)."""
    frame = lz4.frame.compress(body, block_checksum=True, content_checksum=True)
    return meta + PREFIX.pack(flags, len(body)) + frame


def v5_meta(size: int = 16 * PAGE) -> bytes:
    return METADATA.pack(5, PAGE, size, 1, BUILD.bytes, BUILD.bytes)


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def v5_body(columns: bytes, n: int, builds: int = 1) -> bytes:
    return (struct.pack("<I", 0) + struct.pack("<I", builds) + BUILD.bytes * builds
            + struct.pack("<I", n) + columns)


def first_frame_table(body: bytes) -> int:
    """Offset of the first build's frame table in a body (after the build count and entry)."""
    return 4 + BUILD_INFO.size


def _frames_swapped() -> bytes:
    meta, flags, body = body_of(V4)
    at = first_frame_table(body)
    kind, count = FRAME_TABLE.unpack_from(body, at)
    assert kind == 1 and count >= 2
    first = at + FRAME_TABLE.size
    a, b = body[first : first + FRAME.size], body[first + FRAME.size : first + 2 * FRAME.size]
    return wrap(meta, body[:first] + b + a + body[first + 2 * FRAME.size :], flags)


def _frames_overlapping() -> bytes:
    meta, flags, body = body_of(V4)
    second = first_frame_table(body) + FRAME_TABLE.size + FRAME.size
    start_u, start_c, size_u, size_c = FRAME.unpack_from(body, second)
    moved = FRAME.pack(start_u - PAGE, start_c, size_u, size_c)
    return wrap(meta, body[:second] + moved + body[second + FRAME.size :], flags)


def _flip_in_lz4() -> bytes:
    data = bytearray(V4.read_bytes())
    data[METADATA.size + PREFIX.size + 20] ^= 0x40
    return bytes(data)


DAMAGE = {
    "truncated LZ4 block": (lambda: V4.read_bytes()[:-40], "LZ4 frame"),
    "LZ4 block checksum": (_flip_in_lz4, "LZ4 frame is damaged"),
    "bytes after the LZ4 frame": (lambda: V5.read_bytes() + b"\0\0\0\0\0\0\0\0", "after the LZ4"),
    "size prefix beyond the cap": (
        lambda: V4.read_bytes()[: METADATA.size] + PREFIX.pack(0, (256 << 20) + 1)
        + V4.read_bytes()[METADATA.size + PREFIX.size :], "cap"),
    "size prefix that lies": (
        lambda: V4.read_bytes()[: METADATA.size] + PREFIX.pack(0, 7)
        + V4.read_bytes()[METADATA.size + PREFIX.size :], "announced"),
    "no prefix": (lambda: V4.read_bytes()[: METADATA.size + 3], "flags and size"),
    "frames out of order": (_frames_swapped, "out of order or overlapping"),
    "frames overlapping": (_frames_overlapping, "out of order or overlapping"),
    "build count that lies": (
        lambda: wrap(v5_meta(), struct.pack("<I", 1000) + bytes(60)), "build count 1000"),
    "frame count that lies": (
        lambda: wrap(v5_meta(), struct.pack("<I", 1) + BUILD_INFO.pack(BUILD.bytes, 4096, bytes(32))
                     + FRAME_TABLE.pack(1, 50) + bytes(24)), "truncated"),
    "V4 mapping count that lies": (
        lambda: wrap(v5_meta()[:0] + METADATA.pack(4, PAGE, 16 * PAGE, 1, BUILD.bytes, BUILD.bytes),
                     struct.pack("<II", 0, 99) + bytes(80)), "mapping count 99"),
    "V5 entry count that lies": (lambda: wrap(v5_meta(), v5_body(b"\1\1\0\0", 5000)),
                                 "mapping count 5000"),
    "varint that overflows": (
        lambda: wrap(v5_meta(), v5_body(b"\xff" * 10 + b"\x7f" + b"\1\0\0", 1)), "overflows"),
    "varint cut short": (lambda: wrap(v5_meta(), v5_body(b"\0\x81\x81\x81\x81", 1)),
                         "truncated"),
    "V5 overlapping entries": (
        lambda: wrap(v5_meta(), v5_body(b"\0\0" + b"\2\2" + b"\0\0" + b"\0\0", 2)), "overlaps"),
    "V5 entry past the end": (
        lambda: wrap(v5_meta(), v5_body(uvarint(10) + uvarint(7) + b"\0\0", 1)), "beyond"),
    "V5 build index out of range": (
        lambda: wrap(v5_meta(), v5_body(b"\0\1\0\4", 1)), "build index 4"),
    "unknown compression type": (
        lambda: wrap(v5_meta(), struct.pack("<I", 1) + BUILD_INFO.pack(BUILD.bytes, 4096, bytes(32))
                     + FRAME_TABLE.pack(9, 1) + FRAME.pack(0, 0, 4096, 10)), "compression type 9"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damage_is_refused_with_one_line(name, tmp_path):
    make, words = DAMAGE[name]
    path = tmp_path / "memfile.header"
    path.write_bytes(make())
    with pytest.raises(HeaderError, match=words):
        load_header(path)
    result = fcsnap("inspect", path)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("fcsnap: error: ") and "Traceback" not in result.stderr


def test_v5_without_entries_is_all_zeros_and_v4_without_mappings_is_its_own_build():
    """E2B's two readings of an empty mapping list, which differ between the versions."""
    zeros = parse_header(wrap(v5_meta(), v5_body(b"", 0, builds=0)))
    assert [(m.offset, m.length, m.build_id) for m in zeros.mappings] == [(0, 16 * PAGE, NIL)]
    meta4 = METADATA.pack(4, PAGE, 16 * PAGE, 1, BUILD.bytes, BUILD.bytes)
    own = parse_header(wrap(meta4, struct.pack("<II", 0, 0)))
    assert [(m.offset, m.length, m.build_id) for m in own.mappings] == [(0, 16 * PAGE, BUILD)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([V4, V5]), st.data())
def test_fuzz_mutated_body_clear_error_or_valid(path, data):
    """Mutations past the LZ4 layer (the body re-framed), so the fuzzing reaches the builds
    section, frame tables and varint columns."""
    meta, flags, body = body_of(path)
    blob = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        header = parse_header(wrap(meta, bytes(blob[:cut]), flags))
    except HeaderError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert sum(m.length for m in header.mappings) == header.metadata.size
    for m in header.mappings[:64]:
        assert header.lookup(m.offset).remaining == m.length


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([V4, V5]), st.data())
def test_fuzz_mutated_file_clear_error_or_valid(path, data):
    """Mutations of the file as stored: the prefix, the LZ4 frame and its checksums."""
    blob = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(METADATA.size, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(METADATA.size, len(blob)))
    try:
        header = parse_header(bytes(blob[:cut]))
    except HeaderError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert sum(m.length for m in header.mappings) == header.metadata.size


def test_the_format_version_is_the_low_16_bits_and_only_records_are_written():
    """E2B dispatches on version & 0xFFFF and so does fcsnap; fcsnap writes only V1-V3's
    record layout, so a version-4 label on records is refused, not written."""
    data = bytearray(V4.read_bytes())
    data[0:8] = (0x10004).to_bytes(8, "little")
    flagged = parse_header(bytes(data))
    plain = load_header(V4)
    assert flagged.metadata.version == 0x10004 and flagged.mappings == plain.mappings
    with pytest.raises(HeaderError, match="not written as 40-byte records"):
        encode(plain.metadata, to_records(plain.mappings))
