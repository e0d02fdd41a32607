"""The tests find the S3 server the test extra installed, without an activated environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

FIND = "from fcsnap.testing.s3server import weed_binary; print(weed_binary())"


def test_weed_is_found_in_the_interpreters_scripts_directory_without_it_on_path() -> None:
    installed = Path(sysconfig.get_path("scripts")) / "weed"
    if not installed.is_file():
        pytest.skip(f"the test extra's weed is not installed in {installed.parent}")
    found = subprocess.run(
        [sys.executable, "-c", FIND], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
        text=True, timeout=30, check=True,
    ).stdout.strip()
    assert found == str(installed)
