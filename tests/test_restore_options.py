"""One check of restore's options (fcsnap/restore_options.py) for every way of asking: the
command line, `restore --daemon`, the Python API and the daemon's POST /restores refuse the
same bad value with the same line, before anything listens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import fcsnap_here, one_build_store
from test_daemon import WAIT, Daemon

from fcsnap import api
from fcsnap.errors import UsageError

# (id, command-line options, the same as POST /restores keys, the API's keyword arguments or
# None where the API takes a typed value instead, what the line says)
CASES = [
    ("fault-around", ["--fault-around", "lots"], {"fault_around": "lots"},
     {"fault_around": "lots"}, "invalid fault-around size (or 'adaptive') 'lots'"),
    ("handshake-negative", ["--handshake-timeout=-1"], {"handshake_timeout": -1},
     {"handshake_timeout": -1}, "invalid --handshake-timeout -1: must not be negative"),
    ("api-timeout-0", ["--firecracker-api", "/nowhere/api.sock", "--api-timeout", "0"],
     {"firecracker_api": "/nowhere/api.sock", "api_timeout": 0},
     {"firecracker_api": "/nowhere/api.sock", "api_timeout": 0},
     "invalid --api-timeout 0: must be more than 0 seconds"),
    ("vmstate-alone", ["--vmstate", "/nowhere/vm.state"], {"vmstate": "/nowhere/vm.state"},
     {"vmstate": "/nowhere/vm.state"}, "--vmstate and --track-dirty-pages need --firecracker-api"),
    ("track-alone", ["--track-dirty-pages"], {"track_dirty_pages": True},
     {"track_dirty_pages": True}, "--vmstate and --track-dirty-pages need --firecracker-api"),
    ("socket-mode", ["--socket-mode", "999"], {"socket_mode": "999"}, None,
     "invalid --socket-mode: '999' is not an octal permission mode (e.g. 0600)"),
    ("socket-owner", ["--socket-owner", "no-such-user-here"],
     {"socket_owner": "no-such-user-here"}, None,
     "invalid --socket-owner: no such user 'no-such-user-here'"),
    ("allow-uid", ["--allow-uid", "no-such-user-here"], {"allow_uid": ["no-such-user-here"]},
     None, "invalid --allow-uid: no such user 'no-such-user-here'"),
    ("no-snapfile", ["--firecracker-api", "/nowhere/api.sock"],
     {"firecracker_api": "/nowhere/api.sock"}, {"firecracker_api": "/nowhere/api.sock"},
     "has no snapfile: give --vmstate"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one build named "vm", packed without a snapfile."""
    return one_build_store(tmp_path_factory.mktemp("options"), 1 << 20, seed=5)


@pytest.fixture(scope="module")
def daemon(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(store, tmp_path_factory.mktemp("options-daemon"))
    yield d
    d.close()


def cli_refusal(*args: object) -> str:
    """The message of a `fcsnap restore` usage error (exit 2, one line), run in this process
    (the same entry point, exit status and output)."""
    done = fcsnap_here("restore", *args, timeout=WAIT)
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    prefix, suffix = "fcsnap: error: ", " (see 'fcsnap restore --help')"
    assert lines[0].startswith(prefix) and lines[0].endswith(suffix), lines[0]
    return lines[0][len(prefix):-len(suffix)]


@pytest.mark.parametrize(("cli", "body", "kwargs", "says"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_every_front_end_refuses_a_value_with_the_same_line(
    store: Path, daemon: Daemon, tmp_path: Path, cli: list[str], body: dict,
    kwargs: dict | None, says: str,
) -> None:
    sock = tmp_path / "vm.sock"
    line = cli_refusal("--vm", "vm", "--store", store, "--socket", sock, *cli)
    assert says in line
    status, answer = daemon.call("POST", "/restores", {"vm": "vm", "socket": str(sock), **body})
    assert (status, answer) == (400, {"error": line})
    if kwargs is not None:
        with pytest.raises(UsageError) as refused:
            api.restore("vm", sock, store=store, **kwargs)
        assert str(refused.value) == line
    if "snapfile" not in says:  # the build's files are the daemon's to look at
        daemon_flag = cli_refusal("--daemon", daemon.api, "--vm", "vm", "--socket", sock, *cli)
        assert daemon_flag == line
    assert not sock.exists()
    assert daemon.call("GET", "/restores") == (200, [])
