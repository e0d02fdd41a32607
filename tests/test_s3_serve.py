"""Serving a build in S3 through the host chunk cache: the compiled loop copies pages straight
from the mappings of cached chunks, a chunk evicted while mapped still serves, and the
pure-Python path and --verify serve the same bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import WAIT, Procs, assert_served
from s3_helpers import Bucket, memfile

from fcsnap.store.chunk_cache import CHUNK

MIB = 1 << 20


def fcsnap(bucket: Bucket, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fcsnap", *args], env=bucket.env, capture_output=True,
        text=True, timeout=WAIT, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def wide_mem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 MiB of guest memory: a raw diff of several 4 MiB cache chunks."""
    return memfile(tmp_path_factory.mktemp("wide"), "wide.mem", seed=61, mib=16)


def packed(bucket: Bucket, mem: Path, *args: str) -> str:
    """`mem` packed straight into the bucket as the VM `wide`."""
    fcsnap(bucket, "pack", str(mem), "--store", bucket.url(), "--name", "wide", "-q", *args)
    return "wide"


def served(procs: Procs, bucket: Bucket, mem: Path, cache: Path, *args: str,
           env: dict[str, str] | None = None, **vm: Any) -> dict[str, Any]:
    """Restore `wide` to a stand-in that checks every byte it reads; the server's stats."""
    procs.stats.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "fcsnap", "restore", "--vm", "wide", "--socket",
            str(procs.socket), "--store", bucket.url(), "--cache-dir", str(cache), "--quiet",
            "--stats", str(procs.stats), *args]
    server = procs.track(subprocess.Popen(
        argv, env={**bucket.env, **(env or {})}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = procs.outcome(server, procs.vm(expected=mem, **vm))
    return assert_served(out.vm_status, out.status, out.stderr, out.report, out.stats)


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
    chunks = -(-stats["fetched_bytes"] // CHUNK)
    assert stats["fetch_requests"] == chunks >= 3  # each chunk fetched once
    assert len(chunk_files(cache)) < chunks  # ... though the cache evicted some
    assert stats["compiled_faults"] > 0
