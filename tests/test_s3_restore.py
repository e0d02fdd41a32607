"""restore from a store in S3 through the host chunk cache: every byte checked by the
stand-in VM, a cold and a warm cache, corrupt objects never installed, a dead server kills
the VM within --fetch-timeout."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import obstore
import pytest
from helpers import PAGE, WAIT, Lineage, Procs, check_served, wait_for, wait_serving
from helpers import fcsnap_here as fcsnap  # in this process: the builds a restore serves
from s3_helpers import Bucket, new_bucket, restore_from
from test_chunk_cache import DAMAGE, damage
from test_restore import HUGE, KILLED, SIZE, make_lineage

from fcsnap.store.backends.cached_zstd import TAIL_GUESS
from fcsnap.store.backends.chunk_cache import CHUNK
from fcsnap.testing import firecracker
from fcsnap.testing.s3server import seaweedfs
from fcsnap.workingset import write_working_set


@pytest.fixture(scope="module")
def raw_lineage(tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    return make_lineage(tmp_path_factory.mktemp("s3lineage") / "raw", "none", PAGE, seed=41)


def push(bucket: Bucket, lineage: Lineage, prefix: str = "snaps") -> str:
    """The lineage's newest build pushed to the bucket; its id."""
    result = fcsnap("push", lineage.newest.name, "--from", lineage.store, "--to",
                    bucket.url(prefix), "--init", "-q", env=bucket.env)
    assert result.returncode == 0, result.stderr
    return lineage.newest.name


def serve(procs: Procs, bucket: Bucket, build: str, cache: Path, *args: str,
          socket: Path | None = None, stats: Path | None = None) -> subprocess.Popen[bytes]:
    return procs.track(restore_from(bucket, build, socket or procs.socket, cache, *args,
                                    stats=stats or procs.stats))


def stored_bytes(lineage: Lineage) -> int:
    return sum((b / "memfile.diff").stat().st_size for b in lineage.builds)


def test_cold_then_warm_cache(bucket: Bucket, raw_lineage: Lineage, procs: Procs,
                              tmp_path: Path) -> None:
    build = push(bucket, raw_lineage)
    cache = tmp_path / "cache"
    server = serve(procs, bucket, build, cache, "--fault-around", "0")
    out = procs.outcome(server, procs.vm(expected=raw_lineage.expected))
    check_served(out, raw_lineage)
    cold = out.stats
    assert cold["fetch_requests"] > 0 and cold["cache_misses"] == cold["fetch_requests"]
    assert 0 < cold["fetched_bytes"] <= stored_bytes(raw_lineage)
    assert sorted(p.name for p in cache.iterdir())  # chunks kept for the next VM

    procs.stats.unlink()
    server = serve(procs, bucket, build, cache)
    out = procs.outcome(server, procs.vm(expected=raw_lineage.expected))
    check_served(out, raw_lineage)
    warm = out.stats
    assert warm["fetched_bytes"] == 0 and warm["fetch_requests"] == 0
    assert warm["cache_hits"] > 0 and warm["cache_misses"] == 0


def test_two_restores_share_one_cache(bucket: Bucket, raw_lineage: Lineage, procs: Procs,
                                      tmp_path: Path) -> None:
    build = push(bucket, raw_lineage)
    cache = tmp_path / "cache"
    sockets = [tmp_path / "a.sock", tmp_path / "b.sock"]
    servers = [
        serve(procs, bucket, build, cache, socket=s, stats=tmp_path / f"stats{i}.json")
        for i, s in enumerate(sockets)
    ]
    vms = [
        procs.track(firecracker.spawn(
            s, expected=raw_lineage.expected, deadline=WAIT, report=tmp_path / f"vm{i}.json",
            popen={"stdout": subprocess.PIPE, "stderr": subprocess.PIPE},
        ))
        for i, s in enumerate(sockets)
    ]
    for vm, server in zip(vms, servers, strict=True):
        vm.communicate(timeout=WAIT + 10)
        _, err = server.communicate(timeout=WAIT)
        assert vm.returncode == 0 and server.returncode == 0, err
    for i in range(2):
        assert firecracker.read_report(tmp_path / f"vm{i}.json")["mismatches"] == 0
    stats = [json.loads((tmp_path / f"stats{i}.json").read_text()) for i in range(2)]
    chunks = [p for d in cache.iterdir() for p in d.iterdir() if not p.name.startswith(".")]
    assert sum(s["fetch_requests"] for s in stats) == len(chunks)  # each chunk fetched once
    assert sum(s["cache_hits"] for s in stats) > 0


def test_the_cache_stays_within_its_size(bucket: Bucket, raw_lineage: Lineage, procs: Procs,
                                         tmp_path: Path) -> None:
    build = push(bucket, raw_lineage)
    cache = tmp_path / "cache"
    server = serve(procs, bucket, build, cache, "--cache-size", "4M")
    out = procs.outcome(server, procs.vm(expected=raw_lineage.expected))
    check_served(out, raw_lineage)
    assert out.stats["fetch_requests"] > 1
    held = sum(p.stat().st_size for d in cache.iterdir() for p in d.iterdir())
    assert held <= 4 << 20


def test_a_corrupt_object_is_never_installed(bucket: Bucket, raw_lineage: Lineage,
                                             procs: Procs, tmp_path: Path) -> None:
    build = push(bucket, raw_lineage)
    key = f"snaps/{build}/memfile.diff"
    data = bytearray(obstore.get(bucket.client(), key).bytes())
    data[PAGE * 3 + 17] ^= 0x55
    obstore.put(bucket.client(), key, bytes(data))
    cache = tmp_path / "cache"
    server = serve(procs, bucket, build, cache, "--fault-around", "0")
    out = procs.outcome(server, procs.vm(expected=raw_lineage.expected))
    assert out.status == 1 and out.vm_status == KILLED, out
    assert "block 3 fetched from the store does not match its hash; not installed" in out.error
    cached = [p.name for d in cache.iterdir() if d.name.startswith(build) for p in d.iterdir()]
    assert "00000000" not in cached  # the chunk holding block 3 was never cached


def test_a_damaged_host_cache_is_fetched_again(bucket: Bucket, raw_lineage: Lineage,
                                               procs: Procs, tmp_path: Path) -> None:
    """A cached chunk cut short, one emptied and one with a byte changed: a restore on that
    host checks each before use, fetches those three again and serves every byte right (a
    short chunk was mapped as it was and the compiled copy read past its end)."""
    build = push(bucket, raw_lineage)
    cache = tmp_path / "cache"
    server = serve(procs, bucket, build, cache)
    check_served(procs.outcome(server, procs.vm(expected=raw_lineage.expected)), raw_lineage)
    chunks = sorted(p for p in cache.glob("*/0*"))
    assert len(chunks) >= 3, chunks
    for path, how in zip(chunks, DAMAGE, strict=False):
        damage(path, how)

    procs.stats.unlink()
    server = serve(procs, bucket, build, cache)
    out = procs.outcome(server, procs.vm(expected=raw_lineage.expected))
    warnings = [line for line in out.stderr if "chunk cache file" in line]
    out.stderr[:] = [line for line in out.stderr if line not in warnings]
    check_served(out, raw_lineage)
    assert len(warnings) == 3 and all("removed, fetched again" in w for w in warnings), warnings
    assert out.stats["cache_discarded"] == 3 and out.stats["fetch_requests"] == 3, out.stats
    assert all(p.stat().st_size for p in chunks)


def test_a_dead_server_kills_the_vm_within_the_fetch_timeout(
    raw_lineage: Lineage, procs: Procs, tmp_path: Path
) -> None:
    with seaweedfs(tmp_path / "weed") as server:
        own = new_bucket(server)
        build = push(own, raw_lineage)
        # --lazy-fetch: nothing is fetched in the background before the server goes
        restore = procs.track(restore_from(own, build, procs.socket, tmp_path / "cache",
                                           "--fetch-timeout", "1", "--lazy-fetch",
                                           stats=procs.stats, quiet=False))
        wait_serving(restore)  # its build open: the first chunks fetched
    started = time.monotonic()  # the S3 server is gone; the VM faults now
    out = procs.outcome(restore, procs.vm(expected=raw_lineage.expected))
    assert time.monotonic() - started < 1 + 20
    assert out.status == 1 and out.vm_status == KILLED, out
    assert "within 1s" in out.error and "cannot fetch" in out.error


@pytest.mark.parametrize("page", ["4K", "2M"], ids=["4k-blocks", "2m-blocks-256k-frames"])
def test_a_zstd_lineage_is_served_from_s3(request: pytest.FixtureRequest, bucket: Bucket,
                                          procs: Procs, tmp_path: Path, page: str) -> None:
    """zstd frames are fetched as they are read (all of them here: every page is touched),
    and the seek tables (at most TAIL_GUESS bytes of each object's end). With 2 MiB blocks
    (2 MiB pages) in the default 256 KiB frames, a block's frames are fetched together."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    page_size = firecracker.PAGE_SIZES[page]
    lineage = make_lineage(tmp_path / "zstd", "zstd", page_size, seed=43)
    build = push(bucket, lineage)
    server = serve(procs, bucket, build, tmp_path / "cache")
    out = procs.outcome(server, procs.vm(expected=lineage.expected, page_size=page))
    check_served(out, lineage, page_size)
    stats = out.stats
    stored = sum((b / "memfile.diff.zst").stat().st_size for b in lineage.builds)
    tables = len(lineage.builds) * TAIL_GUESS
    assert stats["cache_misses"] == stats["fetch_requests"] > len(lineage.builds)
    if page == "4K":
        assert stored <= stats["fetched_bytes"] <= stored + tables
    else:  # gen2's block and gen0's second: each build's seek table, then one GET for the
        # block's 8 frames; what gen2 wrote over (gen0's first block, gen1) is never fetched
        assert stats["fetch_requests"] == 2 * (SIZE // HUGE)
        assert 0 < stats["fetched_bytes"] < stored


def test_the_chunks_a_lineage_reads_are_fetched_behind_the_guest(
    bucket: Bucket, procs: Procs, tmp_path: Path
) -> None:
    """The background fetch covers ancestors too: of gen0's diff, the chunks the head still
    reads, and no other."""
    rng = np.random.default_rng(44)
    gen0 = rng.integers(0, 256, 6 * CHUNK, np.uint8)
    gen1 = gen0.copy()
    gen1[:2 * CHUNK] = rng.integers(0, 256, 2 * CHUNK, np.uint8)  # gen0's chunks 0-1: unread
    ids = []
    for name, mem, command in (("gen0", gen0, ("pack", "--init")),
                               ("gen1", gen1, ("diff", "--base", "vm"))):
        (tmp_path / name).write_bytes(mem.tobytes())
        made = fcsnap(command[0], tmp_path / name, *command[1:], "--store", bucket.url(),
                      "--name", "vm", "--json", env=bucket.env)
        assert made.returncode == 0, made.stderr
        ids.append(json.loads(made.stdout)["build_id"])
    cache = tmp_path / "cache"

    def cached() -> dict[str, list[str]]:
        return {build: sorted(p.name for d in cache.glob(f"{build}-*") for p in d.iterdir()
                              if not p.name.startswith(".")) for build in ids}

    server = serve(procs, bucket, "vm", cache)
    vm = procs.vm(size=6 * CHUNK, touch=1 / 6144, verify_bytes=False, hold=WAIT)
    want = {ids[0]: [f"{i:08d}" for i in (2, 3, 4, 5)], ids[1]: ["00000000", "00000001"]}
    wait_for(lambda: cached() == want, f"the cache to hold {want}")
    vm.kill()
    server.wait(timeout=WAIT)


def test_a_working_set_is_fetched_first_and_the_rest_after_it(
    bucket: Bucket, procs: Procs, tmp_path: Path
) -> None:
    """--prefetch-ws from S3: the working set's chunks are fetched at listen, the VM gets its
    working set and every byte right; with --lazy-fetch nothing else is fetched before the VM
    comes, by default the rest of the diff follows in the background."""
    chunks, size = 12, 12 * CHUNK
    mem = tmp_path / "vm.mem"
    mem.write_bytes(np.random.default_rng(45).integers(0, 256, size, np.uint8).tobytes())
    made = fcsnap("pack", "--init", mem, "--store", bucket.url(), "--name", "vm", "--json",
                  env=bucket.env)
    assert made.returncode == 0, made.stderr
    build = json.loads(made.stdout)["build_id"]
    ws = tmp_path / "ws"  # every 7th page of chunks 8 and 9 (random pages: stored in order)
    write_working_set(ws, size, range(8 * CHUNK, 10 * CHUNK, 7 * PAGE))
    cache = tmp_path / "cache"

    def cached() -> set[int]:
        return {int(p.name) for d in cache.glob(f"{build}-*") for p in d.iterdir()
                if not p.name.startswith(".")}

    server = serve(procs, bucket, "vm", cache, "--prefetch-ws", str(ws), "--lazy-fetch")
    wait_for(lambda: {8, 9} <= cached(), "the working set's chunks")
    time.sleep(0.5)  # lazily, nothing else lands before the VM comes but what listening fetches
    assert cached() <= {0, 1, 2, 3, 8, 9}, cached()
    vm = procs.vm(expected=mem, touch=0.02)
    out = procs.outcome(server, vm)
    assert out.status == 0 and out.report["mismatches"] == 0, out
    assert out.stats["prefetched_pages"] == len(range(8 * CHUNK, 10 * CHUNK, 7 * PAGE)), out

    shutil.rmtree(cache)
    server = serve(procs, bucket, "vm", cache, "--prefetch-ws", str(ws))
    vm = procs.vm(expected=mem, touch=0.02, hold=WAIT)  # reads a few pages, then lives on
    wait_for(lambda: cached() == set(range(chunks)), "the rest of the diff")
    vm.kill()
    out = procs.outcome(server, vm)
    assert out.report is not None and out.report["mismatches"] == 0, out
    assert out.stats["prefetched_pages"] == len(range(8 * CHUNK, 10 * CHUNK, 7 * PAGE)), out
