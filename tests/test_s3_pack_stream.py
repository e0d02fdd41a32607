"""pack straight into S3 streams the diff up as it is produced (compressed on a worker, parts in
flight) and must store exactly what a local pack stores: the same diff bytes, sidecar, header
(but for the build id) and manifest figures."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import obstore
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the builds are tested here
from s3_helpers import Bucket, memfile
from store_procs import TIMEOUT
from test_s3_store import start_stopped

from fcsnap.store.backends.s3 import PART_SIZE

BUILD_FILES = ("memfile.diff", "memfile.diff.zst", "memfile.header", "memfile.hashes")
VOLATILE = ("build_id", "base_build_id", "created_at")  # differ between any two packs


def pack(bucket: Bucket, mem: Path, store: str, *options: str) -> str:
    result = fcsnap("pack", "--init", mem, "--store", store, "--json", *options, env=bucket.env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["build_id"]


def without_volatile(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


@pytest.mark.parametrize("options", [
    ("--compress", "zstd"), ("--compress", "none"),
    pytest.param(("--compress", "zstd:5", "--frame-size", "64K"), marks=pytest.mark.slow),
])
def test_an_s3_pack_stores_what_a_local_pack_stores(
    bucket: Bucket, tmp_path: Path, options: tuple[str, ...]
) -> None:
    mem = memfile(tmp_path, "mem", seed=11, mib=64)
    local = tmp_path / "local"
    local_id = pack(bucket, mem, str(local), *options)
    remote_id = pack(bucket, mem, bucket.url(), *options)
    local_dir = local / local_id
    client = bucket.client()

    def remote(name: str) -> bytes:
        return bytes(obstore.get(client, f"snaps/{remote_id}/{name}").bytes())

    names = [n for n in BUILD_FILES if (local_dir / n).exists()]
    assert len(names) == 3, names  # a diff (raw or zstd), the header, the sidecar
    diff = (local_dir / names[0]).read_bytes()
    assert len(diff) > PART_SIZE  # it went up in parts while the scan ran
    assert remote(names[0]) == diff
    assert remote("memfile.hashes") == (local_dir / "memfile.hashes").read_bytes()
    # the header names its own build: equal once the remote id reads as the local one
    header = remote("memfile.header").replace(
        uuid.UUID(remote_id).bytes, uuid.UUID(local_id).bytes
    )
    assert header == (local_dir / "memfile.header").read_bytes()
    local_manifest = json.loads((local_dir / "build.json").read_text())
    remote_manifest = json.loads(remote("build.json"))
    assert without_volatile(remote_manifest) == without_volatile(local_manifest)
    assert remote_manifest["stats"]["bytes_written"] == len(diff)


def test_a_zstd_pack_killed_mid_upload_or_before_its_commit_shows_nothing(
    bucket: Bucket, tmp_path: Path
) -> None:
    """Killed while compressed parts stream up: no object. Killed just before build.json: the
    diff's upload had completed (it ends on a worker while the small files go up, but before
    the commit), and without build.json nothing is visible."""
    mem = memfile(tmp_path, "mem", seed=12, mib=128)  # > 2 parts of zstd output
    store = bucket.url()
    for point in ("uploading", "commit"):
        proc = start_stopped(bucket, "pack", "--init", mem, "--store", store, "--compress", "zstd",
                             "--name", "web", point=point)
        uploaded = bucket.listing()
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
        if point == "uploading":
            assert uploaded == []
        else:
            build_id = uploaded[0].split("/")[0]
            assert uploaded == sorted(f"{build_id}/{name}" for name in (
                "memfile.diff.zst", "memfile.header", "memfile.hashes"))
        listed = fcsnap("ls", "--store", store, "--json", env=bucket.env)
        if point == "uploading":  # nothing arrived, not even the store's marker
            assert listed.returncode == 1 and "fcsnap init" in listed.stderr
        else:
            assert listed.returncode == 0 and json.loads(listed.stdout)["names"] == []


@pytest.mark.parametrize(("endpoint", "variable", "unsigned"), [
    (None, None, True),  # AWS over https: TLS protects the body, no SHA-256 pass over it
    ("https://s3.example.net", None, True),
    ("http://127.0.0.1:8333", None, False),  # plain http: the signature covers the body
    ("https://s3.example.net", "false", False),  # AWS_UNSIGNED_PAYLOAD decides when set
])
def test_payload_signing_follows_the_transport(
    monkeypatch: pytest.MonkeyPatch, endpoint: str | None, variable: str | None, unsigned: bool
) -> None:
    from fcsnap.store.backends.s3 import _config, parse_s3_url

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_UNSIGNED_PAYLOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    if variable:
        monkeypatch.setenv("AWS_UNSIGNED_PAYLOAD", variable)
    config = _config(parse_s3_url("s3://bucket/p"))
    assert config.get("unsigned_payload", False) is unsigned


def test_a_diff_is_stored_as_sent_not_recompressed_by_the_server(
    bucket: Bucket, tmp_path: Path
) -> None:
    """SeaweedFS gzips every chunk of a body sent without a type whose first bytes compress
    (guest memory's do), and then inflates whole chunks to answer each range GET: fcsnap names
    a type on every request, multipart parts included, so its diffs are stored as sent."""
    if not bucket.server.filer:
        pytest.skip("only SeaweedFS's filer shows how an object is stored (not this server)")
    mem = tmp_path / "mem"  # 12 MiB of distinct pages that compress, as guest memory does
    mem.write_bytes(b"".join(((b"page %08d " % i) * 293)[:4096] for i in range(3072)))
    build = pack(bucket, mem, bucket.url(), "--compress", "none")
    url = f"{bucket.server.filer}/buckets/{bucket.name}/snaps/{build}/memfile.diff?metadata=true"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        chunks = json.load(response)["chunks"]
    assert sum(c["size"] for c in chunks) > PART_SIZE  # the diff went up in parts
    assert [c for c in chunks if c.get("is_compressed")] == []
