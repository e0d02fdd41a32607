"""gc of a store in object storage: protected by leases and --grace (docs/FORMAT.md §8.5-6).

Object storage has no locks, so gc cannot see which builds another host is using, as the local
gc does with flock. Restores and the daemon write leases (backends/leases.py) on the builds
they serve, and gc keeps whatever a live lease names. For the other commands, it relies on
time: a build is committed (build.json) only after all its objects, and named right after;
whatever a running command writes is therefore younger than that command. So gc deletes only
what no name's head reads, no live lease names, *and* is older than --grace (default 1h):
committed builds by their build.json's time, and objects of builds never committed (a killed
upload) by their newest object. Before deleting, it lists the store again and keeps whatever a
head, or a build committed meanwhile, reads. What this cannot protect: a command other than a
restore running longer than --grace over a build no name reads (a `diff --base <old id>`);
keep --grace above your longest such command.
--repack-below squashes as the local gc does (lifecycle.repack), moving names by
compare-and-swap on the pointer's ETag; the builds it leaves unread then go as any other.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.store.backends.leases import LeaseEntry, read_leases, take
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.backends.stores import scan_store
from fcsnap.store.backends.usage import StoreView
from fcsnap.store.format.layout import MANIFEST, foreign_build, parse_build_id
from fcsnap.store.format.locks import stop_point
from fcsnap.store.operations.lifecycle import repack
from fcsnap.store.operations.listing import summary


def collect_remote(
    store: RemoteStore, grace: float, dry_run: bool, repack_below: float | None
) -> dict[str, Any]:
    before = scan_store(store)
    bad = before.unreadable_heads()
    if bad:
        raise FcsnapError(f"gc stopped, it cannot tell what VM {bad[0]} reads; fix or rm it")
    repacked = repack(store, before, repack_below, dry_run) if repack_below is not None else []
    view = scan_store(_fresh(store)) if repacked and not dry_run else before
    now = time.time()
    reachable = view.reachable()
    delete: dict[uuid.UUID, int] = {}
    kept: dict[uuid.UUID, str] = {}
    for build in view.builds.values():
        if build.build_id in reachable:
            continue
        if build.age(now) < grace:
            kept[build.build_id] = "younger than the grace period"
        else:
            delete[build.build_id] = build.disk_bytes
    _keep_what_kept_builds_read(view, kept, delete)
    stop_point("gc-recheck")
    _recheck(store, view, delete, kept)
    uncommitted = _uncommitted(store, now, grace)
    # written before the leases are read: a restore leasing a build after this sees it
    marker = take(store, delete, kind="gc") if delete and not dry_run else None
    try:
        stale = _keep_leased(store, view, kept, delete)
        stop_point("gc-leases")  # tests start a restore of a doomed build here
        if not dry_run:
            for build_id in sorted(delete):
                _delete_build(store, build_id)
            for prefix in uncommitted:
                for info in store.objects.list(prefix):
                    store.objects.delete(info.key)
            for entry in stale:
                store.objects.delete(entry.key)
    finally:
        if marker is not None:
            marker.release()
    freed = sum(delete.values())
    after = summary(scan_store(_fresh(store))) if not dry_run else _predicted(before, delete)
    return {
        "dry_run": dry_run,
        "grace_s": grace,
        "deleted" if not dry_run else "would_delete": [
            {"build_id": str(b), "disk_bytes": n} for b, n in sorted(delete.items())
        ],
        "bytes_freed" if not dry_run else "bytes_to_free": freed,
        "kept": [{"build_id": str(b), "reason": r} for b, r in sorted(kept.items())],
        "leftovers": [f"{store.url}/{p}" for p in uncommitted],
        "stale_leases": [entry.as_dict(store.url) for entry in stale],
        "repacked": repacked,
        "before": summary(before),
        "after": after,
    }


def _keep_what_kept_builds_read(
    view: StoreView, kept: dict[uuid.UUID, str], delete: dict[uuid.UUID, int]
) -> None:
    for build_id in list(kept):
        build = view.builds[build_id]
        reads = build.reads
        for target in set(delete) if reads is None else reads & set(delete):
            if target != build_id:
                delete.pop(target)
                kept[target] = f"read by {build_id}"


def _keep_leased(
    store: RemoteStore, view: StoreView, kept: dict[uuid.UUID, str],
    delete: dict[uuid.UUID, int],
) -> list[LeaseEntry]:
    """Keep every build a live lease names (and what those builds read); a lease that cannot
    be read keeps every build. Returns the stale leases, which protect nothing."""
    live, stale = read_leases(store, time.time())
    for entry in live:
        if entry.kind == "gc":  # another gc's list of what it deletes
            continue
        held = set(delete) if entry.builds is None else entry.builds
        for build_id in held:
            build = view.builds.get(build_id)
            reads: set[uuid.UUID] = set() if build is None else (
                set(delete) if build.reads is None else build.reads  # unreadable: all
            )
            for target in ({build_id} | reads) & set(delete):
                delete.pop(target)
                kept[target] = f"leased by {entry.holder} ({store.url}/{entry.key})"
    return stale


def _recheck(
    store: RemoteStore, before: StoreView, delete: dict[uuid.UUID, int],
    kept: dict[uuid.UUID, str],
) -> None:
    """Names moved and builds committed since the scan: keep what they read."""
    view = scan_store(_fresh(store))
    readers = set(view.reachable()) | (set(view.builds) - set(before.builds))
    for reader in readers:
        build = view.builds.get(reader)
        reads = ({reader} | (build.reads or set())) if build is not None else {reader}
        for target in reads & set(delete):
            delete.pop(target)
            kept[target] = f"read by {reader}, named or written during this gc"


def _uncommitted(store: RemoteStore, now: float, grace: float) -> list[str]:
    """Prefixes `<build-id>/` holding objects but no build.json, whose newest object is older
    than the grace period: what killed uploads left. An E2B/Wrenn build (a header and none of
    fcsnap's objects, layout.foreign_build) is not one: fcsnap only reads those."""
    newest: dict[str, float] = {}
    names: dict[str, set[str]] = {}
    for info in store.objects.list():
        head, _, rest = info.key.partition("/")
        if parse_build_id(head) is None or not rest:
            continue
        newest[head] = max(newest.get(head, 0.0), info.mtime)
        names.setdefault(head, set()).add(rest)
    return sorted(
        f"{head}/" for head, t in newest.items()
        if MANIFEST not in names[head] and not foreign_build(names[head]) and now - t >= grace
    )


def _delete_build(store: RemoteStore, build_id: uuid.UUID) -> None:
    """build.json first: from then on no reader sees the build, whatever is left."""
    store.objects.delete(f"{build_id}/{MANIFEST}")
    stop_point("gc-delete")  # tests kill gc here: a build without build.json is left
    for info in store.objects.list(f"{build_id}/"):
        with contextlib.suppress(FcsnapError):
            store.objects.delete(info.key)


def _fresh(store: RemoteStore) -> RemoteStore:
    """The same store with an empty mirror (a second scan must not see the first's files)."""
    from fcsnap.scratch import scratch_dir

    return RemoteStore(store.objects, scratch_dir("mirror"))


def _predicted(before: StoreView, delete: dict[uuid.UUID, int]) -> dict[str, Any]:
    out = summary(before)
    out["disk_bytes"] -= sum(delete.values())
    out["builds"] -= len(delete)
    out["unreferenced_builds"] -= len(delete)
    live = out["live_bytes"]
    out["amplification"] = round(out["disk_bytes"] / live, 4) if live else None
    return out
