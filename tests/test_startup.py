"""Start-up stays cheap: commands import what they need when they need it (bench/startup.py
times it; this checks the behaviour that keeps it fast, which a loaded machine cannot blur)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_build_store

HEAVY = {"numpy", "zstandard", "xxhash", "cffi", "pydantic", "click"}
FRAMEWORK = {"typer", "rich"}  # the command line's, not the library's
RICH_UNUSED = {"markdown_it", "pygments", "attr"}  # what typer's help module would import

PROBE = """
import json, sys
{code}
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""
RUN_CLI = """
from fcsnap import cli
try:
    cli.main({argv!r})
except SystemExit:
    pass
"""


def modules_after(code: str, cwd: Path) -> set[str]:
    """sys.modules after `code` runs in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)], cwd=cwd, capture_output=True,
        text=True, timeout=60,
    )
    return set(json.loads(result.stderr.splitlines()[-1]))


def imported(code: str, cwd: Path) -> set[str]:
    """Top-level packages in sys.modules after `code` runs in a fresh interpreter."""
    return {name.split(".")[0] for name in modules_after(code, cwd)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return one_build_store(tmp_path_factory.mktemp("startup"), 256 << 10, seed=1)


@pytest.mark.parametrize(
    ("code", "heavy"),
    [
        ("import fcsnap", HEAVY | FRAMEWORK),
        ("import fcsnap; fcsnap.Store, fcsnap.FcsnapError", HEAVY | FRAMEWORK),
        (RUN_CLI.format(argv=["--help"]), HEAVY | RICH_UNUSED),
        (RUN_CLI.format(argv=["pack", "--help"]), HEAVY | RICH_UNUSED),
        (RUN_CLI.format(argv=["pack", "mem", "--store", "store", "--compress", "gzip"]),
         HEAVY | {"rich"}),
        (RUN_CLI.format(argv=["inspect", "vm", "--store", "store", "--at", "0x1000"]),
         HEAVY | {"rich"}),
        (RUN_CLI.format(argv=["inspect", "vm", "--store", "store", "--json"]), HEAVY | {"rich"}),
    ],
    ids=["import", "api-names", "help", "pack-help", "usage-error", "inspect", "inspect-json"],
)
def test_no_heavy_module_is_imported(store: Path, code: str, heavy: set[str]) -> None:
    """The library imports no framework; the command line imports typer (its help rich, but
    not the parts of rich it never uses); no command imports what it does not need."""
    assert imported(code, store.parent).isdisjoint(heavy)


def test_the_probe_sees_heavy_imports(store: Path) -> None:
    """The check above can fail: a command that does need numpy shows it."""
    loaded = imported(RUN_CLI.format(argv=["verify", "vm", "--store", "store"]), store.parent)
    assert {"numpy", "xxhash"} <= loaded
    helped = imported("import rich.markdown, typer.rich_utils", store.parent)
    assert helped >= RICH_UNUSED  # typer's help module would import these without lean_help


# What only a store in S3 or an E2B header needs (hashlib's OpenSSL included).
REMOTE_ONLY = {"fcsnap.store.backends.remote", "fcsnap.store.backends.s3",
               "fcsnap.store.backends.objects", "obstore", "fcsnap.header.e2b", "lz4"}


def test_a_local_pack_loads_no_s3_module(store: Path) -> None:
    """A raw pack into a local store (the command run most, where start-up is most of its
    time) imports neither the S3 backend nor E2B's header code nor numpy; a pack into S3
    does import the backend (so the check can fail)."""
    (store.parent / "vm.mem").rename(store.parent / "mem")
    try:
        local = modules_after(RUN_CLI.format(argv=["pack", "mem", "--store", "store", "--quiet"]),
                              store.parent)
        remote = modules_after(  # nothing listens there: the command fails at once
            "import os; os.environ['AWS_ENDPOINT_URL'] = 'http://127.0.0.1:9'\n"
            + RUN_CLI.format(argv=["pack", "mem", "--store", "s3://bucket", "--quiet"]),
            store.parent)
    finally:
        (store.parent / "mem").rename(store.parent / "vm.mem")
    assert "fcsnap.store.operations.fresh" in local  # it packed
    assert local.isdisjoint(REMOTE_ONLY | {"numpy"}), local & (REMOTE_ONLY | {"numpy"})
    assert "fcsnap.store.backends.remote" in remote


SERVER = ("fcsnap.uffd.session", "fcsnap.uffd.server", "fcsnap.store", "fcsnap.header")


def test_restore_listens_before_it_imports_the_server(store: Path) -> None:
    """restore's socket exists before numpy, cffi, the server's modules or anything of the
    store is imported (an orchestrator starts Firecracker once the socket is there); it
    imports them after, and serves (here: is stopped by SIGTERM, exit 0)."""
    probe = """
import os, signal, sys, threading
from fcsnap.uffd import listener
listen = listener.listen
seen = []
def spy(path, *args, **kwargs):
    seen.append(sorted(sys.modules))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # stop waiting
    return listen(path, *args, **kwargs)
listener.listen = spy
from fcsnap import cli
try:
    cli.main(["restore", "vm", "--store", "store", "--socket", "s", "--quiet"])
except SystemExit as e:
    print(json.dumps({"status": e.code, "at_listen": seen[0], "after": sorted(sys.modules)}),
          file=sys.stderr)
"""
    result = subprocess.run(
        [sys.executable, "-c", "import json\n" + probe], cwd=store.parent, capture_output=True,
        text=True, timeout=60,
    )
    report = json.loads(result.stderr.splitlines()[-1])
    assert report["status"] == 0, result.stderr

    def loaded(names: list[str]) -> set[str]:
        tops = {name.split(".")[0] for name in names}
        ours = {name for name in names if name.startswith(SERVER)}
        return (tops & (HEAVY | {"rich"})) | ours

    assert loaded(report["at_listen"]) == set()
    assert {"numpy", "cffi", "fcsnap.uffd.session"} <= loaded(report["after"])


def test_the_root_help_builds_no_command(store: Path) -> None:
    """`fcsnap --help` lists the commands from their help texts: building one reads its
    function's signature and makes every option (most of what the help would cost)."""
    probe = """
import typer.main
built = []
real = typer.main.get_command_from_info
def spy(*args, **kwargs):
    built.append((args[0] if args else kwargs["command_info"]).name)
    return real(*args, **kwargs)
typer.main.get_command_from_info = spy
""" + RUN_CLI.format(argv=["--help"]) + RUN_CLI.format(argv=["restore", "--help"]) + """
print("built:", built, file=sys.stderr)
"""
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + probe], cwd=store.parent, capture_output=True,
        text=True, timeout=60,
    )
    assert "built: ['restore']" in result.stderr, result.stderr  # restore --help builds one
