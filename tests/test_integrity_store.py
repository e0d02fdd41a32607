"""A damaged or mixed-up store never yields wrong bytes: lineage pins, blocks checked on copy,
and unpack's output never replaces what is not a regular file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from store_procs import hidden_entries, make_lineage, start_stopped, visible_builds

from fcsnap.header import load_header
from fcsnap.store.format.layout import DIFF_RAW, HASHES, MANIFEST
from fcsnap.units import PAGE


def pages(path: Path) -> np.ndarray:
    return np.fromfile(path, np.uint8).reshape(-1, PAGE)


def inherited_unique_page(m0: Path, m1: Path) -> int:
    """A page of m0 that is data, stored once (no other page has its bytes) and unchanged in
    m1: the newest generation reads it from generation 0."""
    mem0, mem1 = pages(m0), pages(m1)
    _, first, counts = np.unique(mem0, axis=0, return_index=True, return_counts=True)
    unique = np.zeros(len(mem0), bool)
    unique[first[counts == 1]] = True
    candidates = unique & mem0.any(axis=1) & (mem0 == mem1).all(axis=1)
    return int(np.flatnonzero(candidates)[0])


@pytest.fixture
def impostor(tmp_path):
    """A lineage web (g0, g1) whose g0 was replaced by another build carrying g0's id: the
    files of a pack of m0 with one page changed (same layout, its own consistent sidecar)."""
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    page = inherited_unique_page(tmp_path / "m0", tmp_path / "m1")
    other = pages(tmp_path / "m0").copy()
    other[page, :16] ^= 0x5A
    other.tofile(tmp_path / "other")
    r = fcsnap("pack", "--init", tmp_path / "other", "--store", tmp_path / "elsewhere", "--json")
    assert r.returncode == 0, r.stderr
    twin = Path(json.loads(r.stdout)["path"])
    for name in (DIFF_RAW, HASHES):
        shutil.copyfile(twin / name, store / g0 / name)
    return store, g0, g1


def test_verify_unpack_squash_diff_restore_refuse_an_impostor_ancestor(impostor, tmp_path):
    store, g0, g1 = impostor
    pin = f"fcsnap: error: build {g0} does not match the pin in {g1}'s build.json"
    out = tmp_path / "out"
    builds = visible_builds(store)
    for argv in (
        ("verify", "web"),
        ("unpack", "web", "-o", out),
        ("squash", "web", "--name", "flat"),
        ("diff", tmp_path / "m2", "--base", "web", "--name", "web"),
        ("restore", "--vm", "web", "--socket", tmp_path / "uffd.sock"),
    ):
        r = fcsnap(*argv, "--store", store)
        assert (r.returncode, r.stderr.startswith(pin), r.stderr.count("\n")) == (1, True, 1), (
            argv, r.stderr
        )
    assert not out.exists() and not (tmp_path / "uffd.sock").exists()
    assert visible_builds(store) == builds and hidden_entries(store) == []


def test_inspect_and_ls_check_the_pins_they_report(impostor):
    """inspect and `ls NAME` never vouch for pins unchecked: with an impostor ancestor, the
    pinned row says FAILED (inspect exits 1 with the pin's line), and the ancestor's row of
    the lineage is marked."""
    store, g0, g1 = impostor
    pin = f"build {g0} does not match the pin in {g1}'s build.json"
    r = fcsnap("inspect", "web", "--store", store)
    assert r.returncode == 1 and r.stderr.splitlines() == [f"fcsnap: error: {pin} "
                                                           "(a different build with the same id?)"]
    pinned = next(line for line in r.stdout.splitlines() if line.startswith("pinned"))
    assert "FAILED" in pinned and pin in pinned and "yes" not in pinned, pinned
    r = fcsnap("inspect", "web", "--store", store, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["pinned"] is True and pin in report["pin_errors"][0]
    r = fcsnap("ls", "web", "--store", store, "--json")
    report = json.loads(r.stdout)
    rows = {row["build_id"]: row for row in report["generations"]}
    assert pin in rows[g0]["pin_error"] and "pin_error" not in rows[g1]
    assert report["pinned"] is True and len(report["pin_errors"]) == 1
    r = fcsnap("ls", "web", "--store", store)
    g0_row = next(line for line in r.stdout.splitlines() if f" {g0[:8]} " in line)  # the table's
    assert "FAILS ITS PIN" in g0_row, r.stdout
    assert "pins: FAILED" in r.stdout and pin in r.stdout


def test_inspect_and_ls_say_when_the_pins_match(tmp_path):
    store = tmp_path / "store"
    make_lineage(tmp_path, store)
    r = fcsnap("inspect", "web", "--store", store)
    assert r.returncode == 0 and "yes (every build read matches its pin)" in r.stdout, r.stderr
    r = fcsnap("ls", "web", "--store", store)
    assert r.returncode == 0 and "pins: every build the head reads matches its pin" in r.stdout


def test_builds_pin_every_other_build_they_read(tmp_path):
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    sidecar = (store / g0 / HASHES).read_bytes()
    pins = json.loads((store / g1 / MANIFEST).read_text())["pins"]
    assert pins == {g0: "sha256:" + hashlib.sha256(sidecar).hexdigest()}
    assert json.loads((store / g0 / MANIFEST).read_text())["pins"] == {}


def test_unpinned_builds_still_work_and_say_so(tmp_path):
    store = tmp_path / "store"
    _, g1 = make_lineage(tmp_path, store)
    r = fcsnap("verify", "web", "--store", store)
    assert r.returncode == 0 and "unpinned" not in r.stdout, r.stderr
    r = fcsnap("inspect", "web", "--store", store, "--json")
    assert json.loads(r.stdout)["pinned"] is True
    manifest = json.loads((store / g1 / MANIFEST).read_text())
    del manifest["pins"]  # as written before pins existed
    (store / g1 / MANIFEST).write_text(json.dumps(manifest))
    r = fcsnap("verify", "web", "--store", store)
    assert r.returncode == 0 and "unpinned" in r.stdout, r.stderr
    r = fcsnap("verify", "web", "--store", store, "--json")
    assert json.loads(r.stdout)["pinned"] is False
    r = fcsnap("inspect", "web", "--store", store, "--json")
    assert json.loads(r.stdout)["pinned"] is False
    r = fcsnap("inspect", "web", "--store", store)
    assert r.returncode == 0 and "unpinned" in r.stdout
    r = fcsnap("unpack", "web", "--store", store, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == (tmp_path / "m1").read_bytes()


def flip_inherited_byte(store: Path, g0: str, g1: str) -> None:
    """Flip a byte of g0's raw diff inside a block that g1 reads."""
    mapping = next(m for m in load_header(store / g1).mappings if str(m.build_id) == g0)
    with open(store / g0 / DIFF_RAW, "r+b") as f:
        f.seek(mapping.storage_offset + 100)
        byte = f.read(1)
        f.seek(mapping.storage_offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_squash_and_unpack_refuse_a_damaged_block_and_leave_nothing(tmp_path):
    store = tmp_path / "store"
    g0, g1 = make_lineage(tmp_path, store)
    flip_inherited_byte(store, g0, g1)
    builds = visible_builds(store)
    r = fcsnap("squash", "web", "--store", store, "--name", "flat")
    assert r.returncode == 1 and "does not match its hash" in r.stderr, r.stderr
    assert f"build {g0}: block" in r.stderr and r.stderr.count("\n") == 1
    assert visible_builds(store) == builds and hidden_entries(store) == []
    assert not (store / "vms" / "flat").exists()
    out = tmp_path / "out"
    r = fcsnap("unpack", "web", "--store", store, "-o", out)
    assert r.returncode == 1 and "does not match its hash" in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def special_outputs(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a socket, a directory and (as root) a character device like /dev/null."""
    made = {"a FIFO": tmp_path / "fifo", "a socket": tmp_path / "sock",
            "a directory": tmp_path / "dir"}
    os.mkfifo(made["a FIFO"])
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(made["a socket"]))
    listener.close()
    made["a directory"].mkdir()
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        made["a character device"] = tmp_path / "null"
    except PermissionError:
        pass  # not root: the other kinds still show the rule
    return made


def test_unpack_force_replaces_only_a_regular_file(tmp_path):
    store = tmp_path / "store"
    make_lineage(tmp_path, store)
    for kind, path in special_outputs(tmp_path).items():
        before = os.lstat(path)
        r = fcsnap("unpack", "web", "--store", store, "-o", path, "--force")
        assert r.returncode == 1, (kind, r.stderr)
        rule = (
            "give the memory file to write" if kind == "a directory"
            else "only a regular file can be replaced"
        )
        assert r.stderr == f"fcsnap: error: {path} is {kind}: {rule}\n"
        after = os.lstat(path)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    regular = tmp_path / "old"
    regular.write_bytes(b"old")
    r = fcsnap("unpack", "web", "--store", store, "-o", regular)
    assert r.returncode == 1 and "use --force" in r.stderr
    r = fcsnap("unpack", "web", "--store", store, "-o", regular, "--force")
    assert r.returncode == 0, r.stderr
    assert regular.read_bytes() == (tmp_path / "m1").read_bytes()


def test_unpack_refuses_a_dangling_symlink_without_force(tmp_path):
    store = tmp_path / "store"
    make_lineage(tmp_path, store)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    r = fcsnap("unpack", "web", "--store", store, "-o", link)
    assert r.returncode == 1 and "is a symbolic link" in r.stderr, r.stderr
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    r = fcsnap("unpack", "web", "--store", store, "-o", link, "--force")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink() and not (tmp_path / "nowhere").exists()  # the link replaced
    assert link.read_bytes() == (tmp_path / "m1").read_bytes()


def test_partial_files_of_killed_unpacks_are_removed_live_ones_kept(tmp_path):
    store = tmp_path / "store"
    make_lineage(tmp_path, store)
    outdir = tmp_path / "out"
    outdir.mkdir()
    killed = start_stopped("unpack", "web", "--store", store, "-o", outdir / "a",
                           point="unpacking")
    (stale,) = outdir.iterdir()
    killed.kill()
    killed.wait(timeout=60)
    live = start_stopped("unpack", "web", "--store", store, "-o", outdir / "b",
                         point="unpacking")
    try:
        assert not stale.exists()  # the second unpack removed the dead one's partial
        (held,) = outdir.iterdir()
        r = fcsnap("unpack", "web", "--store", store, "-o", outdir / "c")
        assert r.returncode == 0, r.stderr
        assert held.exists()  # still being written by a live (stopped) unpack
    finally:
        live.kill()
        live.wait(timeout=60)
    assert sorted(p.name for p in outdir.iterdir()) == sorted(["c", held.name])
