"""`fcsnap restore --firecracker-api`: the snapshot load request, against a fake Firecracker.

The fake (fcsnap.testing.firecracker_api) serves Firecracker's API socket in a thread of the
test: it checks the request as Firecracker parses it, then behaves as Firecracker does - it
connects a VM (the stand-in, its own process) to the page server and answers only once the
server has accepted that VM, so a restore that waited for the answer before accepting would
hang. Every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import restore_argv

from fcsnap.store.format.layout import SNAPFILE
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing import firecracker
from fcsnap.testing.firecracker_api import FAULT, FakeFirecracker, RawAnswer, answer
from fcsnap.testing.firecracker_schema import NEWEST, OLDEST, PREFIX, load_error
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd.firecracker_api import load_body

SIZE = 1 << 20  # guest memory: 256 pages
WAIT = 30.0  # seconds any one step may take before the test fails


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(build directory packed with a snapfile, the memory file it serves)."""
    root = tmp_path_factory.mktemp("api")
    memfile, vmstate = root / "mem.bin", root / "vm.state"
    write_full(memfile, synthetic_memory(SIZE, seed=7))
    vmstate.write_bytes(b"vmstate")
    _, path = ops.pack(memfile, root / "store", BuildOptions(vmstate=vmstate))
    assert (path / SNAPFILE).is_file()
    return path, memfile


@pytest.fixture
def fakes() -> Iterator[list[FakeFirecracker]]:
    """Fake APIs made by a test, closed (and their VMs killed) at its end."""
    made: list[FakeFirecracker] = []
    yield made
    for fake in made:
        fake.close()


def restore(cwd: Path, build_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `fcsnap restore` on uffd.sock in `cwd` to its end (it serves one VM, or fails)."""
    argv = restore_argv(build_dir, Path("uffd.sock"), *args, quiet=False)
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"restore did not finish in {WAIT}s: {argv}")


@pytest.mark.parametrize(
    ("version", "explicit", "dirty_key"),
    [pytest.param("1.12.1", False, "enable_diff_snapshots", id="1.12-snapfile"),
     pytest.param("1.12.1", True, "enable_diff_snapshots", id="1.12-vmstate",
                  marks=pytest.mark.slow),  # an explicit --vmstate with the old key: as 1.1
     pytest.param("1.1.0", True, "enable_diff_snapshots", id="1.1"),
     pytest.param("1.13.0", True, "track_dirty_pages", id="1.13"),
     pytest.param("1.16.1", False, "track_dirty_pages", id="1.16")],
)
def test_load_resumes_vm_served_by_restore(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker], version: str,
    explicit: bool, dirty_key: str,
) -> None:
    """Restore asks Firecracker its version and sends a body that release accepts (dirty page
    tracking under the name it knows), paths absolute; the VM it makes Firecracker connect is
    served every byte while the request waits for its answer."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", "load", memfile, tmp_path / "vm.json",
                           version=version)
    fakes.append(fake)
    (tmp_path / "other.state").write_bytes(b"other")
    extra = ["--vmstate", "other.state", "--track-dirty-pages"] if explicit else []
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", *extra)
    fake.close()
    assert result.returncode == 0, result.stderr
    assert "fcsnap: Firecracker loaded the snapshot (HTTP 204)" in result.stderr
    assert fake.problems == [] and fake.versions_asked == 1
    assert fake.body == {
        "snapshot_path": str(tmp_path / "other.state" if explicit else build_dir / SNAPFILE),
        "mem_backend": {"backend_type": "Uffd", "backend_path": str(tmp_path / "uffd.sock")},
        dirty_key: explicit,
        "resume_vm": True,
    }
    assert fake.vm is not None and fake.vm.wait(WAIT) == 0
    report = firecracker.read_report(tmp_path / "vm.json")
    assert report["mismatches"] == 0
    assert report["pages_touched"] == SIZE // 4096


@pytest.mark.parametrize("behaviour", ["refuse-early", "refuse-late"])
def test_refused_load_fails_restore_and_kills_vm(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker], behaviour: str
) -> None:
    """Firecracker's 400 ends the restore with its fault_message, before a VM connected or
    after: a connected VM is killed, as it will never run."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", behaviour, memfile, tmp_path / "vm.json")
    fakes.append(fake)
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", "--quiet")
    fake.close()
    assert fake.problems == []
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"fcsnap: error: Firecracker refused the snapshot load: {FAULT}"
    ]
    assert not (tmp_path / "uffd.sock").exists()
    if behaviour == "refuse-late":
        assert fake.vm is not None and fake.vm.wait(WAIT) == -signal.SIGKILL
    else:
        assert fake.vm is None


def test_unanswered_load_fails_restore(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker]
) -> None:
    """A VM served to its end while Firecracker never answered the load: restore cannot say
    the snapshot loaded, so it fails (after a short grace, not the whole --api-timeout)."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", "silent", memfile, tmp_path / "vm.json")
    fakes.append(fake)
    started = time.monotonic()
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", "--quiet")
    assert time.monotonic() - started < WAIT / 2
    fake.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "fcsnap: error: Firecracker had not answered the snapshot load when serving ended"
    ]
    assert fake.vm is not None and fake.vm.wait(WAIT) == 0


def test_api_timeout_bounds_the_wait_for_firecracker(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker]
) -> None:
    """Firecracker takes the request but neither connects a VM nor answers: --api-timeout
    ends the restore (one line, socket removed) instead of its waiting for a VM forever."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", "hang", memfile, tmp_path / "vm.json")
    fakes.append(fake)
    started = time.monotonic()
    result = restore(tmp_path, build_dir, "--firecracker-api",
                     "api.sock", "--api-timeout", "1", "--quiet")
    elapsed = time.monotonic() - started
    fake.close()
    assert fake.problems == []
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "fcsnap: error: Firecracker did not answer PUT /snapshot/load within 1s"
    ]
    assert elapsed < 15, f"restore took {elapsed:.1f}s: the 1s --api-timeout did not end it"
    assert not (tmp_path / "uffd.sock").exists()


def test_missing_api_socket_fails_clearly(build: tuple[Path, Path], tmp_path: Path) -> None:
    build_dir, _ = build
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "nowhere.sock", "--quiet")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "fcsnap: error: cannot reach Firecracker's API at nowhere.sock: No such file or "
        "directory (is Firecracker running with this --api-sock?)"
    ]
    assert not (tmp_path / "uffd.sock").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--vmstate", "vm.state"],
        ["--track-dirty-pages"],
        ["--firecracker-api", "api.sock", "--api-timeout", "0"],
    ],
    ids=["vmstate-alone", "track-alone", "zero-timeout"],
)
def test_option_misuse_is_a_usage_error(
    build: tuple[Path, Path], tmp_path: Path, args: list[str]
) -> None:
    build_dir, _ = build
    result = restore(tmp_path, build_dir, *args)
    assert result.returncode == 2, result.stderr


def test_build_without_snapfile_needs_vmstate(tmp_path: Path) -> None:
    memfile = tmp_path / "mem.bin"
    write_full(memfile, synthetic_memory(64 << 10, seed=1))
    _, build_dir = ops.pack(memfile, tmp_path / "store", BuildOptions())
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock")
    assert result.returncode == 2
    assert "has no snapfile" in result.stderr


VERSIONS = [(1, minor) for minor in range(OLDEST[1], NEWEST[1] + 1)]


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{v[0]}.{v[1]}" for v in VERSIONS])
def test_load_body_is_what_each_release_accepts(version: tuple[int, int]) -> None:
    """For every release claimed, both ways of --track-dirty-pages give a body that release
    takes; the other name for the flag is one that release refuses, or deprecates."""
    for track in (False, True):
        body = load_body(Path("vm.state"), Path("uffd.sock"), track, version)
        assert load_error(json.dumps(body).encode(), version) is None
        assert Path(body["snapshot_path"]).is_absolute()
    assert ("track_dirty_pages" in body) == (version >= (1, 13))
    assert ("enable_diff_snapshots" in body) == (version < (1, 13))
    renamed = {**body, "track_dirty_pages": True}
    refused = load_error(json.dumps(renamed).encode(), version)
    assert (refused is None) == (version >= (1, 13))


@pytest.mark.parametrize(
    ("field", "value", "since"),
    [("network_overrides", [], (1, 12)), ("track_dirty_pages", True, (1, 13)),
     ("clock_realtime", True, (1, 16)), ("vsock_override", {"uds_path": "/v"}, (1, 16))],
)
def test_fake_knows_each_release_fields(field: str, value: object, since: tuple[int, int]
                                        ) -> None:
    """A field is taken from the release that brought it, refused by those before it."""
    body = {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
            field: value}
    for version in VERSIONS:
        refused = load_error(json.dumps(body).encode(), version)
        assert (refused is None) == (version >= since), (version, refused)
        assert refused is None or f"unknown field `{field}`" in refused


def test_load_body_for_releases_newer_than_known() -> None:
    """A release after the newest known gets the newest known body (the deprecated name
    is the one that goes away)."""
    for version in [(1, 17), (2, 0)]:
        body = load_body(Path("vm.state"), Path("uffd.sock"), True, version)
        assert body["track_dirty_pages"] is True and "enable_diff_snapshots" not in body


def test_firecracker_1_12_refuses_track_dirty_pages_as_it_says() -> None:
    """The fake's words for an unknown field are Firecracker 1.12.1's (seen from the real
    binary), position aside."""
    body = {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
            "track_dirty_pages": False, "resume_vm": True}
    assert load_error(json.dumps(body).encode(), (1, 12)) == (
        f"{PREFIX}unknown field `track_dirty_pages`, expected one of `snapshot_path`, "
        "`mem_file_path`, `mem_backend`, `enable_diff_snapshots`, `resume_vm`, "
        "`network_overrides`.")


def version_answer(text: str, status: int = 200) -> bytes:
    """Firecracker's answer to GET /version (or an error of its kind)."""
    document = ({"firecracker_version": text} if status == 200 else {"fault_message": text})
    return b"".join(answer(status, document))


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (version_answer("1.0.0"),
         "Firecracker 1.0.0 cannot load a snapshot from a page server (the Uffd memory "
         "backend needs Firecracker 1.1 or later)"),
        (version_answer("nonsense"),
         'Firecracker\'s API answered GET /version without a version: '
         '{"firecracker_version":"nonsense"}'),
        (b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n[]",
         "Firecracker's API answered GET /version without a version: []"),
        (version_answer("no such action", 400),
         "Firecracker did not give its version: no such action"),
    ],
    ids=["too-old", "not-a-version", "not-an-object", "refused"],
)
def test_version_firecracker_cannot_load_from_fails_before_listening(
    build: tuple[Path, Path], tmp_path: Path, raw: bytes, error: str
) -> None:
    """A Firecracker too old for the Uffd backend, or one that gives no version: one line,
    exit 1, and nothing ever listened (no load was sent)."""
    build_dir, _ = build
    fake = RawAnswer(tmp_path / "api.sock", raw, piece=4096)
    result = restore(tmp_path, build_dir, "--firecracker-api", "api.sock", "--quiet")
    fake.close()
    assert fake.request is not None and fake.request.line == "GET /version HTTP/1.1"
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"fcsnap: error: {error}"]
    assert not (tmp_path / "uffd.sock").exists()


@pytest.mark.parametrize(
    "body",
    [
        {"mem_backend": {"backend_type": "Uffd", "backend_path": "/s"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "uffd", "backend_path": "/s"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
         "resume_vm": "yes"},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
         "resume": True},
        {"snapshot_path": "/v"},
        {"snapshot_path": "/v", "mem_file_path": "/m",
         "mem_backend": {"backend_type": "File", "backend_path": "/m"}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s",
                                                "x": 1}},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
         "resume_vm": None},
        {"snapshot_path": "/v", "mem_backend": {"backend_type": "Uffd", "backend_path": "/s"},
         "network_overrides": [{"iface_id": "eth0"}]},
    ],
    ids=["no-snapshot", "enum", "no-path", "type", "unknown", "no-memory", "two-memories",
         "backend-unknown", "null-bool", "override-incomplete"],
)
def test_validator_rejects_what_firecracker_rejects(body: dict[str, Any]) -> None:
    """The fake's validator is only worth its passes if it catches these."""
    assert load_error(json.dumps(body).encode(), NEWEST) is not None
