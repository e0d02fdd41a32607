"""One header model: every reader (inspect, diff's parent, restore) parses and checks a header
through `header.decode`, and every writer goes through `header.encode`, which refuses what the
reader would refuse."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fcsnap.errors import FcsnapError
from fcsnap.header import (
    NIL,
    PAGE,
    HeaderError,
    Metadata,
    decode,
    encode,
    load_header,
    parse_header,
)
from fcsnap.header.format import MAPPING, METADATA
from fcsnap.store.format.layout import HEADER
from fcsnap.store.format.source import GenerationReader
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full

BUILD = uuid.UUID("12345678-1234-4234-8234-123456789abc")
META = Metadata(3, PAGE, 4 * PAGE, 0, BUILD, BUILD)


def records(*rows: tuple[int, int, uuid.UUID, int]) -> bytes:
    return b"".join(MAPPING.pack(o, n, b.bytes, s) for o, n, b, s in rows)


def test_encode_writes_what_decode_reads_back() -> None:
    rows = records((0, PAGE, BUILD, 0), (PAGE, 3 * PAGE, NIL, 0))
    blob = encode(META, rows)
    meta, back = decode(blob)
    assert meta == META and back == rows
    assert len(blob) == METADATA.size + 2 * MAPPING.size


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (((0, PAGE, BUILD, 0), (2 * PAGE, 2 * PAGE, BUILD, PAGE)), "leaves a gap"),
        (((0, 4 * PAGE, BUILD, 7),), "not 4096-aligned"),
        (((0, 2 * PAGE, BUILD, 0),), "not the memory size"),
    ],
    ids=["gap", "unaligned", "short"],
)
def test_encode_refuses_what_a_reader_would_refuse(rows, message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        encode(META, records(*rows))


def test_mappings_whose_sums_wrap_around_64_bits_are_refused() -> None:
    """(0, 2**63) then (2**63, 2**63 + 4 pages): in 64-bit arithmetic the second ends at 4
    pages, the memory size, as if they tiled it."""
    rows = records((0, 1 << 63, BUILD, 0), (1 << 63, (1 << 63) + 4 * PAGE, BUILD, 0))
    blob = METADATA.pack(3, PAGE, 4 * PAGE, 0, BUILD.bytes, BUILD.bytes) + rows
    with pytest.raises(HeaderError, match="not the memory size"):
        decode(blob)
    with pytest.raises(HeaderError):
        encode(META, rows)


def test_a_broken_header_reads_the_same_everywhere(tmp_path: Path) -> None:
    """inspect (load_header), diff (its parent) and unpack/restore (GenerationReader) name the
    same broken rule in the same words: they share one parser."""
    image = tmp_path / "gen0.mem"
    write_full(image, synthetic_memory(64 * PAGE, seed=4))
    _, build = ops.pack(image, tmp_path / "store", BuildOptions())
    header = build / HEADER
    meta, _ = decode(header.read_bytes())
    gap = records((0, PAGE, meta.build_id, 0), (2 * PAGE, 62 * PAGE, meta.build_id, 2 * PAGE))
    header.chmod(0o644)
    header.write_bytes(header.read_bytes()[: METADATA.size] + gap)
    messages = []
    for read in (
        lambda: load_header(build),
        lambda: ops.diff(image, build, tmp_path / "store", BuildOptions()),
        lambda: GenerationReader(build),
    ):
        with pytest.raises(FcsnapError) as caught:
            read()
        messages.append(str(caught.value))
    assert all("leaves a gap [0x1000, 0x2000)" in m for m in messages), messages
    assert len(set(messages)) == 1, messages


def test_parse_header_keeps_e2b_reading_of_a_header_without_records() -> None:
    header = parse_header(METADATA.pack(3, PAGE, 4 * PAGE, 0, BUILD.bytes, NIL.bytes))
    assert [(m.offset, m.length, m.build_id) for m in header.mappings] == [(0, 4 * PAGE, BUILD)]
