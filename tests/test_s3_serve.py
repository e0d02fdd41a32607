"""Serving a build in S3 through the host chunk cache: the compiled loop copies pages straight
from the mappings of cached chunks, a chunk evicted while mapped still serves, and the
pure-Python path and --verify serve the same bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helpers
import obstore
import pytest
from helpers import Procs, assert_served
from s3_helpers import Bucket, memfile, restore_from
from test_restore import KILLED

from fcsnap.store.cached_zstd import TAIL_GUESS
from fcsnap.store.chunk_cache import CHUNK

MIB = 1 << 20


def fcsnap(bucket: Bucket, *args: str) -> str:
    result = helpers.fcsnap(*args, env=bucket.env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wide_mem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB of guest memory: a raw diff of four 4 MiB cache chunks (13.6 MiB)."""
    return memfile(tmp_path_factory.mktemp("wide"), "wide.mem", seed=61, mib=32)


def packed(bucket: Bucket, mem: Path, *args: str) -> str:
    """`mem` packed straight into the bucket as the VM `wide`."""
    fcsnap(bucket, "pack", str(mem), "--store", bucket.url(), "--name", "wide", "-q", *args)
    return "wide"


def served(procs: Procs, bucket: Bucket, mem: Path, cache: Path, *args: str,
           env: dict[str, str] | None = None, **vm: Any) -> dict[str, Any]:
    """Restore `wide` to a stand-in that checks every byte it reads; the server's stats."""
    procs.stats.unlink(missing_ok=True)
    server = procs.track(restore_from(bucket, "wide", procs.socket, cache, *args,
                                      stats=procs.stats, env=env))
    out = procs.outcome(server, procs.vm(expected=mem, **vm))
    return assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)


def diff_size(bucket: Bucket) -> int:
    """The size of the one diff object in the bucket."""
    diffs = [o for batch in obstore.list(bucket.client(), prefix="snaps/") for o in batch
             if "/memfile.diff" in o["path"]]
    assert len(diffs) == 1, diffs
    return diffs[0]["size"]


def chunk_files(cache: Path) -> list[Path]:
    return [p for d in cache.iterdir() for p in d.iterdir() if not p.name.startswith(".")]


def test_a_warm_cache_is_served_by_the_compiled_loop(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    packed(bucket, wide_mem)
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
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    packed(bucket, wide_mem)
    cache = tmp_path / "cache"
    pure = served(procs, bucket, wide_mem, cache, env={"FCSNAP_PURE_PYTHON": "1"},
                  order="random")
    assert pure["compiled_faults"] == 0 and pure["fetch_requests"] > 1
    checked = served(procs, bucket, wide_mem, cache, "--verify", order="random")
    assert checked["compiled_faults"] == 0 and checked["fetch_requests"] == 0


def test_a_chunk_evicted_while_mapped_still_serves(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    """A cache of one chunk: every chunk is evicted as the next arrives, while the server
    still copies from its mapping; none is fetched twice, every byte is right."""
    packed(bucket, wide_mem)
    cache = tmp_path / "cache"
    stats = served(procs, bucket, wide_mem, cache, "--cache-size", str(CHUNK),
                   "--fault-around", "0", order="random")
    size = diff_size(bucket)
    assert stats["fetched_bytes"] == size  # each chunk fetched once ...
    assert stats["fetch_requests"] == -(-size // CHUNK) >= 3
    assert len(chunk_files(cache)) < stats["fetch_requests"]  # ... though some were evicted
    assert stats["compiled_faults"] > 0


def test_zstd_frames_are_fetched_as_they_are_read(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    """A few scattered pages fetch about their frames, not the diff; every byte is right, and
    a second VM on the host fetches nothing."""
    packed(bucket, wide_mem, "--compress", "zstd")
    whole = diff_size(bucket)
    cache = tmp_path / "cache"
    touched = 8  # pages, of 8192, in 128 frames
    few = served(procs, bucket, wide_mem, cache, touch=touched / 8192, order="random")
    assert few["pages_served"] >= touched
    assert 0 < few["fetch_requests"] <= touched + 2  # its frames and the seek table
    assert few["fetched_bytes"] < whole / 3
    every = served(procs, bucket, wide_mem, cache)  # then every page, in order
    assert few["fetched_bytes"] + every["fetched_bytes"] <= whole + TAIL_GUESS
    assert every["fetch_requests"] > 0
    again = served(procs, bucket, wide_mem, cache, order="random")
    assert again["fetch_requests"] == 0 and again["cache_hits"] > 0


def test_a_corrupt_zstd_frame_is_never_installed(
    bucket: Bucket, wide_mem: Path, procs: Procs, tmp_path: Path
) -> None:
    build = json.loads(fcsnap(bucket, "pack", str(wide_mem), "--store", bucket.url(),
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
