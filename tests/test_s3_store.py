"""Stores in S3 (a real server: SeaweedFS, or FCSNAP_S3_ENDPOINT's): every command, the commit
protocol (build.json last, names by compare-and-swap), and failures as one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from s3_helpers import Bucket
from store_procs import fcsnap

from fcsnap.testing.memimage import evolve, synthetic_memory, write_full, write_sparse_diff

MIB = 1 << 20


def run(bucket: Bucket, *args: object, ok: bool = True) -> subprocess.CompletedProcess:
    result = fcsnap(*args, env=bucket.env)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_every_command_on_an_s3_store(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.url()
    mem0 = synthetic_memory(16 * MIB, seed=1)
    mem1, dirty = evolve(mem0, seed=2)
    write_full(tmp_path / "m0", mem0)
    write_sparse_diff(tmp_path / "m1.sparse", mem1, dirty)
    write_full(tmp_path / "m1", mem1)
    (tmp_path / "vm.state").write_bytes(b"vmstate bytes")

    packed = json.loads(run(
        bucket, "pack", tmp_path / "m0", "--store", store, "--name", "web", "--json",
        "--vmstate", tmp_path / "vm.state",
    ).stdout)
    g0 = packed["build_id"]
    assert packed["path"] == f"{store}/{g0}"
    keys = bucket.listing()
    assert f"{g0}/build.json" in keys and f"{g0}/memfile.diff" in keys
    assert f"{g0}/snapfile" in keys and "vms/web" in keys
    diffed = json.loads(run(
        bucket, "diff", tmp_path / "m1.sparse", "--base", "web", "--store", store,
        "--sparse-diff", "--compress", "zstd", "--name", "web", "--json",
    ).stdout)
    assert diffed["generation"] == 1 and diffed["parent_build_id"] == g0
    assert diffed["pins"] and list(diffed["pins"]) == [g0]

    report = json.loads(run(bucket, "inspect", "web", "--store", store, "--json").stdout)
    assert report["metadata"]["build_id"] == diffed["build_id"]
    assert {b["build_id"] for b in report["builds"]} >= {g0}
    verified = json.loads(run(bucket, "verify", "web", "--store", store, "--json").stdout)
    assert verified["ok"] and verified["pinned"] and verified["builds_checked"] == 2

    run(bucket, "unpack", "web", "--store", store, "-o", tmp_path / "out1")
    assert (tmp_path / "out1").read_bytes() == mem1.tobytes()
    run(bucket, "unpack", g0, "--store", store, "-o", tmp_path / "out0")
    assert (tmp_path / "out0").read_bytes() == mem0.tobytes()

    squashed = json.loads(run(
        bucket, "squash", "web", "--store", store, "--name", "flat", "--json"
    ).stdout)
    assert squashed["generation"] == 0 and squashed["compression"] == "zstd"
    run(bucket, "unpack", "flat", "--store", store, "-o", tmp_path / "flat")
    assert (tmp_path / "flat").read_bytes() == mem1.tobytes()

    # a Full-file diff over an S3 base reads no parent diff data
    full = json.loads(run(
        bucket, "diff", tmp_path / "m1", "--base", g0, "--store", store, "--json"
    ).stdout)
    assert full["stats"]["bytes_stored"] == diffed["stats"]["bytes_stored"]

    listing = json.loads(run(bucket, "ls", "--store", store, "--json").stdout)
    assert [n["name"] for n in listing["names"]] == ["flat", "web"]
    assert listing["summary"]["builds"] == 4
    on_bucket = sum(o["size"] for o in _objects(bucket) if not o["path"].endswith("/vms/web")
                    and "/vms/" not in o["path"])
    assert listing["summary"]["disk_bytes"] == on_bucket
    builds = json.loads(run(bucket, "ls", "--store", store, "--builds", "--json").stdout)
    unreferenced = [b["build_id"] for b in builds["builds"] if b["unreferenced"]]
    assert unreferenced == [full["build_id"]]
    lineage = json.loads(run(bucket, "ls", "web", "--store", store, "--json").stdout)
    assert [g["build_id"] for g in lineage["generations"]] == [diffed["build_id"], g0]

    run(bucket, "rm", "flat", "--store", store)
    assert "vms/flat" not in bucket.listing() and "vms/web" in bucket.listing()
    gone = run(bucket, "rm", "flat", "web", "--store", store, ok=False)
    assert "no VM named 'flat'" in one_line_error(gone)
    assert "vms/web" in bucket.listing()


def _objects(bucket: Bucket) -> list[dict]:
    import obstore

    return [o for batch in obstore.list(bucket.client(), prefix="snaps/") for o in batch]
