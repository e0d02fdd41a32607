"""What `fcsnap ls` reports: names, builds with their live fraction, and one name's lineage.

Reports are JSON-ready dicts; the CLI renders the same structures as tables.
"""

from __future__ import annotations

import uuid
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.store.backends.usage import StoreView, union_length
from fcsnap.store.format.pins import pin_problems


def _fraction(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def summary(view: StoreView) -> dict[str, Any]:
    """Bytes on disk against the bytes the heads read: the store's space amplification."""
    disk, live = view.disk_bytes, view.live_bytes
    return {
        "names": len(view.names),
        "builds": len(view.builds),
        "unreferenced_builds": len(set(view.builds) - view.reachable()),
        "disk_bytes": disk,
        "live_bytes": live,
        "amplification": round(disk / live, 4) if live else None,
    }


def names_report(view: StoreView) -> dict[str, Any]:
    readers = view.readers()
    rows = []
    for name, entry in sorted(view.names.items()):
        head = view.builds.get(entry.head) if entry.head is not None else None
        reads = view.head_reads(name)
        lineage = [view.builds[b] for b in reads if b in view.builds]
        damaged = _damaged(view, reads)
        row: dict[str, Any] = {
            "name": name,
            "head": None if entry.head is None else str(entry.head),
            "generation": head.manifest.generation if head and head.manifest else None,
            "created_at": head.manifest.created_at if head and head.manifest else None,
            "memory_bytes": head.manifest.size if head and head.manifest else None,
            "lineage_bytes": sum(b.disk_bytes for b in lineage),
            "shared_bytes": sum(b.disk_bytes for b in lineage if len(readers[b.build_id]) > 1),
            # A build whose build.json cannot be read stores an unknown number of bytes.
            "live_fraction": None if damaged else _fraction(
                view.head_live_bytes(name), sum(b.stored_bytes for b in lineage)
            ),
        }
        if entry.error or head is None or head.error:
            row["error"] = entry.error or (head.error if head else f"build {entry.head} is missing")
        elif damaged:
            row["error"] = damaged
        rows.append(row)
    return {"names": rows, "summary": summary(view)}


def _damaged(view: StoreView, reads: set[uuid.UUID]) -> str | None:
    """What is wrong with the first build of `reads` that is missing or cannot be read."""
    for build_id in sorted(reads):
        build = view.builds.get(build_id)
        if build is None:
            return f"build {build_id} read by the head is missing"
        if build.error:
            return f"build {build_id}: {build.error}"
    return None


def builds_report(view: StoreView) -> dict[str, Any]:
    readers = view.readers()
    heads: dict[uuid.UUID, list[str]] = {}
    for entry in sorted(view.names.values(), key=lambda n: n.name):
        if entry.head is not None:
            heads.setdefault(entry.head, []).append(entry.name)
    rows = []
    for build in view.builds.values():
        m = build.manifest
        rows.append({
            "build_id": str(build.build_id),
            "generation": m.generation if m else None,
            "parent": str(m.parent_build_id) if m and m.parent_build_id else None,
            "created_at": m.created_at if m else None,
            "disk_bytes": build.disk_bytes,
            "stored_bytes": build.stored_bytes,
            "live_bytes": view.live.get(build.build_id, 0),
            "live_fraction": _fraction(view.live.get(build.build_id, 0), build.stored_bytes),
            "read_by": readers.get(build.build_id, []),
            "head_of": heads.get(build.build_id, []),  # a head need not read itself
            "unreferenced": build.build_id not in readers and build.build_id not in heads,
            **({"error": build.error} if build.error else {}),
        })
    rows.sort(key=lambda r: (r["created_at"] or "", r["build_id"]))
    return {"builds": rows, "summary": summary(view)}


def lineage_report(view: StoreView, name: str) -> dict[str, Any]:
    """One name's lineage, newest generation first, following build.json's parent links: what
    each generation stores and how much of it the head still reads, and whether each build
    the head reads matches its pin in the head's build.json (checked, as restore checks it:
    `pinned` is None when the head's build.json cannot say)."""
    if name not in view.names:
        raise FcsnapError(f"no VM named {name!r} in store {view.store}")
    entry = view.names[name]
    if entry.head is None:
        raise FcsnapError(entry.error or f"{name!r} has no head")
    head = view.builds.get(entry.head)
    head_ranges = (head.ranges or {}) if head else {}
    pins: dict[uuid.UUID, str] | None = None
    pinned: bool | None = None
    if head is not None and head.manifest is not None:
        try:
            pins = pin_problems(head.path, set(head_ranges))
            pinned = pins is not None
        except FcsnapError:
            pass  # build.json changed under us: not checked
    rows = []
    seen: set[uuid.UUID] = set()
    current: uuid.UUID | None = entry.head
    while current is not None and current not in seen:
        seen.add(current)
        build = view.builds.get(current)
        if build is None:
            rows.append({"build_id": str(current), "missing": True})
            break
        m = build.manifest
        read = union_length(*head_ranges[current]) if current in head_ranges else 0
        row = {
            "build_id": str(current),
            "generation": m.generation if m else None,
            "created_at": m.created_at if m else None,
            "disk_bytes": build.disk_bytes,
            "stored_bytes": build.stored_bytes,
            "head_reads_bytes": read,
            "head_reads_fraction": _fraction(read, build.stored_bytes) if m else None,
            "read_by_head": current in head_ranges,
            "missing": False,
        }
        if build.error:
            row["error"] = build.error
        if pins and current in pins:
            row["pin_error"] = pins[current]
        rows.append(row)
        current = m.parent_build_id if m else None
    return {
        "name": name, "head": str(entry.head), "pinned": pinned,
        "pin_errors": sorted((pins or {}).values()), "generations": rows,
    }
