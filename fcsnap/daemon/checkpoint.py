"""`POST /restores/{id}/checkpoint`: the next generation of a served VM, from its written set.

With the VM paused (by the caller, or here through the restore's Firecracker API: PATCH /vm
Paused, then Resumed whatever happens), the written set is taken and a new interval started
(those pages write-protected again) on the session's reactor, atomically. The pages in the set
are then read straight from the guest (guestread.py) and stored as a diff over the restore's
last checkpoint (at first: the build served), through the one builder (build_generation): the
cost follows the pages written, not the size of memory. Should anything fail after the take,
the pages go back into the written set, so the next checkpoint still has them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.daemon.request import RequestError
from fcsnap.errors import FcsnapError
from fcsnap.store.format.lineage import Parent
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.format.source import GenerationReader
from fcsnap.store.operations.builder import BuildOptions, build_generation
from fcsnap.store.operations.scan import CHUNK
from fcsnap.uffd import firecracker_api
from fcsnap.uffd.guestread import GuestMemory, guest_blocks
from fcsnap.units import PAGE

if TYPE_CHECKING:
    from fcsnap.daemon.restores import Restore

CALL_WAIT = 10.0  # seconds the reactor has to take the written set
API_TIMEOUT = 10.0  # seconds Firecracker has to answer a pause or a resume


@dataclass(frozen=True)
class CheckpointRequest:
    name: str


def parse_checkpoint(body: object) -> CheckpointRequest:
    """{"name": NAME}: the name the new generation is published under."""
    if not isinstance(body, dict) or set(body) - {"name"}:
        raise RequestError('the body must be {"name": NAME}')
    name = body.get("name")
    if not isinstance(name, str):
        raise RequestError('"name" is required: the name to publish the checkpoint under')
    try:
        check_vm_name(name)
    except FcsnapError as e:
        raise RequestError(str(e)) from None
    return CheckpointRequest(name)


def checkpoint(restore: Restore, store: Path, request: CheckpointRequest) -> dict[str, Any]:
    """Write the next generation of `restore`'s VM into `store`; its summary."""
    session = restore.session
    if session is None or session.peer is None or session.installer is None:
        raise RequestError(f"restore {restore.id} has no VM being served", 409)
    if restore.interval_restarted:
        raise RequestError(f"restore {restore.id}: its written set was restarted by GET "
                           "written?new_interval=1, so a checkpoint would miss those pages",
                           409)
    if not restore.checkpointing.acquire(blocking=False):
        raise RequestError(f"restore {restore.id} is being checkpointed already", 409)
    try:
        return _checkpoint(restore, store, request)
    finally:
        restore.checkpointing.release()


def _checkpoint(restore: Restore, store: Path, request: CheckpointRequest) -> dict[str, Any]:
    session = restore.session
    assert session is not None
    api = restore.load.api_socket if restore.load is not None else None
    started = time.monotonic()
    if api is not None:
        _vm_state(api, "Paused")
    try:
        paused = time.monotonic()
        offsets, count, pidfd = _take(restore)
        try:
            manifest, build_dir = _build(restore, store, request, offsets, pidfd)
        except BaseException:
            with contextlib.suppress(FcsnapError):  # ended meanwhile: nothing to give back to
                session.call(lambda: session.give_back_written(offsets), CALL_WAIT)
            raise
        finally:
            os.close(pidfd)
        # before the resume, which may fail: the next checkpoint is over this one regardless
        restore.checkpoint_base = Path(build_dir)
    finally:
        if api is not None:
            _vm_state(api, "Resumed")
    return {"build_id": str(manifest.build_id), "name": request.name,
            "written_pages": count, "pages_read": len(offsets),
            "bytes_stored": manifest.stats.bytes_stored,
            "seconds": round(time.monotonic() - paused, 6),
            "paused_seconds": round(time.monotonic() - started, 6) if api else None}


def _take(restore: Restore) -> tuple[Any, int, int]:
    """(the written set, its written pages, a pidfd of the VM of our own), on the reactor's
    thread, where the session's pidfd is open: the session may end and close it meanwhile."""
    session = restore.session
    assert session is not None

    def take() -> tuple[Any, int, int]:
        assert session.peer is not None
        offsets, count = session.take_written(True)
        return offsets, count, os.dup(session.peer.pidfd)

    try:
        return session.call(take, CALL_WAIT)
    except FcsnapError as e:
        raise RequestError(f"restore {restore.id}: {e}", 409) from None


def _build(restore: Restore, store: Path, request: CheckpointRequest, offsets: Any,
           pidfd: int) -> tuple[Any, Path | str]:
    session = restore.session
    assert session is not None and session.peer is not None
    peer = session.peer
    memory = GuestMemory(peer.pid, pidfd, peer.regions)
    base_dir = restore.checkpoint_base or restore.build.build_dir
    with open_lineage(base_dir):
        parent = Parent(base_dir)
        options = replace(BuildOptions.of_build(parent.manifest), name=request.name,
                          source=f"checkpoint of restore {restore.id}", verb="checkpoint")
        reader = GenerationReader(base_dir) if parent.block_size != PAGE else None
        try:
            chunks = guest_blocks(memory, offsets, parent.block_size, CHUNK,
                                  reader.read if reader else None)
            result = build_generation(store, _alive_at_end(chunks, memory), parent.size,
                                      options, parent, holes_are_zero=False)
        finally:
            if reader is not None:
                reader.close()
    return result


def _alive_at_end(chunks: Any, memory: GuestMemory) -> Any:
    """The chunks, then a check that the VM outlived the reads (before anything is
    published: a recycled pid must not have been read)."""
    yield from chunks
    memory.check_alive()


def _vm_state(api: Path, state: str) -> None:
    response = firecracker_api.call(api, "PATCH", "/vm", {"state": state}, API_TIMEOUT)
    if response.status >= 300:
        raise FcsnapError(f"Firecracker refused to set the VM {state}: "
                          f"{response.fault_message()}")
