"""Removing names and collecting garbage builds, safely beside every other command.

`rm` only removes names. `gc` deletes what no name's head reads (a build only an older
generation of a name read included), plus leftovers of killed commands. It never deletes what
another process uses, even with no grace period, by the store's flock protocol: gc holds
STORE/.gc.lock; a candidate is deleted only if gc gets LOCK_EX on its directory (readers,
restore and writers hold LOCK_SH or LOCK_EX on everything they use, so a busy build is kept,
with everything it reads); names and new builds are re-read after locking; a candidate is
renamed to `.trash-<id>` (one atomic step, fsynced) before its files go, so a killed gc leaves
only hidden trash, which the next gc removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.files import fsync_path
from fcsnap.store.backends.stores import Store, build_bytes, squash_source
from fcsnap.store.backends.usage import (
    StoreView,
    build_dirs,
    directory_bytes,
    read_names,
    read_ranges,
    scan,
)
from fcsnap.store.format.layout import (
    GC_LOCK,
    STAGING_PREFIX,
    TRASH_PREFIX,
    build_path,
    foreign_build,
)
from fcsnap.store.format.locks import (
    POINTER_TMP_PREFIX,
    DirLock,
    NameMoved,
    lock_dir,
    name_lock,
    stop_point,
    try_remove_staging,
)
from fcsnap.store.format.names import VMS, check_vm_name
from fcsnap.store.operations import ops
from fcsnap.store.operations.listing import summary

DEFAULT_GRACE = 3600.0


def remove_names(store: Path, names: list[str]) -> list[dict[str, str]]:
    """Remove vms/<name> for every name, or none of them when one does not exist."""
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        check_vm_name(name)
    if not store.is_dir():
        raise FcsnapError(f"store {store} is not a directory")
    if not (store / VMS).is_dir():
        raise FcsnapError(f"no VM named {wanted[0]!r} in store {store}")
    removed = []
    with name_lock(store) as vms:
        for name in wanted:
            if not (vms / name).is_file():
                raise FcsnapError(f"no VM named {name!r} in store {store}")
        for name in wanted:
            head = (vms / name).read_text().strip()
            (vms / name).unlink()
            removed.append({"name": name, "head": head})
        fsync_path(vms)
    return removed


@dataclass
class GcPlan:
    """What one gc run decided, and why: builds to delete, builds kept, leftovers to remove."""

    delete: dict[uuid.UUID, int] = field(default_factory=dict)  # build -> bytes on disk
    kept: dict[uuid.UUID, str] = field(default_factory=dict)  # unreferenced build -> reason
    leftovers: list[str] = field(default_factory=list)


@contextlib.contextmanager
def gc_lock(store: Path, dry_run: bool) -> Iterator[None]:
    """STORE/.gc.lock LOCK_EX|LOCK_NB: one gc at a time. A dry run only reads, so it creates
    nothing and takes no lock (it never deletes, so it cannot race another gc)."""
    if dry_run:
        yield
        return
    fd = os.open(store / GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with DirLock(fd, store / GC_LOCK):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FcsnapError(f"another gc is running on {store}") from None
        yield


def collect(
    store: Path, grace: float = DEFAULT_GRACE, dry_run: bool = False,
    repack_below: float | None = None,
) -> dict[str, Any]:
    """Delete every build no head reads and no process uses, older than `grace` seconds, and
    the leftovers of killed commands; with `repack_below`, first squash the names whose lineage
    the head reads less than that fraction of. Returns the JSON-ready report."""
    if not store.is_dir():
        raise FcsnapError(f"store {store} is not a directory")
    with gc_lock(store, dry_run):
        before = scan(store)
        refuse_unknown_heads(before)
        repacked = repack(store, before, repack_below, dry_run) if repack_below is not None else []
        view = scan(store) if repacked and not dry_run else before
        plan = GcPlan()
        locks = lock_candidates(view, grace, plan)
        try:
            recheck(store, view, locks, plan)
            if dry_run:
                plan.delete = {b: view.builds[b].disk_bytes for b in locks}
                plan.leftovers = leftovers(store, remove=False)
            else:  # a killed gc's trash first: its names must be free for this run's
                plan.leftovers = leftovers(store, remove=True)
                delete(store, locks, plan)
        finally:
            for lock in locks.values():
                lock.release()
        freed = sum(plan.delete.values())
        after = summary(scan(store)) if not dry_run else predicted(before, plan)
    return {
        "dry_run": dry_run,
        "grace_s": grace,
        "deleted" if not dry_run else "would_delete": [
            {"build_id": str(b), "disk_bytes": n} for b, n in sorted(plan.delete.items())
        ],
        "bytes_freed" if not dry_run else "bytes_to_free": freed,
        "kept": [{"build_id": str(b), "reason": r} for b, r in sorted(plan.kept.items())],
        "leftovers": plan.leftovers,
        "repacked": repacked,
        "before": summary(before),
        "after": after,
    }


def refuse_unknown_heads(view: StoreView) -> None:
    """A head gc cannot read might read anything: refuse rather than guess (as restic's prune
    refuses a damaged repository)."""
    bad = view.unreadable_heads()
    if bad:
        raise FcsnapError(f"gc stopped, it cannot tell what VM {bad[0]} reads; fix or rm it")


def lock_candidates(view: StoreView, grace: float, plan: GcPlan) -> dict[uuid.UUID, DirLock]:
    """LOCK_EX|LOCK_NB on every unreferenced build older than the grace period. A young or busy
    one is kept, and so is every build it reads."""
    now = time.time()
    reachable = view.reachable()
    candidates = [b for b in view.builds.values() if b.build_id not in reachable]
    locks: dict[uuid.UUID, DirLock] = {}
    for build in candidates:
        if _foreign(build.path):
            plan.kept[build.build_id] = "an E2B/Wrenn build (gc never removes those)"
            continue
        if build.age(now) < grace:
            plan.kept[build.build_id] = "younger than the grace period"
            continue
        try:
            lock = lock_dir(build.path, exclusive=True, block=False)
        except FileNotFoundError:
            continue  # gone since the scan
        if lock is None:
            plan.kept[build.build_id] = "in use"
        elif not lock.still_at(build.path):
            lock.release()
        else:
            locks[build.build_id] = lock
    for kept in list(plan.kept):
        keep_what_it_reads(view, kept, locks, plan)
    return locks


def _foreign(path: Path) -> bool:
    """An E2B/Wrenn build (layout.foreign_build), which fcsnap only reads: never garbage."""
    try:
        return foreign_build(os.listdir(path))
    except FileNotFoundError:
        return False  # gone since the scan


def keep_what_it_reads(
    view: StoreView, kept: uuid.UUID, locks: dict[uuid.UUID, DirLock], plan: GcPlan,
    reads: set[uuid.UUID] | None = None,
) -> None:
    """Release the candidates a kept build reads. A kept build whose header cannot be read
    might read any of them: then none is deleted."""
    if reads is None:
        build = view.builds.get(kept)
        reads = build.reads if build is not None else set()
    targets = set(locks) if reads is None else reads & set(locks)
    reason = f"read by {kept}" if reads is not None else f"{kept} (unreadable) might read it"
    for build_id in targets - {kept}:
        locks.pop(build_id).release()
        plan.kept[build_id] = reason


def recheck(
    store: Path, view: StoreView, locks: dict[uuid.UUID, DirLock], plan: GcPlan
) -> None:
    """With the candidates locked, read the names and list the builds again: a head moved to a
    candidate, or a build made since the scan reading one, keeps it."""
    stop_point("gc-recheck")
    heads = {n.head for n in read_names(store).values() if n.head is not None}
    newcomers = set(build_dirs(store)) - set(view.builds)
    for build_id in heads | newcomers:
        if build_id in locks:
            locks.pop(build_id).release()
            plan.kept[build_id] = "named again"
        try:
            reads: set[uuid.UUID] | None = set(read_ranges(build_path(store, build_id)))
        except (FcsnapError, FileNotFoundError):
            reads = None if build_path(store, build_id).exists() else set()
        keep_what_it_reads(view, build_id, locks, plan, reads)


def delete(store: Path, locks: dict[uuid.UUID, DirLock], plan: GcPlan) -> None:
    """Rename every locked candidate to hidden trash in one fsynced step, then remove it."""
    trash = []
    for build_id in locks:
        path = build_path(store, build_id)
        plan.delete[build_id] = directory_bytes_or_zero(path)
        target = store / f"{TRASH_PREFIX}{build_id}"
        os.rename(path, target)
        trash.append(target)
    if trash:
        fsync_path(store)
    for target in trash:
        remove_tree(target)
    if trash:
        fsync_path(store)


def directory_bytes_or_zero(path: Path) -> int:
    try:
        return directory_bytes(path)
    except FileNotFoundError:
        return 0


def remove_tree(path: Path) -> None:
    """Remove a trashed build file by file; the stop point lets tests kill gc mid-deletion."""
    for child in sorted(path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        stop_point("gc-delete")
    path.rmdir()


def leftovers(store: Path, remove: bool) -> list[str]:
    """Trash of a killed gc, staging directories no writer holds, stale pointer temporaries:
    the names of those removed (or, for a dry run, that would be)."""
    found = []
    for entry in sorted(store.glob(f"{TRASH_PREFIX}*")):
        found.append(entry.name)
        if remove and entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        elif remove:
            entry.unlink(missing_ok=True)
    for entry in sorted(store.glob(f"{STAGING_PREFIX}*")):
        if remove:
            if try_remove_staging(entry):
                found.append(entry.name)
            continue
        with contextlib.suppress(FileNotFoundError):
            lock = lock_dir(entry, exclusive=True, block=False)
            if lock is not None:
                found.append(entry.name)
                lock.release()
    vms = store / VMS
    if vms.is_dir() and any(vms.glob(f"{POINTER_TMP_PREFIX}*")):
        if not remove:
            found += [f"{VMS}/{p.name}" for p in sorted(vms.glob(f"{POINTER_TMP_PREFIX}*"))]
        else:
            with name_lock(store):  # a pointer is written under this lock: any left is stale
                for p in sorted(vms.glob(f"{POINTER_TMP_PREFIX}*")):
                    p.unlink(missing_ok=True)
                    found.append(f"{VMS}/{p.name}")
    return found


def predicted(before: StoreView, plan: GcPlan) -> dict[str, Any]:
    """The summary a dry run's deletions would leave."""
    out = summary(before)
    out["disk_bytes"] -= sum(plan.delete.values())
    out["builds"] -= len(plan.delete)
    out["unreferenced_builds"] -= len(plan.delete)
    live = out["live_bytes"]
    out["amplification"] = round(out["disk_bytes"] / live, 4) if live else None
    return out


def repack(
    store: Store, view: StoreView, below: float, dry_run: bool
) -> list[dict[str, Any]]:
    """Squash every name whose head reads less than `below` of the bytes its lineage stores,
    when that shrinks the store (the builds only it reads outweigh what the head reads), and
    point the name at the flat copy by compare-and-swap: a name moved meanwhile is left alone.
    Local and remote stores alike (the remote gc calls it too)."""
    if not 0 < below <= 1:
        raise FcsnapError(f"--repack-below {below} must be a fraction in (0, 1]")
    readers = view.readers()
    done = []
    for name, entry in sorted(view.names.items()):
        head = view.builds.get(entry.head) if entry.head is not None else None
        reads = view.head_reads(name)
        if head is None or head.manifest is None or reads == {head.build_id}:
            continue  # a flat build: squashing it would copy it as it is
        lineage = [view.builds[b] for b in reads if b in view.builds]
        stored = sum(b.stored_bytes for b in lineage)
        live = view.head_live_bytes(name)
        if not stored or live / stored >= below:
            continue
        own = sum(b.stored_bytes for b in lineage if readers[b.build_id] == [name])
        row: dict[str, Any] = {
            "name": name, "head": str(head.build_id), "live_fraction": round(live / stored, 6),
            "lineage_stored_bytes": stored, "head_reads_bytes": live,
        }
        if own <= live:
            row["skipped"] = "its lineage is shared: a flat copy would not shrink the store"
        elif not dry_run:
            try:
                # squashed as the head was written; `name` moves only if still at the head
                new, _ = ops.squash(squash_source(store, head.path), store, name,
                                    head.manifest.build_id, verb="gc --repack-below")
            except NameMoved as e:  # the squash removed its build
                row["skipped"] = str(e)
            else:
                row["new_head"] = str(new.build_id)
                row["new_head_disk_bytes"] = build_bytes(store, new.build_id)
        done.append(row)
    return done
