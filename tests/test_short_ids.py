"""Short build ids: an unambiguous prefix of 4 or more hex digits names a build wherever a
build is taken (local and S3 stores); an ambiguous one is refused naming the candidates;
tables show 8 digits, --json the whole id."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import obstore
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from helpers import one_build_store
from s3_helpers import Bucket
from test_s3_store import one_line_error, run

from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

KIB = 1 << 10


def _twin(build_id: str) -> str:
    """Another build id with the same first 8 hex digits."""
    last = "0" if build_id[-1] != "0" else "1"
    return build_id[:-1] + last


def _build_id(store: Path) -> str:
    return json.loads(fcsnap("inspect", "vm", "--store", store, "--json").stdout)[
        "metadata"]["build_id"]


def test_a_prefix_names_a_build_in_every_argument(tmp_path: Path) -> None:
    store = one_build_store(tmp_path, 256 * KIB, seed=3)
    full = _build_id(store)
    mem, _ = evolve(synthetic_memory(256 * KIB, seed=3), seed=4)
    write_full(tmp_path / "m1", mem)
    for prefix in (full[:4], full[:8].upper(), full[:13]):
        shown = fcsnap("inspect", prefix, "--store", store, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["metadata"]["build_id"] == full
    child = fcsnap("diff", tmp_path / "m1", "--base", full[:6], "--store", store, "--json")
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout)["parent_build_id"] == full
    assert fcsnap("verify", full[:5], "--store", store).returncode == 0

    three = fcsnap("inspect", full[:3], "--store", store)  # too short: a name, not a prefix
    assert three.returncode == 1 and f"no build or VM named {full[:3]!r}" in three.stderr


def test_an_ambiguous_prefix_is_refused_naming_the_candidates(tmp_path: Path) -> None:
    store = one_build_store(tmp_path, 256 * KIB, seed=5)
    full = _build_id(store)
    twin = _twin(full)
    shutil.copytree(store / full, store / twin)
    refused = fcsnap("inspect", full[:8], "--store", store)
    line = one_line_error(refused)
    assert "ambiguous" in line and full in line and twin in line
    assert fcsnap("inspect", full, "--store", store).returncode == 0  # the whole id still does


def test_tables_show_short_ids_and_json_whole_ones(tmp_path: Path) -> None:
    store = one_build_store(tmp_path, 256 * KIB, seed=6)
    full = _build_id(store)
    for argv in (("ls", "--store", store), ("ls", "--builds", "--store", store)):
        table = fcsnap(*argv)
        assert table.returncode == 0, table.stderr
        assert f"{full[:8]} " in table.stdout and full not in table.stdout, table.stdout
    inspected = fcsnap("inspect", "vm", "--store", store).stdout  # its header keeps the id
    assert any(line.startswith(f"{full[:8]} ") for line in inspected.splitlines()), inspected
    assert full in fcsnap("ls", "--builds", "--store", store, "--json").stdout


def test_a_prefix_in_an_s3_store(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.url()
    write_full(tmp_path / "m0", synthetic_memory(1 << 20, seed=8))
    full = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name",
                          "web",
                          "--json").stdout)["build_id"]
    shown = run(bucket, "inspect", full[:6], "--store", store, "--json")
    assert json.loads(shown.stdout)["metadata"]["build_id"] == full

    twin = _twin(full)  # a second committed build sharing the prefix
    obstore.put(bucket.client(), f"snaps/{twin}/build.json", b"{}")
    line = one_line_error(run(bucket, "inspect", full[:8], "--store", store, ok=False))
    assert "ambiguous" in line and full in line and str(uuid.UUID(twin)) in line
