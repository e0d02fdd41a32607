"""The test oracle of the mapping algebra: a generation's runs laid over its parent's, in
plain Python, one Mapping at a time.

Production never calls this: pack and diff do the same with numpy (store/lineage.Runs), fast
enough for lineages of tens of thousands of mappings. This version is kept because it is
obviously right: the property tests check Runs against it, and fixtures/make_headers.py
composes the golden headers with it. All functions are pure: they return new lists and never
mutate their inputs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from fcsnap.header.format import NIL, Mapping


def joinable(a: Mapping, b: Mapping) -> bool:
    """True when b continues a: same build and, for data, storage that continues too.

    Joining on the build id alone would serve the wrong bytes after a dedup or a split.
    """
    if a.end != b.offset or a.build_id != b.build_id:
        return False
    return a.is_zero or a.storage_offset + a.length == b.storage_offset


def normalize(mappings: Iterable[Mapping]) -> list[Mapping]:
    """Join adjacent joinable runs and drop empty ones (input must be sorted, non-overlapping)."""
    out: list[Mapping] = []
    for m in mappings:
        if m.length == 0:
            continue
        if m.is_zero and m.storage_offset:
            m = Mapping(m.offset, m.length, NIL, 0)
        if out and joinable(out[-1], m):
            last = out[-1]
            grown = last.length + m.length
            out[-1] = Mapping(last.offset, grown, last.build_id, last.storage_offset)
        else:
            out.append(m)
    return out


def runs_for_blocks(
    blocks: Iterable[tuple[int, uuid.UUID, int]], block_size: int
) -> list[Mapping]:
    """Turn (block index, build id, storage offset) entries, in ascending block order, into
    normalized runs covering just those blocks."""
    return normalize(
        Mapping(index * block_size, block_size, build_id, storage)
        for index, build_id, storage in blocks
    )


def packed_runs(
    changed: Iterable[int], build_id: uuid.UUID, block_size: int
) -> list[Mapping]:
    """Runs for a new generation whose changed blocks (ascending indices) are packed in order
    into its diff file: the k-th changed block is stored at k * block_size."""
    return runs_for_blocks(
        ((index, build_id, k * block_size) for k, index in enumerate(changed)), block_size
    )


def _cut(m: Mapping, start: int, end: int) -> Mapping:
    """The part of m inside [start, end); the storage offset moves with the offset."""
    lo, hi = max(m.offset, start), min(m.end, end)
    storage = 0 if m.is_zero else m.storage_offset + (lo - m.offset)
    return Mapping(lo, hi - lo, m.build_id, storage)


def merge(parent: Sequence[Mapping], overlay: Sequence[Mapping]) -> list[Mapping]:
    """Lay a new generation's runs over its parent's covering list.

    Overlay runs replace the parent wherever they lie; parent runs are split around them. Both
    inputs must be sorted and non-overlapping; the result is normalized. O(n + m).
    """
    out: list[Mapping] = []
    i = 0
    pos = 0  # everything before pos is already emitted
    for o in overlay:
        # parent pieces in [pos, o.offset)
        while i < len(parent) and parent[i].offset < o.offset:
            p = parent[i]
            if p.end > pos:
                out.append(_cut(p, pos, o.offset))
            if p.end <= o.offset:
                i += 1
            else:
                break
        out.append(o)
        pos = o.end
        while i < len(parent) and parent[i].end <= pos:
            i += 1
    for p in parent[i:]:
        if p.end > pos:
            out.append(_cut(p, pos, p.end))
    return normalize(out)
