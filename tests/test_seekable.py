"""The zstd seekable format: writer, reader, seek-table validation, interop with other tools."""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.errors import FcsnapError
from fcsnap.store.format.seekable import (
    MAX_EXPANSION,
    MAX_FRAME_SIZE,
    MAX_FRAMES,
    Frame,
    SeekableReader,
    SeekableWriter,
    parse_seek_table,
)

ZSTD = shutil.which("zstd")


def sample(size: int, seed: int = 0) -> bytes:
    """Memory-like data: random stretches, zero pages and repetitive text, in turns."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.randrange(1, 20000)
        if kind == 0:
            out += rng.randbytes(n)
        elif kind == 1:
            out += bytes(n)
        else:
            out += (b"fcsnap page %d " % rng.randrange(100)) * (n // 16 + 1)
    return bytes(out[:size])


def write_seekable(path: Path, data: bytes, frame_size: int, **kwargs: object) -> SeekableWriter:
    with path.open("wb") as f, SeekableWriter(f, frame_size, **kwargs) as writer:
        writer.write(data)
    return writer


def assemble(
    packed: list[bytes], sizes: list[int], checksums: list[int] | None, extra: int = 0
) -> bytes:
    """Compressed frames plus a seek table packed by hand with struct, as another tool would."""
    entries = b""
    for i, (frame, size) in enumerate(zip(packed, sizes, strict=True)):
        entries += struct.pack("<II", len(frame), size)
        if checksums is not None:
            entries += struct.pack("<I", checksums[i])
    descriptor = (0x80 if checksums is not None else 0) | extra
    footer = struct.pack("<IBI", len(packed), descriptor, 0x8F92EAB1)
    table = struct.pack("<II", 0x184D2A5E, len(entries) + len(footer)) + entries + footer
    return b"".join(packed) + table


def hand_built(frames: list[bytes], checksums: bool, descriptor_extra: int = 0) -> bytes:
    """A seekable file made without fcsnap, its frames lacking the content size field."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False)
    sums = [xxhash.xxh64_intdigest(f) & 0xFFFFFFFF for f in frames] if checksums else None
    packed = [compressor.compress(f) for f in frames]
    return assemble(packed, [len(f) for f in frames], sums, descriptor_extra)


@pytest.mark.parametrize("frame_size", [1, 4096, 10_000, 256 << 10])
def test_round_trip_with_odd_chunked_writes(tmp_path: Path, frame_size: int) -> None:
    data = sample(700_000 if frame_size > 1 else 3000, seed=frame_size)
    path = tmp_path / "d.zst"
    rng = random.Random(frame_size)
    with path.open("wb") as f:
        writer = SeekableWriter(f, frame_size, level=1)
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            n = rng.choice([0, 1, 7, 4095, 4097, 65_537, 300_001])
            writer.write(view[pos : pos + n])
            pos += n
        total = writer.close()
    assert total == path.stat().st_size == writer.compressed_size
    assert writer.uncompressed_size == len(data)
    sizes = [f.decompressed_size for f in writer.frames]
    assert sizes[:-1] == [frame_size] * (len(sizes) - 1) and 0 < sizes[-1] <= frame_size
    with SeekableReader(path) as reader:
        assert reader.size == len(data)
        assert reader.frames == writer.frames
        for _ in range(200):
            offset = rng.randrange(len(data))
            length = rng.randrange(min(len(data) - offset, 3 * frame_size + 5) + 1)
            assert reader.read(offset, length) == data[offset : offset + length]
        assert reader.read(0, len(data)) == data


def test_large_writes_bypass_staging_and_frames_line_up(tmp_path: Path) -> None:
    data = sample(3 << 20, seed=7)
    path = tmp_path / "d.zst"
    # 16 KiB frames batch 1 MiB at a time, so the 2 MiB write is compressed in place.
    with path.open("wb") as f, SeekableWriter(f, 16 << 10, threads=2) as writer:
        writer.write(data[:100])
        writer.write(memoryview(data)[100 : (2 << 20) + 3])
        writer.write(bytearray(data[(2 << 20) + 3 :]))
    frames = writer.frames
    assert [f.decompressed_offset for f in frames] == list(range(0, len(data), 16 << 10))
    assert all(f.checksum is not None for f in frames)
    assert path.read_bytes()[-5] == 0x80  # descriptor: checksums, reserved and unused bits zero
    with SeekableReader(path, verify_checksums=True) as reader:
        assert b"".join(reader.read_frame(i) for i in range(len(frames))) == data


def test_empty_input_gives_a_valid_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.zst"
    write_seekable(path, b"", 4096)
    with SeekableReader(path) as reader:
        assert reader.size == 0 and reader.frames == []
        assert reader.read(0, 0) == b""
        with pytest.raises(FcsnapError, match="outside"):
            reader.read(0, 1)


@pytest.mark.skipif(ZSTD is None, reason="zstd command-line tool not installed")
@pytest.mark.parametrize("checksums", [True, False])
def test_zstd_cli_decompresses_writer_output(tmp_path: Path, checksums: bool) -> None:
    data = sample(500_000, seed=3)
    path = tmp_path / "d.zst"
    write_seekable(path, data, 50_000, checksums=checksums)
    out = subprocess.run([ZSTD, "-d", "-c", str(path)], capture_output=True, check=True).stdout
    assert out == data


@pytest.mark.parametrize("checksums", [True, False])
def test_reads_a_file_built_by_hand(tmp_path: Path, checksums: bool) -> None:
    rng = random.Random(5)
    frames = [sample(n, seed=n) for n in (1, 5000, 123_457, 2, 70_000)]
    data = b"".join(frames)
    path = tmp_path / "hand.zst"
    # Unused descriptor bits 0-1 are for non-breaking extensions: readers must not reject them.
    path.write_bytes(hand_built(frames, checksums, descriptor_extra=0b11))
    with SeekableReader(path, verify_checksums=True, cache_bytes=0) as reader:
        assert [f.decompressed_size for f in reader.frames] == [len(f) for f in frames]
        assert all((f.checksum is not None) == checksums for f in reader.frames)
        for i, frame in enumerate(frames):
            assert reader.read_frame(i) == frame
        for _ in range(100):
            offset = rng.randrange(len(data))
            length = rng.randrange(len(data) - offset + 1)
            assert reader.read(offset, length) == data[offset : offset + length]
        assert reader.frame_index(0) == 0
        assert reader.frame_index(1) == 1
        assert reader.frame_index(len(data) - 1) == len(frames) - 1


PLAIN = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(b"a" * 1000)
DECLARED = zstandard.ZstdCompressor(level=1).compress(b"a" * 1000)


@pytest.mark.parametrize(
    ("packed", "size", "message"),
    [
        (PLAIN, 1001, "decompressed to 1000 bytes, seek table says 1001"),
        (PLAIN, 999, "decompresses to more than the 999 bytes the seek table says"),
        (PLAIN + b"xyz", 1000, "corrupt zstd frame"),
        (DECLARED + b"xyz", 1000, "corrupt zstd frame: .*unused data"),
        (DECLARED, 1001, "frame header says 1000 bytes, seek table says 1001"),
        (DECLARED, 10**5, "frame header says 1000 bytes"),
    ],
)
def test_frame_disagreeing_with_its_table_entry(
    tmp_path: Path, packed: bytes, size: int, message: str
) -> None:
    path = tmp_path / "bad.zst"
    path.write_bytes(assemble([DECLARED, packed], [1000, size], None))
    with SeekableReader(path) as reader:
        assert reader.read_frame(0) == b"a" * 1000
        with pytest.raises(FcsnapError, match=rf"bad\.zst: frame 1 \(at byte {len(DECLARED)}\): "):
            reader.read_frame(1)
        with pytest.raises(FcsnapError, match=message):
            reader.read_frame(1)


def test_checksums_catch_a_flipped_byte_in_a_stored_frame(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(200_000)  # incompressible: zstd stores raw blocks
    path = tmp_path / "d.zst"
    writer = write_seekable(path, data, 100_000)
    blob = bytearray(path.read_bytes())
    second = writer.frames[1]
    blob[second.compressed_offset + second.compressed_size // 2] ^= 0x40
    path.write_bytes(blob)
    with SeekableReader(path) as reader:  # without verification the damage goes unnoticed
        assert reader.read_frame(1) != data[100_000:]
    with SeekableReader(path, verify_checksums=True) as reader:
        assert reader.read_frame(0) == data[:100_000]
        with pytest.raises(FcsnapError, match=r"d\.zst: frame 1 .*checksum"):
            reader.read_frame(1)


def test_garbage_frame_data_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "d.zst"
    writer = write_seekable(path, sample(100_000), 40_000)
    blob = bytearray(path.read_bytes())
    frame = writer.frames[2]
    blob[frame.compressed_offset : frame.compressed_offset + 8] = b"\xff" * 8
    path.write_bytes(blob)
    with SeekableReader(path) as reader, pytest.raises(FcsnapError, match="frame 2"):
        reader.read(90_000, 100)


def corrupt(tmp_path: Path, mutate: Callable[[bytearray], bytes]) -> Path:
    path = tmp_path / "d.zst"
    write_seekable(path, sample(50_000), 10_000)
    blob = bytearray(path.read_bytes())
    path.write_bytes(mutate(blob))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-1], "not a zstd seekable file"),
        (lambda b: b[:-20], "not a zstd seekable file"),
        (lambda b: b[1:], "compressed bytes but the file has"),
        (lambda b: b"\0" + b, "compressed bytes but the file has"),
        (lambda b: b[:4], "too short"),
        (lambda b: b"", "too short"),
        (lambda b: b[:-4] + b"\xb1\xea\x92\x8e", "footer magic"),
        (lambda b: b[:-5] + b"\x84" + b[-4:], "reserved bits"),
        (lambda b: b[:-9] + struct.pack("<I", 4) + b[-5:], "count of 4 frames"),
        (lambda b: b[:-9] + struct.pack("<I", 0xFFFFFFFF) + b[-5:], "claims 4294967295 frames"),
        (lambda b: b[:-9] + struct.pack("<I", 6000) + b[-5:], "truncated"),
    ],
)
def test_malformed_files_are_rejected_with_a_reason(
    tmp_path: Path, mutate: Callable[[bytearray], bytes], message: str
) -> None:
    path = corrupt(tmp_path, mutate)
    with pytest.raises(FcsnapError, match=message) as info:
        SeekableReader(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_table_field_errors() -> None:
    frames = [b"x" * 100, b"y" * 200]
    blob = hand_built(frames, checksums=True)
    table = blob[-(8 + 2 * 12 + 9) :]
    assert [f.decompressed_size for f in parse_seek_table(table, len(blob))] == [100, 200]

    def with_entry(index: int, field: int, value: int) -> bytes:
        t = bytearray(table)
        struct.pack_into("<I", t, 8 + index * 12 + field * 4, value)
        return bytes(t)

    with pytest.raises(FcsnapError, match="frame 1 has size zero"):
        parse_seek_table(with_entry(1, 1, 0), len(blob))
    with pytest.raises(FcsnapError, match="frame 0 has size zero"):
        parse_seek_table(with_entry(0, 0, 0), len(blob))
    with pytest.raises(FcsnapError, match="claims 1073741825 decompressed bytes"):
        parse_seek_table(with_entry(0, 1, (1 << 30) + 1), len(blob))
    with pytest.raises(FcsnapError, match="compressed bytes but the file has"):
        parse_seek_table(with_entry(0, 0, 5), len(blob))
    with pytest.raises(FcsnapError, match="skippable magic|count of"):
        parse_seek_table(b"\0" * 4 + table[4:], len(blob))
    with pytest.raises(FcsnapError, match="does not match its frame count"):
        parse_seek_table(table[:4] + struct.pack("<I", 7) + table[8:], len(blob))
    with pytest.raises(FcsnapError, match="only 20 given"):
        parse_seek_table(table[-20:], len(blob))
    with pytest.raises(FcsnapError, match="longer than the file"):
        parse_seek_table(table, len(table) - 1)


def check_frames(frames: list[Frame], tail: bytes, file_size: int) -> None:
    """What parse_seek_table promises about any table it accepts."""
    coffset = doffset = 0
    for f in frames:
        assert f.compressed_offset == coffset and f.decompressed_offset == doffset
        assert 0 < f.decompressed_size <= 1 << 30 and f.compressed_size > 0
        assert f.decompressed_size <= f.compressed_size * MAX_EXPANSION
        coffset += f.compressed_size
        doffset += f.decompressed_size
    assert coffset < file_size
    assert len(frames) * 8 <= len(tail)


@settings(max_examples=400, deadline=None)
@given(tail=st.binary(max_size=200), extra=st.integers(0, 1 << 40))
def test_fuzz_arbitrary_tails(tail: bytes, extra: int) -> None:
    for file_size in (len(tail), len(tail) + extra, max(0, len(tail) - 1)):
        try:
            frames = parse_seek_table(tail, file_size)
        except FcsnapError:
            continue
        check_frames(frames, tail, file_size)


VALID = hand_built([b"a" * 300, b"b" * 5000, sample(9000)], checksums=True)
VALID_TABLE = VALID[-(8 + 3 * 12 + 9) :]


@settings(max_examples=400, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(VALID_TABLE) - 1), st.integers(1, 255)), max_size=4
    ),
    cut=st.integers(0, 12),
    prefix=st.binary(max_size=16),
    size_delta=st.integers(-64, 64),
)
def test_fuzz_mutated_tables(
    flips: list[tuple[int, int]], cut: int, prefix: bytes, size_delta: int
) -> None:
    table = bytearray(VALID_TABLE)
    for position, mask in flips:
        table[position] ^= mask
    tail = prefix + bytes(table[cut:])
    file_size = len(VALID) + size_delta
    try:
        frames = parse_seek_table(tail, file_size)
    except FcsnapError:
        return
    check_frames(frames, tail, file_size)


def test_cache_respects_its_budget_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "d.zst"
    data = sample(10 * 4096)
    write_seekable(path, data, 4096)
    with SeekableReader(path, cache_bytes=3 * 4096) as reader:
        for i in (0, 1, 2):
            reader.read_frame(i)
        assert (reader.hits, reader.misses, reader.cached_bytes) == (0, 3, 3 * 4096)
        assert reader.read(100, 10) == data[100:110]  # frame 0: a hit, now most recent
        assert reader.hits == 1
        reader.read_frame(3)  # evicts frame 1, the least recently used
        assert reader.cached_bytes == 3 * 4096
        reader.read_frame(0)
        reader.read_frame(2)
        assert (reader.hits, reader.misses) == (3, 4)
        reader.read_frame(1)
        assert (reader.hits, reader.misses) == (3, 5)
        for i in range(10):
            reader.read_frame(i)
            assert reader.cached_bytes <= 3 * 4096
    with SeekableReader(path, cache_bytes=0) as reader:
        reader.read_frame(0)
        reader.read_frame(0)
        assert (reader.hits, reader.misses, reader.cached_bytes) == (0, 2, 0)


def test_threads_share_one_reader(tmp_path: Path) -> None:
    path = tmp_path / "d.zst"
    data = sample(400_000, seed=9)
    write_seekable(path, data, 8192)
    errors: list[str] = []
    with SeekableReader(path, cache_bytes=5 * 8192, verify_checksums=True) as reader:

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(300):
                offset = rng.randrange(len(data) - 9000)
                if reader.read(offset, 9000) != data[offset : offset + 9000]:
                    errors.append(f"mismatch at {offset}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert reader.cached_bytes <= 5 * 8192
        assert reader.hits + reader.misses >= 4 * 300
    assert errors == []


def test_api_edges(tmp_path: Path) -> None:
    path = tmp_path / "d.zst"
    write_seekable(path, sample(20_000), 4096)
    with SeekableReader(path) as reader:
        for offset, length in ((-1, 1), (0, 20_001), (19_999, 2), (5, -1)):
            with pytest.raises(FcsnapError, match="outside"):
                reader.read(offset, length)
        with pytest.raises(FcsnapError, match="no frame 5"):
            reader.read_frame(5)
        with pytest.raises(FcsnapError, match="outside"):
            reader.frame_index(20_000)
    with pytest.raises(FcsnapError, match="cannot open"):
        SeekableReader(tmp_path / "missing.zst")
    with pytest.raises(FcsnapError, match="frame size"):
        SeekableWriter(io.BytesIO(), 0)
    writer = SeekableWriter(io.BytesIO(), 4096)
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"x")


def test_failed_block_leaves_no_seek_table() -> None:
    out = io.BytesIO()
    with pytest.raises(RuntimeError), SeekableWriter(out, 4096) as writer:
        writer.write(b"x" * 10_000)
        raise RuntimeError("source went away")
    assert not out.getvalue().endswith(struct.pack("<I", 0x8F92EAB1))


# -- memory in proportion to the file, not to what its table claims ---------------------------


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Yields a list that holds, after the block, the peak bytes Python allocated in it."""
    result: list[int] = []
    tracemalloc.start()
    try:
        yield result
    finally:
        result.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.mark.parametrize("checksums", [True, False])
def test_claimed_frame_count_is_checked_against_the_file_first(
    tmp_path: Path, checksums: bool
) -> None:
    """A footer claiming the most frames the format allows (a 1.6 GB table) on a small file:
    refused from the footer alone, without reading or allocating the table."""
    blob = hand_built([b"a" * 100], checksums)
    path = tmp_path / "d.zst"
    path.write_bytes(blob[:-9] + struct.pack("<I", MAX_FRAMES) + blob[-5:])
    with peak_memory() as peak, pytest.raises(FcsnapError, match="truncated"):
        SeekableReader(path)
    assert peak[0] < 64 << 10


def test_entry_claiming_more_than_zstd_can_expand_is_refused(tmp_path: Path) -> None:
    """1 GiB from 17 bytes is no zstd frame: refused when the table is read."""
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(b"a" * 100)
    path = tmp_path / "d.zst"
    path.write_bytes(assemble([packed], [MAX_FRAME_SIZE], None))
    with pytest.raises(FcsnapError, match="more than zstd can expand"):
        SeekableReader(path)
    entry = struct.pack("<II", len(packed), len(packed) * MAX_EXPANSION)
    table = struct.pack("<II", 0x184D2A5E, 8 + 9) + entry + struct.pack("<IBI", 1, 0, 0x8F92EAB1)
    assert parse_seek_table(table, len(packed) + len(table))[0].decompressed_size == len(
        packed
    ) * MAX_EXPANSION  # the bound itself is allowed


@pytest.mark.parametrize("content_size", [False, True], ids=["unsized", "sized"])
def test_frame_yielding_less_than_its_entry_allocates_what_it_yields(
    tmp_path: Path, content_size: bool
) -> None:
    """An entry claiming 1 GiB for a frame of 64 KiB of random bytes (plausible to the
    expansion bound): reading it costs memory in proportion to the frame, not 1 GiB, which
    zstd's one-call decompress would allocate up front for a frame without a size."""
    data = random.Random(2).randbytes(64 << 10)
    packed = zstandard.ZstdCompressor(write_content_size=content_size).compress(data)
    path = tmp_path / "d.zst"
    path.write_bytes(assemble([packed], [MAX_FRAME_SIZE], None))
    message = "frame header says 65536 bytes" if content_size else "decompressed to 65536 bytes"
    with SeekableReader(path) as reader, peak_memory() as peak, pytest.raises(
        FcsnapError, match=message
    ):
        reader.read_frame(0)
    assert peak[0] < 4 << 20


def test_frames_without_a_size_stream_to_the_same_bytes(tmp_path: Path) -> None:
    """The streaming path (frames without a content size, as other writers make them)
    gives exactly the frame, across several chunks too."""
    data = sample(3 << 20, seed=5)
    path = tmp_path / "d.zst"
    path.write_bytes(hand_built([data[: 1 << 20], data[1 << 20 :]], checksums=True))
    with SeekableReader(path, verify_checksums=True) as reader:
        assert reader.read(0, len(data)) == data
