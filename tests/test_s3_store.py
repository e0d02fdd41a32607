"""Stores in S3 (a real server: SeaweedFS, or FCSNAP_S3_ENDPOINT's): every command, the commit
protocol (build.json last, names by compare-and-swap), and failures as one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from helpers import fcsnap, fcsnap_here
from s3_helpers import Bucket, memfile
from store_procs import TIMEOUT, wait_stopped

from fcsnap.store.format.locks import STOP_ENV
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full, write_sparse_diff
from fcsnap.testing.s3server import free_ports

MIB = 1 << 20


def run(bucket: Bucket, *args: object, ok: bool = True) -> subprocess.CompletedProcess:
    """`fcsnap ARGS` on the bucket's server, run in this process."""
    result = fcsnap_here(*args, env=bucket.env)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_every_command_on_an_s3_store(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.url()
    mem0 = synthetic_memory(16 * MIB, seed=1)
    mem1, dirty = evolve(mem0, seed=2)
    write_full(tmp_path / "m0", mem0)
    write_sparse_diff(tmp_path / "m1.sparse", mem1, dirty)
    write_full(tmp_path / "m1", mem1)
    (tmp_path / "vm.state").write_bytes(b"vmstate bytes")

    packed = json.loads(run(
        bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name", "web", "--json",
        "--vmstate", tmp_path / "vm.state",
    ).stdout)
    g0 = packed["build_id"]
    assert packed["path"] == f"{store}/{g0}"
    keys = bucket.listing()
    assert f"{g0}/build.json" in keys and f"{g0}/memfile.diff" in keys
    assert f"{g0}/snapfile" in keys and "vms/web" in keys
    diffed = json.loads(run(
        bucket, "diff", tmp_path / "m1.sparse", "--base", "web", "--store", store,
        "--sparse-diff", "--compress", "zstd", "--name", "web", "--json",
    ).stdout)
    assert diffed["generation"] == 1 and diffed["parent_build_id"] == g0
    assert diffed["pins"] and list(diffed["pins"]) == [g0]

    report = json.loads(run(bucket, "inspect", "web", "--store", store, "--json").stdout)
    assert report["metadata"]["build_id"] == diffed["build_id"]
    assert {b["build_id"] for b in report["builds"]} >= {g0}
    verified = json.loads(run(bucket, "verify", "web", "--store", store, "--json").stdout)
    assert verified["ok"] and verified["pinned"] and verified["builds_checked"] == 2

    run(bucket, "unpack", "web", "--store", store, "-o", tmp_path / "out1")
    assert (tmp_path / "out1").read_bytes() == mem1.tobytes()
    run(bucket, "unpack", g0, "--store", store, "-o", tmp_path / "out0")
    assert (tmp_path / "out0").read_bytes() == mem0.tobytes()

    squashed = json.loads(run(
        bucket, "squash", "web", "--store", store, "--name", "flat", "--json"
    ).stdout)
    assert squashed["generation"] == 0 and squashed["compression"] == "zstd"
    run(bucket, "unpack", "flat", "--store", store, "-o", tmp_path / "flat")
    assert (tmp_path / "flat").read_bytes() == mem1.tobytes()

    # a Full-file diff over an S3 base reads no parent diff data
    full = json.loads(run(
        bucket, "diff", tmp_path / "m1", "--base", g0, "--store", store, "--json"
    ).stdout)
    assert full["stats"]["bytes_stored"] == diffed["stats"]["bytes_stored"]

    listing = json.loads(run(bucket, "ls", "--store", store, "--json").stdout)
    assert [n["name"] for n in listing["names"]] == ["flat", "web"]
    assert listing["summary"]["builds"] == 4
    on_bucket = sum(o["size"] for o in _objects(bucket) if not o["path"].endswith("/vms/web")
                    and "/vms/" not in o["path"] and not o["path"].endswith("/fcsnap-store.json"))
    assert listing["summary"]["disk_bytes"] == on_bucket
    builds = json.loads(run(bucket, "ls", "--store", store, "--builds", "--json").stdout)
    unreferenced = [b["build_id"] for b in builds["builds"] if b["unreferenced"]]
    assert unreferenced == [full["build_id"]]
    lineage = json.loads(run(bucket, "ls", "web", "--store", store, "--json").stdout)
    assert [g["build_id"] for g in lineage["generations"]] == [diffed["build_id"], g0]

    run(bucket, "rm", "flat", "--store", store)
    assert "vms/flat" not in bucket.listing() and "vms/web" in bucket.listing()
    gone = run(bucket, "rm", "flat", "web", "--store", store, ok=False)
    assert "no VM named 'flat'" in one_line_error(gone)
    assert "vms/web" in bucket.listing()


def _objects(bucket: Bucket) -> list[dict]:
    import obstore

    return [o for batch in obstore.list(bucket.client(), prefix="snaps/") for o in batch]


def start_stopped(bucket: Bucket, *args: object, point: str) -> subprocess.Popen:
    """`fcsnap ARGS` on the bucket's server, stopped (SIGSTOP) at its stop point `point`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcsnap", *map(str, args)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**bucket.env, STOP_ENV: point},
    )
    wait_stopped(proc.pid)
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def test_a_build_killed_before_its_build_json_is_invisible(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.url()
    mem = memfile(tmp_path, "m0", seed=3)
    proc = start_stopped(bucket, "pack", "--init", mem, "--store", store, "--name", "web",
                         point="commit")
    uploaded = bucket.listing()
    build_id = uploaded[0].split("/")[0]
    assert {k.split("/")[1] for k in uploaded} == {"memfile.diff", "memfile.header",
                                                   "memfile.hashes"}
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert bucket.listing() == uploaded  # what a killed writer left: no build.json, no name
    listing = json.loads(run(bucket, "ls", "--store", store, "--builds", "--json").stdout)
    assert listing["builds"] == [] and listing["summary"]["builds"] == 0
    for arg in (build_id, "web"):
        line = one_line_error(run(bucket, "inspect", arg, "--store", store, ok=False))
        assert "not found" in line or "no build or VM named" in line
    # the next pack is unaffected
    run(bucket, "pack", "--init", mem, "--store", store, "--name", "web")
    run(bucket, "verify", "web", "--store", store)


def test_a_pack_killed_mid_upload_leaves_no_object(bucket: Bucket, tmp_path: Path) -> None:
    """Killed while its diff streams up (a multipart upload not completed): nothing visible."""
    store = bucket.url()
    mem = memfile(tmp_path, "m0", seed=4, mib=64)
    proc = start_stopped(bucket, "pack", "--init", mem, "--store", store, "--name", "web",
                         point="uploading")
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert bucket.listing(marker=True) == []  # not even a store was made
    assert "fcsnap init" in one_line_error(run(bucket, "ls", "--store", store, ok=False))


def test_sigterm_during_a_pack_removes_what_it_uploaded(bucket: Bucket, tmp_path: Path) -> None:
    """SIGTERM once the diff, header and sidecar are up (before build.json): the pack removes
    them as a failing pack does, says so in one line and exits 143; the name is not made."""
    store = bucket.url()
    mem = memfile(tmp_path, "m0", seed=5)
    proc = start_stopped(bucket, "pack", "--init", mem, "--store", store, "--name", "web",
                         point="commit")
    assert bucket.listing() != []
    proc.send_signal(signal.SIGTERM)  # pending until it runs again
    status, err = finish(proc)
    assert status == 143 and err.splitlines() == ["fcsnap: terminated"]
    assert bucket.listing() == []


def test_a_failing_pack_removes_what_it_uploaded(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.url()
    (tmp_path / "bad").write_bytes(b"x" * 5000)  # not a multiple of 4 KiB
    line = one_line_error(run(bucket, "pack", "--init", tmp_path / "bad", "--store", store,
                              ok=False))
    assert "fcsnap: error:" in line
    assert bucket.listing() == []


def test_racing_diffs_one_moves_the_name(bucket: Bucket, tmp_path: Path) -> None:
    """Two diffs from the same head: both read the pointer, then both put it conditionally on
    the ETag they read. Exactly one wins; the loser says where the name went and removes its
    build."""
    store = bucket.url()
    mem0 = synthetic_memory(8 * MIB, seed=5)
    write_full(tmp_path / "m0", mem0)
    write_full(tmp_path / "a", evolve(mem0, seed=6)[0])
    write_full(tmp_path / "b", evolve(mem0, seed=7)[0])
    head = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name",
                          "web",
                          "--json").stdout)["build_id"]
    a = start_stopped(bucket, "diff", tmp_path / "a", "--base", "web", "--store", store,
                      "--name", "web", "--json", point="compare-and-swap")
    b = start_stopped(bucket, "diff", tmp_path / "b", "--base", "web", "--store", store,
                      "--name", "web", "--json", point="compare-and-swap")
    status_a, err_a = finish(a)
    status_b, err_b = finish(b)
    assert sorted([status_a, status_b]) == [0, 1], (err_a, err_b)
    loser_err = err_b if status_a == 0 else err_a
    pointer = run(bucket, "inspect", "web", "--store", store, "--json").stdout
    now = json.loads(pointer)["metadata"]["build_id"]
    assert now != head
    assert loser_err.strip() == f"fcsnap: error: web moved to {now} while this diff ran"
    builds = {k.split("/")[0] for k in bucket.listing() if not k.startswith("vms/")}
    assert builds == {head, now}  # the loser's objects are gone
    run(bucket, "verify", "web", "--store", store)


def test_a_name_moved_while_a_diff_ran(bucket: Bucket, tmp_path: Path) -> None:
    store = bucket.url()
    mem0 = synthetic_memory(8 * MIB, seed=8)
    write_full(tmp_path / "m0", mem0)
    write_full(tmp_path / "a", evolve(mem0, seed=9)[0])
    run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name", "web")
    a = start_stopped(bucket, "diff", tmp_path / "a", "--base", "web", "--store", store,
                      "--name", "web", point="publish")
    other = json.loads(run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name",
                           "web",
                           "--json").stdout)["build_id"]
    status, err = finish(a)
    assert status == 1 and err.strip() == f"fcsnap: error: web moved to {other} while this diff ran"
    run(bucket, "rm", "web", "--store", store)
    b = start_stopped(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name", "web",
                      point="publish")
    run(bucket, "pack", "--init", tmp_path / "m0", "--store", store, "--name", "web")
    status, err = finish(b)
    assert status == 1 and "web moved to" in err  # absent at the start: created meanwhile


def test_bad_urls_credentials_and_servers_are_one_line(bucket: Bucket, tmp_path: Path) -> None:
    mem = memfile(tmp_path, "m0", seed=10, mib=1)
    env = bucket.env

    def fails(*args: object, env: dict[str, str] = env) -> str:
        return one_line_error(fcsnap(*args, env=env))

    for url in ("s3://", "s3://A_B/x", "s3://ab", "s3://bucket/a//b", "s3://bucket/../x"):
        assert "invalid store URL" in fails("ls", "--store", url)
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    assert "no S3 credentials" in fails("ls", "--store", bucket.url(), env=bare)
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    assert "S3 refused" in fails("pack", "--init", mem, "--store", bucket.url(), env=wrong)
    assert "does not exist" in fails("ls", "--store", f"s3://missing-{uuid.uuid4().hex[:12]}/x")
    port = free_ports(1)[0]
    dead = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    assert "cannot reach S3 at" in fails("ls", "--store", bucket.url(), env=dead)
    assert time.monotonic() - started < 60
    assert "not an http" in fails("ls", "--store", bucket.url(),
                                  env={**env, "AWS_ENDPOINT_URL": "ftp://x"})


def test_an_s3_url_never_becomes_a_local_directory(bucket: Bucket, tmp_path: Path) -> None:
    """Before S3 stores, `--store s3://b/p` made a directory named `s3:` in the working
    directory; now every command reaches the server or fails in one line, leaving cwd alone."""
    mem = memfile(tmp_path, "m0", seed=11, mib=1)
    work = tmp_path / "cwd"
    work.mkdir()
    missing = f"s3://missing-{uuid.uuid4().hex[:12]}/p"

    def fcsnap_in_cwd(*args: object) -> subprocess.CompletedProcess:
        return fcsnap_here(*args, cwd=work, env=bucket.env, timeout=TIMEOUT)

    for args in (("ls", "--store", missing), ("inspect", "web", "--store", missing),
                 ("gc", "--store", missing), ("rm", "web", "--store", missing)):
        assert "does not exist" in one_line_error(fcsnap_in_cwd(*args)), args
    packed = fcsnap_in_cwd("pack", "--init", mem, "--store", missing)  # SeaweedFS makes the bucket
    assert packed.returncode == 0 or "does not exist" in one_line_error(packed)
    assert list(work.iterdir()) == []


def test_a_huge_pointer_is_refused_without_being_downloaded(bucket: Bucket, tmp_path: Path
                                                            ) -> None:
    """Whoever can write the bucket puts 160 MiB where a VM pointer belongs: `ls` lists the
    name as damaged, naming the object, and a restore of it is refused in one line; neither
    reads more of it than a pointer may be (the process's peak memory stays far below the
    object's size)."""
    run(bucket, "init", bucket.url())
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(160 * MIB)
    import obstore

    obstore.put(bucket.client(), "snaps/vms/web", huge, chunk_size=16 * MIB)
    probe = (  # its peak (VmHWM: ru_maxrss would count the memory of the test it forked from)
        "import re, sys\n"
        "from fcsnap.cli import main\n"
        "try:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]\n"
        "print(peak, code, file=sys.stderr)\n"
    )
    pointer = f"{bucket.url()}/vms/web"
    for args, status, error in (
        (["ls", "--store", bucket.url()], "0", f"web: {pointer} does not hold a build id"),
        (["restore", "web", "--store", bucket.url(), "--socket", str(tmp_path / "s")], "1",
         f"fcsnap: error: {pointer} is not a VM pointer (too big)"),
    ):
        result = subprocess.run([sys.executable, "-c", probe, *args], env=bucket.env,
                                capture_output=True, text=True, timeout=TIMEOUT)
        *lines, peak = result.stderr.strip().splitlines()
        peak_kib, code = peak.split()
        said = lines if status == "1" else result.stdout.splitlines()  # ls: in its listing
        assert code == status and error in said, (result.stdout, result.stderr)
        assert status == "0" or len(lines) == 1
        assert int(peak_kib) < 120 * 1024, f"{args[0]}: peak {int(peak_kib) >> 10} MiB"
