"""`fcsnap serve --preload`: builds opened before the API listens, so that no POST pays for
opening one, and kept open until the daemon stops.

Real parts: the daemon as its own process, the Firecracker stand-in with real userfaultfd and
every byte compared. Every wait has a deadline.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon import Build, Daemon
from test_daemon_latency import raw_store
from test_restore_faults import WAIT


@pytest.fixture(scope="module")
def raw_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Build]:
    return raw_store(tmp_path_factory.mktemp("preload"))


def test_preloaded_build_is_open_before_any_post_and_stays_open(raw_build, tmp_path: Path
                                                               ) -> None:
    """The build is open once the API listens; two VMs restored from it are served every
    byte without opening it again, and it stays open after they end, until the daemon
    stops (SIGTERM: exit 0)."""
    store, build = raw_build
    daemon = Daemon(store, tmp_path, "--preload", "web")
    try:
        metrics = daemon.metrics()
        assert metrics["fcsnap_builds_open", ()] == 1
        assert metrics["fcsnap_build_opens_total", ()] == 1
        ids = [daemon.restore("web", f"vm{i}")["id"] for i in range(2)]
        for i in range(2):
            assert daemon.vm(f"vm{i}", build, threads=2).wait(WAIT) == 0
        for restore_id in ids:
            assert daemon.wait_ended(restore_id)["exit_reason"] == "vm exited"
        metrics = daemon.metrics()
        assert metrics["fcsnap_build_opens_total", ()] == 1  # no POST opened it
        assert metrics["fcsnap_builds_open", ()] == 1  # still open with no restore
        code, lines = daemon.stop()
        assert code == 0, lines
    finally:
        daemon.close()


def test_preload_of_an_unknown_build_is_one_line_and_listens_on_nothing(raw_build,
                                                                        tmp_path: Path) -> None:
    store, _ = raw_build
    api = tmp_path / "api.sock"
    done = subprocess.run([sys.executable, "-m", "fcsnap", "serve", "--store", str(store),
                           "--api", str(api), "--preload", "web", "nosuch"],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: ") and "nosuch" in lines[0]
    assert not api.exists()
