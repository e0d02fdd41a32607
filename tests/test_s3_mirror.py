"""The local mirror of a store in S3: private to the user, and an object changed in the
bucket (a header, sidecar or build.json repaired after a pin mismatch) is read again even
when its size did not change, so a long-running daemon serves the repaired build."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import obstore
import pytest
from s3_helpers import Bucket, memfile
from test_daemon import Build, Daemon
from test_s3_daemon import served
from test_s3_serve import fcsnap

from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.backends.stores import open_store
from fcsnap.store.format.layout import HASHES
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full


def lineage(bucket: Bucket, tmp_path: Path) -> tuple[list[str], Path]:
    """vm: two generations (the head pins its parent's sidecar); their build ids, oldest
    first, and the head's memory."""
    ids = []
    mem = synthetic_memory(8 << 20, seed=90)
    write_full(tmp_path / "gen0.mem", mem)
    new, _ = evolve(mem, seed=91, dirty_share=0.2)
    write_full(tmp_path / "gen1.mem", new)
    for name, command in (("gen0", ("pack", "--init")), ("gen1", ("diff", "--base", "vm"))):
        out = fcsnap(bucket, command[0], str(tmp_path / f"{name}.mem"), *command[1:], "--store",
                     bucket.url(), "--name", "vm", "-q", "--json")
        ids.append(json.loads(out)["build_id"])
    return ids, tmp_path / "gen1.mem"


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_the_mirror_is_private(bucket: Bucket, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    mem = memfile(tmp_path, "vm.mem", seed=92)
    fcsnap(bucket, "pack", "--init", str(mem), "--store", bucket.url(), "--name", "vm", "-q")
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    old = os.umask(0o022)
    try:
        store = open_store(bucket.url())
        assert isinstance(store, RemoteStore)
        store.mirror_lineage(store.resolve("vm"), data=True)
        store.mirror_names()
    finally:
        os.umask(old)
    found = {p.name: oct(stat.S_IMODE(p.lstat().st_mode))
             for p in [store.mirror, *store.mirror.rglob("*")]}
    dirs = {p.name for p in [store.mirror, *store.mirror.rglob("*")] if p.is_dir()}
    assert len(found) > 5 and all(
        mode == ("0o700" if name in dirs else "0o600") for name, mode in found.items()), found


def test_an_object_changed_in_place_is_mirrored_again(bucket: Bucket, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ids, _ = lineage(bucket, tmp_path)
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    store = open_store(bucket.url())
    assert isinstance(store, RemoteStore)
    key = f"snaps/{ids[0]}/{HASHES}"
    good = bytes(obstore.get(bucket.client(), key).bytes())
    build = uuid.UUID(ids[0])
    local = store.mirror_build(build) / HASHES
    assert local.read_bytes() == good
    obstore.put(bucket.client(), key, flipped(good, len(good) - 3))  # same size
    store.mirror_build(build)
    assert local.read_bytes() == flipped(good, len(good) - 3)
    obstore.put(bucket.client(), key, good)
    store.mirror_build(build)
    assert local.read_bytes() == good


def test_the_daemon_serves_a_bucket_repaired_after_a_pin_mismatch(
        bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, expected = lineage(bucket, tmp_path)
    key = f"snaps/{ids[0]}/{HASHES}"
    good = bytes(obstore.get(bucket.client(), key).bytes())
    obstore.put(bucket.client(), key, flipped(good, len(good) - 3))  # another build's, say
    for name, value in bucket.server.env().items():
        monkeypatch.setenv(name, value)
    daemon = Daemon(bucket.url(), tmp_path, "--cache-dir",  # type: ignore[arg-type]
                    str(tmp_path / "cache"), "--fetch-timeout", "10")
    try:
        status, answer = daemon.call("POST", "/restores", {
            "vm": "vm", "socket": str(tmp_path / "a.sock")})
        assert status >= 400 and "pin" in answer["error"], answer
        obstore.put(bucket.client(), key, good)  # repaired: same size, right bytes
        served(daemon, Build("vm", ids[1], expected), "b")
    finally:
        daemon.close()
