"""tag: point a name at a build already in the store, as `diff --name` points one at a new build.

The move is the same compare-and-swap under the same lock (locks.publish_name, or the S3
store's conditional put): the name moves only if it still points where it did when the
command began. The build's lineage is held while the name moves (the flock a local gc
honours, and in S3 a lease), so gc cannot delete a build a name is being pointed at.
"""

from __future__ import annotations

import uuid

from fcsnap.errors import FcsnapError
from fcsnap.store.backends.holds import hold_builds
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.backends.stores import Store, current_head, resolve
from fcsnap.store.format.layout import HEADER
from fcsnap.store.format.locks import publish_name
from fcsnap.store.format.names import check_vm_name


def tag(store: Store, build: str, name: str) -> tuple[uuid.UUID, uuid.UUID | None]:
    """Point `name` at the build BUILD stands for; returns (that build, the build the name
    pointed at before, None when it was new)."""
    check_vm_name(name)  # before anything else: a bad name costs nothing
    before = current_head(store, name)
    build_dir = resolve(build, store)  # in S3: the lineage's metadata, mirrored
    hold = hold_builds(build_dir, store if isinstance(store, RemoteStore) else None)
    try:
        if not (build_dir / HEADER).exists():  # deleted by gc before the hold
            raise FcsnapError(f"build {build_dir.name} was deleted while this tag ran")
        build_id = uuid.UUID(build_dir.name)
        if isinstance(store, RemoteStore):
            store.publish_name(name, build_id, before, "tag")
        else:
            publish_name(store, name, build_id, before, "tag")
    finally:
        hold.release()
    return build_id, before
