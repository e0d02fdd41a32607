"""A store in object storage: builds, names and the commit protocol (docs/FORMAT.md §8.5).

The layout is the local one, as keys: `<build-id>/<file>` and `vms/<name>`. Objects cannot be
renamed, so a build is committed by its last object: every other object of the build is
written first, `build.json` last; a build without `build.json` does not exist for any reader
(a killed upload leaves only such invisible objects). A name moves by compare-and-swap: a
conditional put on the pointer's ETag (If-Match), or If-None-Match for a new name.

Commands that read builds (inspect, verify, unpack, squash, diff's base, ls) read a *mirror*:
a temporary local directory with the store's layout holding the objects they need (headers,
manifests, hash sidecars; diffs only for the commands that read data), so the local code
reads a remote build unchanged. Diffs a command does not read are sparse files of the right
size (ls counts their bytes, nothing reads them). The mirror is private to the user (0700
directories, 0600 files: private.py). A mirrored object is fetched again when its
ETag is not the one it was fetched as: a long-lived mirror (the daemon's) sees a header,
sidecar or build.json repaired in the bucket even when its size did not change.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.store.backends.objects import Conflict, ObjectInfo, ObjectStore
from fcsnap.store.backends.private import (
    FILE_MODE,
    new_private_file,
    private_dir,
    private_dirs,
    publish,
    write_private,
)
from fcsnap.store.format.layout import (
    DIFF_RAW,
    DIFF_ZSTD,
    HASHES,
    HEADER,
    LEASES,
    MANIFEST,
    SNAPFILE,
    parse_build_id,
)
from fcsnap.store.format.locks import NameMoved, builds_read, stop_point
from fcsnap.store.format.marker import (
    MARKER,
    MARKER_MAX,
    State,
    check_marker,
    looks_like_store,
    marker_bytes,
)
from fcsnap.store.format.names import POINTER_MAX, VMS, check_vm_name
from fcsnap.store.format.prefixes import is_prefix, match_prefix

META_FILES = (HEADER, MANIFEST, HASHES)
DOWNLOAD_STEP = 16 << 20  # bytes per range GET of a whole-object download


def build_key(build_id: uuid.UUID, name: str) -> str:
    return f"{build_id}/{name}"


def name_key(name: str) -> str:
    return f"{VMS}/{name}"


class RemoteStore:
    """A store held in an ObjectStore that cannot rename (S3)."""

    def __init__(self, objects: ObjectStore, scratch: Path) -> None:
        self.objects = objects
        self.url = objects.url
        self.mirror = scratch  # the local mirror of what this command reads
        private_dirs(scratch, "mirror directory")
        self.fetched_as: dict[Path, str] = {}  # each mirrored object's ETag when fetched

    def __str__(self) -> str:
        return self.url

    # the marker (docs/FORMAT.md §2.3)

    def state(self) -> State:
        """Whether the prefix is a store: its marker, else what its objects look like (a
        listing, needed only for a store made before markers and for E2B/Wrenn buckets, read
        only up to the first object of a store's: build ids sort first). Leases count too: gc
        of such a store's last build may leave one."""
        found = self.objects.get(MARKER, MARKER_MAX)
        if found is not None:
            check_marker(found[0], f"{self.url}/{MARKER}")
            return State.MARKED
        empty = True
        for info in self.objects.scan():
            empty = False
            head, _, rest = info.key.partition("/")
            build = rest != "" and parse_build_id(head) is not None
            if looks_like_store({head}, [head] if build else []) or head == LEASES and rest:
                return State.UNMARKED
        return State.EMPTY if empty else State.FOREIGN

    def write_marker(self) -> None:
        """Create the marker unless it exists (If-None-Match: two inits do not race)."""
        with contextlib.suppress(Conflict):
            self.objects.put(MARKER, marker_bytes(), None)

    # names

    def read_pointer(self, name: str) -> tuple[uuid.UUID | None, str | None]:
        """The build `vms/<name>` points to and the pointer's ETag; (None, None) if absent."""
        found = self.objects.get(name_key(name), POINTER_MAX)
        if found is None:
            return None, None
        data, etag = found
        if len(data) > POINTER_MAX:
            raise FcsnapError(f"{self.url}/{name_key(name)} is not a VM pointer (too big)")
        build_id = parse_build_id(data.decode(errors="replace").strip())
        if build_id is None:
            raise FcsnapError(f"{self.url}/{name_key(name)} does not hold a build id")
        return build_id, etag

    def names(self) -> dict[str, str]:
        """Every name and its pointer's text."""
        out = {}
        for info in self.objects.list(f"{VMS}/"):
            name = info.key[len(VMS) + 1:]
            if "/" in name or name.startswith("."):
                continue
            found = self.objects.get(info.key, POINTER_MAX)
            if found is not None:
                out[name] = found[0].decode(errors="replace").strip()
        return out

    def publish_name(
        self, name: str, build_id: uuid.UUID, expected: uuid.UUID | None, verb: str
    ) -> None:
        """Point `name` at build_id if it still points at `expected` (None: absent): read the
        pointer, compare, then put it conditionally on the ETag read, so a writer that moved
        it in between makes the put fail (NameMoved, as locks.publish_name)."""
        stop_point("publish")
        current, etag = self.read_pointer(name)
        if current == expected:
            stop_point("compare-and-swap")
            data = f"{build_id}\n".encode()
            try:
                self.objects.put(name_key(name), data, etag)
                return
            except Conflict:
                again, etag_again = self.read_pointer(name)
                if etag is None or (again, etag_again) != (current, etag):
                    current = again
                else:  # refused an If-Match on the ETag it still reports: not supported
                    self._replace_without_if_match(name, data)
                    return
        where = f"moved to {current}" if current is not None else "was removed"
        raise NameMoved(f"{name} {where} while this {verb} ran")

    def _replace_without_if_match(self, name: str, data: bytes) -> None:
        """Servers without conditional updates (Ceph before Reef refuses every If-Match on
        PUT with 412) get compare-then-put: the pointer was just read back unchanged, and is
        replaced unconditionally. Another host moving the name in the instant between the
        two can lose its move: said once on stderr."""
        print(
            f"fcsnap: warning: the S3 server of {self.url} refuses conditional updates "
            f"(If-Match); {name} was moved by compare-then-put, not atomically",
            file=sys.stderr,
        )
        self.objects.replace(name_key(name), data)

    def remove_name(self, name: str) -> None:
        """Delete a pointer. S3 has no conditional delete everywhere: a name moved between the
        check and the delete is removed too (rm's documented limit on S3)."""
        self.objects.delete(name_key(name))

    # builds

    def build_objects(self, build_id: uuid.UUID) -> dict[str, ObjectInfo]:
        prefix = f"{build_id}/"
        return {o.key[len(prefix):]: o for o in self.objects.list(prefix)}

    def committed(self) -> dict[uuid.UUID, float]:
        """Every build with its build.json (the commit mark), with the time it was committed."""
        out = {}
        for info in self.objects.list():
            head, _, rest = info.key.partition("/")
            build_id = parse_build_id(head)
            if rest == MANIFEST and build_id is not None and str(build_id) == head:
                out[build_id] = info.mtime
        return out

    def has_build(self, build_id: uuid.UUID) -> bool:
        return self.objects.head(build_key(build_id, MANIFEST)) is not None

    def resolve(self, arg: str) -> uuid.UUID:
        """A BUILD argument (a build id, a VM name, or a build id prefix) as a committed
        build's id."""
        build_id = parse_build_id(arg)
        if build_id is not None:
            if not self.has_build(build_id):
                raise FcsnapError(f"build {arg} not found in store {self.url}")
            return build_id
        try:
            check_vm_name(arg)
        except FcsnapError:
            raise FcsnapError(f"no build or VM named {arg!r} in store {self.url}") from None
        build_id, _ = self.read_pointer(arg)
        if build_id is None:
            build_id = match_prefix(arg, self.committed(), self.url) if is_prefix(arg) else None
            if build_id is None:
                raise FcsnapError(f"no build or VM named {arg!r} in store {self.url}")
            return build_id
        if not self.has_build(build_id):
            raise FcsnapError(f"VM {arg!r} points at build {build_id}, which is not in {self.url}")
        return build_id

    # the local mirror

    def mirror_build(self, build_id: uuid.UUID, data: bool = False) -> Path:
        """Bring a committed build's header, manifest and sidecar (and with `data` its diff
        and snapfile) into the mirror; returns its directory there."""
        target = self.mirror / str(build_id)
        objects = self.build_objects(build_id)
        if MANIFEST not in objects:
            raise FcsnapError(f"build {build_id} not found in store {self.url}")
        private_dir(target)
        for name, info in objects.items():
            path = target / name
            if "/" in name:
                continue
            if name in META_FILES or (data and name in (DIFF_RAW, DIFF_ZSTD, SNAPFILE)):
                if not (info.etag and self.fetched_as.get(path) == info.etag):
                    self.download(info.key, path)
            elif name in (DIFF_RAW, DIFF_ZSTD, SNAPFILE) and not (
                path.exists() and path.stat().st_size == info.size
            ):  # sparse: its size is right, nothing reads it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             FILE_MODE)
                try:
                    os.ftruncate(fd, info.size)
                finally:
                    os.close(fd)
        os.utime(target, (objects[MANIFEST].mtime, objects[MANIFEST].mtime))
        return target

    def download(self, key: str, path: Path, mode: int = FILE_MODE) -> None:
        """Copy an object to a local file, in ranges (no whole diff in memory), durably
        before it is visible; remembered as fetched at the ETag it had then. `mode`: the new
        file's (0600: the mirror is private)."""
        info = self.objects.head(key)
        if info is None:
            raise FcsnapError(f"{self.url}/{key} disappeared")
        step = DOWNLOAD_STEP
        fd, tmp = new_private_file(path.parent, mode)
        try:
            with open(fd, "wb", closefd=False) as f:
                for start in range(0, info.size, step):
                    f.write(self.objects.get_range(key, start, min(step, info.size - start)))
            publish(fd, tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.fetched_as[path] = info.etag

    def mirror_lineage(self, build_id: uuid.UUID, data: bool = False) -> Path:
        """The build and every build its header reads, mirrored; the head's directory."""
        head = self.mirror_build(build_id, data)
        for ancestor in builds_read(head):
            if self.has_build(ancestor):  # a missing one: its reader says so in its words
                self.mirror_build(ancestor, data)
        return head

    def mirror_names(self, names: Iterable[str] | None = None) -> None:
        vms = self.mirror / VMS
        private_dir(vms)
        pointers = self.names()
        for name in pointers if names is None else names:
            if name in pointers:
                write_private(vms / name, (pointers[name] + "\n").encode())
