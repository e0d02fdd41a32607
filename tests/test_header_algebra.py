"""Property tests of the mapping algebra: the oracle (fcsnap/testing/header_oracle.py) against
a naive page-by-page replay of each lineage, and production's numpy Runs against the oracle."""

from __future__ import annotations

import uuid

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.header import (
    NIL,
    PAGE,
    ZEROS,
    Header,
    Mapping,
    Metadata,
    check,
    encode,
    parse_header,
    to_records,
)
from fcsnap.store.format.lineage import Runs
from fcsnap.testing.header_oracle import merge, normalize, packed_runs, runs_for_blocks


def build_ids(n: int) -> list[uuid.UUID]:
    return [uuid.UUID(int=i + 1) for i in range(n)]


@st.composite
def lineages(draw):
    """A lineage of 1-8 generations; each changes random pages to new data (packed into its own
    diff), to zeros, or to a copy of a page stored earlier anywhere in the lineage (dedup)."""
    pages = draw(st.integers(1, 48))
    gens = draw(st.integers(1, 8))
    ids = build_ids(gens)
    stored: list[tuple[uuid.UUID, int]] = []
    generations = []
    for g in range(gens):
        changed = sorted(draw(st.sets(st.integers(0, pages - 1), max_size=pages)))
        entries = []
        own = 0
        for index in changed:
            kind = draw(st.sampled_from(["new", "zero", "dup"] if stored else ["new", "zero"]))
            if kind == "new":
                entries.append((index, ids[g], own * PAGE))
                stored.append((ids[g], own * PAGE))
                own += 1
            elif kind == "zero":
                entries.append((index, NIL, 0))
            else:
                entries.append((index, *draw(st.sampled_from(stored))))
        generations.append(entries)
    return pages, ids, generations


def replay(pages: int, generations) -> list[list[tuple[uuid.UUID, int]]]:
    """Naive model: a table per generation, page -> (build, storage offset)."""
    table = [(NIL, 0)] * pages
    out = []
    for entries in generations:
        table = list(table)
        for index, build, storage in entries:
            table[index] = (build, storage)
        out.append(table)
    return out


def header_of(mappings, pages: int, build: uuid.UUID, generation: int) -> Header:
    meta = Metadata(3, PAGE, pages * PAGE, generation, build, uuid.UUID(int=1))
    return Header(meta, tuple(mappings))


def validate(header: Header) -> None:
    check(header.metadata, to_records(header.mappings))


def resolve(header: Header, offset: int) -> tuple[uuid.UUID, int]:
    found = header.lookup(offset)
    return found.build_id, found.storage_offset


@settings(max_examples=300, deadline=None)
@given(lineages())
def test_merged_lineage_resolves_like_naive_replay(lineage):
    pages, ids, generations = lineage
    expected = replay(pages, generations)
    current = [Mapping(0, pages * PAGE, NIL, 0)]
    for g, entries in enumerate(generations):
        overlay = runs_for_blocks(entries, PAGE)
        current = merge(current, overlay)
        header = header_of(current, pages, ids[g], g)
        validate(header)
        assert normalize(current) == current, "merge output must already be normalized"
        for page in range(pages):
            build, storage = expected[g][page]
            got = resolve(header, page * PAGE + 123)
            assert got == (build, 0 if build == NIL else storage + 123), (g, page)
        # The header survives its own byte format unchanged.
        blob = encode(header.metadata, to_records(header.mappings))
        assert parse_header(blob).mappings == header.mappings


@settings(max_examples=200, deadline=None)
@given(lineages())
def test_merge_never_mutates_inputs(lineage):
    pages, _ids, generations = lineage
    parent = [Mapping(0, pages * PAGE, NIL, 0)]
    for entries in generations:
        overlay = runs_for_blocks(entries, PAGE)
        parent_copy, overlay_copy = list(parent), list(overlay)
        merged = merge(parent, overlay)
        assert parent == parent_copy and overlay == overlay_copy
        parent = merged


@settings(max_examples=300, deadline=None)
@given(lineages(), st.data())
def test_normalize_never_changes_a_lookup(lineage, data):
    pages, ids, generations = lineage
    current = [Mapping(0, pages * PAGE, NIL, 0)]
    for entries in generations:
        current = merge(current, runs_for_blocks(entries, PAGE))
    # Split every run at random page boundaries: same meaning, not normalized.
    split: list[Mapping] = []
    for m in current:
        cuts = sorted(data.draw(st.sets(st.integers(1, m.length // PAGE - 1), max_size=4))
                      if m.length > PAGE else [])
        bounds = [0, *(c * PAGE for c in cuts), m.length]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            storage = 0 if m.is_zero else m.storage_offset + lo
            split.append(Mapping(m.offset + lo, hi - lo, m.build_id, storage))
    split_header = header_of(split, pages, ids[-1], 0)
    validate(split_header)
    normalized = header_of(normalize(split), pages, ids[-1], 0)
    validate(normalized)
    assert normalize(split) == current
    for page in range(pages):
        assert resolve(split_header, page * PAGE) == resolve(normalized, page * PAGE)


def test_normalize_checks_storage_contiguity():
    a = uuid.UUID(int=7)
    runs = [Mapping(0, PAGE, a, 0), Mapping(PAGE, PAGE, a, 5 * PAGE)]
    assert normalize(runs) == runs, "same build but non-contiguous storage must not be joined"
    contiguous = [Mapping(0, PAGE, a, 0), Mapping(PAGE, PAGE, a, PAGE)]
    assert normalize(contiguous) == [Mapping(0, 2 * PAGE, a, 0)]
    zeros = [Mapping(0, PAGE, NIL, 0), Mapping(PAGE, PAGE, NIL, 0)]
    assert normalize(zeros) == [Mapping(0, 2 * PAGE, NIL, 0)]


def test_merge_splits_parent_and_moves_storage_of_right_part():
    parent_build, child = uuid.UUID(int=1), uuid.UUID(int=2)
    parent = [Mapping(0, 10 * PAGE, parent_build, 100 * PAGE)]
    overlay = [Mapping(3 * PAGE, 2 * PAGE, child, 0)]
    assert merge(parent, overlay) == [
        Mapping(0, 3 * PAGE, parent_build, 100 * PAGE),
        Mapping(3 * PAGE, 2 * PAGE, child, 0),
        Mapping(5 * PAGE, 5 * PAGE, parent_build, 105 * PAGE),
    ]


def test_packed_runs_pack_changed_blocks_in_order():
    b = uuid.UUID(int=3)
    assert packed_runs([1, 2, 5], b, PAGE) == [
        Mapping(PAGE, 2 * PAGE, b, 0),
        Mapping(5 * PAGE, PAGE, b, 2 * PAGE),
    ]


@settings(max_examples=300, deadline=None)
@given(lineages())
def test_builder_vector_runs_agree_with_merge(lineage):
    """pack/diff lay generations over each other with numpy (store/lineage.Runs) for speed;
    merge is the model. Both must produce the same normalized mappings, generation by
    generation."""
    pages, ids, generations = lineage
    current = [Mapping(0, pages * PAGE, NIL, 0)]
    runs = Runs.zeros(pages)
    number = {build: n for n, build in enumerate(ids)}
    for entries in generations:
        current = merge(current, runs_for_blocks(entries, PAGE))
        blocks = np.array([index for index, _, _ in entries], np.int64)
        owner = np.array([ZEROS if b == NIL else number[b] for _, b, _ in entries], np.int32)
        slot = np.array([storage // PAGE for _, _, storage in entries], np.int64)
        runs = Runs.of_blocks(blocks, owner, slot).over(runs, pages)
        records = runs.records(ids, PAGE)
        got = [
            Mapping(int(r["offset"]), int(r["length"]), uuid.UUID(bytes=r["build_id"].tobytes()),
                    int(r["storage"]))
            for r in records
        ]
        assert got == current


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 2), min_size=1, max_size=120), st.data())
def test_data_blocks_in_counts_what_a_block_by_block_count_finds(owners, data):
    """Runs.data_blocks_in (diff's check for holes over the base's data) against counting
    block by block: joined runs of any owner, any set of ranges."""
    owner = np.array([ZEROS if o < 0 else o for o in owners], np.int32)
    blocks = np.arange(len(owner))
    runs = Runs.of_blocks(blocks, owner, np.where(owner == ZEROS, 0, blocks))
    chosen = np.array(data.draw(st.lists(st.booleans(), min_size=len(owner),
                                         max_size=len(owner))))
    edges = np.flatnonzero(np.diff(np.concatenate(([0], chosen.astype(np.int8), [0]))))
    start, end = edges[::2], edges[1::2]
    assert runs.data_blocks_in(start, end - start) == int((chosen & (owner != ZEROS)).sum())
