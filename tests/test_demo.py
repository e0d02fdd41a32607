"""The README's main-job command works end to end."""

import subprocess
import sys


def test_demo_restores_and_checks_every_byte():
    result = subprocess.run(
        [sys.executable, "-m", "fcsnap", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "every byte matched" in result.stdout
    assert "balloon pages read zero: True" in result.stdout
