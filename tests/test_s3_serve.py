"""Serving a build in S3 through the host chunk cache: the compiled loop copies pages straight
from the mappings of cached chunks, a chunk evicted while mapped still serves, and the
pure-Python path and --verify serve the same bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import helpers
import obstore
import pytest
import zstandard
from helpers import Procs, assert_served
from s3_helpers import Bucket, memfile, new_bucket, restore_from
from test_restore import KILLED

from fcsnap.store.backends.cached_zstd import TAIL_GUESS
from fcsnap.store.backends.chunk_cache import CHUNK
from fcsnap.store.format.seekable import SeekableWriter, decompress_frame, parse_seek_table

MIB = 1 << 20
BIG_BLOCKS = ("--compress", "zstd", "--block-size", "2M", "--frame-size", "256K")


def fcsnap(bucket: Bucket, *args: str) -> str:
    result = helpers.fcsnap_here(*args, env=bucket.env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wide_mem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB of guest memory: a raw diff of four 4 MiB cache chunks (13.6 MiB)."""
    return memfile(tmp_path_factory.mktemp("wide"), "wide.mem", seed=61, mib=32)


def packed(bucket: Bucket, mem: Path, *args: str) -> str:
    """`mem` packed straight into the bucket as the VM `wide`."""
    fcsnap(bucket, "pack", "--init", str(mem), "--store", bucket.url(), "--name", "wide", "-q",
           *args)
    return "wide"


@pytest.fixture(scope="module")
def raw_wide(s3_server, wide_mem: Path) -> Bucket:  # noqa: ANN001
    """A bucket holding `wide_mem` packed raw as `wide`, for the tests that only read it
    (a restore's lease comes and goes; the build is never changed)."""
    bucket = new_bucket(s3_server)
    packed(bucket, wide_mem)
    return bucket


def served(procs: Procs, bucket: Bucket, mem: Path, cache: Path, *args: str,
           env: dict[str, str] | None = None, **vm: Any) -> dict[str, Any]:
    """Restore `wide` to a stand-in that checks every byte it reads; the server's stats."""
    procs.stats.unlink(missing_ok=True)
    server = procs.track(restore_from(bucket, "wide", procs.socket, cache, *args,
                                      stats=procs.stats, env=env))
    out = procs.outcome(server, procs.vm(expected=mem, **vm))
    return assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)


def diff_listed(bucket: Bucket) -> tuple[str, int]:
    """The key and the size of the one diff object in the bucket."""
    diffs = [o for batch in obstore.list(bucket.client(), prefix="snaps/") for o in batch
             if "/memfile.diff" in o["path"]]
    assert len(diffs) == 1, diffs
    return diffs[0]["path"], diffs[0]["size"]


def diff_size(bucket: Bucket) -> int:
    return diff_listed(bucket)[1]


def chunk_files(cache: Path) -> list[Path]:
    return [p for d in cache.iterdir() for p in d.iterdir() if not p.name.startswith(".")]


def diff_object(bucket: Bucket) -> tuple[str, bytes]:
    """The key and the bytes of the one diff object in the bucket."""
    key = diff_listed(bucket)[0]
    return key, bytes(obstore.get(bucket.client(), key).bytes())


def test_a_warm_cache_is_served_by_the_compiled_loop(
    raw_wide: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    bucket = raw_wide
    cache = tmp_path / "cache"
    cold = served(procs, bucket, wide_mem, cache, "--fault-around", "0", order="random")
    assert cold["fetch_requests"] > 1
    warm = served(procs, bucket, wide_mem, cache, order="random")
    assert warm["fetch_requests"] == 0 and warm["cache_hits"] > 0
    # every fault but the first of each chunk is served in C, from the chunk's mapping
    assert warm["compiled_faults"] >= warm["faults"] - cold["fetch_requests"] > 0
    # in order, 1 MiB windows: installs that cross from one chunk's mapping to the next
    windows = served(procs, bucket, wide_mem, cache, "--fault-around", "1M")
    assert windows["compiled_faults"] > 0 and windows["fetch_requests"] == 0


def test_python_and_verify_serve_the_same_bytes(
    raw_wide: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    bucket = raw_wide
    cache = tmp_path / "cache"
    pure = served(procs, bucket, wide_mem, cache, env={"FCSNAP_PURE_PYTHON": "1"},
                  order="random")
    assert pure["compiled_faults"] == 0 and pure["fetch_requests"] > 1
    checked = served(procs, bucket, wide_mem, cache, "--verify", order="random")
    assert checked["compiled_faults"] == 0 and checked["fetch_requests"] == 0


def test_a_chunk_evicted_while_mapped_still_serves(
    raw_wide: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    """A cache of one chunk: every chunk is evicted as the next arrives, while the server
    still copies from its mapping; none is fetched twice, every byte is right."""
    bucket = raw_wide
    cache = tmp_path / "cache"
    stats = served(procs, bucket, wide_mem, cache, "--cache-size", str(CHUNK),
                   "--fault-around", "0", order="random")
    size = diff_size(bucket)
    assert stats["fetched_bytes"] == size  # each chunk fetched once ...
    assert stats["fetch_requests"] == -(-size // CHUNK) >= 3
    assert len(chunk_files(cache)) < stats["fetch_requests"]  # ... though some were evicted
    assert stats["compiled_faults"] > 0


def scattered_then_all(procs: Procs, bucket: Bucket, mem: Path, cache: Path, touched: int,
                       most_requests: int, most_bytes: float) -> tuple[dict, dict]:
    """Serve `touched` scattered pages (of 8192) from a cold cache: at most `most_requests`
    fetches and `most_bytes` fetched; then every page, the diff fetched no more than once;
    then a second VM fetching nothing. The first two VMs' stats."""
    few = served(procs, bucket, mem, cache, touch=touched / 8192, order="random")
    assert few["pages_served"] >= touched
    assert 0 < few["fetch_requests"] <= most_requests
    assert few["fetched_bytes"] < most_bytes
    every = served(procs, bucket, mem, cache)  # then every page, in order
    assert few["fetched_bytes"] + every["fetched_bytes"] <= diff_size(bucket) + TAIL_GUESS
    again = served(procs, bucket, mem, cache, order="random")
    assert again["fetch_requests"] == 0 and again["cache_hits"] > 0
    return few, every


def test_zstd_frames_are_fetched_as_they_are_read(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    """A few scattered pages fetch about their frames, not the diff; every byte is right, and
    a second VM on the host fetches nothing."""
    packed(bucket, wide_mem, "--compress", "zstd")
    whole = diff_size(bucket)
    # 8 pages, of 8192, in 128 frames: their frames and the seek table
    few, every = scattered_then_all(procs, bucket, wide_mem, tmp_path / "cache", 8, 8 + 2,
                                    whole / 3)
    assert every["fetch_requests"] > 0


def test_a_corrupt_zstd_frame_is_never_installed(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    build = json.loads(fcsnap(bucket, "pack", "--init", str(wide_mem), "--store", bucket.url(),
                              "--name", "wide", "--compress", "zstd", "--json"))["build_id"]
    key = f"snaps/{build}/memfile.diff.zst"
    data = bytearray(obstore.get(bucket.client(), key).bytes())
    data[len(data) // 3] ^= 0x55  # inside a frame, away from the seek table
    obstore.put(bucket.client(), key, bytes(data))
    server = procs.track(restore_from(bucket, "wide", procs.socket, tmp_path / "c",
                                      stats=procs.stats))
    out = procs.outcome(server, procs.vm(expected=wide_mem))
    assert out.status == 1 and out.vm_status == KILLED, out
    assert "fetched from the store" in out.error and "not installed" in out.error


def test_zstd_frames_smaller_than_a_block_are_fetched_a_block_at_a_time(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    """2 MiB blocks in 256 KiB frames: the 8 frames of a block are fetched (one range GET),
    checked and cached together; a few scattered pages (of a 4 KiB-page guest) fetch about
    their blocks, not the diff; every byte is right, and a second VM fetches nothing."""
    packed(bucket, wide_mem, *BIG_BLOCKS)
    _, data = diff_object(bucket)
    whole = len(data)
    blocks = sum(f.decompressed_size for f in parse_seek_table(data, whole)) // (2 * MIB)
    assert blocks >= 12
    cache = tmp_path / "cache"
    # 2 pages, of 8192, in `blocks` blocks: their blocks and the seek table
    few, every = scattered_then_all(procs, bucket, wide_mem, cache, 2, 2 + 1, whole / 4)
    assert few["fetch_requests"] + every["fetch_requests"] == blocks + 1
    pieces = [p for p in chunk_files(cache) if p.name != "seektable"]
    assert len(pieces) == blocks  # one piece per block, not per frame


def test_a_bad_frame_inside_a_block_is_never_installed(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    """2 MiB blocks in 256 KiB frames; the diff rewritten with one byte changed in the fourth
    frame of block 5: every frame still decompresses and matches its seek-table checksum, but
    the block does not match the sidecar. The VM is killed with one line naming the block,
    and nothing of that block is cached."""
    packed(bucket, wide_mem, *BIG_BLOCKS)
    key, data = diff_object(bucket)
    frames = parse_seek_table(data, len(data))
    dctx = zstandard.ZstdDecompressor()
    memory = bytearray(b"".join(
        decompress_frame(dctx, data[f.compressed_offset:f.compressed_offset + f.compressed_size],
                         f, verify_checksum=True)
        for f in frames
    ))
    frame = frames[5 * 8 + 3]
    memory[frame.decompressed_offset + frame.decompressed_size // 2] ^= 0x55
    out = io.BytesIO()
    with SeekableWriter(out, 256 << 10) as writer:
        writer.write(memory)
    obstore.put(bucket.client(), key, out.getvalue())
    cache = tmp_path / "cache"
    server = procs.track(restore_from(bucket, "wide", procs.socket, cache, stats=procs.stats))
    result = procs.outcome(server, procs.vm(expected=wide_mem))
    assert result.status == 1 and result.vm_status == KILLED, result
    assert "block 5 fetched from the store does not match its hash; not installed" in result.error
    assert "00000005" not in [p.name for p in chunk_files(cache)]
