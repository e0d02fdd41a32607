"""Shared pytest options: tests marked `slow` (a real guest under QEMU) run only with --runslow."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="also run tests marked slow (they boot a real guest under QEMU)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
