"""`fcsnap serve`: one daemon restores many VMs at once, each failure ending its own restore.

Real parts throughout: the daemon is its own process (`python -m fcsnap serve`), every VM is
the Firecracker stand-in (some reading through a KVM vCPU) with real userfaultfd, its bytes
compared with the memory file. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import fcsnap_here
from prometheus_client.parser import text_string_to_metric_families
from test_restore_faults import KILLED, WAIT
from test_watchdog import wait_dead

from fcsnap.daemon.client import call_daemon
from fcsnap.header import load_header
from fcsnap.store.format.layout import diff_path
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing import firecracker
from fcsnap.testing.firecracker_api import FAULT, FakeFirecracker
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.units import PAGE

MiB = 1 << 20
SIZE = 8 * MiB
DEADLINE = 1.0  # seconds from the daemon's SIGKILL to its VMs' deaths (the watchdog)
HAS_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


@dataclass(frozen=True)
class Build:
    name: str  # its name in the store
    build_id: str
    expected: Path  # the memory file it holds


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Build]]:
    """One store, three VMs: "raw" (two generations, raw), "zstd" (one, compressed) and
    "victim" (raw, on its own lineage: a test corrupts it)."""
    root = tmp_path_factory.mktemp("daemon")
    store = root / "store"
    builds = {}
    for seed, (name, compression) in enumerate(
            [("raw", "none"), ("zstd", "zstd"), ("victim", "none")]):
        mem = synthetic_memory(SIZE, seed=40 + seed)
        write_full(root / f"{name}0.mem", mem)
        head = ops.pack(root / f"{name}0.mem", store, BuildOptions(compression=compression,
                                                                   name=name))[1]
        expected = root / f"{name}0.mem"
        if name == "raw":
            new, _ = evolve(mem, seed=50, dirty_share=0.2)
            write_full(root / "raw1.mem", new)
            head = ops.diff(root / "raw1.mem", head, store, BuildOptions(name=name))[1]
            expected = root / "raw1.mem"
        builds[name] = Build(name, head.name, expected)
    return store, builds


class Daemon:
    """A `fcsnap serve` process and a client for its API."""

    def __init__(self, store: Path, tmp: Path, *args: str, prefix: tuple[str, ...] = ()
                 ) -> None:
        """`prefix`: a command the daemon runs under (e.g. setpriv)."""
        self.api = tmp / "api.sock"
        self.tmp = tmp
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fcsnap", "serve", "--store", str(store), "--api",
             str(self.api), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self.vms: list[subprocess.Popen[bytes]] = []
        deadline = time.monotonic() + WAIT
        while not self.api.exists():
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "the daemon never listened"
            time.sleep(0.01)

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        return call_daemon(self.api, method, path, body, WAIT)

    def restore(self, vm: str, name: str, **options: Any) -> dict[str, Any]:
        status, answer = self.call("POST", "/restores", {
            "vm": vm, "socket": str(self.tmp / f"{name}.sock"), **options})
        assert status == 201, answer
        assert Path(answer["socket"]).exists()  # it listens before the answer
        return answer

    def vm(self, name: str, build: Build, **options: Any) -> subprocess.Popen[bytes]:
        options.setdefault("deadline", WAIT)
        proc = firecracker.spawn(self.tmp / f"{name}.sock", expected=build.expected,
                                 report=self.tmp / f"{name}.json", popen={
                                     "stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE},
                                 **options)
        self.vms.append(proc)
        return proc

    def report(self, name: str) -> dict[str, Any] | None:
        path = self.tmp / f"{name}.json"
        return firecracker.read_report(path) if path.exists() else None

    def wait_ended(self, restore_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            status, document = self.call("GET", f"/restores/{restore_id}")
            assert status == 200, document
            if document["state"] == "ended":
                return document
            assert time.monotonic() < deadline, f"restore {restore_id} never ended"
            time.sleep(0.02)

    def metrics_text(self) -> str:
        """GET /metrics: Prometheus's text format (it is not JSON, unlike `call`'s answers)."""
        from fcsnap.unix_http import UnixHTTPConnection, exchange

        connection = UnixHTTPConnection(self.api, WAIT)
        try:
            answer, body = exchange(connection, "GET", "/metrics", b"", {}, 1 << 20)
        finally:
            connection.close()
        assert answer.status == 200
        assert answer.getheader("Content-Type", "").startswith("text/plain")
        return body.decode()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        connection_status, _ = self.call("GET", "/healthz")
        assert connection_status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.metrics_text())
                for s in family.samples}

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, list[str]]:
        self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=WAIT)
        return self.proc.returncode, err.decode().splitlines()

    def close(self) -> None:
        for proc in [self.proc, *self.vms]:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=WAIT)


@pytest.fixture
def daemon(store, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(store[0], tmp_path, "--output-dir", str(tmp_path))
    yield d
    d.close()


@pytest.fixture(scope="module")
def refusing_daemon(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the tests of requests it refuses: each checks that its refusal left
    no restore behind, so the next finds the daemon as it started."""
    tmp = tmp_path_factory.mktemp("refusing")
    d = Daemon(store[0], tmp, "--output-dir", str(tmp))
    yield d
    d.close()


def test_sixteen_vms_from_two_builds_while_others_fail(store, daemon: Daemon) -> None:
    """16 VMs from a raw and a zstd build at once, every byte checked (two of them read
    through a KVM vCPU); beside them one VM is killed mid-serving, one sends a bad
    handshake, one reads a corrupt block under --verify and one balloons. Each failure ends
    its own restore, with its reason; the 16 and the balloon finish correctly."""
    _, builds = store
    victim = builds["victim"]
    stored = next(m for m in load_header(Path(store[0]) / victim.build_id).mappings
                  if not m.is_zero)
    path = diff_path(Path(store[0]) / victim.build_id)
    path.chmod(0o644)
    with path.open("r+b") as f:  # one byte of one stored block, before anything reads it
        f.seek(stored.storage_offset + 100)
        byte = f.read(1)[0]
        f.seek(stored.storage_offset + 100)
        f.write(bytes([byte ^ 0xFF]))
    ids: dict[str, str] = {}
    for i in range(16):
        build = builds["raw" if i % 2 else "zstd"]
        ids[f"vm{i}"] = daemon.restore(build.name, f"vm{i}")["id"]
    ids["killed"] = daemon.restore("raw", "killed")["id"]
    ids["garbage"] = daemon.restore("raw", "garbage", handshake_timeout=5)["id"]
    ids["corrupt"] = daemon.restore("victim", "corrupt", verify=True)["id"]
    ids["balloon"] = daemon.restore("zstd", "balloon", fault_around="0")["id"]
    procs = {}
    for i in range(16):
        build = builds["raw" if i % 2 else "zstd"]
        kvm = HAS_KVM and i < 2
        procs[f"vm{i}"] = daemon.vm(f"vm{i}", build, threads=0 if kvm else 2, kvm=kvm,
                                    order="random")
    procs["killed"] = daemon.vm("killed", builds["raw"], start_delay=WAIT, hold=WAIT)
    procs["garbage"] = daemon.vm("garbage", builds["raw"], misbehave="garbage")
    procs["corrupt"] = daemon.vm("corrupt", victim, threads=2)
    procs["balloon"] = daemon.vm("balloon", builds["zstd"], threads=4, order="random",
                                 balloon=[(PAGE, 2 * MiB)], balloon_cycles=2)
    deadline = time.monotonic() + WAIT
    while daemon.call("GET", f"/restores/{ids['killed']}")[1]["state"] != "serving":
        assert time.monotonic() < deadline, "the VM to be killed was never served"
        time.sleep(0.02)
    procs["killed"].kill()
    for proc in procs.values():
        proc.communicate(timeout=2 * WAIT)
    for i in range(16):
        name = f"vm{i}"
        assert procs[name].returncode == 0, (name, daemon.report(name))
        report = daemon.report(name)
        assert report is not None and report["mismatches"] == 0
        if HAS_KVM and i < 2:
            assert report["kvm"]["ok"] is True
        else:
            assert report["pages_touched"] == SIZE // PAGE
        assert daemon.wait_ended(ids[name])["exit_reason"] == "vm exited"
    balloon = daemon.report("balloon")
    assert procs["balloon"].returncode == 0 and balloon is not None
    assert balloon["balloon_ok"] is True and balloon["mismatches"] == 0
    assert daemon.wait_ended(ids["balloon"])["remove_events"] == 2 * (2 * MiB // PAGE)
    assert daemon.wait_ended(ids["killed"])["exit_reason"] == "vm exited"
    garbage = daemon.wait_ended(ids["garbage"])["exit_reason"]
    assert garbage.startswith("error: handshake is not a JSON region array"), garbage
    assert procs["garbage"].returncode == KILLED
    corrupt = daemon.wait_ended(ids["corrupt"])["exit_reason"]
    assert "does not match its hash" in corrupt and victim.build_id in corrupt, corrupt
    assert procs["corrupt"].returncode == KILLED
    report = daemon.report("corrupt")
    assert report is None or report["mismatches"] == 0
    status, health = daemon.call("GET", "/healthz")
    assert status == 200 and health["restores_active"] == 0
    metrics = daemon.metrics()
    assert metrics["fcsnap_restores_ended_total", (("reason", "vm_exited"),)] == 18
    assert metrics["fcsnap_restores_ended_total", (("reason", "error"),)] == 2
    assert metrics["fcsnap_build_opens_total", ()] <= 4 + 3  # shared, not one per VM
    code, lines = daemon.stop()
    assert code == 0
    ended = [line for line in lines if " ended: " in line]
    assert len(ended) == 20  # one line per restore


def test_metrics_count_what_the_restores_served(store, daemon: Daemon) -> None:
    """/metrics, parsed by prometheus-client's own parser, adds up each build's restores; the
    second VM of a zstd build is served from the frames the first decompressed."""
    _, builds = store
    first = daemon.restore("zstd", "one")
    second = daemon.restore("zstd", "two")  # the build stays open while either needs it
    assert daemon.vm("one", builds["zstd"], threads=2).wait(WAIT) == 0
    one = daemon.wait_ended(first["id"])
    before = daemon.metrics()
    misses = before["fcsnap_cache_misses_total", ()]
    assert misses > 0
    assert 0 < before["fcsnap_cache_bytes", ()] <= before["fcsnap_cache_budget_bytes", ()]
    assert daemon.vm("two", builds["zstd"], threads=2).wait(WAIT) == 0
    two = daemon.wait_ended(second["id"])
    metrics = daemon.metrics()
    assert metrics["fcsnap_cache_misses_total", ()] == misses  # nothing decompressed twice
    assert metrics["fcsnap_cache_hits_total", ()] >= misses
    label = (("build_id", builds["zstd"].build_id),)
    assert metrics["fcsnap_pages_served_total", label] == (
        one["pages_served"] + two["pages_served"])
    assert metrics["fcsnap_faults_total", label] == one["faults"] + two["faults"]
    assert metrics["fcsnap_zero_pages_total", label] == one["zero_pages"] + two["zero_pages"]
    assert metrics["fcsnap_restores_active", ()] == 0
    assert metrics["fcsnap_restores_ended_total", (("reason", "vm_exited"),)] == 2
    assert metrics["fcsnap_fault_service_seconds_count", label] == one["faults"] + two["faults"]
    assert metrics["fcsnap_builds_open", ()] == 0  # the last VM closed it


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"socket": "/tmp/x.sock"}, 400, "vm is required"),
    ({"vm": "raw"}, 400, "socket is required"),
    ({"vm": "raw", "socket": "rel.sock"}, 400, "must be an absolute path"),
    ({"vm": "raw", "socket": "/tmp/x.sock", "verfy": True}, 400, "unknown key 'verfy'"),
    ({"vm": "raw", "socket": "/tmp/x.sock", "eager": "yes"}, 400, "eager must be true"),
    ({"vm": "nosuch", "socket": "/tmp/x.sock"}, 404, "no build or VM named 'nosuch'"),
    ({"vm": "raw", "socket": "/tmp/x.sock", "fault_around": "lots"}, 400, "fault-around"),
    ({"vm": "raw", "socket": "/tmp/x.sock", "vmstate": "/tmp/v"}, 400, "need --firecracker-api"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_are_one_line_and_listen_on_nothing(refusing_daemon: Daemon, body, status,
                                                         says) -> None:
    daemon = refusing_daemon
    got, answer = daemon.call("POST", "/restores", body)
    assert got == status and says in answer["error"], answer
    assert "\n" not in answer["error"]
    assert not Path("/tmp/x.sock").exists()
    assert daemon.call("GET", "/restores") == (200, [])


def test_api_errors(store, daemon: Daemon, tmp_path: Path) -> None:
    """Unknown ids and paths, wrong methods, a socket in use, a --stats directory that does
    not exist: 4xx with one line, nothing left listening, the daemon serves on."""
    _, builds = store
    assert daemon.call("GET", "/restores/nosuch")[0] == 404
    assert daemon.call("DELETE", "/restores/nosuch")[0] == 404
    assert daemon.call("GET", "/nothing")[0] == 404
    assert daemon.call("PUT", "/restores")[0] == 405
    assert daemon.call("POST", "/metrics", {})[0] == 405
    live = daemon.restore("raw", "busy")
    status, answer = daemon.call("POST", "/restores", {"vm": "raw", "socket": live["socket"]})
    assert status == 400 and "is the socket of a running process" in answer["error"]
    status, answer = daemon.call("POST", "/restores", {
        "vm": "raw", "socket": str(tmp_path / "s.sock"), "stats": str(tmp_path / "no/s.json")})
    assert status == 400 and "cannot write --stats" in answer["error"]
    assert not (tmp_path / "s.sock").exists()
    connection = socket.socket(socket.AF_UNIX)
    connection.settimeout(WAIT)
    connection.connect(str(daemon.api))
    connection.sendall(b"POST /restores HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{nope")
    assert connection.recv(4096).startswith(b"HTTP/1.1 400")
    connection.close()
    listed = daemon.call("GET", "/restores")[1]
    assert [r["id"] for r in listed] == [live["id"]] and listed[0]["state"] == "listening"
    assert listed[0]["exit_reason"] is None  # not ended
    assert daemon.vm("busy", builds["raw"], threads=2).wait(WAIT) == 0
    assert daemon.wait_ended(live["id"])["exit_reason"] == "vm exited"


def test_delete_ends_a_restore_and_kills_its_vm(store, daemon: Daemon) -> None:
    """DELETE ends a restore as SIGTERM ends `restore`: a VM that still needs pages is
    killed, its socket removed; a restore nobody connected to just stops listening."""
    _, builds = store
    served = daemon.restore("raw", "held")
    idle = daemon.restore("raw", "idle")
    vm = daemon.vm("held", builds["raw"], start_delay=WAIT, hold=WAIT)
    deadline = time.monotonic() + WAIT
    while daemon.call("GET", f"/restores/{served['id']}")[1]["state"] != "serving":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    listed = {r["id"]: r for r in daemon.call("GET", "/restores")[1]}
    assert (listed[served["id"]]["state"], listed[served["id"]]["exit_reason"]) == (
        "serving", None)
    assert daemon.call("GET", f"/restores/{served['id']}")[1]["exit_reason"] is None
    status, document = daemon.call("DELETE", f"/restores/{served['id']}")
    assert status == 200 and document["exit_reason"] == "deleted"
    assert vm.wait(WAIT) == KILLED
    assert not Path(served["socket"]).exists()
    status, document = daemon.call("DELETE", f"/restores/{idle['id']}")
    assert status == 200 and document["exit_reason"] == "stopped before a VM was served"
    assert not Path(idle["socket"]).exists()


def test_sigterm_ends_every_restore(store, daemon: Daemon) -> None:
    """SIGTERM: no new restores, every VM that needs pages killed, sockets removed, exit 0."""
    _, builds = store
    answers = [daemon.restore("raw", f"t{i}") for i in range(3)]
    vms = [daemon.vm(f"t{i}", builds["raw"], start_delay=WAIT, hold=WAIT) for i in range(2)]
    deadline = time.monotonic() + WAIT
    while sum(r["state"] == "serving" for r in daemon.call("GET", "/restores")[1]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    code, lines = daemon.stop()
    assert code == 0, lines
    assert all(vm.wait(WAIT) == KILLED for vm in vms)
    assert not any(Path(a["socket"]).exists() for a in answers)
    assert not daemon.api.exists()
    assert sum("ended: daemon stopped" in line for line in lines) == 2, lines


def test_sigkill_of_the_daemon_kills_its_vms_through_the_watchdog(store, daemon: Daemon
                                                                  ) -> None:
    """A SIGKILLed daemon cannot kill its VMs: its one watchdog kills every VM that still
    needed it, within a second."""
    _, builds = store
    for i in range(3):
        daemon.restore("raw", f"k{i}")
    vms = [daemon.vm(f"k{i}", builds["raw"], start_delay=WAIT, hold=WAIT) for i in range(3)]
    deadline = time.monotonic() + WAIT
    while sum(r["state"] == "serving" for r in daemon.call("GET", "/restores")[1]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon.proc.kill()
    daemon.proc.wait(WAIT)
    for vm in vms:
        took = wait_dead(vm.pid, WAIT)
        assert took is not None and took < DEADLINE, f"a VM was still alive after {took}s"
        assert vm.wait(WAIT) == KILLED


def test_restore_daemon_flag_prints_the_id_once_listening(store, daemon: Daemon, tmp_path
                                                          ) -> None:
    """`fcsnap restore --daemon API` asks the daemon, prints the id, exits 0 with the socket
    listening; its refusals are one line and exit 1."""
    _, builds = store
    stats = tmp_path / "flag.stats.json"
    done = fcsnap_here("restore", "--daemon", daemon.api, "--vm", "raw", "--socket",
                       tmp_path / "flag.sock", "--stats", stats, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    restore_id = done.stdout.strip()
    assert (tmp_path / "flag.sock").exists()
    assert daemon.vm("flag", builds["raw"], threads=2).wait(WAIT) == 0
    assert daemon.wait_ended(restore_id)["exit_reason"] == "vm exited"
    assert json.loads(stats.read_text())["exit_reason"] == "vm exited"
    refused = fcsnap_here("restore", "--daemon", daemon.api, "--vm", "nosuch", "--socket",
                          tmp_path / "no.sock", timeout=WAIT)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        "fcsnap: error: the daemon refused the restore: no build or VM named 'nosuch' in store "
        f"{store[0]}"]


def test_serve_refuses_a_bad_store_or_a_socket_in_use(store, daemon: Daemon, tmp_path: Path
                                                      ) -> None:
    """`fcsnap serve` with no such store, or on the API socket of a running daemon: one line,
    exit 1, the running daemon untouched."""
    for args, says in [
        (["--store", str(tmp_path / "none"), "--api", str(tmp_path / "a.sock")],
         "does not exist"),
        (["--store", str(store[0]), "--api", str(daemon.api)],
         "is the socket of a running process"),
    ]:
        done = subprocess.run([sys.executable, "-m", "fcsnap", "serve", *args],
                              capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fcsnap: error: ") and says in lines[0]
    assert daemon.call("GET", "/healthz")[0] == 200
    usage = subprocess.run(
        [sys.executable, "-m", "fcsnap", "restore", "--daemon", str(daemon.api), "--vm", "raw",
         "--socket", str(tmp_path / "u.sock"), "--store", str(store[0])],
        capture_output=True, text=True, timeout=WAIT)
    assert usage.returncode == 2 and "the daemon serves its own store" in usage.stderr


def test_firecracker_api_load_from_the_daemon(store, daemon: Daemon, tmp_path: Path) -> None:
    """With `firecracker_api`, the daemon has Firecracker load the snapshot once the socket
    listens and answers the POST once Firecracker has answered: 201 once loaded (the VM it
    connected is served every byte), 502 with Firecracker's fault_message if refused (that
    restore ends with it, its VM is killed), and the daemon serves on."""
    _, builds = store
    vmstate = tmp_path / "vm.state"
    vmstate.write_bytes(b"state")
    answers = {}
    fakes = {}
    try:
        for behaviour in ("load", "refuse-late"):
            fakes[behaviour] = FakeFirecracker(
                tmp_path / f"{behaviour}.api", behaviour, builds["raw"].expected,
                tmp_path / f"{behaviour}.json")
            answers[behaviour] = daemon.call("POST", "/restores", {
                "vm": "raw", "socket": str(tmp_path / f"{behaviour}.sock"),
                "vmstate": str(vmstate), "firecracker_api": str(tmp_path / f"{behaviour}.api")})
        status, answer = answers["load"]
        assert status == 201, answer
        loaded = daemon.wait_ended(answer["id"])
        status, answer = answers["refuse-late"]
        error = f"Firecracker refused the snapshot load: {FAULT}"
        assert (status, answer["error"]) == (502, error)
        refused = daemon.wait_ended(answer["id"])
    finally:
        for fake in fakes.values():
            fake.close()
    assert fakes["load"].problems == [] and fakes["load"].vm is not None
    assert fakes["load"].vm.wait(WAIT) == 0
    assert fakes["load"].body["mem_backend"]["backend_path"] == str(tmp_path / "load.sock")
    assert loaded["exit_reason"] == "vm exited"
    assert firecracker.read_report(tmp_path / "load.json")["mismatches"] == 0
    assert refused["exit_reason"] == f"error: {error}"
    assert fakes["refuse-late"].vm is not None
    assert fakes["refuse-late"].vm.wait(WAIT) == KILLED
    assert daemon.call("GET", "/healthz")[0] == 200


@pytest.mark.parametrize("behaviour", ["load", "refuse-early", "refuse-late"])
def test_restore_via_daemon_waits_for_the_load(store, daemon: Daemon, tmp_path: Path,
                                               behaviour: str) -> None:
    """`restore --daemon --firecracker-api` exits once Firecracker has answered the load: 0
    with the restore's id once loaded, 1 with Firecracker's fault_message if refused."""
    _, builds = store
    (tmp_path / "vm.state").write_bytes(b"state")
    fake = FakeFirecracker(tmp_path / "fc.api", behaviour, builds["raw"].expected,
                           tmp_path / "vm.json")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fcsnap", "restore", "--daemon", str(daemon.api), "--vm",
             "raw", "--socket", str(tmp_path / "u.sock"), "--firecracker-api",
             str(tmp_path / "fc.api"), "--vmstate", str(tmp_path / "vm.state")],
            capture_output=True, text=True, timeout=WAIT)
    finally:
        fake.close()
    assert fake.problems == []
    if behaviour == "load":
        assert done.returncode == 0, done.stderr
        assert daemon.wait_ended(done.stdout.strip())["exit_reason"] == "vm exited"
    else:
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr.splitlines() == [
            f"fcsnap: error: Firecracker refused the snapshot load: {FAULT}"]
        assert not (tmp_path / "u.sock").exists()
