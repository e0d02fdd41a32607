"""push / pull between local and S3 stores: lineages copied, present builds skipped, and what
arrives checked (pins, block hashes) before it is visible."""

from __future__ import annotations

import json
from pathlib import Path

import obstore
from s3_helpers import Bucket
from test_s3_store import one_line_error, run

from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

MIB = 1 << 20


def _lineage(tmp: Path, bucket: Bucket, store: Path) -> tuple[list[str], list[bytes]]:
    mem0 = synthetic_memory(8 * MIB, seed=21)
    mem1, _ = evolve(mem0, seed=22)
    write_full(tmp / "m0", mem0)
    write_full(tmp / "m1", mem1)
    g0 = json.loads(run(bucket, "pack", "--init", tmp / "m0", "--store", store, "--name", "web",
                        "--json").stdout)["build_id"]
    g1 = json.loads(run(bucket, "diff", tmp / "m1", "--base", "web", "--store", store,
                        "--name", "web", "--compress", "zstd", "--json").stdout)["build_id"]
    return [g0, g1], [mem0.tobytes(), mem1.tobytes()]


def _push(bucket: Bucket, verb: str, arg: str, source: object, dest: object) -> dict:
    return json.loads(run(bucket, verb, arg, "--from", source, "--to", dest, "--init",
                          "--json").stdout)


def test_push_and_pull_between_local_and_s3(bucket: Bucket, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (g0, g1), (_, mem1) = _lineage(tmp_path, bucket, local)
    s3 = bucket.url()
    pushed = _push(bucket, "push", "web", local, s3)
    assert [b["build_id"] for b in pushed["builds"]] == [g0, g1]
    assert all(b["copied"] for b in pushed["builds"]) and pushed["bytes_copied"] > 0
    assert run(bucket, "inspect", "web", "--store", s3, "--json").stdout.count(g1) >= 1
    again = _push(bucket, "push", "web", local, s3)
    assert not any(b["copied"] for b in again["builds"]) and again["bytes_copied"] == 0

    other = bucket.url("mirror")  # S3 to S3
    assert all(b["copied"] for b in _push(bucket, "push", "web", s3, other)["builds"])
    back = tmp_path / "back"  # S3 to local
    pulled = _push(bucket, "pull", "web", other, back)
    assert [b["build_id"] for b in pulled["builds"]] == [g0, g1]
    run(bucket, "verify", "web", "--store", back)
    run(bucket, "unpack", "web", "--store", back, "-o", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == mem1
    run(bucket, "unpack", "web", "--store", other, "-o", tmp_path / "out-s3")
    assert (tmp_path / "out-s3").read_bytes() == mem1

    # a new generation: only it travels
    write_full(tmp_path / "m2", synthetic_memory(8 * MIB, seed=23))
    g2 = json.loads(run(bucket, "diff", tmp_path / "m2", "--base", "web", "--store", local,
                        "--name", "web", "--json").stdout)["build_id"]
    third = _push(bucket, "push", "web", local, s3)
    assert [b["build_id"] for b in third["builds"] if b["copied"]] == [g2]
    # a build id travels without a name
    by_id = _push(bucket, "push", g0, local, bucket.url("ids"))
    assert by_id["name"] is None and [b["build_id"] for b in by_id["builds"]] == [g0]


def test_a_corrupt_block_never_arrives(bucket: Bucket, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (g0, _), _ = _lineage(tmp_path, bucket, local)
    diff = local / g0 / "memfile.diff"
    data = bytearray(diff.read_bytes())
    data[5000] ^= 0xFF
    diff.write_bytes(bytes(data))
    line = one_line_error(run(bucket, "push", "web", "--from", local, "--to", bucket.url(),
                              "--init", ok=False))
    assert f"build {g0}: block 1" in line and "does not match its hash" in line
    assert bucket.listing() == []  # nothing arrived: no build, no name
    line = one_line_error(run(bucket, "pull", "web", "--from", local, "--to", tmp_path / "b",
                              "--init", ok=False))
    assert "does not match its hash" in line
    assert not [p for p in (tmp_path / "b").iterdir() if not p.name.startswith(".")]


def test_a_different_build_under_the_same_id_is_refused(bucket: Bucket, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (g0, g1), _ = _lineage(tmp_path, bucket, local)
    s3 = bucket.url()
    _push(bucket, "push", g0, local, s3)
    write_full(tmp_path / "x", synthetic_memory(8 * MIB, seed=99))
    stranger = json.loads(run(bucket, "pack", "--init", tmp_path / "x", "--store", local,
                              "--json").stdout)["build_id"]
    sidecar = (local / stranger / "memfile.hashes").read_bytes()
    obstore.put(bucket.client(), f"snaps/{g0}/memfile.hashes", sidecar)  # another build's
    line = one_line_error(run(bucket, "push", "web", "--from", local, "--to", s3, ok=False))
    assert f"build {g0} in {s3} is not the build the source holds" in line
    assert not [k for k in bucket.listing() if k.startswith((g1, "vms/"))]
