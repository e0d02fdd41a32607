"""`fcsnap restore --firecracker-api`: the snapshot load request, against a fake Firecracker.

The fake (fcsnap.testing.firecracker_api) serves Firecracker's API socket in a thread of the
test: it checks the request as Firecracker parses it, then behaves as Firecracker does - it
connects a VM (the stand-in, its own process) to the page server and answers only once the
server has accepted that VM, so a restore that waited for the answer before accepting would
hang. Every wait has a deadline.
"""

from __future__ import annotations

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
from fcsnap.testing.firecracker_api import FAULT, FakeFirecracker, load_problems
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


@pytest.mark.parametrize("explicit", [False, True], ids=["snapfile", "vmstate"])
def test_load_resumes_vm_served_by_restore(
    build: tuple[Path, Path], tmp_path: Path, fakes: list[FakeFirecracker], explicit: bool
) -> None:
    """The request matches the API definition, paths are sent absolute, and the VM it makes
    Firecracker connect is served every byte while the request waits for its answer."""
    build_dir, memfile = build
    fake = FakeFirecracker(tmp_path / "api.sock", "load", memfile, tmp_path / "vm.json")
    fakes.append(fake)
    (tmp_path / "other.state").write_bytes(b"other")
    extra = ["--vmstate", "other.state", "--track-dirty-pages"] if explicit else []
    result = restore(tmp_path, build_dir,
                     "--firecracker-api", "api.sock", *extra)
    fake.close()
    assert result.returncode == 0, result.stderr
    assert "fcsnap: Firecracker loaded the snapshot (HTTP 204)" in result.stderr
    assert fake.problems == []
    assert fake.body == {
        "snapshot_path": str(tmp_path / "other.state" if explicit else build_dir / SNAPFILE),
        "mem_backend": {"backend_type": "Uffd", "backend_path": str(tmp_path / "uffd.sock")},
        "track_dirty_pages": explicit,
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


def test_load_body_is_valid_snapshot_load_params(tmp_path: Path) -> None:
    body = load_body(Path("vm.state"), Path("uffd.sock"), track_dirty_pages=False)
    assert load_problems(body) == []
    assert Path(body["snapshot_path"]).is_absolute()


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
    ],
    ids=["no-snapshot", "enum", "no-path", "type", "unknown", "no-memory", "two-memories"],
)
def test_validator_rejects_what_firecracker_rejects(body: dict[str, Any]) -> None:
    """The fake's validator is only worth its passes if it catches these."""
    assert load_problems(body) != []
