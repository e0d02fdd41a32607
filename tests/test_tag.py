"""fcsnap tag BUILD NAME (and Store.tag): a name pointed at an existing build by the same
compare-and-swap as `diff --name`, in local and S3 stores."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from s3_helpers import Bucket
from store_procs import make_lineage, resume, start_stopped
from test_s3_store import one_line_error, run

import fcsnap as api
from fcsnap.testing.memimage import synthetic_memory, write_full


def _pointer(store: Path, name: str) -> str:
    return (store / "vms" / name).read_text().strip()


def test_tag_creates_and_moves_a_name(tmp_path: Path) -> None:
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    made = fcsnap("tag", g0[:6], "known-good", "--store", store)
    assert made.returncode == 0, made.stderr
    assert _pointer(store, "known-good") == g0 and _pointer(store, "web") == g1
    moved = fcsnap("tag", "known-good", "web", "--store", store, "--json")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout) | {"schema": 1} == {
        "schema": 1, "name": "web", "build_id": g0, "previous": g1}
    assert _pointer(store, "web") == g0
    unpacked = fcsnap("unpack", "web", "--store", store, "-o", tmp_path / "out")
    assert unpacked.returncode == 0 and (tmp_path / "out").read_bytes() == (
        tmp_path / "m0").read_bytes()


def test_tag_is_a_compare_and_swap(tmp_path: Path) -> None:
    """A tag that read the name, then found it moved (or removed) by another command before
    its own move, changes nothing and says where the name went."""
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    r = fcsnap("diff", tmp_path / "m2", "--base", "web", "--store", store, "--json")
    g2 = json.loads(r.stdout)["build_id"]
    assert fcsnap("tag", g0, "pin", "--store", store).returncode == 0
    loser = start_stopped("tag", g1, "pin", "--store", store, point="publish")
    assert fcsnap("tag", g2, "pin", "--store", store).returncode == 0
    refused = resume(loser)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"fcsnap: error: pin moved to {g2} while this tag ran"
    assert _pointer(store, "pin") == g2

    loser = start_stopped("tag", g0, "web", "--store", store, point="publish")
    assert fcsnap("rm", "web", "--store", store).returncode == 0
    refused = resume(loser)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "fcsnap: error: web was removed while this tag ran"
    assert not (store / "vms" / "web").exists()


def test_tag_refuses_bad_input_changing_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    for argv, says in (((g0, ".hidden"), "invalid VM name '.hidden'"),
                       (("nope", "other"), "no build or VM named 'nope'"),
                       ((g0[:3], "other"), f"no build or VM named {g0[:3]!r}")):
        r = fcsnap("tag", *argv, "--store", store)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and says in r.stderr, \
            r.stderr
    assert sorted(p.name for p in (store / "vms").iterdir() if p.name[0] != ".") == ["web"]
    assert _pointer(store, "web") == g1


def test_store_tag_in_the_python_api(tmp_path: Path) -> None:
    store = tmp_path / "store"
    g0, _ = make_lineage(tmp_path, store)
    build = api.Store(store).tag(g0, "api")
    assert str(build.build_id) == g0 and _pointer(store, "api") == g0


def test_tag_in_an_s3_store(bucket: Bucket, tmp_path: Path) -> None:
    s3 = bucket.url()
    write_full(tmp_path / "m0", synthetic_memory(1 << 20, seed=31))
    g0 = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", s3, "--name", "web",
                        "--json").stdout)["build_id"]
    run(bucket, "tag", g0[:6], "copy", "--store", s3)
    shown = run(bucket, "inspect", "copy", "--store", s3, "--json")
    assert json.loads(shown.stdout)["metadata"]["build_id"] == g0
    line = one_line_error(run(bucket, "tag", "nope", "copy", "--store", s3, ok=False))
    assert "no build or VM named 'nope'" in line
