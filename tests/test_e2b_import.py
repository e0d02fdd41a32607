"""`fcsnap import` of E2B/Wrenn lineages (fixtures/e2b/, written by E2B's own code): one fcsnap
build per generation with E2B's build ids, each unpacking to the memory E2B says it has, every
source data object read once, restore serving the imported head, and malformed sources refused
with one line and nothing left in the store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import Lineage, check_served, restore, unpacked
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here
from test_e2b_store import EXPECTED, FIXTURES, copy_store

from fcsnap.header import load_header
from fcsnap.store.format.layout import HASHES, HEADER
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.operations import e2b
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.store.operations.e2b_import import import_e2b
from fcsnap.store.operations.ops import verify

SCENARIOS = sorted(EXPECTED)


def generations(scenario: str) -> list[dict]:
    """E2B's answers for the scenario's build directories, oldest first."""
    return [h for h in EXPECTED[scenario] if "peer-" not in h["file"]]


def head_dir(scenario: str, root: Path = FIXTURES.parent) -> Path:
    return (root / "e2b" / generations(scenario)[-1]["file"]).parent


def listed(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if p.is_dir() and p.name != "vms") \
        if store.exists() else []


@pytest.mark.parametrize("compress", ["none", "zstd"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_import_keeps_ids_and_every_generation_unpacks_to_e2bs_memory(scenario, compress,
                                                                      tmp_path):
    store = tmp_path / "store"
    result = fcsnap("import", "--init", head_dir(scenario), "--store", store, "--name", "vm",
                    "--compress", compress, "--json")
    assert result.returncode == 0, result.stderr
    builds = json.loads(result.stdout)["builds"]
    gens = generations(scenario)
    assert [b["build_id"] for b in builds] == [g["build_id"] for g in gens]
    parent = None
    for number, (build, expected) in enumerate(zip(builds, gens, strict=True)):
        path = store / expected["build_id"]
        manifest = read_manifest(path)
        assert manifest.generation == number and manifest.compression == compress
        assert manifest.parent_build_id == (None if parent is None else parent.build_id)
        assert manifest.block_size == expected["block_size"]
        assert (path / HASHES).is_file() and manifest.pins is not None
        assert {str(b) for b in manifest.pins} <= {g["build_id"] for g in gens[:number]}
        memory = unpacked(path, tmp_path)
        assert hashlib.sha256(memory).hexdigest() == expected["memory_sha256"], build
        parent = manifest
    assert (store / "vms" / "vm").exists()
    report = verify(store / gens[-1]["build_id"])  # every block against its hash and pin
    assert report["ok"] and report["pinned"]


def test_each_source_object_is_read_once(tmp_path, monkeypatch):
    reads: dict[Path, list[tuple[int, int]]] = {}
    real = e2b.BuildData._pread

    def counting(self, offset: int, length: int) -> bytes:
        reads.setdefault(self.path, []).append((offset, offset + length))
        return real(self, offset, length)

    monkeypatch.setattr(e2b.BuildData, "_pread", counting)
    for scenario in SCENARIOS:
        import_e2b(head_dir(scenario), tmp_path / scenario, BuildOptions(verb="import"))
    objects = {p for p in FIXTURES.rglob("memfile*") if p.name != HEADER
               and not p.name.endswith(".uncompressed-size")}
    assert set(reads) <= objects and len(reads) >= len(SCENARIOS)
    for path, ranges in reads.items():
        ranges.sort()
        for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
            assert start >= end, f"{path}: bytes read twice"
        assert sum(b - a for a, b in ranges) <= path.stat().st_size


@pytest.mark.parametrize("scenario", ["v4-zstd-4k", "v5-lz4-4k"])
def test_restore_serves_the_imported_head(scenario, procs, tmp_path):
    store = tmp_path / "store"
    result = fcsnap("import", "--init", head_dir(scenario), "--store", store, "--compress", "zstd",
                    "-q")
    assert result.returncode == 0, result.stderr
    builds = [store / g["build_id"] for g in generations(scenario)]
    image = tmp_path / "expected"
    image.write_bytes(unpacked(builds[-1], tmp_path))
    assert hashlib.sha256(image.read_bytes()).hexdigest() == \
        generations(scenario)[-1]["memory_sha256"]
    lineage = Lineage(store, builds, [image])
    check_served(restore(procs, lineage), lineage)


def test_reimport_reuses_the_builds_and_moves_the_name(tmp_path):
    store = tmp_path / "store"
    middle = (FIXTURES / generations("v3-4k")[1]["file"]).parent
    assert fcsnap("import", "--init", middle, "--store", store, "--name", "vm").returncode == 0
    before = {p.name: p.stat().st_ino for p in store.iterdir()}
    result = fcsnap("import", "--init", head_dir("v3-4k"), "--store", store, "--name", "vm")
    assert result.returncode == 0, result.stderr
    after = {p.name: p.stat().st_ino for p in store.iterdir()}
    assert all(after[name] == ino for name, ino in before.items() if name != "vms")
    assert (store / "vms" / "vm").read_text().strip().endswith(generations("v3-4k")[-1]["build_id"])


def _one_error_nothing_left(src: Path, store: Path, *extra: object) -> str:
    result = fcsnap("import", "--init", src, "--store", store, *extra)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcsnap: error: "), lines
    assert listed(store) == [], listed(store)
    return lines[0]


def test_a_damaged_frame_of_a_later_generation_leaves_no_build(tmp_path):
    src = copy_store(tmp_path, "v4-zstd-4k")
    data = src / "e2b00002-0000-4000-8000-000000000003" / "memfile.zstd"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    line = _one_error_nothing_left(src / "e2b00002-0000-4000-8000-000000000003",
                                   tmp_path / "store", "--compress", "zstd")
    assert "memfile.zstd" in line


def test_a_short_data_object_is_refused_before_anything_is_written(tmp_path):
    src = copy_store(tmp_path, "v3-4k")
    data = src / "e2b00001-0000-4000-8000-000000000002" / "memfile"
    os.truncate(data, data.stat().st_size - 4096)
    line = _one_error_nothing_left(src / "e2b00001-0000-4000-8000-000000000003",
                                   tmp_path / "store")
    assert "e2b00001-0000-4000-8000-000000000002" in line


def test_a_truncated_header_and_a_directory_that_is_no_build_are_refused(tmp_path):
    src = copy_store(tmp_path, "v5-lz4-4k")
    header = src / "e2b00003-0000-4000-8000-000000000002" / HEADER
    header.write_bytes(header.read_bytes()[:-7])
    _one_error_nothing_left(src / "e2b00003-0000-4000-8000-000000000003", tmp_path / "store")
    line = _one_error_nothing_left(src, tmp_path / "store")
    assert "not an E2B/Wrenn build directory" in line


def test_an_fcsnap_build_by_the_same_id_is_not_overwritten(tmp_path):
    store = tmp_path / "store"
    first = (FIXTURES / generations("v3-4k")[0]["file"]).parent
    assert fcsnap("import", "--init", first, "--store", store).returncode == 0
    manifest = store / first.name / "build.json"
    text = manifest.read_text().replace("import of E2B build", "something else")
    manifest.chmod(0o644)
    manifest.write_text(text)
    result = fcsnap("import", "--init", head_dir("v3-4k"), "--store", store)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert listed(store) == [first.name]


def test_a_header_marked_incomplete_is_refused(tmp_path):
    src = copy_store(tmp_path, "v4-zstd-4k")
    head = src / "e2b00002-0000-4000-8000-000000000003"
    shutil.copyfile(src / f"peer-{head.name}.header", head / HEADER)
    line = _one_error_nothing_left(head, tmp_path / "store")
    assert "incomplete" in line


# -- export: fcsnap builds written back as an E2B store ------------------------------------


def _imported(tmp_path: Path, scenario: str) -> Path:
    store = tmp_path / "store"
    result = fcsnap("import", "--init", head_dir(scenario), "--store", store, "--name", "vm", "-q")
    assert result.returncode == 0, result.stderr
    return store


@pytest.mark.parametrize("compress", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("scenario", ["v4-zstd-4k", "v5-zstd-2m", "v3-4k"])
def test_export_writes_v4_builds_e2bs_layout_reads_back(scenario, compress, tmp_path):
    store = _imported(tmp_path, scenario)
    out = tmp_path / "e2b"
    result = fcsnap("export", "vm", "--store", store, "-o", out, "--compress", compress, "-q")
    assert result.returncode == 0, result.stderr
    gens = generations(scenario)
    assert sorted(p.name for p in out.iterdir()) == sorted(g["build_id"] for g in gens)
    for expected in gens:
        build = out / expected["build_id"]
        header = load_header(build / HEADER)
        assert header.metadata.version == 4
        entry = header.builds_section.builds[header.metadata.build_id]
        assert entry.checksum_known and entry.compression == compress
        assert (build / ("memfile" + {"none": "", "zstd": ".zstd", "lz4": ".lz4"}[compress])
                ).is_file()
        assert all(f.size_u <= 2 << 20 for f in entry.frames) and bool(entry.frames) == (
            compress != "none" and entry.size > 0)
        memory = tmp_path / "memory"
        result = fcsnap("unpack", build, "-o", memory, "--force")
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(memory.read_bytes()).hexdigest() == expected["memory_sha256"]
    report = json.loads(fcsnap("verify", out / gens[-1]["build_id"], "--json").stdout)
    assert report["sha256_unchecked"] == {} and len(report["sha256_checked"]) >= 1
    again = tmp_path / "again"  # and import takes it back, byte for byte
    result = fcsnap("import", "--init", out / gens[-1]["build_id"], "--store", again, "-q")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(unpacked(again / gens[-1]["build_id"], tmp_path)).hexdigest() == \
        gens[-1]["memory_sha256"]


def test_export_refuses_a_build_already_there_and_a_damaged_block(tmp_path):
    store = _imported(tmp_path, "v4-zstd-4k")
    out = tmp_path / "e2b"
    (out / generations("v4-zstd-4k")[1]["build_id"]).mkdir(parents=True)
    result = fcsnap("export", "vm", "--store", store, "-o", out)
    assert result.returncode == 1 and "already exists" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == [generations("v4-zstd-4k")[1]["build_id"]]
    diff = store / generations("v4-zstd-4k")[0]["build_id"] / "memfile.diff"
    diff.chmod(0o644)
    raw = bytearray(diff.read_bytes())
    raw[100] ^= 0xFF
    diff.write_bytes(bytes(raw))
    fresh = tmp_path / "fresh"
    result = fcsnap("export", "vm", "--store", store, "-o", fresh)
    assert result.returncode == 1 and "does not match its hash" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(fresh.iterdir()) == []


def test_export_of_a_build_that_stores_nothing(tmp_path):
    memory = tmp_path / "memory"
    memory.write_bytes(os.urandom(64 << 10) + bytes(64 << 10))
    store = tmp_path / "store"
    assert fcsnap("pack", "--init", memory, "--store", store, "--name", "vm", "-q").returncode == 0
    result = fcsnap("diff", memory, "--base", "vm", "--store", store, "--name", "vm", "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "e2b"
    result = fcsnap("export", "vm", "--store", store, "-o", out, "--compress", "zstd", "-q")
    assert result.returncode == 0, result.stderr
    child = read_manifest(next(
        p for p in store.iterdir() if p.is_dir() and p.name != "vms"
        and read_manifest(p).generation == 1))
    empty = out / str(child.build_id)
    assert (empty / "memfile").stat().st_size == 0 and not (empty / "memfile.zstd").exists()
    assert load_header(empty / HEADER).builds_section.builds[child.build_id].compression == "none"
    again = tmp_path / "again"
    assert fcsnap("unpack", empty, "-o", again).returncode == 0
    assert again.read_bytes() == memory.read_bytes()


def test_a_build_without_its_header_is_read_through_the_next_generation(tmp_path):
    src = copy_store(tmp_path, "v3-4k")
    gens = generations("v3-4k")
    (src / gens[1]["build_id"] / HEADER).unlink()
    store = tmp_path / "store"
    result = fcsnap("import", "--init", src / gens[2]["build_id"], "--store", store, "--json")
    assert result.returncode == 0, result.stderr
    assert [b["build_id"] for b in json.loads(result.stdout)["builds"]] == \
        [gens[0]["build_id"], gens[2]["build_id"]]
    for expected in (gens[0], gens[2]):
        memory = unpacked(store / expected["build_id"], tmp_path)
        assert hashlib.sha256(memory).hexdigest() == expected["memory_sha256"]


def test_a_failed_import_keeps_the_builds_a_concurrent_import_took_up(tmp_path):
    """Two imports at once of lineages sharing builds (a migration run in parallel): the
    second reuses the template and the next generation the first has published, and names
    its head; the first then fails on its last generation. It removes what it wrote except
    those: the other import's name still verifies."""
    from fcsnap.errors import FcsnapError
    from fcsnap.store.format.names import read_vm_pointer

    src = copy_store(tmp_path, "v4-zstd-4k")
    ids = [g["build_id"] for g in generations("v4-zstd-4k")]
    data = src / ids[2] / "memfile.zstd"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    store = tmp_path / "store"
    assert fcsnap("init", store).returncode == 0
    asked: list[str] = []

    def opener(build_id):  # noqa: ANN001, ANN202
        asked.append(str(build_id))
        if asked.count(ids[2]) == 2:  # the first import is about to write its last build
            import_e2b(src / ids[1], store, BuildOptions(name="other"))
        return e2b.open_e2b(src / str(build_id))

    with pytest.raises(FcsnapError, match="memfile.zstd"):
        import_e2b(src / ids[2], store, BuildOptions(name="vm"), opener=opener)
    assert listed(store) == sorted(ids[:2])
    assert str(read_vm_pointer(store, "other")) == ids[1]
    verify(store / ids[1])


def test_export_after_gc_removed_ancestors(tmp_path):
    """gc removes what no head reads: here the template (every page rewritten by the next
    two generations), which the middle generation's header still reads. `export` of the
    head walks its ancestors as far as the store holds them, writes the middle one's data
    without a header (it cannot be read whole any more; the head's builds section describes
    it, as E2B reads it), and the head's export unpacks to its memory."""
    page = 4096
    memories = [bytearray(os.urandom(256 * page))]
    for rewrite in (range(0, 128), range(128, 256)):
        memories.append(bytearray(memories[-1]))
        memories[-1][rewrite.start * page : rewrite.stop * page] = os.urandom(128 * page)
    store = tmp_path / "store"
    for n, memory in enumerate(memories):
        path = tmp_path / f"gen{n}.mem"
        path.write_bytes(memory)
        argv = ("pack", "--init", path) if n == 0 else ("diff", path, "--base", "vm")
        assert fcsnap(*argv, "--store", store, "--name", "vm", "-q").returncode == 0
    ids = {read_manifest(p).generation: p.name for p in store.iterdir()
           if (p / "build.json").exists()}
    result = fcsnap("gc", "--store", store, "--grace", "0", "--json")
    assert [d["build_id"] for d in json.loads(result.stdout)["deleted"]] == [ids[0]]
    out = tmp_path / "e2b"
    result = fcsnap("export", "vm", "--store", store, "-o", out, "--compress", "zstd",
                    "--frame-size", "64K", "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([ids[1], ids[2]])
    assert not (out / ids[1] / HEADER).exists() and (out / ids[1] / "memfile.zstd").is_file()
    again = tmp_path / "again"
    result = fcsnap("unpack", out / ids[2], "-o", again)
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == memories[2]
