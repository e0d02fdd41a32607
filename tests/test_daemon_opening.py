"""What opening a build costs a POST: `fcsnap serve --preload` opens builds before the API
listens (and keeps them open until the daemon stops); a build opened again after its last
restore ended reuses its parsed header, unless the header file changed.

Real parts: the daemon as its own process, the Firecracker stand-in with real userfaultfd and
every byte compared. Every wait has a deadline.
"""

from __future__ import annotations

import os
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
                           "--api", str(api), "--preload", "web", "--preload", "nosuch"],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: ") and "nosuch" in lines[0]
    assert not api.exists()


def test_a_build_opened_again_reuses_its_parsed_header(raw_build, tmp_path: Path) -> None:
    """Three VMs one after the other, each opening the build anew (its previous one ended and
    closed it): the second reuses the parsed header and arrays, every byte right; the third
    comes after the header file was touched (another identity) and parses it again."""
    store, build = raw_build
    daemon = Daemon(store, tmp_path)
    try:
        def one_vm(name: str) -> dict[str, float]:
            restore_id = daemon.restore("web", name)["id"]
            assert daemon.vm(name, build, threads=2).wait(WAIT) == 0
            assert daemon.wait_ended(restore_id)["exit_reason"] == "vm exited"
            metrics = daemon.metrics()
            assert metrics["fcsnap_builds_open", ()] == 0  # closed: the next VM reopens it
            return {key: metrics[f"fcsnap_{key}_total", ()]
                    for key in ("build_opens", "header_parses")}

        assert one_vm("first") == {"build_opens": 1, "header_parses": 1}
        assert one_vm("second") == {"build_opens": 2, "header_parses": 1}
        header = store / build.build_id / "memfile.header"
        stat = header.stat()
        os.utime(header, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert one_vm("third") == {"build_opens": 3, "header_parses": 2}
    finally:
        daemon.close()
