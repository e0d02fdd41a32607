"""What a fault server holds on the builds it serves, whatever the store keeps them in.

`hold_builds` is the one call restore and the daemon make: it locks the build's lineage and
checks its pins (pins.open_lineage: flock on the build directories, which is what a local
store's gc honours) and, for a build in the mirror of a store in object storage (the store
passed with it), also takes a lease in that store (leases.py), which is what its gc honours.
Both are let go by `release`.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fcsnap.store.format.layout import MANIFEST
from fcsnap.store.format.locks import LineageLock
from fcsnap.store.format.pins import open_lineage

if TYPE_CHECKING:  # a local restore imports no S3 code as it starts
    from fcsnap.store.backends.leases import RemoteLease
    from fcsnap.store.backends.remote import RemoteStore

_foreign: set[Path] = set()  # E2B/Wrenn stores: nothing to lock, pin or lease


def hold_nothing_in(store: Path) -> None:
    """Have `hold_builds` take nothing on the E2B/Wrenn builds of `store` (those without
    build.json): fcsnap's gc never removes their builds, they carry no pins to check, and a
    bucket fcsnap only reads gets no lease objects written into it."""
    _foreign.add(store.resolve())


class Hold:
    """A served build's lineage, locked and (in object storage) leased; released once."""

    def __init__(self, lineage: LineageLock | None, lease: RemoteLease | None) -> None:
        self.lineage = lineage
        self.lease = lease

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.lineage is not None:
            self.lineage.release()
            self.lineage = None


def hold_builds(build_dir: Path, store: RemoteStore | None = None) -> Hold:
    """Hold `build_dir` and every build it reads for as long as it is served; `store`: the
    store in object storage whose mirror `build_dir` is in, where they are leased too."""
    if build_dir.parent.resolve() in _foreign and not (build_dir / MANIFEST).exists():
        return Hold(None, None)
    lineage = open_lineage(build_dir)
    if store is None:
        return Hold(lineage, None)
    from fcsnap.store.backends.leases import take

    try:
        lease = take(store, [uuid.UUID(d.name) for d in lineage.build_dirs])
    except BaseException:
        lineage.release()
        raise
    return Hold(lineage, lease)
