"""gc beside every other command, with no grace period: nothing anyone uses is lost.

Interleavings are forced, not hoped for: a command started with FCSNAP_STOP_AT=<point> stops
itself (SIGSTOP) at that point (locks.stop_point), the test runs gc while it is stopped, then
sends SIGCONT and checks that the command finished and that what it made or read is whole.
The points: `staged` (a writer's staging directory made and locked), `publish` (its build is in
place but not yet named), `gc-recheck` (gc holds its candidates' locks), `gc-delete` (gc is
removing a trashed build's files). Every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import CLI_WAIT, WAIT, Procs, fcsnap, fcsnap_here, wait_serving
from store_procs import stopping_at
from test_daemon import Build as DaemonBuild
from test_daemon import Daemon
from test_lifecycle import (
    Store,
    assert_names_verify_and_unpack,
    fcsnap_json,
    make_store,
    next_image,
    visible_builds,
)

from fcsnap.store.format.layout import VMS
from fcsnap.testing.memimage import write_full


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path)


def start(*args: object, stop_at: str | None = None) -> subprocess.Popen[str]:
    """`fcsnap ARGS`, stopping itself (SIGSTOP) at `stop_at` if given."""
    return subprocess.Popen(
        [sys.executable, "-m", "fcsnap", *map(str, args)],
        env=None if stop_at is None else stopping_at(stop_at), text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def wait_stopped(proc: subprocess.Popen[str], timeout: float = WAIT) -> None:
    """Until the process has stopped itself at its stop point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode} before its stop point: " + (
            proc.communicate(timeout=CLI_WAIT)[1]
        )
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"process {proc.args} did not reach its stop point in {timeout}s")


def wait_blocked_on_flock(proc: subprocess.Popen[str], timeout: float = WAIT) -> None:
    """Until the process waits for a flock (/proc/locks lists waiters with '->')."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate(timeout=CLI_WAIT)
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and fields[fields.index("->") + 4] == str(proc.pid):
                return
        time.sleep(0.02)
    pytest.fail(f"process {proc.args} did not wait for a lock within {timeout}s")


def resume(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=CLI_WAIT)
    return proc.returncode, out, err


@pytest.fixture
def stopped() -> list[subprocess.Popen[str]]:
    """Processes a test started; any left (a failed test) are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=CLI_WAIT)


def gc_now(store: Store) -> dict:
    return fcsnap_json("gc", "--store", store.path, "--grace", "0")


def pointer(store: Store, name: str) -> str:
    return (store.path / VMS / name).read_text().strip()


def test_gc_keeps_a_pack_s_staging_and_its_unnamed_build(store: Store, tmp_path, stopped) -> None:
    for point in ("staged", "publish"):
        known = visible_builds(store.path)
        pack = start("pack", "--init", tmp_path / "m2.mem", "--store", store.path, "--name",
                     f"new-{point}",
                     "--quiet", "--json", stop_at=point)
        stopped.append(pack)
        wait_stopped(pack)
        staging = list(store.path.glob(".staging-*"))
        assert len(staging) == (1 if point == "staged" else 0)
        report = gc_now(store)
        assert report["leftovers"] == []  # the staging directory is locked by its writer
        assert all(p.is_dir() for p in staging)
        if point == "publish":  # in place, not yet named: unreferenced, but locked
            (new,) = visible_builds(store.path) - known
            assert {"build_id": new, "reason": "in use"} in report["kept"]
        status, out, err = resume(pack)
        assert status == 0, err
        assert pointer(store, f"new-{point}") == json.loads(out)["build_id"]
        store.images[f"new-{point}"] = store.images["web"]
    assert_names_verify_and_unpack(store, tmp_path)


def test_gc_keeps_the_base_of_a_running_diff(store: Store, tmp_path, stopped) -> None:
    """A diff over `web` stops before it publishes; `web` is removed and gc runs: the base's
    whole lineage is kept (the diff holds it), and the diff's new build reads it."""
    path, image = next_image(store, tmp_path)
    diff = start("diff", path, "--base", "web", "--store", store.path,
                 "--name", "next", "--quiet", stop_at="publish")
    stopped.append(diff)
    wait_stopped(diff)
    assert fcsnap_here("rm", "web", "--store", store.path).returncode == 0
    report = gc_now(store)
    kept = {r["build_id"] for r in report["kept"]}
    assert store.id("G2") in kept
    assert {r["build_id"] for r in report["deleted"]} == {store.id("G1")}
    status, _, err = resume(diff)
    assert status == 0, err
    del store.images["web"]
    store.images["next"] = image
    assert_names_verify_and_unpack(store, tmp_path)
    report = gc_now(store)  # the lineage is read by `next` now: still kept
    assert store.id("G2") not in {r["build_id"] for r in report["deleted"]}
    assert fcsnap_here("verify", "next", "--store", store.path).returncode == 0


def test_gc_keeps_what_a_running_squash_reads(store: Store, tmp_path, stopped) -> None:
    squash = start("squash", "web", "--store", store.path, "--name", "flat", "--quiet",
                   stop_at="staged")
    stopped.append(squash)
    wait_stopped(squash)
    assert fcsnap_here("rm", "web", "--store", store.path).returncode == 0
    report = gc_now(store)
    assert {r["build_id"] for r in report["deleted"]} == {store.id("G1")}
    assert {"build_id": store.id("G2"), "reason": "in use"} in report["kept"]
    status, _, err = resume(squash)
    assert status == 0, err
    store.images["flat"] = store.images.pop("web")
    assert_names_verify_and_unpack(store, tmp_path)
    report = gc_now(store)  # now nothing reads G2
    assert store.id("G2") in {r["build_id"] for r in report["deleted"]}
    assert_names_verify_and_unpack(store, tmp_path)


def test_gc_keeps_what_restore_serves(store: Store, tmp_path: Path) -> None:
    """A restore serving `web` whose name is removed: gc keeps every build it serves, and the
    VM (the Firecracker stand-in) reads every page right, after gc ran."""
    expected = tmp_path / "expected.mem"
    expected.write_bytes(store.images["web"].tobytes())
    procs = Procs(tmp_path)
    try:
        server = procs.server("web", store.path, quiet=False)
        wait_serving(server)  # pinned and held: its socket listens before that
        assert fcsnap_here("rm", "web", "base", "--store", store.path).returncode == 0
        report = gc_now(store)
        deleted = {r["build_id"] for r in report["deleted"]}
        assert deleted == {store.id("G1")}
        kept = {r["build_id"]: r["reason"] for r in report["kept"]}
        assert kept[store.id("G2")] == "in use" and store.id("G0") in kept
        vm = procs.vm(expected=expected, threads=2)
        out = procs.outcome(server, vm)
        assert out.vm_status == 0 and out.status == 0, out
        assert out.report is not None and out.report["mismatches"] == 0
    finally:
        procs.close()
    report = gc_now(store)  # the server is gone: now they go
    assert {r["build_id"] for r in report["deleted"]} == {store.id("G0"), store.id("G2")}


def test_gc_keeps_what_the_daemon_serves(store: Store, tmp_path: Path) -> None:
    """`fcsnap serve` holds `api` open (--preload) and serves `web` to a VM; every name is
    removed and gc runs: it keeps every build either reads, and the VM (the Firecracker
    stand-in) reads every page right after gc ran. Once web's restore ended its lineage goes;
    api's goes once the daemon stopped."""
    expected = tmp_path / "web.mem"
    expected.write_bytes(store.images["web"].tobytes())
    daemon = Daemon(store.path, tmp_path, "--preload", "api")
    try:
        restore = daemon.restore("web", "web")
        assert fcsnap_here("rm", "web", "base", "api", "--store", store.path).returncode == 0
        report = gc_now(store)
        assert {r["build_id"] for r in report["deleted"]} == {store.id("G1")}
        kept = {r["build_id"]: r["reason"] for r in report["kept"]}
        assert kept[store.id("G2")] == kept[store.id("A1")] == "in use"
        assert {store.id("G0"), store.id("A0")} <= set(kept)
        vm = daemon.vm("web", DaemonBuild("web", store.id("G2"), expected), threads=2)
        _, err = vm.communicate(timeout=2 * WAIT)
        assert vm.returncode == 0, err
        served = daemon.report("web")
        assert served is not None and served["mismatches"] == 0
        assert served["pages_touched"] == len(store.images["web"])
        assert daemon.wait_ended(restore["id"])["exit_reason"] == "vm exited"
        report = gc_now(store)  # no session reads web's lineage now; api is still preloaded
        assert {r["build_id"] for r in report["deleted"]} == {store.id("G0"), store.id("G2")}
        assert visible_builds(store.path) == {store.id("A0"), store.id("A1")}
        status, _ = daemon.stop()
        assert status == 0
    finally:
        daemon.close()
    report = gc_now(store)
    assert {r["build_id"] for r in report["deleted"]} == {store.id("A0"), store.id("A1")}
    assert visible_builds(store.path) == set()


def test_a_diff_over_a_build_gc_is_deleting_fails_cleanly(store: Store, tmp_path, stopped):
    """gc holds G1 (garbage) locked when a diff names it as its base: the diff waits for the
    lock, finds the build gone, and fails with one line, leaving no build and no name."""
    gc = start("gc", "--store", store.path, "--grace", "0", "--json", stop_at="gc-recheck")
    stopped.append(gc)
    wait_stopped(gc)
    known = visible_builds(store.path)
    diff = start("diff", next_image(store, tmp_path)[0], "--base", store.id("G1"),
                 "--store", store.path, "--name", "late", "--quiet")
    stopped.append(diff)
    wait_blocked_on_flock(diff)  # the diff waits on the base's lock (it must not fail yet)
    status, out, err = resume(gc)
    assert status == 0, err
    assert [r["build_id"] for r in json.loads(out)["deleted"]] == [store.id("G1")]
    _, err = diff.communicate(timeout=CLI_WAIT)
    assert diff.returncode == 1
    assert err.strip() == f"fcsnap: error: build {store.id('G1')} was removed"
    assert visible_builds(store.path) == known - {store.id("G1")}
    assert not (store.path / VMS / "late").exists()
    assert_names_verify_and_unpack(store, tmp_path)


def test_a_second_gc_is_refused_while_one_runs(store: Store, tmp_path, stopped) -> None:
    first = start("gc", "--store", store.path, "--grace", "0", "--json", stop_at="gc-recheck")
    stopped.append(first)
    wait_stopped(first)
    second = fcsnap_here("gc", "--store", store.path, "--grace", "0")
    assert second.returncode == 1
    assert second.stderr.strip() == f"fcsnap: error: another gc is running on {store.path}"
    dry = fcsnap_json("gc", "--store", store.path, "--grace", "0", "--dry-run")
    assert dry["would_delete"] == []  # the first gc holds G1's lock: a dry run sees it busy
    status, out, err = resume(first)
    assert status == 0, err
    assert [r["build_id"] for r in json.loads(out)["deleted"]] == [store.id("G1")]
    assert_names_verify_and_unpack(store, tmp_path)


def test_a_name_moved_onto_a_candidate_during_gc_keeps_it(store: Store, tmp_path, stopped):
    """gc has locked G1 (no head reads it) when `web` moves back onto a build reading G1."""
    gc = start("gc", "--store", store.path, "--grace", "0", "--json", stop_at="gc-recheck")
    stopped.append(gc)
    wait_stopped(gc)
    web1 = store.path / VMS / "web"
    web1.write_text(store.id("G1") + "\n")  # as a publish would: the head is now G1
    status, out, err = resume(gc)
    assert status == 0, err
    report = json.loads(out)
    assert report["deleted"] == []
    assert {"build_id": store.id("G1"), "reason": "named again"} in report["kept"]
    assert fcsnap_here("verify", "web", "--store", store.path).returncode == 0


def test_killed_gc_leaves_a_store_that_verifies(store: Store, tmp_path, stopped) -> None:
    assert fcsnap_here("rm", "api", "--store", store.path).returncode == 0
    del store.images["api"]
    gc = start("gc", "--store", store.path, "--grace", "0", stop_at="gc-delete")
    stopped.append(gc)
    wait_stopped(gc)  # the first trashed build has lost a file
    gc.kill()
    gc.communicate(timeout=CLI_WAIT)
    trash = sorted(p.name for p in store.path.glob(".trash-*"))
    assert trash, "gc was killed before it trashed anything"
    assert_names_verify_and_unpack(store, tmp_path)
    assert store.id("G1") not in visible_builds(store.path)
    report = gc_now(store)
    assert set(trash) <= set(report["leftovers"])
    assert not list(store.path.glob(".trash-*"))
    assert visible_builds(store.path) == {store.id("G0"), store.id("G2")}
    assert_names_verify_and_unpack(store, tmp_path)


@pytest.mark.slow  # a small soak: ~10 commands, 30 s on a loaded 2-core machine
def test_free_running_gcs_beside_diffs_lose_nothing(store: Store, tmp_path) -> None:
    """No forced interleaving: diffs move `web` generation after generation, each rewriting the
    pages the one before stored (so each old head becomes garbage at once), each followed by a
    verify of the new head, while gc --grace 0 runs in a loop from two processes. Every command
    succeeds (a gc may find the other running), garbage goes, every name stays whole."""
    mem = store.images["web"].copy()
    rng = np.random.default_rng(3)
    errors: list[str] = []
    done = threading.Event()

    def collector() -> None:
        while not done.is_set():
            result = fcsnap("gc", "--store", store.path, "--grace", "0")
            if result.returncode != 0 and "another gc is running" not in result.stderr:
                errors.append(result.stderr)

    threads = [threading.Thread(target=collector) for _ in range(2)]
    pages = rng.choice(len(mem), 16, replace=False)
    for t in threads:
        t.start()
    try:
        for g in range(4):
            mem[pages] = rng.integers(0, 256, (16, 4096), dtype=np.uint8)
            write_full(tmp_path / f"next{g}.mem", mem)
            result = fcsnap("diff", tmp_path / f"next{g}.mem", "--base", "web", "--name", "web",
                            "--store", store.path, "--quiet")
            assert result.returncode == 0, result.stderr
            checked = fcsnap("verify", "web", "--store", store.path, "--quiet")
            assert checked.returncode == 0, checked.stderr
    finally:
        done.set()
        for t in threads:
            t.join(timeout=CLI_WAIT)
            assert not t.is_alive(), "a gc loop did not stop in time"
    assert errors == []
    store.images["web"] = mem
    assert_names_verify_and_unpack(store, tmp_path)
    gc_now(store)
    assert len(visible_builds(store.path)) == 5  # G0, G2, A0, A1 and the head


def test_repack_loses_to_a_diff_that_moves_the_name(store: Store, tmp_path, stopped) -> None:
    """gc --repack-below squashes `web`, and stops just before moving the name; a diff moves
    `web` meanwhile. The repack leaves the name alone and removes its flat copy; the diff's
    build stays the head, and what it reads is kept."""
    assert fcsnap_here("rm", "base", "--store", store.path).returncode == 0
    del store.images["base"]
    gc = start("gc", "--store", store.path, "--grace", "0", "--repack-below", "0.99", "--json",
               stop_at="publish")
    stopped.append(gc)
    wait_stopped(gc)
    path, image = next_image(store, tmp_path)
    diff = fcsnap_here("diff", path, "--base", "web", "--name", "web", "--store", store.path,
                       "--quiet", "--json")
    assert diff.returncode == 0, diff.stderr
    status, out, err = resume(gc)
    assert status == 0, err
    report = json.loads(out)
    (row,) = report["repacked"]
    new_head = json.loads(diff.stdout)["build_id"]
    assert row["skipped"] == f"web moved to {new_head} while this gc --repack-below ran"
    assert pointer(store, "web") == new_head
    assert {r["build_id"] for r in report["deleted"]} == {store.id("G1")}
    assert visible_builds(store.path) == {
        store.id("G0"), store.id("G2"), store.id("A0"), store.id("A1"), new_head
    }
    store.images["web"] = image
    assert_names_verify_and_unpack(store, tmp_path)
