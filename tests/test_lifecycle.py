"""Store lifecycle: `ls`, `rm` and `gc` on lineages with shared and deduplicated builds.

The store (see `Store`): `base` names generation 0 (G0); `web` went G0 -> G1 -> G2, and G2
rewrote every block G1 stored, so G1 is read by no head (only by an older generation of `web`);
G2 stores a copy of a G0 block by reference (deduplicated); `api` is a second lineage A0 -> A1
whose A1 maps a block to A0's storage. Expected figures are computed from the files and the
memory images, not from fcsnap's own report.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here

from fcsnap.errors import FcsnapError
from fcsnap.store.format.layout import DIFF_RAW, VMS
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.units import PAGE, format_bytes, parse_duration

MIB = 1 << 20


def fcsnap_json(*args: object) -> dict:
    result = fcsnap(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def du(build: Path) -> int:
    return sum(p.stat().st_size for p in build.iterdir())


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    """Every path under the store with its size and mtime: what "changes nothing" compares."""
    out = {}
    for root, dirs, files in os.walk(store):
        for entry in [*dirs, *files]:
            st = os.lstat(os.path.join(root, entry))
            out[os.path.relpath(os.path.join(root, entry), store)] = (st.st_size, st.st_mtime_ns)
    st = os.lstat(store)
    out["."] = (st.st_size, st.st_mtime_ns)
    return out


def random_pages(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, size=(count, PAGE), dtype=np.uint8)


@dataclass
class Store:
    path: Path
    images: dict[str, np.ndarray]  # name -> memory its head holds
    builds: dict[str, Path]  # G0, G1, G2, A0, A1 -> build directory

    def id(self, label: str) -> str:
        return self.builds[label].name


def make_store(root: Path, compression: str = "none") -> Store:
    rng = np.random.default_rng(7)
    store = root / "store"
    options = BuildOptions(compression=compression, frame_size=64 << 10)
    mem0 = synthetic_memory(4 * MIB, seed=11)
    data = np.flatnonzero(mem0.any(axis=1))
    rewritten = data[:40]  # G1 stores these, G2 rewrites exactly them
    mem1 = mem0.copy()
    mem1[rewritten] = random_pages(rng, len(rewritten))
    mem2 = mem1.copy()
    mem2[rewritten] = random_pages(rng, len(rewritten))
    mem2[rewritten[0]] = mem0[data[100]]  # a block G0 stores: deduplicated, not stored again
    memA = synthetic_memory(4 * MIB, seed=12)
    memA2 = memA.copy()
    zero = np.flatnonzero(~memA.any(axis=1))
    memA2[zero[:8]] = random_pages(rng, 8)
    memA2[zero[8]] = memA[np.flatnonzero(memA.any(axis=1))[5]]  # deduplicated against A0
    paths = {}
    for label, mem in (("m0", mem0), ("m1", mem1), ("m2", mem2), ("a0", memA), ("a1", memA2)):
        paths[label] = root / f"{label}.mem"
        write_full(paths[label], mem)

    def named(name: str, over: Path | None = None) -> BuildOptions:
        """Options moving `name` from the build `over` (None: a new name)."""
        expected = None if over is None else uuid.UUID(over.name)
        return replace(options, name=name, name_expected=expected)

    _, g0 = ops.pack(paths["m0"], store, named("base"))
    _, g1 = ops.diff(paths["m1"], g0, store, named("web"))
    _, g2 = ops.diff(paths["m2"], g1, store, named("web", g1))
    _, a0 = ops.pack(paths["a0"], store, named("api"))
    _, a1 = ops.diff(paths["a1"], a0, store, named("api", a0))
    return Store(
        store,
        {"base": mem0, "web": mem2, "api": memA2},
        {"G0": g0, "G1": g1, "G2": g2, "A0": a0, "A1": a1},
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path)


def assert_names_verify_and_unpack(s: Store, tmp_path: Path) -> None:
    for name, mem in s.images.items():
        assert fcsnap("verify", name, "--store", s.path).returncode == 0, name
        out = tmp_path / f"{name}-{uuid.uuid4().hex}.mem"
        result = fcsnap("unpack", name, "--store", s.path, "-o", out, "--quiet")
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == mem.tobytes(), name
        out.unlink()


def next_image(s: Store, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """web's memory with one page changed: a diff of it over G2 reads G0, G2 and itself."""
    mem = s.images["web"].copy()
    mem[0] = 1
    path = tmp_path / "m3.mem"
    write_full(path, mem)
    return path, mem


def builds_by_id(store: Path) -> dict[str, dict]:
    return {r["build_id"]: r for r in fcsnap_json("ls", "--store", store, "--builds")["builds"]}


def visible_builds(store: Path) -> set[str]:
    return {p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")} - {VMS}


# -- ls ----------------------------------------------------------------------------------------


def test_ls_names_shows_heads_and_shared_bytes(store: Store) -> None:
    report = fcsnap_json("ls", "--store", store.path)
    rows = {r["name"]: r for r in report["names"]}
    assert set(rows) == {"base", "web", "api"}
    g0, g2 = store.builds["G0"], store.builds["G2"]
    assert rows["web"]["head"] == g2.name and rows["web"]["generation"] == 2
    assert rows["web"]["memory_bytes"] == 4 * MIB
    assert rows["web"]["lineage_bytes"] == du(g0) + du(g2)  # G1 is not read by the head
    assert rows["web"]["shared_bytes"] == du(g0)  # base's head reads G0 too
    assert rows["base"]["shared_bytes"] == du(g0)
    assert rows["api"]["shared_bytes"] == 0
    assert rows["api"]["lineage_bytes"] == du(store.builds["A0"]) + du(store.builds["A1"])
    s = report["summary"]
    assert s["disk_bytes"] == sum(du(b) for b in store.builds.values())
    assert (s["builds"], s["unreferenced_builds"]) == (5, 1)


def test_ls_builds_marks_unreferenced_and_live_fraction(store: Store) -> None:
    rows = builds_by_id(store.path)
    assert set(rows) == {b.name for b in store.builds.values()}
    g1 = rows[store.id("G1")]
    assert g1["unreferenced"] and g1["read_by"] == [] and g1["live_fraction"] == 0
    assert g1["parent"] == store.id("G0") and g1["generation"] == 1
    assert rows[store.id("G0")]["read_by"] == ["base", "web"]
    assert rows[store.id("G0")]["live_fraction"] == 1.0  # base's head reads all of it
    # G2 stores the 39 rewritten blocks (the 40th is G0's block, deduplicated): all live.
    g2 = rows[store.id("G2")]
    assert g2["stored_bytes"] == 39 * PAGE == (store.builds["G2"] / DIFF_RAW).stat().st_size
    assert g2["live_fraction"] == 1.0 and g2["read_by"] == ["web"]
    for label in ("G0", "G2", "A0", "A1"):
        assert not rows[store.id(label)]["unreferenced"]
        assert rows[store.id(label)]["disk_bytes"] == du(store.builds[label])


def test_ls_live_fraction_falls_when_only_an_older_head_read_a_block(store: Store) -> None:
    assert fcsnap("rm", "base", "--store", store.path).returncode == 0
    rows = builds_by_id(store.path)
    g0 = rows[store.id("G0")]
    # web's head reads G0 except the 40 blocks G1 and G2 rewrote; plus the deduplicated one.
    stored = g0["stored_bytes"]
    mem0 = store.images["base"]
    web = store.images["web"]
    nonzero0 = mem0[mem0.any(axis=1)]
    still = {p.tobytes() for p in web[(web == mem0).all(axis=1) & mem0.any(axis=1)]}
    still |= {p.tobytes() for p in web} & {p.tobytes() for p in nonzero0}
    assert g0["live_bytes"] == len(still) * PAGE
    assert g0["live_fraction"] == pytest.approx(len(still) * PAGE / stored, abs=1e-6)
    assert g0["live_fraction"] < 1.0 and g0["read_by"] == ["web"]


def test_ls_name_shows_the_lineage_generation_by_generation(store: Store) -> None:
    report = fcsnap_json("ls", "web", "--store", store.path)
    gens = report["generations"]
    assert [g["build_id"] for g in gens] == [store.id("G2"), store.id("G1"), store.id("G0")]
    assert [g["generation"] for g in gens] == [2, 1, 0]
    assert [g["read_by_head"] for g in gens] == [True, False, True]
    assert gens[1]["head_reads_bytes"] == 0
    text = fcsnap("ls", "web", "--store", store.path)
    assert text.returncode == 0 and f"{store.id('G1')[:8]} " in text.stdout
    missing = fcsnap("ls", "nope", "--store", store.path)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"fcsnap: error: no VM named 'nope' in store {store.path}"


def test_ls_text_output_lists_every_build(store: Store) -> None:
    result = fcsnap("ls", "--store", store.path, "--builds")
    assert result.returncode == 0, result.stderr
    for build in store.builds.values():
        assert f"{build.name[:8]} " in result.stdout
    assert "unreferenced" in result.stdout and "space amplification" in result.stdout


def test_ls_reports_an_ancestors_corrupt_build_json_never_a_figure(store: Store) -> None:
    """With G0's build.json unreadable, what G0 stores is unknown: no `head reads` figure
    for the names reading it (it read 975% once), a line saying why, and G0's row in
    web's lineage marked."""
    g0 = store.builds["G0"]
    os.chmod(g0, 0o755)
    (g0 / "build.json").chmod(0o644)
    (g0 / "build.json").write_text('{"bad')
    rows = {r["name"]: r for r in fcsnap_json("ls", "--store", store.path)["names"]}
    for name in ("base", "web"):
        assert rows[name]["live_fraction"] is None, rows[name]
        assert store.id("G0") in rows[name]["error"] and "not valid JSON" in rows[name]["error"]
    assert "error" not in rows["api"] and 0 < rows["api"]["live_fraction"] <= 1
    text = fcsnap("ls", "--store", store.path)
    assert text.returncode == 0, text.stderr
    web_row = next(line for line in text.stdout.splitlines() if line.startswith("web "))
    assert web_row.split()[-1] == "-" and "%" not in web_row, web_row
    assert f"web: build {store.id('G0')}: " in text.stdout
    lineage = fcsnap_json("ls", "web", "--store", store.path)["generations"]
    assert "not valid JSON" in lineage[-1]["error"] and lineage[-1]["head_reads_fraction"] is None
    text = fcsnap("ls", "web", "--store", store.path)
    g0_row = next(line for line in text.stdout.splitlines() if f" {store.id('G0')[:8]} " in line)
    assert "DAMAGED" in g0_row and "%" not in g0_row, g0_row


def test_ls_builds_labels_a_head_that_stores_nothing_as_its_names(store: Store,
                                                                   tmp_path: Path) -> None:
    """A head diffed from unchanged memory stores no block and reads none of its own: it is
    still its name's head, in the table as in the JSON and the summary."""
    write_full(tmp_path / "same.mem", store.images["web"])
    result = fcsnap("diff", tmp_path / "same.mem", "--base", "web", "--store", store.path,
                    "--name", "same", "--json")
    assert result.returncode == 0, result.stderr
    same = json.loads(result.stdout)["build_id"]
    report = fcsnap_json("ls", "--store", store.path, "--builds")
    row = next(r for r in report["builds"] if r["build_id"] == same)
    assert row["stored_bytes"] == 0 and row["read_by"] == [] and row["head_of"] == ["same"]
    assert not row["unreferenced"]
    text = fcsnap("ls", "--store", store.path, "--builds").stdout
    line = next(line for line in text.splitlines() if line.startswith(same[:8]))
    assert line.endswith("same (head)"), line
    labelled = sum(line.endswith("unreferenced") for line in text.splitlines())
    assert labelled == report["summary"]["unreferenced_builds"] == 1  # G1
    assert "(1 unreferenced)" in text


# -- rm ----------------------------------------------------------------------------------------


def test_rm_removes_names_never_builds(store: Store) -> None:
    before = visible_builds(store.path)
    result = fcsnap("rm", "base", "api", "--store", store.path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (store.path / VMS).iterdir() if p.name[0] != ".") == ["web"]
    assert visible_builds(store.path) == before


def test_rm_of_a_missing_name_removes_none(store: Store) -> None:
    before = snapshot(store.path)
    result = fcsnap("rm", "base", "nope", "--store", store.path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"fcsnap: error: no VM named 'nope' in store {store.path}"
    assert snapshot(store.path) == before
    bad = fcsnap("rm", "../x", "--store", store.path)
    assert bad.returncode == 1 and bad.stderr.startswith("fcsnap: error: invalid VM name")


# -- gc ----------------------------------------------------------------------------------------


def test_dry_run_lists_garbage_and_changes_nothing(store: Store) -> None:
    before = snapshot(store.path)
    report = fcsnap_json("gc", "--store", store.path, "--dry-run", "--grace", "0")
    assert [r["build_id"] for r in report["would_delete"]] == [store.id("G1")]
    assert report["bytes_to_free"] == du(store.builds["G1"])
    assert report["after"]["disk_bytes"] == report["before"]["disk_bytes"] - du(store.builds["G1"])
    text = fcsnap("gc", "--store", store.path, "--dry-run", "--grace", "0")
    assert text.returncode == 0 and f"would delete build {store.id('G1')}" in text.stdout
    assert snapshot(store.path) == before


def test_gc_deletes_what_only_an_older_generation_read(store: Store, tmp_path: Path) -> None:
    report = fcsnap_json("gc", "--store", store.path, "--grace", "0")
    assert [r["build_id"] for r in report["deleted"]] == [store.id("G1")]
    assert report["bytes_freed"] == report["before"]["disk_bytes"] - report["after"]["disk_bytes"]
    assert visible_builds(store.path) == {store.id(b) for b in ("G0", "G2", "A0", "A1")}
    assert not list(store.path.glob(".trash-*"))
    assert_names_verify_and_unpack(store, tmp_path)
    again = fcsnap_json("gc", "--store", store.path, "--grace", "0")
    assert again["deleted"] == [] and again["bytes_freed"] == 0


def test_gc_prints_what_it_freed(store: Store) -> None:
    size = format_bytes(du(store.builds["G1"]))
    dry = fcsnap("gc", "--store", store.path, "--grace", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1].startswith(f"would free {size} in 1 build; ")
    result = fcsnap("gc", "--store", store.path, "--grace", "0")
    assert result.returncode == 0, result.stderr
    first, *_, last = result.stdout.splitlines()
    assert first == f"deleted build {store.id('G1')} ({size})"
    on_disk = format_bytes(sum(du(store.builds[b]) for b in ("G0", "G2", "A0", "A1")))
    assert last.startswith(f"freed {size} in 1 build; {on_disk} on disk (space amplification ")


def test_rm_then_gc_keeps_shared_and_deduplicated_builds(store: Store, tmp_path: Path) -> None:
    assert fcsnap("rm", "base", "--store", store.path).returncode == 0
    del store.images["base"]
    report = fcsnap_json("gc", "--store", store.path, "--grace", "0")
    assert [r["build_id"] for r in report["deleted"]] == [store.id("G1")]  # web still reads G0
    assert_names_verify_and_unpack(store, tmp_path)
    assert fcsnap("rm", "web", "api", "--store", store.path).returncode == 0
    store.images.clear()
    report = fcsnap_json("gc", "--store", store.path, "--grace", "0")
    assert {r["build_id"] for r in report["deleted"]} == {
        store.id(b) for b in ("G0", "G2", "A0", "A1")
    }
    assert visible_builds(store.path) == set()
    assert report["after"]["disk_bytes"] == 0


def test_grace_keeps_young_builds(store: Store) -> None:
    report = fcsnap_json("gc", "--store", store.path)  # default grace: 1h
    assert report["deleted"] == []
    assert report["kept"] == [
        {"build_id": store.id("G1"), "reason": "younger than the grace period"}
    ]
    two_hours_ago = time.time() - 7200
    os.utime(store.builds["G1"], (two_hours_ago, two_hours_ago))
    report = fcsnap_json("gc", "--store", store.path)
    assert [r["build_id"] for r in report["deleted"]] == [store.id("G1")]


def test_a_young_unnamed_build_keeps_what_it_reads(store: Store, tmp_path: Path) -> None:
    """A diff over `base` whose name never moved (say, still being published): with grace it
    is kept, and so is every build it reads, though no head reads them."""
    old = time.time() - 7200
    for build in store.builds.values():
        os.utime(build, (old, old))
    _, orphan = ops.diff(next_image(store, tmp_path)[0], store.builds["G2"], store.path,
                         BuildOptions())
    assert fcsnap("rm", "web", "base", "--store", store.path).returncode == 0
    report = fcsnap_json("gc", "--store", store.path, "--grace", "1h")
    assert [r["build_id"] for r in report["deleted"]] == [store.id("G1")]
    kept = {r["build_id"]: r["reason"] for r in report["kept"]}
    assert kept[orphan.name] == "younger than the grace period"
    assert kept[store.id("G0")] == kept[store.id("G2")] == f"read by {orphan.name}"
    assert fcsnap("verify", orphan, "--quiet").returncode == 0


def test_repack_squashes_a_partly_dead_lineage(store: Store, tmp_path: Path) -> None:
    assert fcsnap("rm", "base", "--store", store.path).returncode == 0
    del store.images["base"]
    before = snapshot(store.path)
    dry = fcsnap_json("gc", "--store", store.path, "--grace", "0", "--repack-below", "0.99",
                      "--dry-run")
    assert snapshot(store.path) == before
    assert [r["name"] for r in dry["repacked"]] == ["web"] and "new_head" not in dry["repacked"][0]
    report = fcsnap_json("gc", "--store", store.path, "--grace", "0", "--repack-below", "0.99")
    (row,) = report["repacked"]
    assert row["name"] == "web" and row["head"] == store.id("G2") and row["live_fraction"] < 0.99
    assert {r["build_id"] for r in report["deleted"]} == {store.id(b) for b in ("G0", "G1", "G2")}
    new = fcsnap_json("ls", "web", "--store", store.path)["generations"]
    assert len(new) == 1 and new[0]["build_id"] == row["new_head"]
    assert new[0]["generation"] == 0 and new[0]["head_reads_fraction"] == 1.0
    assert report["after"]["amplification"] < report["before"]["amplification"]
    new_head = store.path / row["new_head"]
    assert row["new_head_disk_bytes"] == du(new_head)
    assert report["after"]["disk_bytes"] == (
        report["before"]["disk_bytes"] - report["bytes_freed"] + du(new_head)
    )
    assert_names_verify_and_unpack(store, tmp_path)


def test_repack_leaves_a_lineage_shared_with_another_name(store: Store) -> None:
    report = fcsnap_json("gc", "--store", store.path, "--grace", "0", "--repack-below", "1")
    rows = {r["name"]: r for r in report["repacked"]}
    assert "shared" in rows["web"]["skipped"]  # base's head still reads G0


def test_gc_removes_what_killed_commands_left(store: Store) -> None:
    stale = store.path / f".staging-999999-{uuid.uuid4()}"
    stale.mkdir()
    (stale / "memfile.diff").write_bytes(b"x" * 100)
    trash = store.path / f".trash-{uuid.uuid4()}"
    trash.mkdir()
    (trash / "memfile.diff").write_bytes(b"y")
    pointer = store.path / VMS / f".tmp-{uuid.uuid4().hex}"  # a killed publisher's
    pointer.write_text(store.id("G1") + "\n")
    left = sorted([stale.name, trash.name, f"{VMS}/{pointer.name}"])
    report = fcsnap_json("gc", "--store", store.path, "--dry-run")
    assert sorted(report["leftovers"]) == left
    assert stale.exists() and trash.exists() and pointer.exists()
    report = fcsnap_json("gc", "--store", store.path)
    assert sorted(report["leftovers"]) == left
    assert not stale.exists() and not trash.exists() and not pointer.exists()
    assert sorted(p.name for p in (store.path / VMS).iterdir()) == [".lock", "api", "base", "web"]


def test_gc_refuses_when_a_head_cannot_be_read(store: Store) -> None:
    header = store.builds["A1"] / "memfile.header"
    header.write_bytes(header.read_bytes()[:70])
    before = snapshot(store.path)
    result = fcsnap("gc", "--store", store.path, "--grace", "0")
    assert result.returncode == 1
    assert result.stderr.startswith("fcsnap: error: gc stopped, it cannot tell what VM api")
    assert len(result.stderr.splitlines()) == 1
    after = snapshot(store.path)
    after.pop(".gc.lock", None), after.pop(".", None), before.pop(".", None)
    assert after == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--grace", "soon"), "invalid --grace 'soon'"),
        (("--grace=-1h",), "invalid --grace '-1h'"),
    ],
)
def test_gc_bad_options(store: Store, args: tuple[str, ...], message: str) -> None:
    result = fcsnap("gc", "--store", store.path, *args)
    assert result.returncode == 2 and result.stderr.startswith("fcsnap: error: ")
    assert message in result.stderr and result.stderr.count("\n") == 1
    usage = fcsnap("gc", "--store", store.path, "--repack-below", "1.5")
    assert usage.returncode == 2
    missing = fcsnap("gc", "--store", store.path / "nope")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("0.0", 0), ("45s", 45), ("90s", 90), ("30m", 1800), ("1h", 3600), ("1.5h", 5400),
     ("2d", 172800), ("1w", 604800)],
)
def test_grace_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1x", "-5m", "nan", "inf", "1hh", "1", "45"])
def test_bad_grace_durations(text: str) -> None:
    with pytest.raises(FcsnapError, match="invalid duration"):
        parse_duration(text)


def test_gc_grace_without_a_unit_is_a_usage_error(store: Store) -> None:
    """`gc --grace 1` (meant as an hour?) deletes nothing: exit 2, one line naming the units."""
    before = sorted(p.name for p in store.path.iterdir())
    result = fcsnap("gc", "--store", store.path, "--grace", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "fcsnap: error: Invalid value for '--grace': invalid --grace '1': give a unit, s, m, h, "
        "d or w (e.g. 1s, 1h) (see 'fcsnap gc --help')"]
    assert sorted(p.name for p in store.path.iterdir()) == before


def test_a_damaged_manifest_is_shown_and_does_not_hide_what_a_header_reads(store: Store) -> None:
    (store.builds["G2"] / "build.json").write_text("junk")
    rows = {r["name"]: r for r in fcsnap_json("ls", "--store", store.path)["names"]}
    assert "not valid JSON" in rows["web"]["error"] and rows["web"]["generation"] is None
    text = fcsnap("ls", "--store", store.path)
    assert text.returncode == 0 and "web: " in text.stdout and "not valid JSON" in text.stdout
    report = fcsnap_json("gc", "--store", store.path, "--grace", "0")
    assert [r["build_id"] for r in report["deleted"]] == [store.id("G1")]  # G0, G2 still read
