"""What a store holds and who reads it: names, builds, and the bytes of each build a head reads.

A build is *reachable* when some name's head reads it through the head's header mappings; the
parent chain in build.json does not count. A build that only an older generation of a name
read is therefore unreachable once no head reads it. `ls` renders this view, and `gc` decides
from it (and then re-checks under locks).
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.store.format.layout import HEADER, VMS, parse_build_id
from fcsnap.store.format.lineage import header_records, is_nil
from fcsnap.store.format.manifest import Manifest, read_manifest

Ranges = dict[uuid.UUID, tuple[np.ndarray, np.ndarray]]
"""Per build read: the (start, end) byte ranges of its diff, as two arrays."""


@dataclass
class Build:
    """One build directory of the store, read without trusting it: a damaged build is still
    listed (and is garbage when unreachable), with `error` saying what is wrong."""

    build_id: uuid.UUID
    path: Path
    manifest: Manifest | None
    ranges: Ranges | None  # None when the header cannot be read
    disk_bytes: int
    written_at: float  # the directory's mtime: when its last file was written (in staging)
    error: str | None = None

    @property
    def reads(self) -> set[uuid.UUID] | None:
        """The builds whose diffs this build's header maps (itself included when it does)."""
        return None if self.ranges is None else set(self.ranges)

    @property
    def stored_bytes(self) -> int:
        return self.manifest.stats.bytes_stored if self.manifest else 0

    def age(self, now: float) -> float:
        return now - self.written_at


@dataclass
class Name:
    name: str
    head: uuid.UUID | None  # None: vms/<name> does not hold a build id
    error: str | None = None


@dataclass
class StoreView:
    store: Path
    names: dict[str, Name]
    builds: dict[uuid.UUID, Build]
    live: dict[uuid.UUID, int] = field(default_factory=dict)  # bytes of a diff any head reads

    def head_reads(self, name: str) -> set[uuid.UUID]:
        """The builds a name's head reads (empty when the head is missing or unreadable)."""
        head = self.names[name].head
        build = self.builds.get(head) if head is not None else None
        return (build.reads or set()) if build is not None else set()

    def readers(self) -> dict[uuid.UUID, list[str]]:
        """For every build some head reads, the names whose heads read it."""
        out: dict[uuid.UUID, list[str]] = {}
        for name in sorted(self.names):
            for build_id in self.head_reads(name):
                out.setdefault(build_id, []).append(name)
        return out

    def reachable(self) -> set[uuid.UUID]:
        """Every build a head reads, and the heads themselves."""
        found: set[uuid.UUID] = set()
        for entry in self.names.values():
            if entry.head is not None:
                found.add(entry.head)
                found |= self.head_reads(entry.name)
        return found

    def unreadable_heads(self) -> list[str]:
        """Names whose head exists but whose header cannot be read, or whose pointer is bad:
        what they keep is unknown."""
        bad = []
        for entry in self.names.values():
            if entry.head is None:
                bad.append(f"{entry.name} ({entry.error})")
            elif (b := self.builds.get(entry.head)) is not None and b.ranges is None:
                bad.append(f"{entry.name} (build {b.build_id}: {b.error})")
        return bad

    def head_live_bytes(self, name: str) -> int:
        """Distinct bytes of stored diffs that this name's head reads."""
        head = self.names[name].head
        build = self.builds.get(head) if head is not None else None
        if build is None or build.ranges is None:
            return 0
        return sum(union_length(*r) for r in build.ranges.values())

    @property
    def disk_bytes(self) -> int:
        return sum(b.disk_bytes for b in self.builds.values())

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())


def union_length(starts: np.ndarray, ends: np.ndarray) -> int:
    """Bytes covered by the union of ranges [starts[i], ends[i])."""
    if not len(starts):
        return 0
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    reach = np.maximum.accumulate(ends)
    new = np.ones(len(starts), bool)
    new[1:] = starts[1:] > reach[:-1]  # a range starting past all before it opens a group
    group_start = starts[new]
    group_end = np.maximum.reduceat(ends, np.flatnonzero(new))
    return int((group_end - group_start).sum())


def read_ranges(build_dir: Path) -> Ranges:
    """The diff byte ranges each build read by this build's header holds."""
    _, records = header_records(build_dir / HEADER)
    records = records[~is_nil(records)]
    out: Ranges = {}
    if not len(records):
        return out
    column = np.ascontiguousarray(records["build_id"])
    for raw in np.unique(column):
        rows = records[column == raw]
        start = rows["storage"].astype(np.int64)
        out[uuid.UUID(bytes=raw.tobytes())] = (start, start + rows["length"].astype(np.int64))
    return out


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files directly in `path` (builds hold no subdirectories)."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def read_build(path: Path, build_id: uuid.UUID) -> Build:
    st = path.stat()
    build = Build(build_id, path, None, None, directory_bytes(path), st.st_mtime)
    errors = []
    try:  # the header alone says what the build reads: a damaged manifest does not hide it
        build.ranges = read_ranges(path)
    except FcsnapError as e:
        errors.append(str(e))
    try:
        build.manifest = read_manifest(path)
    except FcsnapError as e:
        errors.append(str(e))
    build.error = "; ".join(errors) or None
    return build


def read_names(store: Path) -> dict[str, Name]:
    """Every vms/<name> pointer (temporary files of a pointer being written are hidden)."""
    names: dict[str, Name] = {}
    vms = store / VMS
    if not vms.is_dir():
        return names
    for pointer in sorted(vms.iterdir()):
        if pointer.name.startswith("."):
            continue
        try:
            text = read_regular(pointer, "VM pointer").decode(errors="replace").strip()
        except FcsnapError as e:
            names[pointer.name] = Name(pointer.name, None, str(e))
            continue
        head = parse_build_id(text)
        names[pointer.name] = Name(
            pointer.name, head, None if head else f"{pointer} does not hold a build id"
        )
    return names


def build_dirs(store: Path) -> dict[uuid.UUID, Path]:
    """Visible build directories: named by their build id in canonical form."""
    found = {}
    with os.scandir(store) as entries:
        for entry in entries:
            build_id = parse_build_id(entry.name)
            if build_id is not None and str(build_id) == entry.name and entry.is_dir(
                follow_symlinks=False
            ):
                found[build_id] = Path(entry.path)
    return found


def scan(store: Path) -> StoreView:
    """Read every name and build of the store, and the live bytes of every build."""
    if not store.is_dir():
        raise FcsnapError(f"store {store} is not a directory")
    names = read_names(store)
    builds = {}
    for build_id, path in build_dirs(store).items():
        try:
            build = read_build(path, build_id)
        except FileNotFoundError:
            continue
        if build.error is None or path.exists():
            builds[build_id] = build
        # else: a gc moved it away while we read it (no lock taken: ls must not wait for a
        # writer that holds its new build until the name is published)
    view = StoreView(store, names, builds)
    per_build: dict[uuid.UUID, list[tuple[np.ndarray, np.ndarray]]] = {}
    for head in {n.head for n in names.values() if n.head in builds}:
        for build_id, r in (builds[head].ranges or {}).items():
            if build_id in builds:
                per_build.setdefault(build_id, []).append(r)
    view.live = {
        b: union_length(np.concatenate([s for s, _ in rs]), np.concatenate([e for _, e in rs]))
        for b, rs in per_build.items()
    }
    return view
