"""`--store` as a store: a directory, or `s3://BUCKET/PREFIX` (fcsnap/store/s3.py).

The CLI turns its --store text into a store here and nowhere else; commands get a `Path` (a
local store, its own protocol of renames and flock locks) or a `RemoteStore`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.errors import FcsnapError
from fcsnap.store.layout import resolve_build
from fcsnap.store.names import check_vm_name, read_vm_pointer
from fcsnap.store.remote import RemoteStore
from fcsnap.store.s3 import is_s3_url

if TYPE_CHECKING:
    from fcsnap.store.usage import StoreView

Store = Path | RemoteStore


def scratch_dir(what: str) -> Path:
    """A private temporary directory removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=f"fcsnap-{what}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def open_store(text: str) -> Store:
    if is_s3_url(text):
        from fcsnap.store.s3 import S3Objects, parse_s3_url

        return RemoteStore(S3Objects(parse_s3_url(text)), scratch_dir("mirror"))
    return Path(text)


def open_optional(text: str | None) -> Store | None:
    return None if text is None else open_store(text)


def resolve(arg: str, store: Store | None, data: bool = False) -> Path:
    """A BUILD argument as a local build directory: in a local store, or in the mirror of a
    remote one (with `data`, the diffs of its lineage are brought too)."""
    if isinstance(store, RemoteStore):
        return store.mirror_lineage(store.resolve(arg), data)
    return resolve_build(arg, store)


def current_head(store: Store, name: str) -> uuid.UUID | None:
    """The build a name points at now (None: no such name)."""
    if isinstance(store, RemoteStore):
        return store.read_pointer(name)[0]
    return read_vm_pointer(store, name)


def local_path(store: Store) -> Path:
    """Where the store's builds are found on this host (a remote store's mirror)."""
    return store.mirror if isinstance(store, RemoteStore) else store


def scan_store(store: Store) -> StoreView:
    """What `ls` shows: a local store as it is, a remote one through its mirror (headers and
    manifests of every committed build; diff sizes from the listing)."""
    from fcsnap.store.usage import scan

    if not isinstance(store, RemoteStore):
        return scan(store)
    for build_id in store.committed():
        store.mirror_build(build_id)
    store.mirror_names()
    view = scan(store.mirror)
    view.store = store.url  # type: ignore[assignment]  (named in messages only)
    return view


def remove_names(store: Store, names: list[str]) -> list[dict[str, str]]:
    """`rm`: every name or, when one does not exist, none. In object storage the names are
    checked first and then deleted one by one (no lock spans them, and not every server has
    conditional deletes: a name another host moves meanwhile is removed all the same)."""
    from fcsnap.store import lifecycle

    if not isinstance(store, RemoteStore):
        return lifecycle.remove_names(store, names)
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        check_vm_name(name)
    heads = {name: store.read_pointer(name) for name in wanted}
    for name, (head, _) in heads.items():
        if head is None:
            raise FcsnapError(f"no VM named {name!r} in store {store.url}")
    removed = []
    for name, (head, etag) in heads.items():
        store.remove_name(name, etag or "")
        removed.append({"name": name, "head": str(head)})
    return removed


def collect(
    store: Store, grace: float, dry_run: bool, repack_below: float | None
) -> dict[str, Any]:
    """`gc`: the local store's collector (fcsnap/store/lifecycle.py), or for a remote store
    the grace-only collector (fcsnap/store/remote_gc.py)."""
    from fcsnap.store import lifecycle

    if not isinstance(store, RemoteStore):
        return lifecycle.collect(store, grace, dry_run, repack_below)
    from fcsnap.store.remote_gc import collect_remote

    return collect_remote(store, grace, dry_run, repack_below)
