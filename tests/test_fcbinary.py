"""The real-VMM tests' supplies without the real VMM: the Firecracker binary is taken from
the cache only as pinned (a swapped or linked file is fetched again, never run), and what
cannot be had is one Unavailable line. No network: the fetch is replaced where it would run."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from fcsnap.testing import fcbinary, fcguest
from fcsnap.testing.fcbinary import Unavailable
from fcsnap.testing.fcguest import GuestConfig, Round, parse_round


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty test cache, no FCSNAP_FIRECRACKER, and a fetch that only records it ran."""
    monkeypatch.setenv(fcbinary.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(fcbinary.BINARY_ENV, raising=False)
    monkeypatch.delenv(fcbinary.JAILER_ENV, raising=False)

    def no_fetch(directory: Path) -> None:
        raise Unavailable(f"fetch into {directory.name}")

    monkeypatch.setattr(fcbinary, "_fetch", no_fetch)
    return tmp_path / "cache"


def pin(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Cached binaries whose content is what SHA256 pins (the pins made to match them)."""
    directory = cache / f"firecracker-v{fcbinary.VERSION}"
    directory.mkdir(parents=True)
    pins = {}
    for name in fcbinary.SHA256:
        (directory / name).write_bytes(f"#!{name}\n".encode())
        (directory / name).chmod(0o755)
        pins[name] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    monkeypatch.setattr(fcbinary, "SHA256", pins)
    return directory


def test_pinned_cached_binaries_are_used(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = pin(cache, monkeypatch)
    assert fcbinary.firecracker_binary() == directory / "firecracker"
    assert fcbinary.jailer_binary() == directory / "jailer"


@pytest.mark.parametrize("swap", ["content", "symlink"])
def test_a_swapped_cached_binary_is_fetched_again(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, swap: str) -> None:
    """One changed byte, or a link (even to a file with the pinned content): not run, but
    fetched again."""
    directory = pin(cache, monkeypatch)
    binary = directory / "firecracker"
    if swap == "content":
        binary.write_bytes(binary.read_bytes() + b"#")
    else:
        (tmp_path / "elsewhere").write_bytes(binary.read_bytes())
        binary.unlink()
        binary.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Unavailable, match="fetch into firecracker-v"):
        fcbinary.firecracker_binary()


def test_no_cache_fetches(cache: Path) -> None:
    with pytest.raises(Unavailable, match="fetch into firecracker-v"):
        fcbinary.firecracker_binary()


def test_explicit_binary_must_be_executable(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    plain = tmp_path / "firecracker"
    plain.write_bytes(b"not executable")
    monkeypatch.setenv(fcbinary.BINARY_ENV, str(plain))
    with pytest.raises(Unavailable, match=f"{fcbinary.BINARY_ENV}={plain} is not an executable"):
        fcbinary.firecracker_binary()
    plain.chmod(0o755)
    assert fcbinary.firecracker_binary() == plain
    with pytest.raises(Unavailable, match="jailer beside"):
        fcbinary.jailer_binary()


def test_an_unusable_cache_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv(fcbinary.CACHE_ENV, str(tmp_path / "file" / "cache"))
    monkeypatch.delenv(fcbinary.BINARY_ENV, raising=False)
    with pytest.raises(Unavailable, match="cannot use the cache .*: Not a directory"):
        fcbinary.firecracker_binary()


def test_guest_without_a_compiler(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Unavailable, match="cannot build the test guest: no `gcc` on PATH"):
        fcguest.build()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc on this machine")
def test_guest_builds_once(cache: Path) -> None:
    """Built into the cache as an x86-64 ELF, then found there (same path, not rebuilt)."""
    elf = fcguest.build()
    assert elf.parent == cache and elf.read_bytes()[:5] == b"\x7fELF\x02"
    built = elf.stat().st_mtime_ns
    assert fcguest.build() == elf and elf.stat().st_mtime_ns == built


def test_progress_lines() -> None:
    assert parse_round("fcguest round 12 ok\n") == Round(12, True, "fcguest round 12 ok")
    bad = parse_round("fcguest round 3 BAD page=0x2000000")
    assert bad is not None and (bad.number, bad.ok) == (3, False)
    for other in ("und 12 ok", "fcguest round 1", "fcguest start fill=1", "2 ok", ""):
        assert parse_round(other) is None, other
    assert GuestConfig(fill=8, ws=4, sweep=2, write=1, seed=9).cmdline() == \
        "fill=8 ws=4 sweep=2 write=1 seed=9"
    assert GuestConfig().fits(64) and not GuestConfig(fill=8193).fits(64)
