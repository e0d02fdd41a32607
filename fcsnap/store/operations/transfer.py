"""push / pull: copy a lineage between any two stores (local or S3, either way, or S3 to S3).

A lineage is a build and every build its header reads. Builds already in the destination are
not copied again, but are checked against the head's pins, so a different build under the
same id is refused. Every build copied is checked before it becomes visible there: its hash
sidecar against the head's pin, every stored block against its sidecar, and its files against
each other (ops.verify_build_data). The destination publishes each build by its own protocol
(a local staging directory renamed into place; in S3, build.json last), ancestors before the
head, and then moves the name by compare-and-swap.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.scratch import scratch
from fcsnap.store.backends.remote import RemoteStore, build_key
from fcsnap.store.backends.stores import Store, current_head, resolve
from fcsnap.store.format.hashes import sidecar_pin
from fcsnap.store.format.layout import HASHES, MANIFEST, build_path, parse_build_id, staged_build
from fcsnap.store.format.locks import publish_name
from fcsnap.store.format.manifest import read_manifest
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.operations.ops import verify_build_data


@dataclass
class Copied:
    build_id: uuid.UUID
    copied: bool  # False: it was in the destination already
    bytes: int


def _name_of(arg: str, source: Store) -> str | None:
    """`arg` when it is a VM name of `source` (published at the destination too); None for
    a build id, a build id prefix or a path."""
    if parse_build_id(arg) is not None:
        return None
    try:
        check_vm_name(arg)
    except FcsnapError:
        return None
    return arg if current_head(source, arg) is not None else None


def copy_lineage(arg: str, source: Store, dest: Store, verb: str) -> dict[str, Any]:
    """Copy BUILD (a build id or VM name of `source`) and every build it reads to `dest`;
    a name is published there too. Returns a JSON-ready report."""
    name = _name_of(arg, source)
    expected = current_head(dest, name) if name is not None else None
    head_dir = resolve(arg, source)  # local, or mirrored: header, manifest, sidecar
    head_id = uuid.UUID(head_dir.name)
    with open_lineage(head_dir) as lineage:  # source builds stay while we copy them
        # What must arrive: ancestors as the head's build.json pins them (checked against the
        # source's sidecars just now by open_lineage), the head as the source's sidecar is.
        expect = {uuid.UUID(d.name): sidecar_pin((d / HASHES).read_bytes())
                  for d in lineage.build_dirs}
        needed = _mapped_ends(head_dir)
        block_size = read_manifest(head_dir).block_size
        order = [uuid.UUID(d.name) for d in lineage.build_dirs[1:]] + [head_id]
        results = [
            _copy_build(build_id, source, dest, expect[build_id], needed.get(build_id, 0),
                        block_size)
            for build_id in order
        ]
    if name is not None:
        if isinstance(dest, RemoteStore):
            dest.publish_name(name, head_id, expected, verb)
        else:
            publish_name(dest, name, head_id, expected, verb)
    return {
        "head": str(head_id),
        "name": name,
        "from": str(source),
        "to": str(dest),
        "builds": [
            {"build_id": str(r.build_id), "copied": r.copied, "bytes": r.bytes} for r in results
        ],
        "bytes_copied": sum(r.bytes for r in results),
    }


def _mapped_ends(head_dir: Path) -> dict[uuid.UUID, int]:
    """For each build the head reads, the end of the storage its mappings use."""
    ends: dict[uuid.UUID, int] = {}
    for m in load_header(head_dir).mappings:
        if not m.is_zero:
            ends[m.build_id] = max(ends.get(m.build_id, 0), m.storage_offset + m.length)
    return ends


def _present(dest: Store, build_id: uuid.UUID) -> Path | None:
    """The destination's copy of a build, as a local directory with its sidecar; None when
    the destination does not hold it."""
    if isinstance(dest, RemoteStore):
        return dest.mirror_build(build_id) if dest.has_build(build_id) else None
    path = build_path(dest, build_id)
    return path if (path / MANIFEST).exists() else None


def _check_pin(build_dir: Path, pin: str, where: str) -> None:
    if sidecar_pin((build_dir / HASHES).read_bytes()) != pin:
        raise FcsnapError(
            f"build {build_dir.name} in {where} is not the build the source holds under that "
            "id (its hash sidecar does not match the pin)"
        )


def _copy_build(
    build_id: uuid.UUID, source: Store, dest: Store, pin: str,
    mapped_end: int, block_size: int,
) -> Copied:
    present = _present(dest, build_id)
    if present is not None:
        _check_pin(present, pin, str(dest))
        return Copied(build_id, False, 0)
    if isinstance(dest, RemoteStore):
        return _copy_to_remote(build_id, source, dest, pin, mapped_end, block_size)
    with staged_build(dest, build_id) as lock:
        size = _fetch(build_id, source, lock.path)
        _check_arrived(lock.path, pin, mapped_end, block_size, str(source))
    lock.release()
    return Copied(build_id, True, size)


def _copy_to_remote(
    build_id: uuid.UUID, source: Store, dest: RemoteStore, pin: str,
    mapped_end: int, block_size: int,
) -> Copied:
    if isinstance(source, RemoteStore):
        with scratch("push") as staging:
            return _upload_checked(build_id, source, dest, staging, pin, mapped_end, block_size)
    local = build_path(source, build_id)  # read in place: no copy of a local build
    return _upload_checked(build_id, None, dest, local, pin, mapped_end, block_size)


def _upload_checked(
    build_id: uuid.UUID, source: RemoteStore | None, dest: RemoteStore, directory: Path,
    pin: str, mapped_end: int, block_size: int,
) -> Copied:
    if source is not None:
        _fetch(build_id, source, directory)
    _check_arrived(directory, pin, mapped_end, block_size, str(source or directory.parent))
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    written = []
    try:
        for path in [*files, directory / MANIFEST]:  # build.json last: the commit
            written.append(build_key(build_id, path.name))
            dest.objects.upload(written[-1], path)
    except BaseException:
        for key in reversed(written):
            with contextlib.suppress(FcsnapError):
                dest.objects.delete(key)
        raise
    return Copied(build_id, True, sum(p.stat().st_size for p in [*files, directory / MANIFEST]))


def _fetch(build_id: uuid.UUID, source: Store, target: Path) -> int:
    """Every file of the build into `target`; returns the bytes copied."""
    if isinstance(source, RemoteStore):
        objects = source.build_objects(build_id)
        for name, info in objects.items():
            if "/" not in name:
                source.download(info.key, target / name, 0o666)  # a store's: the umask's
        return sum(o.size for o in objects.values())
    total = 0
    for path in build_path(source, build_id).iterdir():
        if path.is_file():
            shutil.copyfile(path, target / path.name)
            total += path.stat().st_size
    return total


def _check_arrived(
    build_dir: Path, pin: str, mapped_end: int, block_size: int,
    where: str,
) -> None:
    _check_pin(build_dir, pin, where)
    verify_build_data(build_dir, block_size, mapped_end, lambda _: None)
