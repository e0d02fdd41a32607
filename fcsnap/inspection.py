"""What `fcsnap inspect` reports about a header: metadata, the builds it reads, lookups.

One vocabulary with the header format: a *mapping* is a run of guest memory served by one
build from its `build_storage_offset`; zero mappings carry the nil build id; `base_build_id` is
generation 0 of the lineage, `parent_build_id` the generation this one was diffed from.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.header import NIL, Header, Lookup
from fcsnap.header.e2b import BuildsSection, Frame
from fcsnap.store.format.layout import MANIFEST
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.format.pins import pin_problems


def _generation_of(build_id: uuid.UUID, header: Header, store: Path | None) -> int | None:
    """A build's generation: the header knows its own; the store's build.json knows the rest."""
    if build_id == header.metadata.build_id:
        return header.metadata.generation
    if store is not None and (store / str(build_id) / MANIFEST).exists():
        try:
            return read_manifest(store / str(build_id)).generation
        except FcsnapError:
            return None
    return None


def _pins(header: Header, store: Path | None) -> dict[str, Any]:
    """Whether the build's build.json pins the builds it reads, checked as restore checks
    them (the sidecars' hashes, not the memory): {"pinned": bool, "pin_errors": [lines]}
    (errors only when pinned); {} when there is no readable build.json to say."""
    build_dir = None if store is None else store / str(header.metadata.build_id)
    if build_dir is None or not (build_dir / MANIFEST).exists():
        return {}
    try:
        problems = pin_problems(build_dir, header.build_ids())
    except FcsnapError:
        return {}
    if problems is None:
        return {"pinned": False}
    return {"pinned": True, "pin_errors": list(problems.values())}


def _parent_of(header: Header, build_dir: Path | None) -> str | None:
    """The parent build id, which only build.json knows (the header names generation 0, the
    base, but not the parent): None for generation 0, and where no readable build.json of
    this build sits beside the header (inspect reports the header; verify checks build.json)."""
    if header.metadata.generation == 0 or build_dir is None:
        return None
    if not (build_dir / MANIFEST).exists():
        return None
    try:
        manifest = read_manifest(build_dir)
    except FcsnapError:
        return None
    if manifest.build_id != header.metadata.build_id or manifest.parent_build_id is None:
        return None
    return str(manifest.parent_build_id)


def _frame_json(frame: Frame) -> dict[str, int]:
    return {
        "uncompressed_offset": frame.start_u, "uncompressed_length": frame.size_u,
        "compressed_offset": frame.start_c, "compressed_length": frame.size_c,
    }


def _builds_section(section: BuildsSection, show_frames: bool) -> dict[str, Any]:
    """E2B's V4/V5 flags and builds section: per build its file size, SHA-256 (None where the
    header says unknown: all zeros) and frame table; the frames themselves with --mappings."""
    builds = []
    for info in section.builds.values():
        row: dict[str, Any] = {
            "build_id": str(info.build_id),
            "file_size": info.size,
            "sha256": info.checksum.hex() if info.checksum_known else None,
            "compression": info.compression,
            "frames": len(info.frames),
            "frames_uncompressed_bytes": sum(f.size_u for f in info.frames),
            "frames_compressed_bytes": sum(f.size_c for f in info.frames),
        }
        if show_frames:
            row["frame_table"] = [_frame_json(f) for f in info.frames]
        builds.append(row)
    return {
        "flags": section.flags,
        "incomplete_pending_upload": section.incomplete,
        "builds": builds,
    }


def _lookup_frame(header: Header, found: Lookup) -> dict[str, int] | None:
    """The frame of a compressed build's object that holds a looked-up byte, if the header's
    builds section has it."""
    section = header.builds_section
    info = section.builds.get(found.build_id) if section else None
    frame = info.frame_at(found.storage_offset) if info else None
    return None if frame is None else _frame_json(frame)


def inspect_report(
    header: Header,
    store: Path | None = None,
    show_mappings: bool = False,
    at: list[int] | None = None,
    build_dir: Path | None = None,
) -> dict[str, Any]:
    """The JSON-ready report; the CLI's tables render this same structure. `build_dir` holds
    the header and, in a store, the build.json that names the parent."""
    meta = header.metadata
    per_build: dict[uuid.UUID, list[int]] = defaultdict(lambda: [0, 0])
    for m in header.mappings:
        row = per_build[m.build_id]
        row[0] += 1
        row[1] += m.length
    zero_runs, zero_bytes = per_build.pop(NIL, [0, 0])
    builds = [
        {
            "build_id": str(build_id),
            "generation": _generation_of(build_id, header, store),
            "mappings": runs,
            "bytes": length,
            "blocks": length // meta.block_size,
            "share": round(length / meta.size, 6),
        }
        for build_id, (runs, length) in per_build.items()
    ]
    builds.sort(key=lambda b: (b["generation"] is None, b["generation"] or 0, b["build_id"]))
    report: dict[str, Any] = {
        "metadata": {
            "version": meta.version,
            "block_size": meta.block_size,
            "size": meta.size,
            "generation": meta.generation,
            "build_id": str(meta.build_id),
            "parent_build_id": _parent_of(header, build_dir),
            "base_build_id": str(meta.base_build_id),
        },
        "mapping_count": len(header.mappings),
        "zero": {
            "mappings": zero_runs,
            "bytes": zero_bytes,
            "share": round(zero_bytes / meta.size, 6),
        },
        "builds": builds,
    }
    report = {**_pins(header, store), **report}  # a build's header, not a lone header file
    if header.builds_section is not None:
        report["e2b"] = _builds_section(header.builds_section, show_mappings)
    if show_mappings:
        report["mappings"] = [
            {
                "offset": m.offset,
                "length": m.length,
                "build_id": str(m.build_id),
                "build_storage_offset": m.storage_offset,
            }
            for m in header.mappings
        ]
    if at:
        lookups = [header.lookup(offset) for offset in at]
        report["lookups"] = [
            {
                "offset": found.offset,
                "build_id": str(found.build_id),
                "build_storage_offset": found.storage_offset,
                "remaining_length": found.remaining,
                **({"frame": _lookup_frame(header, found)} if header.builds_section else {}),
            }
            for found in lookups
        ]
    return report
