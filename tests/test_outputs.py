"""The files fcsnap writes outside its store (fcsnap/outputs.py): never through a planted
symlink, never replacing a device, and through the daemon only under its --output-dir.

Real parts: restore and the daemon as their own processes, the Firecracker stand-in with real
userfaultfd. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from helpers import WAIT, Procs, fcsnap_here, one_build_store
from test_daemon import Daemon

from fcsnap.workingset import parse_working_set

SIZE = 4 << 20
VICTIM = b"the victim's content\n"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    return victim


def _plant(victim: Path, *links: Path) -> None:
    for link in links:
        link.symlink_to(victim)


def _private_null(path: Path) -> Path:
    """A character device like /dev/null, made here (never the system's own)."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod of a character device needs CAP_MKNOD")
    return path


def _served(procs: Procs, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """One restore of the "vm" build to a stand-in reading a tenth of its pages."""
    store = tmp_path / "store"
    if not store.exists():
        one_build_store(tmp_path, SIZE, seed=5)
    server = procs.server("vm", store, *args, stats=False)
    vm = procs.vm(expected=tmp_path / "vm.mem", touch=0.1)
    vm.communicate(timeout=WAIT + 10)
    out, err = server.communicate(timeout=WAIT)
    assert vm.returncode == 0 and server.returncode == 0, err.decode()
    return subprocess.CompletedProcess(server.args, server.returncode, out, err)


def test_planted_symlinks_at_temporary_names_redirect_no_write(tmp_path: Path) -> None:
    """Symlinks planted at every name the old writers used (NAME.tmp, .NAME.tmp) for
    --stats and --record-ws: the victim they point at is untouched, the outputs are regular
    files holding what they should, the links are left as they were."""
    victim = _victim(tmp_path)
    stats, ws = tmp_path / "stats.json", tmp_path / "run.ws"
    links = [tmp_path / n for n in ("stats.json.tmp", ".stats.json.tmp", "run.ws.tmp",
                                    ".run.ws.tmp")]
    _plant(victim, *links)
    procs = Procs(tmp_path)
    try:
        _served(procs, tmp_path, "--stats", str(stats), "--record-ws", str(ws))
    finally:
        procs.close()
    assert victim.read_bytes() == VICTIM
    assert stats.is_file() and not stats.is_symlink()
    assert json.loads(stats.read_text())["exit_reason"] == "vm exited"
    assert not ws.is_symlink() and parse_working_set(ws.read_bytes())[0] == SIZE
    assert all(link.is_symlink() for link in links)
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")} == {
        link.name for link in links}  # no temporary left behind


def test_stats_and_record_ws_to_a_device_leave_it_a_device(tmp_path: Path) -> None:
    """`--stats /dev/null` (a private device with /dev/null's numbers) and `--record-ws` to
    another: both are written in place and stay character devices."""
    null1, null2 = _private_null(tmp_path / "null1"), _private_null(tmp_path / "null2")
    procs = Procs(tmp_path)
    try:
        _served(procs, tmp_path, "--stats", str(null1), "--record-ws", str(null2))
    finally:
        procs.close()
    for dev in (null1, null2):
        st = os.lstat(dev)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3), dev
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_fifo_output_is_written_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """A FIFO someone reads gets the whole content; one nobody reads is refused at once
    (one line), not waited on, and one whose reader stops reading fails after
    STALL_TIMEOUT; the FIFO stays a FIFO."""
    from fcsnap import outputs
    from fcsnap.outputs import OutputError, write_output

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="a FIFO nobody reads"):
        write_output(fifo, b"x", "--stats")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    for _ in range(int(WAIT * 100)):  # until the reader has the FIFO open
        try:
            write_output(fifo, b"whole document\n", "--stats")
            break
        except OutputError:
            threading.Event().wait(0.01)
    reader.join(WAIT)
    assert got == [b"whole document\n"]
    monkeypatch.setattr(outputs, "STALL_TIMEOUT", 0.2)
    idle = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        with pytest.raises(OutputError, match="its reader read nothing for 0.2s"):
            write_output(fifo, bytes(4 << 20), "--record-ws")
    finally:
        os.close(idle)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_device_alias_stays_a_link_to_its_device(tmp_path: Path) -> None:
    """`--stats /dev/stdout` (a symlink of root's to /proc/self/fd/1) and a link of this
    user's to a device like /dev/null: written in place through the link, which stays a link
    (the system's /dev/stdout is never replaced by a file). A link another user planted is
    still replaced as a link, never followed to their device."""
    from fcsnap.outputs import write_output

    read_end, write_end = os.pipe()
    stdout = tmp_path / "stdout"  # as /dev/stdout, with a pipe (`| jq`) as fd 1
    stdout.symlink_to(f"/proc/self/fd/{write_end}")
    null = tmp_path / "null"
    null.symlink_to(_private_null(tmp_path / "null-device"))
    os.set_blocking(read_end, False)
    try:
        write_output(stdout, b"whole document\n", "--stats")
        assert os.read(read_end, 100) == b"whole document\n"  # (non-blocking: no wait)
        write_output(null, b"discarded\n", "--record-ws")
        for link in (stdout, null):
            assert link.is_symlink(), link
        assert stat.S_ISCHR(os.lstat(tmp_path / "null-device").st_mode)
        if os.geteuid() == 0:
            theirs = tmp_path / "theirs"
            theirs.symlink_to(f"/proc/self/fd/{write_end}")
            os.lchown(theirs, 65534, 65534)
            write_output(theirs, b"not for them\n", "--stats")
            assert not theirs.is_symlink() and theirs.read_bytes() == b"not for them\n"
            with pytest.raises(BlockingIOError):
                os.read(read_end, 100)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_taken_temporary_name_is_never_opened(tmp_path: Path) -> None:
    """The temporary is created with O_EXCL: a symlink (or file) already at the name drawn
    is left alone and another name is drawn; a symlink at the target itself is replaced as a
    link, not followed."""
    from fcsnap import outputs

    victim = _victim(tmp_path)
    out = tmp_path / "out"
    names = iter([".taken", ".taken", ".free"])
    (tmp_path / ".taken").symlink_to(victim)
    out.symlink_to(victim)
    with outputs.output(out, "", temp_name=lambda: next(names)) as fd:
        outputs.write_all(fd, b"new\n")
    assert victim.read_bytes() == VICTIM
    assert not out.is_symlink() and out.read_bytes() == b"new\n"
    assert (tmp_path / ".taken").is_symlink() and not (tmp_path / ".free").exists()


def test_refused_outputs_are_one_line(tmp_path: Path) -> None:
    """A directory, a socket, a missing directory: refused naming the path."""
    import socket

    from fcsnap.outputs import OutputError, write_output

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    sock.close()
    for path, problem in ((tmp_path, "it is a directory"), (tmp_path / "sock", "a socket"),
                          (tmp_path / "no" / "f", "no such directory")):
        with pytest.raises(OutputError, match=f"cannot write --stats {path}: .*{problem}"):
            write_output(path, b"x", "--stats")


def test_ws_merge_output_is_written_safely(tmp_path: Path) -> None:
    """`ws merge -o`: a symlink planted at the old temporary name redirects nothing, and a
    device output stays a device."""
    from fcsnap.workingset import write_working_set

    write_working_set(tmp_path / "a.ws", SIZE, [0, 4096])
    victim = _victim(tmp_path)
    _plant(victim, tmp_path / ".merged.ws.tmp")
    merge = ["ws", "merge", "-q", tmp_path / "a.ws", "-o"]
    done = fcsnap_here(*merge, tmp_path / "merged.ws", timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == VICTIM
    assert parse_working_set((tmp_path / "merged.ws").read_bytes())[1].tolist() == [0, 4096]
    null = _private_null(tmp_path / "null")
    done = fcsnap_here(*merge, null, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISCHR(os.lstat(null).st_mode)


def test_daemon_writes_outputs_only_under_its_output_dir(tmp_path: Path) -> None:
    """With --output-dir OUT: stats and record_ws outside OUT, escaping it with `..` or
    through a symlinked directory are refused (403/400, one line, nothing listens); a
    directory swapped for a symlink after the request was admitted is not followed when the
    stats are written. Without --output-dir, requests may name no output file."""
    store = one_build_store(tmp_path, SIZE, seed=6)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere)
    daemon = Daemon(store, tmp_path, "--output-dir", str(out))
    try:
        for key, path, status in (
            ("stats", elsewhere / "s.json", 403),
            ("record_ws", elsewhere / "w.ws", 403),
            ("stats", f"{out}/../elsewhere/s.json", 403),
            ("stats", out / "link" / "s.json", 400),
        ):
            code, answer = daemon.call("POST", "/restores", {
                "vm": "vm", "socket": str(tmp_path / "r.sock"), key: str(path)})
            assert code == status, (path, answer)
            assert len(answer["error"].splitlines()) == 1
            assert not (tmp_path / "r.sock").exists()
        restore = daemon.restore("vm", "swap", stats=str(out / "sub" / "s.json"))
        (out / "sub").rename(out / "sub.old")
        (out / "sub").symlink_to(elsewhere)
        code, document = daemon.call("DELETE", f"/restores/{restore['id']}")
        assert code == 200 and "symbolic link" in document["exit_reason"], document
        assert list(elsewhere.iterdir()) == []
    finally:
        daemon.close()
    plain = Daemon(store, tmp_path / "out")
    try:
        code, answer = plain.call("POST", "/restores", {
            "vm": "vm", "socket": str(tmp_path / "r.sock"), "stats": str(out / "s.json")})
        assert code == 403 and "--output-dir" in answer["error"], answer
    finally:
        plain.close()


def test_unpack_output_is_private_and_replaces_a_link_not_its_target(tmp_path: Path) -> None:
    """`unpack -o LINK --force`: the link is replaced by the memory file (0600: guest memory),
    the file it pointed at is untouched."""
    from fcsnap.store.operations import ops

    store = one_build_store(tmp_path, SIZE, seed=7)
    victim = _victim(tmp_path)
    out = tmp_path / "out.mem"
    out.symlink_to(victim)
    ops.unpack(store / (store / "vms" / "vm").read_text().strip(), out, force=True)
    assert victim.read_bytes() == VICTIM
    assert not out.is_symlink() and out.read_bytes() == (tmp_path / "vm.mem").read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
