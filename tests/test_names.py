"""VM names and BUILD arguments: checked before any work, looked up only in the given store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from store_procs import (
    TIMEOUT,
    hidden_entries,
    make_lineage,
    start_stopped,
    visible_builds,
)

from fcsnap.store.format.locks import lock_dir
from fcsnap.store.format.names import read_vm_pointer

BAD_NAMES = {
    "256 bytes": "n" * 256,
    "control character": "web\x07",
    "newline": "web\nother",
    "line separator": "web\u2028other",
    "uuid-shaped": str(uuid.uuid4()),
    "uuid-shaped, no dashes": uuid.uuid4().hex,
    "dot": ".",
    "dot-dot": "..",
    "hidden": ".web",
    "slash": "a/b",
    "empty": "",
}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    store = tmp / "store"
    ids = make_lineage(tmp, store)
    return tmp, store, ids


def argv_for(command: str, tmp: Path, store: Path, name: str | bytes) -> list[object]:
    return {
        "pack": ["pack", tmp / "m2", "--store", store, "--name", name],
        "diff": ["diff", tmp / "m2", "--base", "web", "--store", store, "--name", name],
        "squash": ["squash", "web", "--store", store, "--name", name],
    }[command]


def bad_name_cases() -> list[tuple[str, str]]:
    """Every kind with pack; with diff and squash, the kinds a late check let through."""
    cases = [("pack", kind) for kind in [*BAD_NAMES, "invalid UTF-8"]]
    return cases + [(c, k) for c in ("diff", "squash") for k in ("256 bytes", "invalid UTF-8")]


@pytest.mark.parametrize("command,kind", bad_name_cases())
def test_bad_names_are_refused_before_any_build_work(lineage, command, kind):
    tmp, store, _ = lineage
    before = (visible_builds(store), sorted(os.listdir(store / "vms")))
    if kind == "invalid UTF-8":
        argv = [os.fsencode(str(a)) for a in argv_for(command, tmp, store, "x")]
        argv[-1] = b"web\xff"
        r = subprocess.run([sys.executable.encode(), b"-m", b"fcsnap", *argv],
                           capture_output=True, timeout=TIMEOUT)
        stderr = r.stderr.decode(errors="replace")
    else:
        r = fcsnap(*argv_for(command, tmp, store, BAD_NAMES[kind]))
        stderr = r.stderr
    assert r.returncode == 1 and stderr.startswith("fcsnap: error: invalid VM name"), stderr
    assert stderr.count("\n") == 1, stderr
    assert (visible_builds(store), sorted(os.listdir(store / "vms"))) == before
    assert hidden_entries(store) == []


def test_a_name_of_255_bytes_works(lineage):
    tmp, store, _ = lineage
    name = "é" * 127 + "n"  # 255 bytes of UTF-8
    r = fcsnap("squash", "web", "--store", store, "--name", name, "--json")
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)["build_id"]
    assert str(read_vm_pointer(store, name)) == built
    r = fcsnap("verify", name, "--store", store, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["build_id"] == built, r.stderr


def test_with_a_store_a_bare_word_is_never_a_directory_of_the_cwd(lineage, tmp_path):
    tmp, store, (_, g1) = lineage
    other = tmp_path / "other"
    r = fcsnap("pack", "--init", tmp / "m0", "--store", other, "--json")
    shutil.copytree(json.loads(r.stdout)["path"], tmp_path / "web")  # a build named ./web
    for argv in (("verify", "web", "--json"), ("inspect", "web", "--json")):
        r = fcsnap(*argv, "--store", store, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report.get("build_id", report.get("metadata", {}).get("build_id")) == g1


def test_a_build_path_outside_the_given_store_is_refused(lineage, tmp_path):
    tmp, store, _ = lineage
    r = fcsnap("pack", "--init", tmp / "m0", "--store", tmp_path / "other", "--json")
    outside = json.loads(r.stdout)["path"]
    for argv in (("verify", outside), ("unpack", outside, "-o", tmp_path / "out"),
                 ("squash", outside), ("diff", tmp / "m2", "--base", outside)):
        r = fcsnap(*argv, "--store", store)
        assert r.returncode == 1, (argv, r.stderr)
        assert r.stderr == f"fcsnap: error: build {outside} is not in store {store}\n", r.stderr
    assert not (tmp_path / "out").exists()


def test_a_huge_vm_pointer_is_not_read_whole(lineage):
    tmp, store, _ = lineage
    pointer = store / "vms" / "huge"
    with open(pointer, "wb") as f:
        f.truncate(64 << 30)  # sparse: costs nothing on disk, 64 GiB to read
    try:
        started = time.monotonic()
        r = fcsnap("verify", "huge", "--store", store)
        assert r.returncode == 1
        assert r.stderr == f"fcsnap: error: {pointer} is not a VM pointer (more than 4096 bytes)\n"
        assert time.monotonic() - started < 30
    finally:
        pointer.unlink()


@pytest.mark.parametrize("level", [99, 0, "3"])
def test_a_bad_compression_level_in_build_json_is_one_clear_line(lineage, tmp_path, level):
    store = tmp_path / "store"
    shutil.copytree(lineage[1], store)
    g1 = lineage[2][1]
    manifest = json.loads((store / g1 / "build.json").read_text())
    manifest["compression_level"] = level
    (store / g1 / "build.json").write_text(json.dumps(manifest))
    for argv in (("squash", "web"), ("verify", "web")):
        r = fcsnap(*argv, "--store", store)
        assert r.returncode == 1, r.stderr
        assert r.stderr.startswith("fcsnap: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "compression_level is not a zstd level 1-22" in r.stderr


def test_disk_full_names_the_file(tmp_path):
    """A store on a full filesystem (a 1 MiB tmpfs in a private mount namespace)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs")
    make_lineage(tmp_path, tmp_path / "store")
    full = tmp_path / "full"
    full.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m none {full} || exit 99; "
        f'"$@" pack --init {tmp_path / "m0"} --store {full}/s -q; '
        f'"$@" unpack web --store {tmp_path / "store"} -o {full}/out -q; true'
    )
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-m", "fcsnap"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    if r.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    assert r.stderr.splitlines() == [
        f"fcsnap: error: cannot write memfile.diff of the new build in store {full}/s: "
        "No space left on device",
        f"fcsnap: error: cannot write {full}/out: No space left on device",
    ]


def test_a_build_published_but_never_named_is_collected_by_gc(tmp_path):
    """Killed between publishing its build and moving the name: the name is untouched and the
    build is visible but held by no one, so `fcsnap gc` collects it and nothing else."""
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    killed = start_stopped("squash", "web", "--store", store, "--name", "web", point="publish")
    (orphan,) = set(visible_builds(store)) - {g0, g1}
    killed.kill()
    killed.wait(timeout=60)
    assert str(read_vm_pointer(store, "web")) == g1
    lock = lock_dir(store / orphan, exclusive=True, block=False)
    assert lock is not None
    lock.release()
    r = fcsnap("gc", "--store", store, "--grace", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert [d["build_id"] for d in json.loads(r.stdout)["deleted"]] == [orphan]
    assert visible_builds(store) == sorted([g0, g1])
    r = fcsnap("unpack", "web", "--store", store, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == (tmp_path / "m1").read_bytes()
