"""docs/FORMAT.md must stay true to the code: every citation of it names a real section, its
byte tables match the structs the code parses with, its constants and build.json fields match
the code, and nothing cites the retired specification (outside the repository) any more."""

from __future__ import annotations

import dataclasses
import importlib
import re
import struct
import subprocess
from pathlib import Path

import pytest

from fcsnap.store.format.manifest import Manifest, Stats

ROOT = Path(__file__).resolve().parent.parent
FORMAT = ROOT / "docs" / "FORMAT.md"
THREAT_MODEL = ROOT / "docs" / "THREAT_MODEL.md"
LEAD_CHECK = "<!-- lead: check against code -->"

HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
CITATION = re.compile(r"docs/FORMAT\.md((?:(?:,| to| and)? §\d+(?:\.\d+)*)+)")
SECTION_SIGN = re.compile(r"§(\d+(?:\.\d+)*)")
GRAMMAR = re.compile(r"<!-- grammar: ([\w.]+) -->\n((?:\|.*\n)+)")
# struct format letter -> the type names a byte table may give it
TYPES = {"Q": {"u64"}, "I": {"u32"}, "H": {"u16"}, "B": {"u8"}, "s": {"uuid", "bytes"}}
# Built in two parts so that this file does not match what it looks for.
RETIRED = ["SPEC" + ".md", "SPEC" + " section", "../" + "shared", "/work/" + "shared"]


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


def test_the_readme_links_the_documents() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/FORMAT.md)" in readme and "(docs/THREAT_MODEL.md)" in readme


def test_the_readme_names_every_restore_option() -> None:
    """Every option of `fcsnap restore` is in the README, and the options that have
    Firecracker load the snapshot are rows of its restore options table."""
    from fcsnap.cli import command_tree

    restore = command_tree().commands["restore"]
    readme = (ROOT / "README.md").read_text()
    options = [o for p in restore.params for o in p.opts if o.startswith("--")]
    missing = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", readme)]
    assert not missing, f"restore options the README does not name: {missing}"
    for option in ("--firecracker-api", "--vmstate", "--track-dirty-pages", "--api-timeout"):
        assert re.search(rf"^\| `{option}\b", readme, re.M), option


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
