"""The README and docs/ stay true to the code. Every shell block marked runnable runs; every
option a command's --help shows is documented; every relative link resolves. docs/FORMAT.md:
every citation of it names a real section, its byte tables match the structs the code parses
with, its constants and build.json fields match the code, and nothing cites the retired
specification (outside the repository) any more."""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import fcsnap_here

from fcsnap.store.format.manifest import Manifest, Stats
from fcsnap.testing.memimage import evolve, synthetic_memory, write_full, write_sparse_diff

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FORMAT = DOCS / "FORMAT.md"
THREAT_MODEL = DOCS / "THREAT_MODEL.md"
LEAD_CHECK = "<!-- lead: check against code -->"
RUNNABLE = re.compile(r"<!-- runnable -->\n```sh\n(.*?)```", re.DOTALL)
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_LINES = 250  # the most the README may have
MEMORY = 8 << 20  # bytes of guest memory the runnable blocks' snapshots hold
RUN_WAIT = 120.0  # seconds a runnable block, or a --help, may take

HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
CITATION = re.compile(r"docs/FORMAT\.md((?:(?:,| to| and)? §\d+(?:\.\d+)*)+)")
SECTION_SIGN = re.compile(r"§(\d+(?:\.\d+)*)")
GRAMMAR = re.compile(r"<!-- grammar: ([\w.]+) -->\n((?:\|.*\n)+)")
# struct format letter -> the type names a byte table may give it
TYPES = {"Q": {"u64"}, "I": {"u32"}, "H": {"u16"}, "B": {"u8"}, "s": {"uuid", "bytes"}}
# Built in two parts so that this file does not match what it looks for.
RETIRED = ["SPEC" + ".md", "SPEC" + " section", "../" + "shared", "/work/" + "shared"]


def manual_pages() -> list[Path]:
    """The README and every page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def runnable_blocks() -> dict[Path, list[str]]:
    """The shell blocks marked `<!-- runnable -->` of each page that has any."""
    found = {page: RUNNABLE.findall(page.read_text()) for page in manual_pages()}
    return {page: blocks for page, blocks in found.items() if blocks}


def docs_environment(work: Path) -> dict[str, str]:
    """What the runnable blocks start from, in `work`: two Full snapshots of one VM (mem.snap,
    mem2.snap), a Diff snapshot taken after the second (dirty.snap), a vmstate, and `fcsnap`
    on PATH running this tree with this interpreter."""
    mem = synthetic_memory(MEMORY, seed=31)
    mem2, _ = evolve(mem, seed=32, dirty_share=0.1)
    mem3, dirty = evolve(mem2, seed=33, dirty_share=0.02)
    write_full(work / "mem.snap", mem)
    write_full(work / "mem2.snap", mem2)
    write_sparse_diff(work / "dirty.snap", mem3, dirty)
    (work / "vm.state").write_bytes(b"vmstate")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "fcsnap"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fcsnap "$@"\n')
    shim.chmod(0o755)
    path = f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT)}


def cli_commands() -> list[tuple[str, ...]]:
    """Every command of the command line, as the words that name it: () for `fcsnap` itself,
    ("pack",), ("ws", "merge"), ..."""
    from fcsnap.cli import command_tree

    def walk(command: Any, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for name, sub in getattr(command, "commands", {}).items():
            found += walk(sub, (*prefix, name)) or [(*prefix, name)]
        return found

    return [(), *walk(command_tree(), ())]


def help_options(command: list[str]) -> list[str]:
    """The long options `fcsnap COMMAND --help` shows (--help itself left out), asked in this
    process: the help is the entry point's output, not the process's."""
    shown = fcsnap_here(*command, "--help", env={**os.environ, "COLUMNS": "200"},
                        timeout=RUN_WAIT)
    assert shown.returncode == 0, shown.stderr
    options = dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", shown.stdout))
    return [o for o in options if o != "--help"]


def names_option(text: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def anchors(page: Path) -> set[str]:
    """The #anchors of a markdown page's headings, made as GitHub makes them."""
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", page.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def format_text() -> str:
    return FORMAT.read_text()


def sections() -> set[str]:
    return set(HEADING.findall(format_text()))


def repo_text_files() -> list[Path]:
    """Every text file of the repository: what git tracks or would track (not what it ignores,
    such as a virtualenv), or every file outside hidden directories when git is unavailable."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
        paths = [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        paths = [
            p for p in ROOT.rglob("*")
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts[:-1])
        ]
    out = []
    for path in paths:
        if path.is_file() and path.stat().st_size <= 2 << 20 and b"\0" not in path.read_bytes():
            out.append(path)
    return out


def table_rows(table: str) -> list[list[str]]:
    """The body rows of a markdown table, cells stripped (header and rule left out)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return rows[2:]


def resolve(dotted: str) -> object:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def struct_fields(layout: struct.Struct) -> list[tuple[int, int, str]]:
    """(offset, size, format letter) of each field of a little-endian, unpadded struct."""
    assert layout.format[0] == "<", f"{layout.format}: not little-endian without padding"
    fields, offset = [], 0
    for count, letter in re.findall(r"(\d*)([a-zA-Z?])", layout.format[1:]):
        n = int(count or 1)
        if letter == "s":
            fields.append((offset, n, letter))
            offset += n
            continue
        for _ in range(n):
            size = struct.calcsize("<" + letter)
            fields.append((offset, size, letter))
            offset += size
    assert offset == layout.size
    return fields


def test_format_sections_are_numbered_once_and_in_order() -> None:
    numbers = HEADING.findall(format_text())
    assert len(numbers) == len(set(numbers)), "a section number is used twice"
    keys = [tuple(int(p) for p in n.split(".")) for n in numbers]
    assert keys == sorted(keys), "sections out of order"
    assert {"3.1", "3.3", "3.4", "5", "6.2", "8.1", "9.4"} <= set(numbers)


def test_every_citation_names_a_section_that_exists() -> None:
    known = sections()
    cited: dict[str, list[str]] = {}
    for path in repo_text_files():
        text = path.read_text(errors="replace")
        refs = [s for m in CITATION.finditer(text) for s in SECTION_SIGN.findall(m.group(1))]
        if path in (FORMAT, THREAT_MODEL):  # their bare § references are to FORMAT.md
            refs += SECTION_SIGN.findall(text)
        for ref in refs:
            cited.setdefault(ref, []).append(str(path.relative_to(ROOT)))
    missing = {ref: files for ref, files in cited.items() if ref not in known}
    assert not missing, f"citations of sections FORMAT.md does not have: {missing}"
    code_citations = [f for files in cited.values() for f in files if f.startswith("fcsnap/")]
    assert len(code_citations) >= 10, "the code no longer cites the format document"


def test_every_mention_in_the_code_cites_a_section() -> None:
    """A bare "docs/FORMAT.md" in the code sends the reader to 800 lines; a section, to the
    rule the code follows."""
    bare = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in repo_text_files()
        if path.suffix in (".py", ".c", ".h")
        and any(path.is_relative_to(ROOT / part) for part in ("fcsnap", "csrc"))
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for mention in re.finditer(r"docs/FORMAT\.md", line)
        if not CITATION.match(line, mention.start())
    ]
    assert not bare, f"mentions of docs/FORMAT.md without a section: {bare}"


def test_the_readme_stays_short() -> None:
    """A newcomer reads the README in minutes; the manual is docs/."""
    lines = len(README.read_text().splitlines())
    assert lines <= README_LINES, f"README.md has {lines} lines: move the detail to docs/"


def test_the_readme_links_every_page_of_the_manual() -> None:
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in manual_pages() if p != README and f"(docs/{p.name})" not in readme]
    assert not unlinked, f"pages of docs/ the README does not link: {unlinked}"


def test_restore_md_names_every_restore_option() -> None:
    """Every option of `fcsnap restore` is on its page, and the options that have Firecracker
    load the snapshot are rows of its options table."""
    page = (DOCS / "restore.md").read_text()
    missing = [o for o in help_options(["restore"]) if not names_option(page, o)]
    assert not missing, f"restore options docs/restore.md does not name: {missing}"
    for option in ("--firecracker-api", "--vmstate", "--track-dirty-pages", "--api-timeout"):
        assert re.search(rf"^\| `{option}\b", page, re.M), option


def test_every_option_of_every_command_is_documented() -> None:
    """What `fcsnap CMD --help` offers, the README or a page of docs/ names."""
    text = "\n".join(p.read_text() for p in manual_pages())
    commands = cli_commands()
    assert {("pack",), ("restore",), ("serve",), ("ws", "merge")} <= set(commands)
    missing = {
        " ".join(command): undocumented
        for command in commands
        if (undocumented := [o for o in help_options(list(command)) if not names_option(text, o)])
    }
    assert not missing, f"options no page documents: {missing}"


def test_every_relative_link_resolves() -> None:
    """Links to files of the repository name files that exist, and their #anchors headings
    that the target has."""
    broken = []
    for page in manual_pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_every_runnable_block_is_found() -> None:
    """The test below cannot pass by running nothing: the README's stand-in quickstart and the
    store page's commands are among the runnable blocks."""
    found = {page.name: len(blocks) for page, blocks in runnable_blocks().items()}
    assert found.get("README.md", 0) >= 1 and found.get("store.md", 0) >= 3, found


@pytest.mark.parametrize("page", list(runnable_blocks()), ids=lambda p: p.name)
def test_runnable_blocks_run(page: Path, tmp_path: Path) -> None:
    """Each page's runnable blocks, in order, by `bash -e` in one directory that holds what
    the pages say they start from, with `fcsnap` on PATH running this tree."""
    blocks = runnable_blocks()[page]
    if any("fcsnap.testing.firecracker" in b or "fcsnap restore" in b for b in blocks):
        from fcsnap.uffd.support import userfaultfd_problem

        if problem := userfaultfd_problem():
            pytest.skip(f"the stand-in VM needs userfaultfd: {problem}")
    env = docs_environment(tmp_path)
    for number, block in enumerate(blocks, 1):
        try:
            done = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=RUN_WAIT,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{page.name} block {number} did not finish within {RUN_WAIT:g}s")
        assert done.returncode == 0, f"{page.name} block {number}:\n{block}\n{done.stderr}"


def test_nothing_cites_the_retired_spec() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {word}"
        for path in repo_text_files()
        for word in RETIRED
        if word in path.read_text(errors="replace")
    ]
    assert not offenders


EXPECTED_GRAMMARS = {
    "fcsnap.header.format.METADATA",
    "fcsnap.header.format.MAPPING",
    "fcsnap.store.format.hashes.HEAD",
    "fcsnap.workingset.HEAD",
    "fcsnap.workingset.BASE",
    "fcsnap.store.format.seekable.SKIPPABLE_HEAD",
    "fcsnap.store.format.seekable.ENTRY_CHECKSUM",
    "fcsnap.store.format.seekable.FOOTER",
}


def test_every_byte_table_is_there() -> None:
    assert {m.group(1) for m in GRAMMAR.finditer(format_text())} == EXPECTED_GRAMMARS


@pytest.mark.parametrize("match", list(GRAMMAR.finditer(FORMAT.read_text())),
                         ids=lambda m: m.group(1))
def test_byte_table_matches_the_struct_the_code_parses_with(match: re.Match[str]) -> None:
    layout = resolve(match.group(1))
    assert isinstance(layout, struct.Struct)
    rows = table_rows(match.group(2))
    documented = [(int(offset), int(size), kind) for offset, size, _name, kind, *_ in rows]
    actual = struct_fields(layout)
    assert [(o, s) for o, s, _ in documented] == [(o, s) for o, s, _ in actual]
    for (offset, _, kind), (_, _, letter) in zip(documented, actual, strict=True):
        assert kind in TYPES[letter], f"offset {offset}: documented {kind}, code uses {letter!r}"


def constant_rows() -> list[list[str]]:
    section = format_text().split("## 11. Constants", 1)[1]
    return table_rows("\n".join(line for line in section.splitlines() if line.startswith("|")))


def parse_value(text: str) -> object:
    """`word` -> bytes or str as the code holds it, numbers -> int, lists -> tuple."""
    items = [v.strip() for v in text.split(",")]
    values = [v.strip("`") if v.startswith("`") else int(v, 0) for v in items]
    return tuple(values) if len(values) > 1 else values[0]


@pytest.mark.parametrize("row", constant_rows(), ids=lambda r: r[2].strip("`"))
def test_constant_matches_the_code(row: list[str]) -> None:
    _what, value, code = row
    documented = parse_value(value)
    actual = resolve(code.strip("`"))
    if isinstance(actual, bytes):
        actual = actual.decode()
    assert documented == actual


def manifest_keys(table_title: str) -> dict[str, str]:
    """First-column keys of the §6.1 table that starts with `table_title`, with their rows."""
    text = format_text().split("### 6.1 Fields", 1)[1].split("### 6.2", 1)[0]
    table = text.split(table_title, 1)[1].split("\n\n", 1)[0]
    return {row[0].strip("`"): "|".join(row) for row in table_rows(table_title + table)}


def test_every_build_json_field_is_documented() -> None:
    documented = manifest_keys("| Key | Type |")
    code = {f.name for f in dataclasses.fields(Manifest)}
    assert code <= set(documented), f"undocumented build.json keys: {code - set(documented)}"
    for key in set(documented) - code:  # only the design not yet in the code may run ahead
        assert LEAD_CHECK in documented[key], f"build.json key {key} is not in the code"
    stats = manifest_keys("| Key | Meaning |")
    assert set(stats) == {f.name for f in dataclasses.fields(Stats)}
