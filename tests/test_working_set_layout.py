"""`pack`/`diff --working-set`: the working set's blocks lead the diff, in fault order.

Each build laid out with a working set is checked against the same build made without one:
same stats and same bytes, every block it does not store itself (zeros, deduplicated,
unchanged) mapped exactly as before, and the blocks it stores at the slots a reference model
gives (working-set blocks first, in working-set order, then the rest in memory order, each
distinct content once).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import Lineage, race_the_balloon, restore, unpacked
from helpers import fcsnap_here as fcsnap  # in this process: the store is tested here

from fcsnap.errors import FcsnapError
from fcsnap.header import NIL, load_header
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full, write_sparse_diff
from fcsnap.units import PAGE
from fcsnap.workingset import read_working_set, write_working_set

MiB = 1 << 20
BLOCK_SIZES = [pytest.param(PAGE, id="4K"), pytest.param(2 * MiB, id="2M")]
COMPRESSIONS = ["none", "zstd"]


def layout(build: Path) -> list[tuple[uuid.UUID, int]]:
    """(build id, storage offset) of every block, read through header lookups."""
    header = load_header(build)
    bs = header.metadata.block_size
    found = (header.lookup(b * bs) for b in range(header.metadata.size // bs))
    return [(f.build_id, 0 if f.build_id == NIL else f.storage_offset) for f in found]


def ws_blocks(offsets: np.ndarray, bs: int) -> list[int]:
    """The blocks of a working set in order, each at its first page."""
    return list(dict.fromkeys((np.asarray(offsets) // bs).tolist()))


def check_ws_first(
    ws_build: Path, plain_build: Path, content: np.ndarray, offsets: np.ndarray
) -> int:
    """Check a build made with a working set against the same build made without one;
    returns how many working-set blocks it stores first."""
    bs = content.shape[1]
    ws_stats, plain_stats = read_manifest(ws_build).stats, read_manifest(plain_build).stats
    for key in ("blocks_stored", "blocks_zero", "blocks_deduplicated", "blocks_inherited",
                "bytes_stored"):
        assert getattr(ws_stats, key) == getattr(plain_stats, key), key
    me, plain_me = uuid.UUID(ws_build.name), uuid.UUID(plain_build.name)
    got, plain = layout(ws_build), layout(plain_build)
    own = [b for b, (owner, _) in enumerate(plain) if owner == plain_me]
    for b, (owner, storage) in enumerate(plain):  # zeros, dedup and unchanged: as before
        if owner != plain_me:
            assert got[b] == (owner, storage), b
    # The model: stored blocks in working-set order, then memory order, each content once.
    first = [b for b in ws_blocks(offsets, bs) if b in set(own)]
    slots: dict[bytes, int] = {}
    for b in first + [b for b in own if b not in set(first)]:
        slots.setdefault(content[b].tobytes(), len(slots))
    assert [got[b] for b in own] == [(me, slots[content[b].tobytes()] * bs) for b in own]
    leading = len({content[b].tobytes() for b in first})
    assert leading > 0
    # Spelled out: storage 0..k-1 holds the working set's new blocks, in working-set order.
    seen: dict[bytes, int] = {}
    for b in first:
        expected = seen.setdefault(content[b].tobytes(), len(seen))
        assert got[b] == (me, expected * bs)
    return leading


def guest(bs: int, seed: int) -> np.ndarray:
    """Pages of a guest with whole zero and duplicated blocks at any block size."""
    size = 8 * MiB if bs == PAGE else 32 * MiB
    mem = synthetic_memory(size, seed=seed, zero_share=0.3)
    blocks = mem.reshape(-1, bs)
    n = len(blocks)
    blocks[2] = 0  # a zero block in the working set
    blocks[1] = blocks[n - 2]  # a working-set block equal to an earlier working-set block
    blocks[0] = blocks[n // 2]  # a block before the working set's copy of it in memory
    return mem


def page_offsets(blocks: list[int], bs: int, seed: int) -> np.ndarray:
    """A working set touching `blocks` in this order: several pages of each (2 MiB blocks),
    interleaved, as faults of several vCPUs are."""
    if bs == PAGE:
        return np.array(blocks, np.int64) * PAGE
    rng = np.random.default_rng(seed)
    pages = [b * bs + int(p) * PAGE for b in blocks for p in rng.choice(bs // PAGE, 3)]
    return np.array(list(dict.fromkeys(rng.permutation(pages).tolist())), np.int64)


def ws_order(n: int, seed: int) -> list[int]:
    """Working-set blocks: the special ones of `guest` among random others, not in memory
    order."""
    rng = np.random.default_rng(seed)
    others = rng.choice(np.arange(3, n - 2), min(n - 6, 150), replace=False).tolist()
    special = [n - 2, 2, n // 2, 1]
    return others[: len(others) // 2] + special + others[len(others) // 2 :]


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_pack_lays_the_working_set_first(tmp_path, bs: int, compression: str) -> None:
    mem = guest(bs, seed=1)
    content = mem.reshape(-1, bs)
    write_full(tmp_path / "mem", mem)
    offsets = page_offsets(ws_order(len(content), seed=2), bs, seed=3)
    write_working_set(tmp_path / "ws", mem.size, offsets)
    store = tmp_path / "store"
    options = BuildOptions(bs, compression, frame_size=64 << 10)
    _, plain = ops.pack(tmp_path / "mem", store, options)
    _, ws = ops.pack(tmp_path / "mem", store, BuildOptions(
        bs, compression, frame_size=64 << 10, working_set=tmp_path / "ws"))
    assert unpacked(ws, tmp_path) == mem.tobytes()
    ops.verify(ws)  # also checks the hash sidecar follows the new storage order
    leading = check_ws_first(ws, plain, content, offsets)
    assert leading >= (3 if bs == PAGE else 2)


def generation_one(mem0: np.ndarray, bs: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """The next snapshot, and the working set's blocks: changed blocks of every kind (new
    content, zeroed, equal to an ancestor's block, equal to another new block, one page of
    a block rewritten), unchanged ones, and changes outside the working set."""
    rng = np.random.default_rng(seed)
    mem1 = mem0.copy()
    blocks = mem1.reshape(-1, bs)
    n = len(blocks)
    new, zeroed, from_gen0, twin, one_page, unchanged, outside = (
        int(b) for b in rng.choice(np.arange(3, n), 7, replace=False)
    )
    blocks[new] = np.frombuffer(rng.bytes(bs), np.uint8)
    blocks[zeroed] = 0
    blocks[from_gen0] = mem0.reshape(-1, bs)[n // 2]
    blocks[twin] = blocks[new]
    blocks[one_page, :PAGE] ^= 0x5A  # with 2 MiB blocks: the rest comes from the parent
    blocks[outside] = np.frombuffer(rng.bytes(bs), np.uint8)
    if bs == PAGE:  # many more changed and unchanged pages, in and out of the working set
        more = rng.choice(np.arange(3, n), 300, replace=False)
        blocks[more[:150]] = np.frombuffer(rng.bytes(150 * bs), np.uint8).reshape(150, bs)
        ws = [new, unchanged, *more[::2].tolist(), zeroed, twin, from_gen0, one_page]
    else:
        ws = [new, unchanged, zeroed, twin, from_gen0, one_page]
    return mem1, list(dict.fromkeys(ws))


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("sparse", [False, True], ids=["full", "sparse"])
def test_diff_lays_the_working_set_first(tmp_path, bs: int, compression: str,
                                         sparse: bool) -> None:
    mem0 = guest(bs, seed=4)
    write_full(tmp_path / "mem0", mem0)
    store = tmp_path / "store"
    options = BuildOptions(bs, compression, frame_size=64 << 10)
    _, gen0 = ops.pack(tmp_path / "mem0", store, options)
    mem1, blocks = generation_one(mem0, bs, seed=5)
    if sparse:
        dirty = np.flatnonzero((mem0 != mem1).any(axis=1))
        write_sparse_diff(tmp_path / "mem1", mem1, dirty)
    else:
        write_full(tmp_path / "mem1", mem1)
    offsets = page_offsets(blocks, bs, seed=6)
    write_working_set(tmp_path / "ws", mem1.size, offsets)
    _, plain = ops.diff(tmp_path / "mem1", gen0, store, options, sparse_diff=sparse)
    _, ws = ops.diff(tmp_path / "mem1", gen0, store, BuildOptions(
        bs, compression, frame_size=64 << 10, working_set=tmp_path / "ws"), sparse_diff=sparse)
    assert unpacked(ws, tmp_path) == mem1.tobytes()
    ops.verify(ws)
    check_ws_first(ws, plain, mem1.reshape(-1, bs), offsets)
    # The unchanged, zeroed and ancestor-equal blocks of the working set were not stored.
    stats = read_manifest(ws).stats
    assert stats.blocks_deduplicated >= 2 and stats.blocks_inherited > 0


def test_without_a_working_set_the_layout_is_memory_order(tmp_path) -> None:
    """The control: the model of the tests above does not hold for a plain build."""
    mem = guest(PAGE, seed=1)
    content = mem.reshape(-1, PAGE)
    write_full(tmp_path / "mem", mem)
    offsets = page_offsets(ws_order(len(content), seed=2), PAGE, seed=3)
    _, plain = ops.pack(tmp_path / "mem", tmp_path / "store", BuildOptions())
    with pytest.raises(AssertionError):
        check_ws_first(plain, plain, content, offsets)


def test_cli_working_set_json_stats_and_size_mismatch(tmp_path) -> None:
    mem = guest(PAGE, seed=7)
    write_full(tmp_path / "mem", mem)
    store = tmp_path / "store"
    offsets = page_offsets(ws_order(len(mem), seed=8), PAGE, seed=9)
    write_working_set(tmp_path / "ws", mem.size, offsets)
    plain = fcsnap("pack", "--init", tmp_path / "mem", "--store", store, "--json")
    first = fcsnap("pack", "--init", tmp_path / "mem", "--store", store, "--json", "--compress",
                   "zstd",
                   "--working-set", tmp_path / "ws")
    assert plain.returncode == first.returncode == 0, first.stderr
    a, b = json.loads(plain.stdout), json.loads(first.stdout)
    assert {k: v for k, v in a["stats"].items() if k != "bytes_written"} == {
        k: v for k, v in b["stats"].items() if k != "bytes_written"}
    check_ws_first(Path(b["path"]), Path(a["path"]), mem, offsets)
    diffed = fcsnap("diff", tmp_path / "mem", "--base", a["build_id"], "--store", store,
                    "--json", "--working-set", tmp_path / "ws")
    assert diffed.returncode == 0, diffed.stderr
    assert json.loads(diffed.stdout)["stats"]["blocks_stored"] == 0  # nothing changed
    builds = sorted(p.name for p in store.iterdir())
    write_working_set(tmp_path / "other", 2 * mem.size, [0])
    for command in (("pack", "--init", tmp_path / "mem"),
                    ("diff", tmp_path / "mem", "--base", a["build_id"])):
        bad = fcsnap(*command, "--store", store, "--working-set", tmp_path / "other")
        assert bad.returncode == 1
        assert bad.stderr.startswith("fcsnap: error: ") and "recorded for" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in store.iterdir()) == builds
    with pytest.raises(FcsnapError, match="recorded for"):
        ops.pack(tmp_path / "mem", store, BuildOptions(working_set=tmp_path / "other"))


# -- restore of a working-set-first build ----------------------------------------------------

SIZE = 4 * MiB


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_prefetch_of_a_working_set_first_build(tmp_path, procs, compression: str) -> None:
    """Record a working set, pack with it first, restore with --prefetch-ws: the working
    set is installed before the guest gets to it, and every byte is right."""
    mem = synthetic_memory(SIZE, seed=11)
    write_full(tmp_path / "mem", mem)
    store = tmp_path / "store"
    options = BuildOptions(compression=compression)
    _, build = ops.pack(tmp_path / "mem", store, options)
    lineage = Lineage(store, [build], [tmp_path / "mem"])
    ws = tmp_path / "ws"
    guest_args = {"touch": 0.3, "order": "random", "seed": 5, "threads": 2}
    first = restore(procs, lineage, ("--record-ws", str(ws), "--fault-around", "0"),
                    **guest_args)
    assert first.status == 0 and first.report is not None and first.report["mismatches"] == 0
    recorded = read_working_set(ws, SIZE)
    _, ws_build = ops.pack(tmp_path / "mem", store,
                           BuildOptions(compression=compression, working_set=ws))
    header = load_header(ws_build)
    slots: dict[bytes, int] = {}
    for offset in recorded.tolist():  # each distinct non-zero page in fault order, from 0
        found = header.lookup(offset)
        assert found.build_id == (NIL if not mem[offset // PAGE].any() else
                                  uuid.UUID(ws_build.name))
        if found.build_id != NIL:
            slot = slots.setdefault(mem[offset // PAGE].tobytes(), len(slots))
            assert found.storage_offset == slot * PAGE
    assert len(slots) > 50
    procs.stats.unlink()
    # The delay stands in for Firecracker restoring vCPU state after the handshake.
    second = restore(procs, Lineage(store, [ws_build], [tmp_path / "mem"]),
                     ("--prefetch-ws", str(ws), "--fault-around", "0"),
                     start_delay=0.3, **guest_args)
    assert second.status == 0 and second.vm_status == 0, second.stderr
    assert second.report is not None and second.report["mismatches"] == 0
    stats = second.stats
    assert stats is not None
    assert stats["prefetched_pages"] == len(recorded)
    assert stats["faults"] < first.stats["faults"] / 2
    assert stats["per_build_pages"] == {ws_build.name: stats["pages_served"] - stats[
        "zero_pages"]}


PREFETCH_CASES = [
    pytest.param("none", True, "4K", (), id="raw-ws-first"),
    pytest.param("zstd", True, "4K", ("--verify",), id="zstd-ws-first-verify"),
    pytest.param("none", False, "4K", (), id="raw-plain-build"),
    pytest.param("zstd", False, "4K", (), id="zstd-plain-build"),
    pytest.param("none", True, "2M", (), id="raw-ws-first-2m-pages"),
]


@pytest.mark.parametrize(("compression", "ws_first", "page", "args"), PREFETCH_CASES)
def test_prefetch_racing_the_guest(request, tmp_path, procs, compression: str, ws_first: bool,
                                   page: str, args: tuple[str, ...]) -> None:
    """No start delay: four threads fault while the prefetch runs (pages of the working set
    one at a time, others with fault-around). Every byte read is right, every page is
    installed once, and the prefetch finishes."""
    if page == "2M":
        request.getfixturevalue("hugepages")
    mem = synthetic_memory(SIZE, seed=12)
    write_full(tmp_path / "mem", mem)
    rng = np.random.default_rng(13)
    ws = tmp_path / "ws"
    write_working_set(ws, SIZE, rng.permutation(SIZE // PAGE)[: SIZE // PAGE // 3] * PAGE)
    options = BuildOptions(compression=compression, working_set=ws if ws_first else None)
    _, build = ops.pack(tmp_path / "mem", tmp_path / "store", options)
    out = restore(procs, Lineage(tmp_path / "store", [build], [tmp_path / "mem"]),
                  ("--prefetch-ws", str(ws), "--fault-around", "64K", *args),
                  page_size=page, threads=4, order="random", seed=5)
    assert out.status == 0 and out.vm_status == 0, out.stderr
    assert out.report is not None and out.report["mismatches"] == 0
    stats = out.stats
    assert stats is not None
    page_size = 4096 if page == "4K" else 2 * MiB
    assert stats["pages_served"] == SIZE // page_size
    assert stats["prefetched_pages"] > 0 and stats["prefetch_s"] is not None


def test_prefetch_while_the_balloon_races_the_faults(tmp_path, procs) -> None:
    """REMOVE events arrive while the prefetch installs (its copies then fail with EAGAIN
    until the events are read): ballooned pages read zero, all others right."""
    mem = synthetic_memory(SIZE, seed=14)
    write_full(tmp_path / "mem", mem)
    ws = tmp_path / "ws"
    write_working_set(ws, SIZE, np.random.default_rng(15).permutation(SIZE // PAGE) * PAGE)
    _, build = ops.pack(tmp_path / "mem", tmp_path / "store", BuildOptions(working_set=ws))
    server = procs.server(build.name, tmp_path / "store", "--prefetch-ws", str(ws))
    race_the_balloon(procs, server, tmp_path / "mem")


def test_eager_installs_the_working_set_first(tmp_path, procs) -> None:
    """--eager with --prefetch-ws: the working set goes in first, then everything else,
    before any fault is served."""
    mem = synthetic_memory(SIZE, seed=16)
    write_full(tmp_path / "mem", mem)
    ws = tmp_path / "ws"
    offsets = np.random.default_rng(17).permutation(SIZE // PAGE)[:100] * PAGE
    write_working_set(ws, SIZE, offsets)
    _, build = ops.pack(tmp_path / "mem", tmp_path / "store", BuildOptions(working_set=ws))
    out = restore(procs, Lineage(tmp_path / "store", [build], [tmp_path / "mem"]),
                  ("--eager", "--prefetch-ws", str(ws)), threads=2, order="random")
    assert out.status == 0 and out.vm_status == 0, out.stderr
    assert out.report is not None and out.report["mismatches"] == 0
    stats = out.stats
    assert stats is not None and stats["prefetch_s"] is not None
    assert stats["prefetched_pages"] == 100
    assert stats["prefetched_pages"] + stats["populated_pages"] == SIZE // PAGE
