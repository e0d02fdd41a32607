"""gc of an S3 store: --grace is its only protection (no locks across hosts)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import obstore
from s3_helpers import Bucket
from test_s3_store import finish, one_line_error, run, start_stopped

from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

MIB = 1 << 20


def test_gc_deletes_what_no_head_reads_once_older_than_grace(
    bucket: Bucket, tmp_path: Path
) -> None:
    store = bucket.url()
    mem0 = synthetic_memory(8 * MIB, seed=31)
    write_full(tmp_path / "m0", mem0)
    write_full(tmp_path / "m1", evolve(mem0, seed=32, dirty_share=1.0)[0])  # rewrites it all
    g0 = json.loads(run(bucket, "pack", tmp_path / "m0", "--store", store, "--name", "web",
                        "--json").stdout)["build_id"]
    g1 = json.loads(run(bucket, "diff", tmp_path / "m1", "--base", "web", "--store", store,
                        "--name", "web", "--json").stdout)["build_id"]
    keep = json.loads(run(bucket, "pack", tmp_path / "m0", "--store", store, "--name", "keep",
                          "--json").stdout)["build_id"]
    run(bucket, "rm", "keep", "--store", store)
    # a killed pack's objects (no build.json)
    killed = start_stopped(bucket, "pack", tmp_path / "m0", "--store", store, point="commit")
    killed.kill()
    killed.communicate(timeout=60)
    leftover = {k.split("/")[0] for k in bucket.listing()} - {g0, g1, keep, "vms"}
    assert len(leftover) == 1

    young = json.loads(run(bucket, "gc", "--store", store, "--json").stdout)  # grace 1h
    assert young["deleted"] == [] and young["leftovers"] == []
    assert {k["build_id"] for k in young["kept"]} == {keep} | ({g0} if g0 not in
                                                              _reads(bucket, "web") else set())
    time.sleep(1.1)
    dry = json.loads(run(bucket, "gc", "--store", store, "--grace", "1s", "--dry-run",
                         "--json").stdout)
    doomed = {keep} | ({g0} - _reads(bucket, "web"))
    assert {r["build_id"] for r in dry["would_delete"]} == doomed
    assert len(dry["leftovers"]) == 1 and bucket.listing() and keep in _builds(bucket)
    done = json.loads(run(bucket, "gc", "--store", store, "--grace", "1s", "--json").stdout)
    assert {r["build_id"] for r in done["deleted"]} == doomed
    assert _builds(bucket) == {g1} | _reads(bucket, "web")
    run(bucket, "verify", "web", "--store", store)
    line = one_line_error(run(bucket, "gc", "--store", store, "--repack-below", "0.5", ok=False))
    assert "not supported on an S3 store" in line


def test_gc_keeps_what_a_name_moved_onto_during_gc(bucket: Bucket, tmp_path: Path) -> None:
    """A name published while gc runs (between its scan and its deletions) keeps its build."""
    store = bucket.url()
    write_full(tmp_path / "m0", synthetic_memory(4 * MIB, seed=33))
    old = json.loads(run(bucket, "pack", tmp_path / "m0", "--store", store,
                         "--json").stdout)["build_id"]
    time.sleep(1.1)
    gc = start_stopped(bucket, "gc", "--store", store, "--grace", "1s", "--json",
                       point="gc-recheck")
    obstore.put(bucket.client(), "snaps/vms/late", f"{old}\n".encode(), mode="create")
    status, err = finish(gc)
    assert status == 0, err
    assert old in _builds(bucket)
    run(bucket, "verify", "late", "--store", store)


def _builds(bucket: Bucket) -> set[str]:
    return {k.split("/")[0] for k in bucket.listing() if k.endswith("/build.json")}


def _reads(bucket: Bucket, name: str) -> set[str]:
    report = json.loads(run(bucket, "inspect", name, "--store", bucket.url(), "--json").stdout)
    return {b["build_id"] for b in report["builds"]}
