"""`rm` and `gc` of any store: a local one's (lifecycle.py) or one in object storage
(remote_gc.py), chosen here, above both, so the store abstraction never reaches up to them."""

from __future__ import annotations

from typing import Any

from fcsnap.errors import FcsnapError
from fcsnap.store.backends.remote import RemoteStore
from fcsnap.store.backends.stores import Store
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.operations import lifecycle, remote_gc


def remove_names(store: Store, names: list[str]) -> list[dict[str, str]]:
    """`rm`: every name or, when one does not exist, none. In object storage the names are
    checked first and then deleted one by one (no lock spans them, and not every server has
    conditional deletes: a name another host moves meanwhile is removed all the same)."""
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
    for name, (head, _) in heads.items():
        store.remove_name(name)
        removed.append({"name": name, "head": str(head)})
    return removed


def collect(
    store: Store, grace: float, dry_run: bool, repack_below: float | None
) -> dict[str, Any]:
    """`gc`: the local store's collector (lifecycle.py), or for a remote store the grace-only
    collector (remote_gc.py)."""
    if not isinstance(store, RemoteStore):
        return lifecycle.collect(store, grace, dry_run, repack_below)
    return remote_gc.collect_remote(store, grace, dry_run, repack_below)
