"""What a newcomer expects of the command line: restore takes its build like every command,
FCSNAP_STORE, a client for the daemon, a word on unnamed builds, --json everywhere with a
schema version."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fcsnap_here, one_build_store, wait_for
from test_daemon import WAIT, Daemon

from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.workingset import write_working_set


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_build_store(tmp_path_factory.mktemp("newcomer"), 256 << 10, seed=7)


def fcsnap(*args: object, cwd: Path, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """A command in this process (the same entry point, exit status and output), without
    FCSNAP_STORE unless `env` sets it."""
    environment = {k: v for k, v in os.environ.items() if k != "FCSNAP_STORE"}
    return fcsnap_here(*args, cwd=cwd, env=environment | (env or {}), timeout=WAIT)


def listen(argv: list[str], socket: Path, cwd: Path, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """Run `fcsnap restore ...` until it serves (its first line on stderr: it announces
    itself, or fails; quiet, it says nothing: until its socket listens), then SIGTERM it;
    its outcome."""
    environment = {k: v for k, v in os.environ.items() if k != "FCSNAP_STORE"}
    proc = subprocess.Popen([sys.executable, "-m", "fcsnap", "restore", *argv], cwd=cwd,
                            env=environment | (env or {}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: socket.exists() or proc.poll() is not None, "the restore socket")
        assert proc.stderr is not None
        quiet = "-q" in argv or "--quiet" in argv
        said = not quiet and select.select([proc.stderr], [], [], WAIT)[0] and \
            proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
        err = (said or "") + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_restore_takes_its_build_as_an_argument(store: Path, tmp_path: Path) -> None:
    done = listen(["vm", "--store", store, "--socket", tmp_path / "a.sock"], tmp_path / "a.sock",
                  tmp_path)
    assert done.returncode == 0 and "serving" in done.stderr, done.stderr
    old = listen(["--vm", "vm", "--store", store, "--socket", tmp_path / "b.sock"],
                 tmp_path / "b.sock", tmp_path)
    assert old.returncode == 0, old.stderr
    nope = fcsnap("restore", "nope", "--store", store, "--socket", tmp_path / "c.sock",
                  cwd=tmp_path)
    assert nope.returncode == 1 and "no build or VM named 'nope'" in nope.stderr
    for argv, says in ((["--store", store], "Missing argument 'BUILD'"),
                       (["vm", "--vm", "other", "--store", store], "differ")):
        refused = fcsnap("restore", *argv, "--socket", tmp_path / "d.sock", cwd=tmp_path)
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
    assert not (tmp_path / "c.sock").exists() and not (tmp_path / "d.sock").exists()


def test_restore_json_prints_its_final_statistics(store: Path, tmp_path: Path) -> None:
    done = listen(["vm", "--store", store, "--socket", tmp_path / "s", "--json", "-q"],
                  tmp_path / "s", tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["schema"] == 1 and stats["status"] == 0 and stats["faults"] == 0
    assert stats["exit_reason"] == "stopped before a VM was served"


def test_fcsnap_store_is_the_default_store(store: Path, tmp_path: Path) -> None:
    env = {"FCSNAP_STORE": str(store)}
    shown = fcsnap("inspect", "vm", "--json", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["metadata"]["generation"] == 0
    write_full(tmp_path / "mem", synthetic_memory(64 << 10, seed=8))
    packed = fcsnap("pack", "--init", "mem", "--name", "other", "-q", cwd=tmp_path,
                    env={"FCSNAP_STORE": "st"})
    assert packed.returncode == 0 and (tmp_path / "st" / "vms" / "other").exists()
    given = fcsnap("ls", "--store", "st", "--json", cwd=tmp_path, env=env)  # the option wins
    assert [n["name"] for n in json.loads(given.stdout)["names"]] == ["other"]
    assert "FCSNAP_STORE" in fcsnap("ls", "--help", cwd=tmp_path).stdout
    listened = listen(["vm", "--socket", tmp_path / "s"], tmp_path / "s", tmp_path, env=env)
    assert listened.returncode == 0, listened.stderr


def test_ps_and_stop_drive_the_daemon(store: Path, tmp_path: Path) -> None:
    daemon = Daemon(store, tmp_path)
    try:
        restore_id = daemon.restore("vm", "one")["id"]
        table = fcsnap("ps", "--daemon", daemon.api, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert restore_id in table.stdout and "listening" in table.stdout, table.stdout
        listed = json.loads(fcsnap("ps", "--daemon", daemon.api, "--json", cwd=tmp_path).stdout)
        assert listed["schema"] == 1
        assert [(r["id"], r["vm"]) for r in listed["restores"]] == [(restore_id, "vm")]
        stopped = fcsnap("stop", "--daemon", daemon.api, restore_id, "--json", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(stopped.stdout)["state"] == "ended"
        unknown = fcsnap("stop", "--daemon", daemon.api, "nosuch", cwd=tmp_path)
        assert unknown.returncode == 1
        assert unknown.stderr == "fcsnap: error: no restore 'nosuch'\n"
    finally:
        code, lines = daemon.stop()
        daemon.close()
    assert code == 0, lines
    gone = fcsnap("ps", "--daemon", daemon.api, cwd=tmp_path)
    assert gone.returncode == 1 and "cannot reach the fcsnap daemon" in gone.stderr


def test_an_unnamed_build_is_said_to_be_collected(tmp_path: Path) -> None:
    write_full(tmp_path / "mem", synthetic_memory(64 << 10, seed=9))
    packed = fcsnap("pack", "--init", "mem", "--store", "st", cwd=tmp_path)
    assert packed.returncode == 0 and "'fcsnap gc' removes it" in packed.stderr
    build = packed.stdout.split()[2]
    diffed = fcsnap("diff", "mem", "--base", build, "--store", "st", cwd=tmp_path)
    assert diffed.returncode == 0 and "'fcsnap gc' removes it" in diffed.stderr
    named = fcsnap("pack", "--init", "mem", "--store", "st", "--name", "web", cwd=tmp_path)
    assert named.returncode == 0 and "gc" not in named.stderr


def test_more_commands_take_json(store: Path, tmp_path: Path) -> None:
    unpacked = fcsnap("unpack", "vm", "--store", store, "-o", "out", "--json", cwd=tmp_path)
    assert json.loads(unpacked.stdout) == {
        "schema": 1, "output": "out", "size": (tmp_path / "out").stat().st_size}
    write_working_set(tmp_path / "a.ws", 1 << 20, [0, 4096, 8192])
    write_working_set(tmp_path / "b.ws", 1 << 20, [4096, 0])
    merged = fcsnap("ws", "merge", "a.ws", "b.ws", "-o", "m.ws", "--json", cwd=tmp_path)
    assert json.loads(merged.stdout) == {
        "schema": 1, "output": "m.ws", "pages": 2, "runs": 2, "min_runs": 2}
    write_full(tmp_path / "mem", synthetic_memory(64 << 10, seed=10))
    fcsnap("pack", "--init", "mem", "--store", "st", "--name", "web", "-q", cwd=tmp_path)
    head = json.loads(fcsnap("ls", "--store", "st", "--json", cwd=tmp_path).stdout
                      )["names"][0]["head"]
    removed = fcsnap("rm", "web", "--store", "st", "--json", cwd=tmp_path)
    assert json.loads(removed.stdout) == {"schema": 1, "removed": [{"name": "web",
                                                                    "head": head}]}


@pytest.mark.parametrize("argv", [
    ["inspect", "vm"], ["verify", "vm"], ["ls"], ["ls", "--builds"], ["ls", "vm"],
    ["gc", "--dry-run"],
])
def test_every_json_document_carries_its_schema(store: Path, argv: list[str]) -> None:
    done = fcsnap(*argv, "--store", store, "--json", cwd=store.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema"] == 1
