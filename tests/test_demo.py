"""The README's main-job command works end to end, and says what it lacks instead of hanging."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")


def test_demo_restores_and_checks_every_byte():
    result = subprocess.run(
        [sys.executable, "-m", "fcsnap", "demo"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "every byte matched" in result.stdout
    assert "balloon pages read zero: True" in result.stdout


def as_nobody(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run this interpreter as the user nobody, without root's capabilities (CAP_SYS_PTRACE
    lets root create a userfaultfd whatever the sysctl says). It keeps CAP_DAC_READ_SEARCH
    alone, to reach an interpreter installed under a private home; that grants no write
    access, so /dev/userfaultfd (0600 root) stays closed to it."""
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
         sys.executable, *argv],
        capture_output=True, text=True, timeout=timeout, cwd="/", stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": "/"},
    )


@pytest.fixture
def no_unprivileged_userfaultfd():
    """vm.unprivileged_userfaultfd=0 for the test, the value it had put back after."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to set the sysctl and become nobody) and setpriv")
    if os.stat("/dev/userfaultfd").st_mode & 0o006 if os.path.exists("/dev/userfaultfd") else 0:
        pytest.skip("/dev/userfaultfd is open to every user here: nobody has userfaultfd")
    before = SYSCTL.read_text().strip()
    if before == "0":
        yield
        return
    try:
        SYSCTL.write_text("0")
    except OSError as e:
        pytest.skip(f"cannot set vm.unprivileged_userfaultfd here ({e.strerror})")
    try:
        yield
    finally:
        SYSCTL.write_text(before)


def test_demo_without_userfaultfd_rights_says_what_is_missing(no_unprivileged_userfaultfd):
    result = as_nobody("-m", "fcsnap", "demo", timeout=60)
    err = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr
    assert len(err) == 1 and err[0].startswith("fcsnap: error: demo needs userfaultfd"), err
    for way in ("root", "vm.unprivileged_userfaultfd=1", "/dev/userfaultfd"):
        assert way in err[0]
    assert "1. pack" not in result.stdout, "checked before any work"


def test_demo_restore_ends_when_its_stand_in_fails_before_connecting(tmp_path):
    """The restore step watches the stand-in: one that dies before it connects (here: its
    expected memory file is missing) ends the step at once with its last line, instead of a
    server waiting for a VM that will never come."""
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from fcsnap.demo import _restore
        from fcsnap.errors import FcsnapError
        from fcsnap.store.operations import ops
        from fcsnap.store.operations.builder import BuildOptions
        from fcsnap.testing.memimage import synthetic_memory, write_full
        work = Path(sys.argv[1])
        write_full(work / "m0", synthetic_memory(4 << 20, seed=1))
        _, build = ops.pack(work / "m0", work / "store", BuildOptions())
        try:
            _restore(build, work / "missing.mem", work, 2)
        except FcsnapError as e:
            print(e)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("demo failed: the stand-in VM exited with status 1: "), line
    assert "missing.mem" in line
    assert not (tmp_path / "uffd.sock").exists()
