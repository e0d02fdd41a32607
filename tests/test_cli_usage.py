"""The command line's contract: usage errors exit 2 and runtime failures 1, each as one line;
flags render as flags; -h is help; --debug works before or after the command; plain output is
whole when piped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helpers
import pytest

from fcsnap.cli import command_tree
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full

SIZE = 1 << 20
WAIT = 60


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """store/ with vms/vm: generation 1 over generation 0; m0, m1 beside it."""
    root = tmp_path_factory.mktemp("usage")
    mem = synthetic_memory(SIZE, seed=3)
    write_full(root / "m0", mem)
    write_full(root / "m1", evolve(mem, seed=4, dirty_share=0.2)[0])
    _, b0 = ops.pack(root / "m0", root / "store", BuildOptions(name="vm"))
    ops.diff(root / "m1", b0, root / "store", BuildOptions(name="vm"))
    return root / "store"


def fcsnap(*args: str, cwd: Path, columns: int = 80,
           process: bool = False) -> subprocess.CompletedProcess[str]:
    """The command line at a terminal width of `columns`, without FCSNAP_DEBUG: in this
    process (the same entry point, exit status and output), or as a process of its own."""
    env = {k: v for k, v in os.environ.items() if k != "FCSNAP_DEBUG"}
    run = helpers.fcsnap if process else helpers.fcsnap_here
    return run(*args, cwd=cwd, env=env | {"COLUMNS": str(columns)}, timeout=WAIT)


def cases(rows: list[tuple[str, ...]]) -> list[Any]:
    """Every row run in this process, and every row run as a process of its own: the first
    in the default run, the rest behind `slow` (what only a process shows: its start-up, what
    the interpreter prints as it exits; tests/test_bad_input.py runs each command so)."""
    return [pytest.param(*row[1:], False, id=row[0]) for row in rows] + [
        pytest.param(*row[1:], True, id=f"{row[0]}-process",
                     marks=() if row is rows[0] else pytest.mark.slow)
        for row in rows
    ]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


PACK = "pack m0 --store store"
DIFF = "diff m1 --base vm --store store"
INSPECT = "inspect vm --store store"
RESTORE = "restore --vm vm --store store --socket uffd.sock"
USAGE = [
        ("unknown-command", "frobnicate", "No such command 'frobnicate'"),
    ("unknown-option", PACK + " --level 3", "No such option: --level"),
    ("abbreviated-option", PACK + " --comp zstd",
     "No such option: --comp (Possible options: --compress)"),
    ("pack/no-store", "pack m0", "Missing option '--store'"),
    ("pack/compress-gzip", PACK + " --compress gzip", "invalid compression 'gzip'"),
    ("pack/zstd-level-99", PACK + " --compress zstd:99", "invalid zstd level in 'zstd:99'"),
    ("pack/block-size-3K", PACK + " --block-size 3K", "invalid block size '3K': use 4K or 2M"),
    ("pack/frame-size-0", PACK + " --frame-size 0", "invalid frame size '0'"),
    ("pack/frame-size-5K", PACK + " --frame-size 5K", "invalid frame size '5K'"),
    ("pack/frame-size-words", PACK + " --frame-size big", "invalid frame size 'big'"),
    ("diff/no-base", "diff m1 --store store", "Missing option '--base'"),
    ("diff/compress-lz4", DIFF + " --compress lz4", "invalid compression 'lz4'"),
    ("diff/block-size-1M", DIFF + " --block-size 1M", "invalid block size '1M'"),
    ("export/compress-lz4-level", "export vm --store store -o out --compress lz4:9",
     "invalid compression 'lz4:9': use none, zstd, zstd:LEVEL or lz4"),
    ("export/frame-size-128M", "export vm --store store -o out --frame-size 128M",
     "invalid frame size '128M': a multiple of 4K up to 64M"),
    ("inspect/no-target", "inspect", "Missing argument 'BUILD|HEADER'"),
    ("inspect/at-hello", INSPECT + " --at hello",
     "Invalid value for '--at': invalid offset 'hello'"),
    ("inspect/at-0xZZ", INSPECT + " --at 0xZZ", "invalid offset '0xZZ'"),
    ("inspect/at-negative", INSPECT + " --at=-4096", "invalid offset '-4096': must not be"),
    ("unpack/no-output", "unpack vm --store store", "Missing option '-o' / '--output'"),
    ("restore/no-socket", "restore --vm vm --store store", "Missing option '--socket'"),
    ("restore/fault-around-x", RESTORE + " --fault-around x",
     "invalid fault-around size (or 'adaptive') 'x'"),
    ("restore/timeout-words", RESTORE + " --handshake-timeout soon", "'soon' is not a valid float"),
    ("restore/cache-mb-words", RESTORE + " --cache-mb lots", "'lots' is not a valid integer"),
    ("restore/vmstate-alone", RESTORE + " --vmstate m0", "need --firecracker-api"),
    ("restore/api-timeout-0", RESTORE + " --firecracker-api api.sock --api-timeout 0",
     "must be more than 0 seconds"),
    ("demo/threads-words", "demo --threads many", "'many' is not a valid integer"),
]


@pytest.mark.parametrize(("argv", "expect", "process"), cases(USAGE))
def test_usage_error_is_one_line_and_exit_2(store: Path, argv: str, expect: str,
                                            process: bool) -> None:
    before = listing(store.parent)
    result = fcsnap(*argv.split(), cwd=store.parent, process=process)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), result.stderr
    assert expect in lines[0] and "--help" in lines[0]
    assert listing(store.parent) == before


RUNTIME = [
    ("unknown-build", INSPECT.replace("vm", "nope"), "no build or VM named 'nope'"),
    ("offset-outside-memory", INSPECT + " --at 1G", "outside guest memory"),
    ("block-size-not-the-base", DIFF + " --block-size 2M",
     "block size 2M differs from the base build's 4K"),
    ("output-is-a-directory", "unpack vm --store store -o store",
     "store is a directory: give the memory file to write"),
    ("vmstate-is-a-directory", PACK + " --vmstate store", "vmstate file store is not a regular"),
    ("memfile-unaligned", "pack store/vms/vm --store store",
     "is not a multiple of the block size 4K (a Firecracker memory file is whole pages)"),
]


@pytest.mark.parametrize(("argv", "expect", "process"), cases(RUNTIME))
def test_runtime_failure_is_one_line_and_exit_1(store: Path, argv: str, expect: str,
                                                process: bool) -> None:
    result = fcsnap(*argv.split(), cwd=store.parent, process=process)
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), result.stderr
    assert expect in lines[0]


def commands() -> dict[str, Any]:
    """Every command line's command by how it is typed ("" the root, "ws merge")."""
    tree = command_tree()
    found: dict[str, Any] = {"": tree}
    for name, command in tree.commands.items():
        found[name] = command
        for sub, inner in getattr(command, "commands", {}).items():
            found[f"{name} {sub}"] = inner
    return found


PANELS = ("Store", "Output", "S3 stores", "Fault handling", "Firecracker API", "Socket access")


@pytest.mark.parametrize("command", list(commands()))
def test_help_shows_flags_as_flags(tmp_path: Path, command: str) -> None:
    """Every switch's help row is the switch and its text: no metavar (`--json <bool>`); the
    usage line names arguments plainly (no `{BUILD}`)."""
    result = fcsnap(*command.split(), "-h", cwd=tmp_path, columns=200)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"Usage: fcsnap {command}".replace("  ", " ") in out
    assert "<bool>" not in out and "BOOLEAN" not in out and "{" not in out
    switches = [p for p in commands()[command].params if getattr(p, "is_flag", False)
                and not p.hidden]
    assert re.search(r"--help\s+-h\s+Show this message", out)
    for param in switches:
        long = next(o for o in param.opts if o.startswith("--"))
        short = "".join(rf"\s+{re.escape(o)}" for o in param.opts if not o.startswith("--"))
        first = (param.help or "").split()[0]
        assert re.search(rf"{re.escape(long)}{short}\s+{re.escape(first)}", out), long
    if command == "restore":
        assert all(f"─ {panel} ─" in out for panel in PANELS), out


@pytest.mark.parametrize("command", [c for c, cmd in commands().items()
                                     if c and not hasattr(cmd, "commands")])
def test_every_command_shows_examples(tmp_path: Path, command: str) -> None:
    out = fcsnap(*command.split(), "--help", cwd=tmp_path, columns=200).stdout
    examples = out.split("Examples:", 1)[1]
    assert f"fcsnap {command} " in examples or examples.strip() == f"fcsnap {command}"


def test_no_command_shows_the_help(tmp_path: Path) -> None:
    """Run bare: the help (commands and all), with exit status 2 as for any usage error."""
    result = fcsnap(cwd=tmp_path, process=True)
    assert result.returncode == 2 and result.stderr == ""
    assert "Usage: fcsnap [OPTIONS] COMMAND" in result.stdout and "─ Commands ─" in result.stdout
    assert all(f" {name} " in result.stdout for name in command_tree().commands)


@pytest.mark.parametrize(("argv", "suggested"), [
    ("pakc", "Did you mean 'pack'"),
    ("inspect vm --stor store", "--store)"),
    ("pack m0 --store store --compres zstd", "--compress"),
])
def test_a_typo_gets_a_suggestion(store: Path, argv: str, suggested: str) -> None:
    result = fcsnap(*argv.split(), cwd=store.parent)
    assert result.returncode == 2 and suggested in result.stderr, result.stderr


def test_shell_completion_completes_commands_and_options(tmp_path: Path) -> None:
    # The shell is detected from the parent process: bash here (`; true`: bash must not exec).
    script = subprocess.run(["bash", "-c", f"{sys.executable} -m fcsnap --show-completion; true"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=WAIT)
    assert "complete -o default -F _fcsnap_completion fcsnap" in script.stdout, script.stderr
    env = {"_FCSNAP_COMPLETE": "complete_bash", "COMP_CWORD": "1"}
    words = helpers.fcsnap(cwd=tmp_path, env=os.environ | env | {"COMP_WORDS": "fcsnap re"},
                           timeout=WAIT)
    assert words.stdout.split() == ["restore"], words.stderr
    options = helpers.fcsnap(cwd=tmp_path, timeout=WAIT, env=os.environ | env | {
        "COMP_WORDS": "fcsnap restore --fault", "COMP_CWORD": "2"})
    assert options.stdout.split() == ["--fault-around"], options.stderr


def test_debug_after_the_command_shows_the_traceback(store: Path) -> None:
    for argv in (["--debug", "inspect", "nope"], ["inspect", "nope", "--debug"]):
        result = fcsnap(*argv, "--store", "store", cwd=store.parent, process=True)
        assert result.returncode == 1
        assert "Traceback" in result.stderr
        assert result.stderr.splitlines()[-1].startswith("fcsnap: error: no build or VM")
    quiet = fcsnap("inspect", "nope", "--store", "store", cwd=store.parent, process=True)
    assert "Traceback" not in quiet.stderr


def test_piped_inspect_is_whole_at_any_width(store: Path) -> None:
    """Piped at 40 columns: no cell cut short ("gene…"), no row wrapped onto two lines."""
    result = fcsnap("inspect", "vm", "--store", "store", "--mappings", "--at", "0x1000",
                    cwd=store.parent, columns=40, process=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "…" not in out
    build_ids = [p.name for p in store.iterdir() if p.is_dir() and p.name != "vms"]
    assert all(build_id in out for build_id in build_ids)
    heading = "build     generation  mappings  blocks      bytes  share"
    assert heading in out.splitlines()
    builds = out.split("Builds read by this generation\n", 1)[1].split("\n\n", 1)[0]
    rows = builds.splitlines()[2:]
    cells = [row.split()[0] for row in rows]
    assert sorted(cells[:-1]) == sorted(b[:8] for b in build_ids) and cells[-1] == "(zeros)"
    mappings = out.split("Mappings\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert mappings and all(len(row.split()) == 4 for row in mappings)
    assert "00000000-0000-0000-0000-000000000000" not in out  # zero mappings say (zeros)


def test_a_reader_that_stops_early_gets_no_error_line(store: Path) -> None:
    """`fcsnap inspect ... | head`: once the reader has gone, no "Broken pipe" error line and
    no traceback (the output is larger than a pipe's buffer, so the writes do meet it)."""
    read_end, write_end = os.pipe()
    argv = ["inspect", "vm", "--store", "store", "--mappings", *["--at", "0x1000"] * 3000]
    proc = subprocess.Popen([sys.executable, "-m", "fcsnap", *argv], cwd=store.parent,
                            stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.read(100).startswith(b"Header ")
    _, err = proc.communicate(timeout=WAIT)
    assert (proc.returncode, err) == (1, b"")


def test_inspect_names_parent_and_root(store: Path) -> None:
    out = fcsnap("inspect", "vm", "--store", "store", cwd=store.parent).stdout
    gen0 = fcsnap("inspect", "vm", "--store", "store", "--json", cwd=store.parent)
    meta = json.loads(gen0.stdout)["metadata"]
    assert re.search(rf"^parent_build_id +{meta['parent_build_id']}$", out, re.M)
    assert re.search(rf"^base_build_id +{meta['base_build_id']} \(generation 0 of this",
                     out, re.M)
    assert meta["parent_build_id"] == meta["base_build_id"]  # generation 1: both are gen 0


def test_verify_counts_read_as_english(store: Path, tmp_path: Path) -> None:
    mem = tmp_path / "one"
    write_full(mem, synthetic_memory(64 << 10, seed=5))
    packed = fcsnap("pack", "--init", str(mem), "--store", "st", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr
    build = next(p for p in (tmp_path / "st").iterdir() if p.is_dir())
    result = fcsnap("verify", str(build), cwd=tmp_path)
    assert re.fullmatch(r"ok: build \S+ \(generation 0\): 1 build and \d+ blocks checked\n",
                        result.stdout), result.stdout


def test_quiet_is_quiet_and_json_still_answers(tmp_path: Path) -> None:
    """--quiet promises "no progress bar or summary" for every command that writes a build;
    --json is asked for explicitly, so it still prints its object."""
    mem = tmp_path / "one"
    write_full(mem, synthetic_memory(64 << 10, seed=6))
    runs = {
        "pack": fcsnap("pack", "--init", str(mem), "--store", "st", "--name", "a", "-q",
                       cwd=tmp_path),
        "diff": fcsnap("diff", str(mem), "--base", "a", "--store", "st", "--name", "a",
                       "--quiet", cwd=tmp_path),
        "squash": fcsnap("squash", "a", "--store", "st", "-q", cwd=tmp_path),
    }
    for verb, result in runs.items():
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), verb
    both = fcsnap("squash", "a", "--store", "st", "-q", "--json", cwd=tmp_path)
    assert json.loads(both.stdout)["generation"] == 0
    loud = fcsnap("squash", "a", "--store", "st", cwd=tmp_path)
    assert loud.stdout.startswith("squashed build ")


def test_a_bare_header_has_no_known_parent(store: Path, tmp_path: Path) -> None:
    """Outside its build directory a generation-1 header names its base, not its parent."""
    gen1 = json.loads(fcsnap("inspect", "vm", "--store", "store", "--json",
                             cwd=store.parent).stdout)["metadata"]
    bare = tmp_path / "copy.header"
    bare.write_bytes((store / gen1["build_id"] / "memfile.header").read_bytes())
    report = json.loads(fcsnap("inspect", str(bare), "--json", cwd=tmp_path).stdout)
    assert report["metadata"] == {**gen1, "parent_build_id": None}
    out = fcsnap("inspect", str(bare), cwd=tmp_path).stdout
    assert re.search(r"^parent_build_id +unknown \(no build.json beside the header\)$", out, re.M)
