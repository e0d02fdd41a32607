"""ls, rm and gc of an S3 store: the local store's lineage (test_lifecycle.make_store) copied
into the bucket, and the same checks. gc's only protection there is --grace (no locks across
hosts)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import obstore
import pytest
from s3_helpers import Bucket
from test_lifecycle import Store, fcsnap_json, make_store, next_image
from test_s3_store import finish, run, start_stopped

from fcsnap.store.backends.leases import EXPIRY_ENV, MARGIN
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

MIB = 1 << 20


def test_gc_deletes_what_no_head_reads_once_older_than_grace(
    bucket: Bucket, tmp_path: Path
) -> None:
    store = bucket.url()
    mem0 = synthetic_memory(8 * MIB, seed=31)
    write_full(tmp_path / "m0", mem0)
    write_full(tmp_path / "m1", evolve(mem0, seed=32, dirty_share=1.0)[0])  # rewrites it all
    g0 = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name",
                        "web",
                        "--json").stdout)["build_id"]
    g1 = json.loads(run(bucket, "diff", tmp_path / "m1", "--base", "web", "--store", store,
                        "--name", "web", "--json").stdout)["build_id"]
    keep = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name",
                          "keep",
                          "--json").stdout)["build_id"]
    run(bucket, "rm", "keep", "--store", store)
    # a killed pack's objects (no build.json)
    killed = start_stopped(bucket, "pack", "--init", tmp_path / "m0", "--store", store,
                           point="commit")
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


def test_gc_keeps_what_a_name_moved_onto_during_gc(bucket: Bucket, tmp_path: Path) -> None:
    """A name published while gc runs (between its scan and its deletions) keeps its build."""
    store = bucket.url()
    write_full(tmp_path / "m0", synthetic_memory(4 * MIB, seed=33))
    old = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", store,
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


@pytest.fixture
def copied(bucket: Bucket, tmp_path: Path) -> Store:
    """test_lifecycle's store (shared G0, G1 read by no head, deduplicated blocks in G2 and
    A1), pushed into the bucket with the same build ids; G1 by its id."""
    local = make_store(tmp_path)
    for arg in ("base", "web", "api", local.id("G1")):
        run(bucket, "push", arg, "--from", local.path, "--to", bucket.url(), "--init")
    return local


def _objects(bucket: Bucket) -> dict[str, tuple[int, object, str]]:
    """Every object with its size, modification time and ETag: what "changes nothing" means."""
    return {
        o["path"]: (o["size"], o["last_modified"], o["e_tag"])
        for batch in obstore.list(bucket.client(), prefix="snaps/") for o in batch
    }


def _names_verify_and_unpack(bucket: Bucket, images: dict, tmp_path: Path) -> None:
    for name, mem in images.items():
        run(bucket, "verify", name, "--store", bucket.url(), "--quiet")
        out = tmp_path / f"{name}.out"
        run(bucket, "unpack", name, "--store", bucket.url(), "-o", out, "--quiet", "--force")
        assert out.read_bytes() == mem.tobytes(), name


def _gc(bucket: Bucket, *args: str) -> dict:
    return json.loads(run(bucket, "gc", "--store", bucket.url(), "--json", *args).stdout)


def test_ls_of_the_copy_reports_what_the_local_store_does(bucket: Bucket, copied: Store) -> None:
    for args in ((), ("--builds",), ("web",), ("api",)):
        remote = json.loads(run(bucket, "ls", *args, "--store", bucket.url(), "--json").stdout)
        assert remote == fcsnap_json("ls", *args, "--store", copied.path), args
    builds = {b["build_id"]: b for b in fcsnap_json("ls", "--builds", "--store", copied.path)[
        "builds"]}
    assert [b for b, row in builds.items() if row["unreferenced"]] == [copied.id("G1")]


def test_dry_run_rm_and_gc_on_s3(bucket: Bucket, copied: Store, tmp_path: Path) -> None:
    """A dry run changes no object (size, time, ETag); rm + gc --grace 0 deletes exactly what
    no head reads (shared G0 stays while web reads it); the rest verify and unpack exact."""
    before = _objects(bucket)
    dry = _gc(bucket, "--dry-run", "--grace", "0")
    assert [r["build_id"] for r in dry["would_delete"]] == [copied.id("G1")]
    assert _objects(bucket) == before
    run(bucket, "rm", "base", "--store", bucket.url())
    del copied.images["base"]
    done = _gc(bucket, "--grace", "0")
    assert [r["build_id"] for r in done["deleted"]] == [copied.id("G1")]
    assert done["bytes_freed"] == dry["bytes_to_free"] > 0
    assert done["after"]["disk_bytes"] == done["before"]["disk_bytes"] - done["bytes_freed"]
    assert not any(k.startswith(copied.id("G1")) for k in bucket.listing())
    _names_verify_and_unpack(bucket, copied.images, tmp_path)
    run(bucket, "rm", "web", "api", "--store", bucket.url())
    done = _gc(bucket, "--grace", "0")
    assert {r["build_id"] for r in done["deleted"]} == {
        copied.id(b) for b in ("G0", "G2", "A0", "A1")}
    assert bucket.listing() == [] and done["after"]["disk_bytes"] == 0


def test_killed_gc_on_s3_leaves_a_store_that_verifies(
    bucket: Bucket, copied: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc killed right after deleting a build's build.json: that build is invisible, every
    name verifies and unpacks; the next gc removes its objects as leftovers, and the killed
    gc's lease once it expired (1s here)."""
    monkeypatch.setenv(EXPIRY_ENV, "1s")
    run(bucket, "rm", "api", "--store", bucket.url())
    del copied.images["api"]
    gc = start_stopped(bucket, "gc", "--store", bucket.url(), "--grace", "0", point="gc-delete")
    gc.kill()
    gc.communicate(timeout=60)
    killed = time.monotonic()
    (lease,) = [k for k in bucket.listing() if k.startswith("leases/")]
    half = {k.split("/")[0] for k in bucket.listing()} - _builds(bucket) - {"vms", "leases"}
    assert len(half) == 1
    listed = json.loads(run(bucket, "ls", "--builds", "--store", bucket.url(), "--json").stdout)
    assert half.isdisjoint(b["build_id"] for b in listed["builds"])
    _names_verify_and_unpack(bucket, copied.images, tmp_path)
    time.sleep(max(0.0, killed + 1 + MARGIN + 0.5 - time.monotonic()))
    done = _gc(bucket, "--grace", "0")
    assert done["leftovers"] == [f"{bucket.url()}/{b}/" for b in half]
    assert [(s["lease"], s["kind"]) for s in done["stale_leases"]] == [
        (f"{bucket.url()}/{lease}", "gc")]
    assert _builds(bucket) == {copied.id("G0"), copied.id("G2")}
    assert {k.split("/")[0] for k in bucket.listing()} == _builds(bucket) | {"vms"}
    _names_verify_and_unpack(bucket, copied.images, tmp_path)


def test_gc_within_grace_beside_a_pack_and_a_diff(
    bucket: Bucket, copied: Store, tmp_path: Path
) -> None:
    """On S3 the grace period is what protects a running command: a pack stopped before its
    build.json (objects up, uncommitted) and a diff over G1 (read by no head) stopped before
    naming its committed build; gc with the default grace deletes nothing of theirs, and
    both finish to builds that verify and unpack exact."""
    path, image = next_image(copied, tmp_path)
    pack = start_stopped(bucket, "pack", "--init", path, "--store", bucket.url(), "--name",
                         "packed",
                         "--quiet", point="commit")
    diff = start_stopped(bucket, "diff", path, "--base", copied.id("G1"), "--store",
                         bucket.url(), "--name", "diffed", "--quiet", point="publish")
    try:
        report = _gc(bucket)
        assert report["deleted"] == [] and report["leftovers"] == []
        assert copied.id("G1") in {r["build_id"] for r in report["kept"]}
        for proc in (pack, diff):
            status, err = finish(proc)
            assert status == 0, err
    finally:
        for proc in (pack, diff):
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
    _names_verify_and_unpack(bucket, {"packed": image, "diffed": image}, tmp_path)


def test_repack_on_s3_squashes_a_partly_dead_lineage(
    bucket: Bucket, copied: Store, tmp_path: Path
) -> None:
    """As on a local store (test_lifecycle.test_repack_squashes_a_partly_dead_lineage): with
    `base` removed, web's head reads part of G0; --repack-below squashes web into one flat
    build (a dry run changes no object), and G0, G1, G2 go."""
    run(bucket, "rm", "base", "--store", bucket.url())
    del copied.images["base"]
    before = _objects(bucket)
    dry = _gc(bucket, "--grace", "0", "--repack-below", "0.99", "--dry-run")
    assert _objects(bucket) == before
    assert [r["name"] for r in dry["repacked"]] == ["web"] and "new_head" not in dry["repacked"][0]
    report = _gc(bucket, "--grace", "0", "--repack-below", "0.99")
    (row,) = report["repacked"]
    assert row["name"] == "web" and row["head"] == copied.id("G2")
    assert row["live_fraction"] == dry["repacked"][0]["live_fraction"] < 0.99
    assert {r["build_id"] for r in report["deleted"]} == {copied.id(b) for b in ("G0", "G1", "G2")}
    new = json.loads(run(bucket, "ls", "web", "--store", bucket.url(), "--json").stdout)
    (gen,) = new["generations"]
    assert gen["build_id"] == row["new_head"] and gen["generation"] == 0
    assert gen["head_reads_fraction"] == 1.0
    assert row["new_head_disk_bytes"] == sum(
        size for key, (size, _, _) in _objects(bucket).items()
        if key.startswith(f"snaps/{row['new_head']}/")
    )
    assert report["after"]["disk_bytes"] == (
        report["before"]["disk_bytes"] - report["bytes_freed"] + row["new_head_disk_bytes"]
    )
    assert report["after"]["amplification"] < report["before"]["amplification"]
    assert _builds(bucket) == {row["new_head"], copied.id("A0"), copied.id("A1")}
    _names_verify_and_unpack(bucket, copied.images, tmp_path)


def test_repack_on_s3_loses_to_a_diff_that_moves_the_name(
    bucket: Bucket, copied: Store, tmp_path: Path
) -> None:
    """gc --repack-below stops just before moving `web`; a diff moves it meanwhile. The
    repack loses the compare-and-swap, removes its flat build and leaves the name alone."""
    run(bucket, "rm", "base", "--store", bucket.url())
    del copied.images["base"]
    gc = start_stopped(bucket, "gc", "--store", bucket.url(), "--grace", "0",
                       "--repack-below", "0.99", "--json", point="publish")
    try:
        path, image = next_image(copied, tmp_path)
        diff = json.loads(run(bucket, "diff", path, "--base", "web", "--name", "web",
                              "--store", bucket.url(), "--json").stdout)
        gc.send_signal(signal.SIGCONT)
        out, err = gc.communicate(timeout=120)
        assert gc.returncode == 0, err
    finally:
        if gc.poll() is None:
            gc.kill()
            gc.communicate(timeout=60)
    report = json.loads(out)
    (row,) = report["repacked"]
    assert row["skipped"] == f"web moved to {diff['build_id']} while this gc --repack-below ran"
    assert {r["build_id"] for r in report["deleted"]} == {copied.id("G1")}
    assert _builds(bucket) == {
        copied.id(b) for b in ("G0", "G2", "A0", "A1")} | {diff["build_id"]}
    copied.images["web"] = image
    _names_verify_and_unpack(bucket, copied.images, tmp_path)
