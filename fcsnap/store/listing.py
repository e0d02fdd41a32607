"""What `fcsnap ls` reports: names, builds with their live fraction, and one name's lineage.

Reports are JSON-ready dicts; the CLI renders the same structures as tables.
"""

from __future__ import annotations

import uuid
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.store.usage import StoreView, union_length


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
        row: dict[str, Any] = {
            "name": name,
            "head": None if entry.head is None else str(entry.head),
            "generation": head.manifest.generation if head and head.manifest else None,
            "created_at": head.manifest.created_at if head and head.manifest else None,
            "memory_bytes": head.manifest.size if head and head.manifest else None,
            "lineage_bytes": sum(b.disk_bytes for b in lineage),
            "shared_bytes": sum(b.disk_bytes for b in lineage if len(readers[b.build_id]) > 1),
            "live_fraction": _fraction(
                view.head_live_bytes(name), sum(b.stored_bytes for b in lineage)
            ),
        }
        if entry.error or head is None or head.error:
            row["error"] = entry.error or (head.error if head else f"build {entry.head} is missing")
        rows.append(row)
    return {"names": rows, "summary": summary(view)}


def builds_report(view: StoreView) -> dict[str, Any]:
    readers = view.readers()
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
            "unreferenced": build.build_id not in readers
            and build.build_id not in {n.head for n in view.names.values()},
            **({"error": build.error} if build.error else {}),
        })
    rows.sort(key=lambda r: (r["created_at"] or "", r["build_id"]))
    return {"builds": rows, "summary": summary(view)}


def lineage_report(view: StoreView, name: str) -> dict[str, Any]:
    """One name's lineage, newest generation first, following build.json's parent links: what
    each generation stores and how much of it the head still reads."""
    if name not in view.names:
        raise FcsnapError(f"no VM named {name!r} in store {view.store}")
    entry = view.names[name]
    if entry.head is None:
        raise FcsnapError(entry.error or f"{name!r} has no head")
    head = view.builds.get(entry.head)
    head_ranges = (head.ranges or {}) if head else {}
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
        rows.append({
            "build_id": str(current),
            "generation": m.generation if m else None,
            "created_at": m.created_at if m else None,
            "disk_bytes": build.disk_bytes,
            "stored_bytes": build.stored_bytes,
            "head_reads_bytes": read,
            "head_reads_fraction": _fraction(read, build.stored_bytes),
            "read_by_head": current in head_ranges,
            "missing": False,
        })
        current = m.parent_build_id if m else None
    return {"name": name, "head": str(entry.head), "generations": rows}
