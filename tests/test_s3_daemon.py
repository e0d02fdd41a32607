"""`fcsnap serve --store s3://...`: the daemon resolves each request's VM in the bucket and
serves it through the host chunk cache; /metrics counts what it fetched."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_helpers import Bucket, memfile, new_bucket
from test_daemon import WAIT, Build, Daemon
from test_s3_serve import fcsnap

from fcsnap.testing.s3server import seaweedfs


@pytest.fixture(scope="module")
def s3_builds(s3_server, tmp_path_factory: pytest.TempPathFactory  # noqa: ANN001
              ) -> tuple[Bucket, dict[str, Build]]:
    """A bucket holding "raw" and "zstd" (16 MiB each), which the daemons only read."""
    bucket, root = new_bucket(s3_server), tmp_path_factory.mktemp("s3-daemon")
    builds = {}
    for seed, (name, compression) in enumerate([("raw", "none"), ("zstd", "zstd")]):
        mem = memfile(root, f"{name}.mem", seed=70 + seed, mib=16)
        fcsnap(bucket, "pack", "--init", str(mem), "--store", bucket.url(), "--name", name,
               "--compress", compression, "-q")
        builds[name] = Build(name, "", mem)
    return bucket, builds


@pytest.fixture
def s3_daemon(s3_builds: tuple[Bucket, dict[str, Build]], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, dict[str, Build]]]:
    """A daemon, with a host cache of its own, on s3_builds' bucket."""
    bucket, builds = s3_builds
    for key, value in bucket.server.env().items():  # the daemon's credentials and endpoint
        monkeypatch.setenv(key, value)
    daemon = Daemon(bucket.url(), tmp_path, "--cache-dir",  # type: ignore[arg-type]
                    str(tmp_path / "cache"), "--fetch-timeout", "10")
    yield daemon, builds
    daemon.close()


def served(daemon: Daemon, build: Build, name: str) -> dict:
    """One restore of `build` to a stand-in that checks every byte; its final document."""
    restore = daemon.restore(build.name, name)
    vm = daemon.vm(name, build, order="random")
    assert vm.wait(timeout=WAIT + 10) == 0, vm.communicate()[1]
    report = daemon.report(name)
    assert report is not None and report["mismatches"] == 0, report
    document = daemon.wait_ended(restore["id"])
    assert document["exit_reason"] == "vm exited", document
    return document


def test_two_vms_share_the_host_cache(s3_daemon: tuple[Daemon, dict[str, Build]]) -> None:
    daemon, builds = s3_daemon
    first = served(daemon, builds["raw"], "a")
    assert first["compiled_faults"] > 0  # pages copied in C from the cached chunks' mappings
    cold = daemon.metrics()
    fetched = cold["fcsnap_fetched_bytes_total", ()]
    assert fetched > 0 and cold["fcsnap_fetch_requests_total", ()] > 0
    served(daemon, builds["raw"], "b")
    warm = daemon.metrics()
    assert warm["fcsnap_fetched_bytes_total", ()] == fetched  # the second fetched nothing
    assert warm["fcsnap_chunk_cache_misses_total", ()] == cold[
        "fcsnap_chunk_cache_misses_total", ()]
    assert warm["fcsnap_chunk_cache_hits_total", ()] > cold["fcsnap_chunk_cache_hits_total", ()]


def test_a_zstd_build_and_an_unknown_name(s3_daemon: tuple[Daemon, dict[str, Build]]) -> None:
    daemon, builds = s3_daemon
    served(daemon, builds["zstd"], "z")
    assert daemon.metrics()["fcsnap_fetch_requests_total", ()] > 1  # frames, on demand
    status, answer = daemon.call("POST", "/restores", {
        "vm": "nobody", "socket": str(daemon.tmp / "n.sock")})
    assert status == 404 and "nobody" in answer["error"], answer
    assert not (daemon.tmp / "n.sock").exists()


def server_processes(data_dir: Path) -> list[int]:
    """The pids of the S3 server running on `data_dir` (its command line names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(data_dir) in (entry / "cmdline").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_stalled_fetch_holds_up_no_other_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """One reactor serves three VMs: two wait on chunks (raw) and frames (zstd) from an S3
    server that has stopped answering; the third (its build in the host cache) runs to its
    end meanwhile; once the server answers again the first two get every byte right too."""
    with seaweedfs(tmp_path / "weed") as server:
        bucket = new_bucket(server)
        builds = {}
        # raw: more chunks than a restore fetches at once when it starts (4)
        for seed, (name, mib, compression) in enumerate(
            [("raw", 64, "none"), ("zstd", 16, "zstd"), ("warm", 16, "none")]
        ):
            mem = memfile(tmp_path, f"{name}.mem", seed=80 + seed, mib=mib)
            fcsnap(bucket, "pack", "--init", str(mem), "--store", bucket.url(), "--name", name,
                   "-q",
                   "--compress", compression)
            builds[name] = Build(name, "", mem)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        # --lazy-fetch: the cold builds' chunks are not fetched in the background before the
        # server stops, so their VMs' faults are what waits on it
        daemon = Daemon(bucket.url(), tmp_path, "--cache-dir",  # type: ignore[arg-type]
                        str(tmp_path / "cache"), "--fetch-timeout", str(WAIT), "--reactors", "1",
                        "--lazy-fetch")
        stopped: list[int] = []
        try:
            served(daemon, builds["warm"], "w0")  # its chunks now in the host cache
            cold = {name: daemon.restore(name, name) for name in ("raw", "zstd")}
            warm = daemon.restore("warm", "w1")  # all listening before the server stops
            stopped = server_processes(tmp_path / "weed")
            assert stopped
            for pid in stopped:
                os.kill(pid, signal.SIGSTOP)
            cold_vms = {name: daemon.vm(name, builds[name], order="random") for name in cold}
            time.sleep(0.5)  # they fault on chunks and frames that cannot come now
            assert all(vm.poll() is None for vm in cold_vms.values())
            began = time.monotonic()
            warm_vm = daemon.vm("w1", builds["warm"], order="random")
            assert warm_vm.wait(timeout=WAIT) == 0, warm_vm.communicate()[1]
            assert time.monotonic() - began < WAIT / 3  # well before the fetch timeout
            report = daemon.report("w1")
            assert report is not None and report["mismatches"] == 0, report
            assert daemon.wait_ended(warm["id"])["exit_reason"] == "vm exited"
            assert all(vm.poll() is None for vm in cold_vms.values())  # still waiting
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            stopped = []
            for name, vm in cold_vms.items():
                assert vm.wait(timeout=WAIT) == 0, (name, vm.communicate()[1])
                report = daemon.report(name)
                assert report is not None and report["mismatches"] == 0, report
                assert daemon.wait_ended(cold[name]["id"])["exit_reason"] == "vm exited"
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            daemon.close()
