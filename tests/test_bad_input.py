"""Bad input for every command, through the real CLI: one clear line, exit 1, nothing changed.

Each row takes a fresh copy of a small two-generation store (generation 0 raw, generation 1 zstd
seekable), damages it or hands the command a bad file or option, runs `fcsnap` (in the test's
process and as `python -m fcsnap`: see _cases), and checks what an operator relies on: exactly
one stderr line `fcsnap: error: <reason>` (exit 1), no traceback, nothing on stdout, and every
file under the test's directory exactly as it was (names, sizes, mtimes, vms/ pointers): no new
build, no staging directory, no partial output.

Usage errors (a missing or unknown option, a value that can never work) exit 2 before anything
is read: tests/test_cli_usage.py holds their table.

Root ignores permission bits, so "permission denied" rows make a directory immutable with
`chattr +i`, which denies root too (EPERM); a read that root cannot be denied is covered by a
directory or a FIFO where a file is expected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import fcsnap_here

from fcsnap.store.format.hashes import dump_hashes, read_hashes
from fcsnap.store.format.layout import VMS
from fcsnap.store.format.seekable import SeekableReader, SeekableWriter
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full
from fcsnap.workingset import dump_working_set

SIZE = 1 << 20
FRAME = 64 << 10
ABSENT = uuid.UUID("0badc0de-0000-4000-8000-000000000000")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once: store/ (vms/base: generation 0, raw; vms/vm: generation 1, zstd) and inputs."""
    root = tmp_path_factory.mktemp("pristine")
    mem = synthetic_memory(SIZE, seed=7)
    write_full(root / "m0", mem)
    _, g0 = ops.pack(root / "m0", root / "store", BuildOptions(name="base"))
    write_full(root / "m1", evolve(mem, seed=8, dirty_share=0.3)[0])
    ops.diff(
        root / "m1", g0, root / "store",
        BuildOptions(compression="zstd", frame_size=FRAME, name="vm"),
    )
    write_full(root / "m2M", synthetic_memory(2 * SIZE, seed=9))
    (root / "ws2M").write_bytes(dump_working_set(2 * SIZE, [0]))
    (root / "text.txt").write_text("not guest memory\n" * 294 + "end\n")  # 5002 bytes
    (root / "empty").write_bytes(b"")
    (root / "out").mkdir()
    return root


@dataclass
class Ctx:
    """One row's copy of the pristine tree, and the names its command lines use."""

    root: Path
    immutable: list[Path] = field(default_factory=list)
    names: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        store = self.root / "store"
        g1 = (store / VMS / "vm").read_text().strip()
        g0 = (store / VMS / "base").read_text().strip()
        self.names = {
            "root": str(self.root), "store": str(store), "g0": g0, "g1": g1,
            "b0": str(store / g0), "b1": str(store / g1), "absent": str(ABSENT),
            "m0": str(self.root / "m0"), "m1": str(self.root / "m1"),
            "m2M": str(self.root / "m2M"), "ws2M": str(self.root / "ws2M"),
            "text": str(self.root / "text.txt"), "empty": str(self.root / "empty"),
            "fifo": str(self.root / "fifo"), "out": str(self.root / "out"),
        }

    def path(self, template: str) -> Path:
        return Path(template.format_map(self.names))

    def release(self) -> None:
        for path in self.immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)


Damage = Callable[[Ctx], None]


def cut(where: str, keep: int) -> Damage:
    """Keep the first `keep` bytes (negative: drop that many from the end)."""

    def apply(c: Ctx) -> None:
        path = c.path(where)
        path.write_bytes(path.read_bytes()[:keep])

    return apply


def poke(where: str, offset: int, data: bytes) -> Damage:
    def apply(c: Ctx) -> None:
        path = c.path(where)
        blob = bytearray(path.read_bytes())
        blob[offset : offset + len(data)] = data
        path.write_bytes(bytes(blob))

    return apply


def flip(where: str, offset: int) -> Damage:
    """Invert one byte (offset may count from the end)."""

    def apply(c: Ctx) -> None:
        path = c.path(where)
        blob = bytearray(path.read_bytes())
        blob[offset] ^= 0xFF
        path.write_bytes(bytes(blob))

    return apply


def write(where: str, data: bytes) -> Damage:
    return lambda c: c.path(where).write_bytes(data)


def remove(where: str) -> Damage:
    def apply(c: Ctx) -> None:
        path = c.path(where)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return apply


def as_dir(where: str) -> Damage:
    """A directory where a file is expected."""

    def apply(c: Ctx) -> None:
        c.path(where).unlink()
        c.path(where).mkdir()

    return apply


def as_fifo(where: str) -> Damage:
    """A FIFO where a file is expected: opening it for reading would wait for a writer."""

    def apply(c: Ctx) -> None:
        path = c.path(where)
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return apply


def immutable(where: str) -> Damage:
    """chattr +i: nothing can be created, renamed or removed in it, not even by root."""

    def apply(c: Ctx) -> None:
        path = c.path(where)
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"chattr +i is not supported here: {done.stderr.strip()}")
        c.immutable.append(path)

    return apply


def edit_json(where: str, change: Callable[[dict[str, Any]], object]) -> Damage:
    def apply(c: Ctx) -> None:
        path = c.path(where)
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return apply


def repoint(c: Ctx) -> None:
    """Generation 1's header names a build that is not in the store instead of generation 0."""
    path = c.path("{b1}/memfile.header")
    data = path.read_bytes()
    g0 = uuid.UUID(c.names["g0"]).bytes
    path.write_bytes(data[:64] + data[64:].replace(g0, ABSENT.bytes))


def shorter_hashes(c: Ctx) -> None:
    """A valid sidecar one digest short of what the header maps."""
    path = c.path("{b1}/memfile.hashes")
    block_size, table = read_hashes(path)
    path.write_bytes(dump_hashes(block_size, table[:-1].tobytes()))


def shorter_zstd(c: Ctx) -> None:
    """A valid seekable file holding only the first frame of the diff."""
    path = c.path("{b1}/memfile.diff.zst")
    with SeekableReader(path) as reader:
        first = reader.read_frame(0)
    with path.open("wb") as f, SeekableWriter(f, FRAME) as writer:
        writer.write(first)


def fifo(c: Ctx) -> None:
    os.mkfifo(c.path("{fifo}"))


@dataclass(frozen=True)
class Row:
    id: str
    argv: str  # a command line; {names} from Ctx.names
    expect: str  # a regular expression the error must match
    damage: tuple[Damage, ...] = ()


HEADER1 = "{b1}/memfile.header"
HASHES0, HASHES1 = "{b0}/memfile.hashes", "{b1}/memfile.hashes"
MANIFEST1 = "{b1}/build.json"
RAW0, ZST1 = "{b0}/memfile.diff", "{b1}/memfile.diff.zst"
PACK = "pack {m0} --store {store}"
DIFF = "diff {m1} --base vm --store {store}"
INSPECT = "inspect vm --store {store}"
VERIFY = "verify vm --store {store}"
UNPACK = "unpack vm --store {store} -o {out}/mem"
SQUASH = "squash vm --store {store}"
RESTORE = "restore --vm vm --store {store} --socket {out}/uffd.sock"
U64 = (1 << 60).to_bytes(8, "little")
NOT_REGULAR = "not a regular file"
DIGESTS_HUGE = "says 1152921504606846976 digests but holds"
SHORT_DIFF = r"holds \d+ bytes but the header maps up to"
TOO_DEEP = b"[" * 100_000
EPERM = "Operation not permitted"
STORE_EPERM = f"cannot write to store .*: {EPERM}"
VMS_EPERM = f"cannot point .*vms/vm at .*: {EPERM}"

ROWS = [
    # -- pack: memory files, options, the store --------------------------------------------
    Row("pack/missing-file", "pack {root}/nope --store {store}", "nope: No such file"),
    Row("pack/directory", "pack {out} --store {store}", "is a directory, not a memory file"),
    Row("pack/text-unaligned", "pack {text} --store {store}", "size 5002 is not a multiple of"),
    Row("pack/fifo", "pack {fifo} --store {store}", NOT_REGULAR, (fifo,)),
    Row("pack/dev-null", "pack /dev/null --store {store}", NOT_REGULAR),
    Row("pack/empty", "pack {empty} --store {store}", "is empty: not a memory file"),
    Row("pack/1M-file-2M-blocks", PACK + " --block-size 2M", "not a multiple of the block size"),
    Row("pack/name-slash", PACK + " --name a/b", "invalid VM name 'a/b'"),
    Row("pack/name-dotdot", PACK + " --name ..", r"invalid VM name '\.\.'"),
    Row("pack/vmstate-missing", PACK + " --vmstate {root}/nope", "vmstate file .* not found"),
    Row("pack/store-is-a-file", "pack {m0} --store {text}", "store .*text.txt is not a directory"),
    Row("pack/new-store-bad-file", "pack --init {text} --store {root}/new", "is not a multiple of"),
    Row("pack/store-immutable", PACK, STORE_EPERM, (immutable("{store}"),)),
    Row("pack/vms-immutable", PACK + " --name vm", VMS_EPERM, (immutable("{store}/vms"),)),
    # -- diff: the new memory file, the base and everything the base reads ------------------
    Row("diff/missing-file", "diff {root}/nope --base vm --store {store}", "No such file"),
    Row("diff/size-mismatch", "diff {m2M} --base vm --store {store}", "2097152 bytes, but base"),
    Row("diff/text-unaligned", "diff {text} --base vm --store {store}", "not a multiple of"),
    Row("diff/fifo", "diff {fifo} --base vm --store {store}", NOT_REGULAR, (fifo,)),
    Row("diff/base-unknown", "diff {m1} --base nope --store {store}", "no build or VM named"),
    Row("diff/base-name-slash", "diff {m1} --base a/b --store {store}", "named 'a/b'"),
    Row("diff/base-id-absent", "diff {m1} --base {absent} --store {store}", "not found in store"),
    Row("diff/base-outside-store", "diff {m1} --base {b0} --store {out}", "not an fcsnap store"),
    Row("diff/pointer-garbage", DIFF, "does not hold a build id",
        (write("{store}/vms/vm", b"garbage\n"),)),
    Row("diff/pointer-dangling", DIFF, "points at build .*, which is not in",
        (write("{store}/vms/vm", f"{ABSENT}\n".encode()),)),
    Row("diff/header-truncated", DIFF, "not a whole number of 40-byte", (cut(HEADER1, -17),)),
    Row("diff/header-10-bytes", DIFF, "too short: 10 bytes", (cut(HEADER1, 10),)),
    Row("diff/header-version-9", DIFF, "unsupported header version 9",
        (poke(HEADER1, 0, b"\x09"),)),
    Row("diff/header-fifo", DIFF, NOT_REGULAR, (as_fifo(HEADER1),)),
    Row("diff/header-names-absent-build", DIFF, f"build {ABSENT} .* is not in the store",
        (repoint,)),
    Row("diff/ancestor-missing", DIFF, "is not in the store", (remove("{b0}"),)),
    Row("diff/hashes-truncated", DIFF, r"says \d+ digests but holds", (cut(HASHES0, -5),)),
    Row("diff/hashes-bad-magic", DIFF, "not a hash sidecar", (poke(HASHES0, 0, b"XXXX"),)),
    Row("diff/hashes-huge-count", DIFF, DIGESTS_HUGE, (poke(HASHES0, 16, U64),)),
    Row("diff/hashes-missing", DIFF, "cannot read hash sidecar .*No such file",
        (remove(HASHES1),)),
    Row("diff/hashes-short-of-header", DIFF, "hash sidecar holds", (shorter_hashes,)),
    Row("diff/manifest-invalid-json", DIFF, "not valid JSON", (write(MANIFEST1, b"{"),)),
    Row("diff/manifest-nested", DIFF, "nested too deeply", (write(MANIFEST1, TOO_DEEP),)),
    Row("diff/manifest-missing", DIFF, "cannot read manifest", (remove(MANIFEST1),)),
    Row("diff/manifest-directory", DIFF, "build.json: is a directory", (as_dir(MANIFEST1),)),
    Row("diff/manifest-disagrees", DIFF, "build.json and memfile.header disagree",
        (edit_json(MANIFEST1, lambda m: m.update(size=2 * SIZE)),)),
    Row("diff/block-size-2M", DIFF + " --block-size 2M", "differs from the base"),
    Row("diff/name-slash", DIFF + " --name x/y", "invalid VM name 'x/y'"),
    Row("diff/store-immutable", DIFF, STORE_EPERM, (immutable("{store}"),)),
    # -- inspect: header files and builds, lookups ------------------------------------------
    Row("inspect/missing", "inspect {root}/nope", "nope not found"),
    Row("inspect/text", "inspect {text}", "not a whole number of 40-byte"),
    Row("inspect/empty", "inspect {empty}", "too short: 0 bytes"),
    Row("inspect/dev-null", "inspect /dev/null", NOT_REGULAR),
    Row("inspect/fifo", "inspect {fifo}", NOT_REGULAR, (fifo,)),
    Row("inspect/not-a-build", "inspect {out}", "directory without memfile.header"),
    Row("inspect/header-truncated", INSPECT, "not a whole number", (cut(HEADER1, -17),)),
    Row("inspect/header-short-cover", INSPECT, "not the memory size", (cut(HEADER1, -40),)),
    Row("inspect/header-v4", INSPECT, "version 4 body: LZ4 frame is damaged",
        (poke(HEADER1, 0, b"\x04"),)),
    Row("inspect/header-size-unaligned", INSPECT, "not a positive multiple of 4096",
        (poke(HEADER1, 16, (SIZE + 1).to_bytes(8, "little")),)),
    Row("inspect/header-directory", INSPECT, "memfile.header: is a directory",
        (as_dir(HEADER1),)),
    Row("inspect/at-beyond-memory", INSPECT + " --at 1M", "outside guest memory"),
    Row("inspect/id-absent", "inspect {absent} --store {store}", "not found in store"),
    Row("inspect/name-slash", "inspect a/b --store {store}", "no build or VM named 'a/b'"),
    Row("inspect/store-missing", "inspect vm --store {root}/nope", "does not exist: create it"),
    # -- verify: every file of every build read ---------------------------------------------
    Row("verify/raw-byte-flipped", VERIFY, "does not match its hash", (flip(RAW0, 5000),)),
    Row("verify/raw-short", VERIFY, r"diff holds \d+ bytes, hashes cover", (cut(RAW0, -8192),)),
    Row("verify/raw-missing", VERIFY, "diff file missing", (remove(RAW0),)),
    Row("verify/raw-fifo", VERIFY, NOT_REGULAR, (as_fifo(RAW0),)),
    Row("verify/zstd-byte-flipped", VERIFY, "does not match its hash|corrupt zstd|checksum",
        (flip(ZST1, 100),)),
    Row("verify/zstd-footer-flipped", VERIFY, "not a zstd seekable file", (flip(ZST1, -1),)),
    Row("verify/zstd-truncated", VERIFY, "not a zstd seekable file", (cut(ZST1, -5),)),
    Row("verify/zstd-shorter", VERIFY, r"diff holds \d+ bytes", (shorter_zstd,)),
    Row("verify/hashes-missing", VERIFY, "cannot read hash sidecar", (remove(HASHES0),)),
    Row("verify/hashes-huge-count", VERIFY, DIGESTS_HUGE, (poke(HASHES1, 16, U64),)),
    Row("verify/hashes-fifo", VERIFY, NOT_REGULAR, (as_fifo(HASHES0),)),
    Row("verify/hashes-2M-blocks", VERIFY, "hash sidecar .* block size 2097152",
        (poke(HASHES0, 8, (2 * SIZE).to_bytes(8, "little")),)),
    Row("verify/manifest-list", VERIFY, "expected a JSON object", (write(MANIFEST1, b"[]"),)),
    Row("verify/manifest-no-size", VERIFY, "missing size",
        (edit_json(MANIFEST1, lambda m: m.pop("size")),)),
    Row("verify/manifest-size-2**64", VERIFY, "size is not an unsigned 64-bit integer",
        (edit_json(MANIFEST1, lambda m: m.update(size=1 << 64)),)),
    Row("verify/manifest-not-utf8", VERIFY, "not valid JSON", (write(MANIFEST1, b"\xff{}"),)),
    Row("verify/manifest-disagrees", VERIFY, "build.json disagrees with memfile.header",
        (edit_json(MANIFEST1, lambda m: m.update(generation=5)),)),
    Row("verify/ancestor-missing", VERIFY, "is missing from the store", (remove("{b0}"),)),
    Row("verify/header-names-absent-build", VERIFY, f"build {ABSENT} is missing", (repoint,)),
    Row("verify/unknown", "verify nope --store {store}", "no build or VM named 'nope'"),
    Row("verify/store-is-a-file", "verify vm --store {text}", "is not a directory"),
    # -- unpack: the output, and the data it reads ------------------------------------------
    Row("unpack/output-exists", "unpack vm --store {store} -o {text}", r"exists \(use --force"),
    Row("unpack/output-directory", "unpack vm --store {store} -o {out} --force",
        "is a directory"),
    Row("unpack/output-dir-missing", "unpack vm --store {store} -o {root}/nope/mem",
        "cannot write .*nope/mem: no such directory"),
    Row("unpack/output-dir-immutable", UNPACK, f"cannot write .*mem: {EPERM}",
        (immutable("{out}"),)),
    Row("unpack/raw-short", UNPACK, SHORT_DIFF, (cut(RAW0, -8192),)),
    Row("unpack/zstd-frame-corrupt", UNPACK, "corrupt zstd frame", (poke(ZST1, 0, bytes(4)),)),
    Row("unpack/zstd-shorter", UNPACK, SHORT_DIFF, (shorter_zstd,)),
    Row("unpack/zstd-missing", UNPACK, "diff file missing", (remove(ZST1),)),
    Row("unpack/raw-directory", UNPACK, NOT_REGULAR, (as_dir(RAW0),)),
    Row("unpack/header-names-absent-build", UNPACK, f"build {ABSENT} referenced by the header",
        (repoint,)),
    Row("unpack/header-short-cover", UNPACK, "not the memory size", (cut(HEADER1, -40),)),
    Row("unpack/unknown", "unpack nope --store {store} -o {out}/mem", "no build or VM named"),
    # -- squash: reads a whole generation, writes a build -----------------------------------
    Row("squash/zstd-frame-corrupt", SQUASH, "corrupt zstd frame", (poke(ZST1, 0, bytes(4)),)),
    Row("squash/raw-short", SQUASH, SHORT_DIFF, (cut(RAW0, -8192),)),
    Row("squash/ancestor-missing", SQUASH, "referenced by the header is not in",
        (remove("{b0}"),)),
    Row("squash/manifest-zstd-without-frame", SQUASH, "zstd compression without a frame_size",
        (edit_json(MANIFEST1, lambda m: m.update(frame_size=None)),)),
    Row("squash/manifest-nested", SQUASH, "nested too deeply", (write(MANIFEST1, TOO_DEEP),)),
    Row("squash/name-slash", SQUASH + " --name ../x", "invalid VM name"),
    Row("squash/store-immutable", SQUASH, STORE_EPERM, (immutable("{store}"),)),
    Row("squash/vms-immutable", SQUASH + " --name vm", VMS_EPERM, (immutable("{store}/vms"),)),
    Row("squash/id-absent", "squash {absent} --store {store}", "not found in store"),
    # -- restore: everything is checked before the socket is listened on --------------------
    Row("restore/unknown", "restore --vm nope --store {store} --socket {out}/s",
        "no build or VM named"),
    Row("restore/header-truncated", RESTORE, "not a whole number", (cut(HEADER1, -17),)),
    Row("restore/ancestor-missing", RESTORE, "referenced by the header is not in",
        (remove("{b0}"),)),
    Row("restore/raw-short", RESTORE, SHORT_DIFF, (cut(RAW0, -8192),)),
    Row("restore/zstd-footer-flipped", RESTORE, "not a zstd seekable file", (flip(ZST1, -1),)),
    Row("restore/zstd-fifo", RESTORE, NOT_REGULAR, (as_fifo(ZST1),)),
    Row("restore/socket-is-a-file", "restore --vm vm --store {store} --socket {text}",
        "exists and is not a socket"),
    Row("restore/socket-dir-missing", "restore --vm vm --store {store} --socket {root}/nope/s",
        "cannot listen on .*No such file"),
    Row("restore/socket-dir-immutable", RESTORE, f"cannot listen on .*{EPERM}",
        (immutable("{out}"),)),
    Row("restore/prefetch-garbage", RESTORE + " --prefetch-ws {text}",
        "not a working-set file"),
    Row("restore/prefetch-fifo", RESTORE + " --prefetch-ws {fifo}", NOT_REGULAR, (fifo,)),
    Row("restore/prefetch-other-size", RESTORE + " --prefetch-ws {ws2M}",
        "recorded for 2097152 bytes"),
    Row("restore/verify-hashes-missing", RESTORE + " --verify", "cannot read hash sidecar",
        (remove(HASHES0),)),
    Row("restore/stats-dir-missing", RESTORE + " --stats {root}/nope/stats.json",
        "no such directory"),
    Row("restore/stats-is-a-directory", RESTORE + " --stats {out}", "is a directory"),
]


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under root: files by size and mtime (vms/ pointers by content too), other
    entries by type. Directory mtimes are left out: a staging directory created and removed
    again changes its parent's, and a leftover one shows up by name."""
    entries: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            key = str(path.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                pointer = path.read_text() if path.parent.name == VMS else None
                entries[key] = ("file", st.st_size, st.st_mtime_ns, pointer)
            else:
                entries[key] = (stat.S_IFMT(st.st_mode),)
    return entries


def _cases(rows: list[Row]) -> list[Any]:
    """Every row run in this process (the same entry point, exit status and output), and
    every row run as a process of its own: each command's first row in the default run,
    the rest behind `slow` (what only a process shows: its start-up, what the interpreter
    prints as it exits)."""
    first = {row.argv.split(" ")[0]: row for row in reversed(rows)}
    return [pytest.param(row, False, id=row.id) for row in rows] + [
        pytest.param(row, True, id=f"{row.id}-process",
                     marks=() if first[row.argv.split(" ")[0]] is row else pytest.mark.slow)
        for row in rows
    ]


@pytest.mark.parametrize(("row", "process"), _cases(ROWS))
def test_bad_input_is_one_clear_line_and_changes_nothing(
    row: Row, process: bool, pristine: Path, tmp_path: Path
) -> None:
    shutil.copytree(pristine, tmp_path / "t")
    c = Ctx(tmp_path / "t")
    env = {k: v for k, v in os.environ.items() if k != "FCSNAP_DEBUG"} | {"COLUMNS": "200"}
    try:
        for damage in row.damage:
            damage(c)
        argv = [part.format_map(c.names) for part in row.argv.split(" ")]
        before = tree(c.root)
        result = subprocess.run(
            [sys.executable, "-m", "fcsnap", *argv], cwd=c.root, env=env,
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        ) if process else fcsnap_here(*argv, cwd=c.root, env=env, timeout=60)
        after = tree(c.root)
    finally:
        c.release()
    assert "Traceback" not in result.stderr, result.stderr
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), result.stderr
    assert re.search(row.expect, result.stderr), result.stderr
    assert after == before


def test_every_command_has_rows() -> None:
    commands = {row.argv.split(" ")[0] for row in ROWS}
    assert commands == {"pack", "diff", "inspect", "verify", "unpack", "squash", "restore"}
