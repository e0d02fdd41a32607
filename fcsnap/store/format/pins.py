"""Lineage pins: a build proves the content of every build it reads, not only its id.

A build's id is only a directory name: a mixed-up copy, a bad sync or the wrong backup can put
another build in its place, whose hash sidecar agrees with its own wrong blocks. So build.json
records, for every other build the header reads, the SHA-256 of that build's hash sidecar; the
sidecar's per-block digests then pin every block. Opening a lineage checks the pins, which costs
reading the sidecars (16 bytes per block), not the memory.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.store.format.layout import HASHES
from fcsnap.store.format.locks import LineageLock, lock_lineage, stop_point
from fcsnap.store.format.manifest import read_manifest, sidecar_pin


def open_lineage(build_dir: Path) -> LineageLock:
    """Lock the lineage of `build_dir` for reading and check its pins.

    Returns the held LineageLock with `pinned` set (False: a build written before pins, whose
    ancestors are trusted by id). Raises FcsnapError naming the first build that does not match
    its pin, or is not pinned by a pinned head. A missing build is left to the reader to report.
    """
    lineage = lock_lineage(build_dir.parent, build_dir)
    try:
        manifest = read_manifest(build_dir)
        lineage.pinned = manifest.pins is not None
        if manifest.pins is not None:
            for ancestor in lineage.build_dirs[1:]:
                _check_pin(ancestor, build_dir.name, manifest.pins, manifest.block_size)
    except BaseException:
        lineage.release()
        raise
    stop_point("lineage")
    return lineage


def pin_problems(build_dir: Path, reads: Iterable[uuid.UUID]) -> dict[uuid.UUID, str] | None:
    """For reports (`inspect`, `ls NAME`), without locks: what is wrong with each other build
    in `reads` (those build_dir's header reads) against the pins of build_dir's build.json,
    the lines open_lineage would raise; empty when every one matches, None when build.json
    pins nothing (a build written before pins). FcsnapError when build.json cannot be read."""
    manifest = read_manifest(build_dir)
    if manifest.pins is None:
        return None
    problems = {}
    for build_id in reads:
        if build_id == manifest.build_id:
            continue
        ancestor = build_dir.parent / str(build_id)
        try:
            if not ancestor.is_dir():
                raise FcsnapError(f"build {build_id} read by {build_dir.name} is not in the store")
            _check_pin(ancestor, build_dir.name, manifest.pins, manifest.block_size)
        except FcsnapError as e:
            problems[build_id] = str(e)
    return problems


def _check_pin(
    build_dir: Path, head: str, pins: dict[uuid.UUID, str], block_size: int
) -> None:
    build_id = uuid.UUID(build_dir.name)
    if build_id not in pins:
        raise FcsnapError(f"build {build_id} is read by {head} but not pinned in its build.json")
    path = build_dir / HASHES
    sidecar = read_regular(path, "hash sidecar")
    if sidecar_pin(sidecar) == pins[build_id]:
        return
    from fcsnap.store.format.hashes import parse_hashes  # numpy: only once a pin fails

    found, _ = parse_hashes(sidecar, str(path))  # a damaged sidecar says what is wrong with it
    if found != block_size:
        raise FcsnapError(
            f"build {build_id}: hash sidecar is for block size {found}, not {block_size}"
        )
    raise FcsnapError(
        f"build {build_id} does not match the pin in {head}'s build.json "
        "(a different build with the same id?)"
    )
