"""Leases on S3 builds: gc keeps what a running restore or the daemon serves (however old, once
no name reads it), ignores (and reports) the lease of a holder killed with SIGKILL once it
expired, and the daemon lets go of its leases when its restores end."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import obstore
import pytest
from helpers import WAIT, Procs, fcsnap_here, wait_serving
from s3_helpers import Bucket, memfile, restore_from
from test_daemon import Build, Daemon
from test_s3_store import finish, one_line_error, start_stopped

from fcsnap.store.backends.leases import EXPIRY_ENV, MARGIN

EXPIRY = "2s"  # the tests' lease expiry: refreshed every 0.2 s
KILLED_EXPIRY = 5.0  # the killed holder's: rm and gc (in this process) take well under a second


def run(bucket: Bucket, *args: object) -> subprocess.CompletedProcess[str]:
    result = fcsnap_here(*args, env=bucket.env)
    assert result.returncode == 0, result.stderr
    return result


def pack(bucket: Bucket, mem: Path, name: str) -> str:
    """`mem` packed into the bucket's store as a new lineage under `name`; its build id."""
    out = run(bucket, "pack", "--init", mem, "--store", bucket.url(), "--name", name,
              "--json").stdout
    return json.loads(out)["build_id"]


def gc(bucket: Bucket) -> dict:
    return json.loads(run(bucket, "gc", "--store", bucket.url(), "--grace", "0s",
                          "--json").stdout)


def leases(bucket: Bucket) -> dict[str, dict]:
    """Every lease object in the store: key -> body."""
    client = bucket.client()
    return {key: json.loads(bytes(obstore.get(client, f"snaps/{key}").bytes()))
            for key in bucket.listing() if key.startswith("leases/")}


@pytest.fixture
def web(bucket: Bucket, tmp_path: Path) -> tuple[str, Path]:
    """The build `web` names (8 MiB, raw) and the memory it holds."""
    mem = memfile(tmp_path, "web.mem", seed=91)
    return pack(bucket, mem, "web"), mem


def test_gc_keeps_a_build_a_lazy_restore_serves(bucket: Bucket, procs: Procs,
                                               tmp_path: Path) -> None:
    """A restore with --lazy-fetch has fetched only its first chunks when its name moves on
    and gc runs with --grace 0s, after more than the lease's expiry (its lease was
    refreshed): gc keeps the build for its lease, and the VM then reads every page right
    from the bucket. 64 MiB: a raw diff of 7 chunks, of which a restore fetches 4 as it
    starts."""
    mem = memfile(tmp_path, "web.mem", seed=91, mib=64)
    build = pack(bucket, mem, "web")
    server = procs.track(restore_from(bucket, "web", procs.socket, tmp_path / "cache",
                                      "--lazy-fetch", stats=procs.stats,
                                      env={EXPIRY_ENV: EXPIRY}, quiet=False))
    wait_serving(server)
    held = leases(bucket)
    assert [body["builds"] for body in held.values()] == [[build]], held
    moved = pack(bucket, memfile(tmp_path, "next.mem", seed=92), "web")  # the name moves on
    assert moved != build
    time.sleep(3)  # longer than the expiry: only refreshes keep the lease live
    report = gc(bucket)
    assert report["deleted"] == [] and report["stale_leases"] == [], report
    kept = {row["build_id"]: row["reason"] for row in report["kept"]}
    (key,) = held
    assert kept[build].startswith("leased by ") and key in kept[build], kept
    out = procs.outcome(server, procs.vm(expected=mem))
    assert out.status == 0 and out.vm_status == 0, out
    assert out.report is not None and out.report["mismatches"] == 0
    assert out.stats is not None and out.stats["fetch_requests"] > 0  # read from the bucket
    assert leases(bucket) == {}  # released when the restore ended
    assert {row["build_id"] for row in gc(bucket)["deleted"]} == {build}


def test_a_killed_holder_s_lease_expires_and_is_reported_stale(
    bucket: Bucket, procs: Procs, tmp_path: Path, web: tuple[str, Path]
) -> None:
    build, _ = web
    server = procs.track(restore_from(bucket, "web", procs.socket, tmp_path / "cache",
                                      "--lazy-fetch", stats=procs.stats,
                                      env={EXPIRY_ENV: f"{KILLED_EXPIRY:g}s"}, quiet=False))
    wait_serving(server)
    (key,) = leases(bucket)
    server.send_signal(signal.SIGKILL)
    server.communicate(timeout=WAIT)
    killed = time.monotonic()
    run(bucket, "rm", "web", "--store", bucket.url())
    within = gc(bucket)  # the lease has not expired yet
    assert within["deleted"] == [] and within["stale_leases"] == [], within
    assert key in {row["build_id"]: row["reason"] for row in within["kept"]}[build]
    time.sleep(max(0.0, killed + KILLED_EXPIRY + MARGIN + 0.5 - time.monotonic()))
    after = gc(bucket)
    assert {row["build_id"] for row in after["deleted"]} == {build}, after
    (stale,) = after["stale_leases"]
    assert stale["lease"] == f"{bucket.url()}/{key}" and stale["kind"] == "serve"
    assert stale["age_s"] >= KILLED_EXPIRY and stale["expires_after_s"] == KILLED_EXPIRY
    assert leases(bucket) == {}  # gc removed the stale lease
    text = run(bucket, "gc", "--store", bucket.url(), "--grace", "0s").stdout
    assert "stale lease" not in text


def test_the_daemon_s_leases_end_with_its_restores(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, web: tuple[str, Path]
) -> None:
    """`web` is served to a VM, `api` preloaded: each is leased while the daemon serves it
    (gc keeps web once its name is removed); web's lease goes when its restore ends, api's
    when the daemon stops."""
    build, mem = web
    api = pack(bucket, memfile(tmp_path, "api.mem", seed=93), "api")
    for key, value in bucket.server.env().items():
        monkeypatch.setenv(key, value)
    daemon = Daemon(bucket.url(), tmp_path, "--cache-dir",  # type: ignore[arg-type]
                    str(tmp_path / "cache"), "--lazy-fetch", "--preload", "api")
    try:
        preloaded = leases(bucket)
        assert [body["builds"] for body in preloaded.values()] == [[api]], preloaded
        restore = daemon.restore("web", "w")
        held = {k: v for k, v in leases(bucket).items() if k not in preloaded}
        assert [body["builds"] for body in held.values()] == [[build]], held
        run(bucket, "rm", "web", "--store", bucket.url())
        report = gc(bucket)
        assert report["deleted"] == [], report
        assert report["kept"] == [{"build_id": build, "reason": report["kept"][0]["reason"]}]
        assert next(iter(held)) in report["kept"][0]["reason"]
        text = run(bucket, "gc", "--store", bucket.url(), "--grace", "0s").stdout
        assert f"kept unreferenced build {build}: leased by " in text, text
        vm = daemon.vm("w", Build("web", build, mem), order="random")
        assert vm.wait(timeout=WAIT + 10) == 0, vm.communicate()[1]
        served = daemon.report("w")
        assert served is not None and served["mismatches"] == 0, served
        assert daemon.wait_ended(restore["id"])["exit_reason"] == "vm exited"
        assert leases(bucket) == preloaded  # web's restore ended: only api's lease is left
        assert {row["build_id"] for row in gc(bucket)["deleted"]} == {build}
        status, _ = daemon.stop()
        assert status == 0 and leases(bucket) == {}
    finally:
        daemon.close()


def test_a_restore_opening_a_build_gc_is_deleting_fails_cleanly(
    bucket: Bucket, procs: Procs, tmp_path: Path, web: tuple[str, Path]
) -> None:
    """gc has read the leases (none) and is about to delete `web`'s old build when a restore
    of that build by id writes its lease: the restore sees gc's lease naming the build, waits
    for gc to end, finds the build gone and says so, never serving (its socket, listening
    while the build opens, is removed)."""
    build, _ = web
    run(bucket, "rm", "web", "--store", bucket.url())
    collector = start_stopped(bucket, "gc", "--store", bucket.url(), "--grace", "0s", "--json",
                              point="gc-leases")
    server = procs.track(restore_from(bucket, build, procs.socket, tmp_path / "cache",
                                      stats=procs.stats))
    deadline = time.monotonic() + WAIT
    while not any(body["kind"] == "serve" for body in leases(bucket).values()):
        assert server.poll() is None, server.communicate(timeout=WAIT)
        assert time.monotonic() < deadline, "the restore wrote no lease"
        time.sleep(0.05)
    time.sleep(0.5)
    assert server.poll() is None  # waiting for gc to end
    status, err = finish(collector)
    assert status == 0, err
    _, err = server.communicate(timeout=WAIT)
    result = subprocess.CompletedProcess(server.args, server.returncode, "", err.decode())
    line = one_line_error(result)
    assert f"build {build} was deleted from {bucket.url()} by gc" in line
    assert not procs.socket.exists() and leases(bucket) == {}


@pytest.mark.parametrize("expiry", ["30", "0.5s", "soon"])
def test_a_bad_lease_expiry_is_one_line(bucket: Bucket, procs: Procs, tmp_path: Path,
                                        expiry: str) -> None:
    """Refused before the store is read (there is no `web` in it)."""
    server = restore_from(bucket, "web", procs.socket, tmp_path / "cache", stats=procs.stats,
                          env={EXPIRY_ENV: expiry})
    _, err = procs.track(server).communicate(timeout=WAIT)
    lines = err.decode().splitlines()
    assert server.returncode == 1 and len(lines) == 1, lines
    assert lines[0] == (f"fcsnap: error: invalid {EXPIRY_ENV} {expiry!r}: a duration of at "
                        "least 1s, with its unit (30s, 10m)"), lines
    assert not procs.socket.exists() and leases(bucket) == {}
