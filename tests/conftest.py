"""Shared pytest options and fixtures. Tests marked `slow` (soaks, loads, and the `qemu` ones
that boot a real guest) run only with --runslow; tests marked `firecracker` (the real VMM) run
only when a -m expression names them (`pytest -m firecracker`): the default run leaves them
out, CI runs them as a step of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import HUGEPAGE_POOL, Procs, top_up_hugepages

HUGEPAGES_NEEDED = 10  # the most any test holds: a 16 MiB guest, and ballooned pages coming back


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="also run tests marked slow (soaks, loads, a real guest under QEMU)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "firecracker" not in (config.getoption("markexpr") or ""):
        left_out = [item for item in items if item.get_closest_marker("firecracker")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if not item.get_closest_marker("firecracker")]
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hugepage_pool() -> Iterator[list[bool]]:
    """If the session grew the hugepage pool, it is put back to its size when it ends."""
    original = HUGEPAGE_POOL.read_text()
    grown: list[bool] = []
    yield grown
    if grown:
        HUGEPAGE_POOL.write_text(original)


@pytest.fixture
def hugepages(hugepage_pool: list[bool]) -> None:
    """HUGEPAGES_NEEDED free 2 MiB hugepages for this test, or a skip saying why."""
    if top_up_hugepages(HUGEPAGES_NEEDED):
        hugepage_pool.append(True)


@pytest.fixture(scope="session")
def real_vmm() -> None:
    """The real Firecracker (fetched and cached once), the fcguest guest (built once) and
    /dev/kvm, or a skip saying which is missing - a failure under CI=true: CI must run them."""
    from fcsnap.testing import fcguest
    from fcsnap.testing.fcbinary import Unavailable, firecracker_binary

    try:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise Unavailable("no read-write /dev/kvm")
        firecracker_binary()
        fcguest.build()
    except Unavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-Firecracker tests: {e}")
        pytest.skip(f"the real Firecracker cannot run here: {e}")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """A restore server and stand-in VMs for one test, killed at its end if still running."""
    p = Procs(tmp_path)
    yield p
    p.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A real S3 server for the session (tests/s3_helpers.py says which)."""
    from s3_helpers import s3_server as start

    yield from start(tmp_path_factory)


@pytest.fixture
def bucket(s3_server):  # noqa: ANN001, ANN201
    """A new, empty bucket on the session's S3 server."""
    from s3_helpers import new_bucket

    return new_bucket(s3_server)
