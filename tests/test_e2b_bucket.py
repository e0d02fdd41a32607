"""E2B/Wrenn builds in an S3 bucket laid out as E2B lays out its own, read as they are:
`inspect`, `verify` and `unpack` say and write what they say and write for the same builds in a
local directory; damaged or missing objects give one line; the bucket is never written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from test_e2b_restore import upload
from test_e2b_store import DAMAGE, EXPECTED, FIXTURES, copy_store

from fcsnap.store.format.layout import HASHES

CASES = [("v4-zstd-4k", 2), ("v5-lz4-4k", 1), ("v4-on-v3-4k", 1), ("v4-none-4k", 1),
         ("v3-4k", 2), ("v5-zstd-2m", 1)]


def _both(bucket, scenario: str, *argv: object) -> tuple[object, object]:
    """One command run on a fixture's directory and on the same builds in the bucket."""
    local = fcsnap(*argv, "--store", FIXTURES / scenario)
    remote = fcsnap(*argv, "--store", bucket.url(), env=bucket.env)
    return local, remote


@pytest.mark.parametrize(("scenario", "index"), CASES, ids=[s for s, _ in CASES])
def test_inspect_verify_unpack_in_a_bucket_as_in_a_directory(scenario, index, bucket, tmp_path):
    upload(bucket, scenario)
    before = bucket.listing(marker=True)
    expected = EXPECTED[scenario][index]
    build = expected["build_id"]
    for argv in (("inspect", build, "--mappings"), ("inspect", build, "--json"),
                 ("verify", build), ("verify", build, "--json")):
        local, remote = _both(bucket, scenario, *argv)
        assert local.returncode == 0, local.stderr
        assert remote.returncode == 0, remote.stderr
        if argv[:2] == ("inspect", build) and "--json" not in argv:  # its first line: the path
            head, _, rest = remote.stdout.partition("\n")
            assert head.endswith(f"/{build}/memfile.header")
            assert rest == local.stdout.partition("\n")[2]
        else:
            assert remote.stdout == local.stdout
    out = tmp_path / "memory"
    result = fcsnap("unpack", build, "--store", bucket.url(), "-o", out, env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected["memory_sha256"]
    assert bucket.listing(marker=True) == before


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_objects_in_a_bucket_give_one_line_and_no_output(name, bucket, tmp_path):
    """The damage tests/test_e2b_store.py makes to a directory, made to the bucket: verify and
    unpack fail with one line naming it (an object by its s3:// address), as they do on the
    directory; no output file."""
    scenario, damage, commands, words = DAMAGE[name]
    build = damage(copy_store(tmp_path, scenario)).name
    upload(bucket, scenario, root=tmp_path)
    before = bucket.listing(marker=True)
    out = tmp_path / "memory"
    for command in commands:
        argv = (command, build, *(("-o", out) if command == "unpack" else ()))
        result = fcsnap(*argv, "--store", bucket.url(), env=bucket.env)
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and len(lines) == 1, (command, result.stderr)
        assert lines[0].startswith("fcsnap: error: ") and words in lines[0], (command, lines)
        assert "memfile" not in lines[0] or f"{bucket.url()}/{build[:4]}" in lines[0], lines
        assert not out.exists()
    assert bucket.listing(marker=True) == before


@pytest.mark.parametrize("scenario", ["v4-zstd-4k", "v5-lz4-4k", "v3-4k"])
def test_import_from_a_bucket_gives_the_builds_a_directory_gives(scenario, bucket, tmp_path):
    """`import s3://.../BUILD_ID`: the same builds, hash sidecars and names as the import of the
    same lineage from a directory; each generation unpacks to E2B's memory."""
    upload(bucket, scenario)
    before = bucket.listing(marker=True)
    gens = [h for h in EXPECTED[scenario] if "peer-" not in h["file"]]
    head = gens[-1]["build_id"]
    stores = {}
    for source in ("local", "bucket"):
        store = stores[source] = tmp_path / source
        src = FIXTURES / scenario / head if source == "local" else f"{bucket.url()}/{head}"
        result = fcsnap("import", "--init", src, "--store", store, "--name", "vm", "--json",
                        env=bucket.env)
        assert result.returncode == 0, result.stderr
        assert [b["build_id"] for b in json.loads(result.stdout)["builds"]] == \
            [g["build_id"] for g in gens]
    for expected in gens:
        local, remote = (stores[s] / expected["build_id"] for s in ("local", "bucket"))
        assert (remote / HASHES).read_bytes() == (local / HASHES).read_bytes()
        out = tmp_path / f"{expected['build_id']}.mem"
        result = fcsnap("unpack", remote, "-o", out)
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == expected["memory_sha256"]
    assert (stores["bucket"] / "vms" / "vm").read_bytes() == \
        (stores["local"] / "vms" / "vm").read_bytes()
    assert bucket.listing(marker=True) == before


def test_import_from_a_bucket_refuses_damage_and_what_is_no_build(bucket, tmp_path):
    """A frame damaged in the template's object: one line, no build left in the store;
    a path in the bucket that is no E2B build: one line."""
    from test_e2b_store import _zstd_frame_damaged

    upload(bucket, "v4-zstd-4k", root=_damaged_copy(tmp_path, _zstd_frame_damaged))
    head = [h for h in EXPECTED["v4-zstd-4k"] if "peer-" not in h["file"]][-1]["build_id"]
    store = tmp_path / "store"
    assert fcsnap("init", store).returncode == 0
    for src, words in ((f"{bucket.url()}/{head}", "frame"),
                       (f"{bucket.url()}/nothing-here", "not an E2B/Wrenn build")):
        result = fcsnap("import", src, "--store", store, env=bucket.env)
        lines = result.stderr.splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr
        assert words in lines[0], lines
        assert sorted(p.name for p in store.iterdir()) == ["fcsnap-store.json"]


def _damaged_copy(tmp_path: Path, damage) -> Path:  # noqa: ANN001
    """A copy of the v4-zstd-4k scenario under tmp_path/src, `damage` done to it."""
    damage(copy_store(tmp_path / "src", "v4-zstd-4k"))
    return tmp_path / "src"


def test_import_from_a_bucket_fetches_each_byte_once(bucket, tmp_path, monkeypatch):
    """Every range GET an import makes is of bytes no other GET fetched, within the object."""
    from fcsnap.api import Store
    from fcsnap.store.operations import e2b_remote

    reads: dict[str, list[tuple[int, int]]] = {}
    real = e2b_remote.RemoteData._pread

    def counting(self, offset: int, length: int) -> bytes:  # noqa: ANN001
        reads.setdefault(self.key, []).append((offset, offset + length))
        return real(self, offset, length)

    monkeypatch.setattr(e2b_remote.RemoteData, "_pread", counting)
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    for scenario in ("v4-zstd-4k", "v3-4k"):
        upload(bucket, scenario)
        head = [h for h in EXPECTED[scenario] if "peer-" not in h["file"]][-1]["build_id"]
        assert fcsnap("init", tmp_path / scenario).returncode == 0
        Store(tmp_path / scenario).import_e2b(f"{bucket.url()}/{head}")
    assert len(reads) >= 4
    for key, ranges in reads.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert start >= end, f"{key}: bytes fetched twice"


def test_gc_never_removes_e2b_builds_in_a_bucket(bucket):
    """gc with no grace of a prefix of E2B builds (no build.json: the shape of a killed
    upload's leftovers too) deletes none of their objects."""
    upload(bucket, "v4-zstd-4k")
    before = bucket.listing(marker=True)
    result = fcsnap("gc", "--store", bucket.url(), "--grace", "0", "--json", env=bucket.env)
    assert result.returncode == 0, result.stderr
    assert bucket.listing(marker=True) == before
    head = EXPECTED["v4-zstd-4k"][2]["build_id"]
    assert fcsnap("verify", head, "--store", bucket.url(), env=bucket.env).returncode == 0
