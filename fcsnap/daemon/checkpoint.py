"""`POST /restores/{id}/checkpoint`: the next generation of a served VM, from its written set.

With the VM paused (by the caller, or here through the restore's Firecracker API: PATCH /vm
Paused, then Resumed whatever happens), the written set is taken and a new interval started
(those pages write-protected again) on the session's reactor, atomically. The pages in the set
are then read straight from the guest (guestread.py) and stored as a diff over the restore's
last checkpoint (at first: the build served), through the one builder (build_generation): the
cost follows the pages written, not the size of memory. Should anything fail after the take,
the pages go back into the written set, so the next checkpoint still has them.

In the background ("background": true) the VM is paused only for the take: the pages in the
set are write-protected again and marked pending, the VM resumes, and a thread copies them as
they were at the pause (preimage.py: a write to a page not yet copied first keeps its
pre-image). The answer comes at the resume; the copy's state is the restore's
`last_checkpoint` (GET /restores/ID). Pages written during the copy are the next interval's.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fcsnap.daemon.request import RequestError
from fcsnap.daemon.restores import LOST
from fcsnap.errors import FcsnapError, redact
from fcsnap.store.format.layout import foreign_build
from fcsnap.store.format.lineage import Parent
from fcsnap.store.format.names import check_vm_name
from fcsnap.store.format.pins import open_lineage
from fcsnap.store.format.source import GenerationReader
from fcsnap.store.operations.builder import BuildOptions, build_generation
from fcsnap.store.operations.scan import CHUNK
from fcsnap.uffd import firecracker_api
from fcsnap.uffd.guestread import GuestMemory, guest_blocks
from fcsnap.uffd.preimage import PausedMemory, Preimages
from fcsnap.units import PAGE

if TYPE_CHECKING:
    from fcsnap.daemon.restores import Restore
    from fcsnap.uffd.session import Session

T = TypeVar("T")
CALL_WAIT = 10.0  # seconds the reactor has to take the written set
API_TIMEOUT = 10.0  # seconds Firecracker has to answer a pause or a resume
LOCK_WAIT = 1.0  # seconds a checkpoint waits for the one before it to let go


@dataclass(frozen=True)
class CheckpointRequest:
    name: str
    background: bool = False
    copy_rate: int = 0  # bytes a second the background copy reads at most (0: no limit)


def parse_checkpoint(body: object) -> CheckpointRequest:
    """{"name": NAME, "background": BOOL, "copy_rate": BYTES_PER_S}: the name the new
    generation is published under, and whether its pages are copied after the resume."""
    if not isinstance(body, dict) or set(body) - {"name", "background", "copy_rate"}:
        raise RequestError('the body must be {"name": NAME} (and "background", "copy_rate")')
    name = body.get("name")
    if not isinstance(name, str):
        raise RequestError('"name" is required: the name to publish the checkpoint under')
    try:
        check_vm_name(name)
    except FcsnapError as e:
        raise RequestError(str(e)) from None
    background = body.get("background", False)
    if not isinstance(background, bool):
        raise RequestError('"background" must be true or false')
    rate = body.get("copy_rate", 0)
    if type(rate) is not int or rate < 0:
        raise RequestError('"copy_rate" must be a whole number of bytes a second (0: no limit)')
    if rate and not background:
        raise RequestError('"copy_rate" paces the background copy: it needs "background"')
    return CheckpointRequest(name, background, rate)


def checkpoint(restore: Restore, store: Path, request: CheckpointRequest
               ) -> tuple[int, dict[str, Any]]:
    """Write the next generation of `restore`'s VM into `store`: (201, its summary); in the
    background, (202, the pause's summary) once the VM is resumed, the copy going on (its
    state in `restore.last_checkpoint`)."""
    base = restore.checkpoint_base or restore.build.build_dir
    if foreign_build(set(os.listdir(base))):
        raise RequestError(f"restore {restore.id} serves an E2B/Wrenn build: a checkpoint is "
                           "the next generation of an fcsnap build (fcsnap import the build, "
                           "then restore that)", 409)
    session = restore.session
    if session is None or session.peer is None or session.installer is None:
        raise RequestError(f"restore {restore.id} has no VM being served", 409)
    _refuse_restarted(restore)
    if not restore.checkpointing.acquire(timeout=LOCK_WAIT):
        raise RequestError(f"restore {restore.id} is being checkpointed already", 409)
    restore.checkpoints_begun += 1  # under the lock: each checkpoint its own number
    build_id = uuid.uuid4()  # known at the take: the written set is against it from then on
    if request.background:
        return 202, _background(restore, store, request, build_id)  # the copy releases the lock
    try:
        return 201, _checkpoint(restore, store, request, build_id)
    finally:
        restore.checkpointing.release()


def _checkpoint(restore: Restore, store: Path, request: CheckpointRequest, build_id: uuid.UUID
                ) -> dict[str, Any]:
    session = restore.session
    assert session is not None and session.peer is not None
    api = restore.load.api_socket if restore.load is not None else None
    started = time.monotonic()
    if api is not None:
        _vm_state(api, "Paused")
    try:
        paused = time.monotonic()
        offsets, count, pidfd = _take(restore, build_id)
        try:
            memory = GuestMemory(session.peer.pid, pidfd, session.peer.regions)
            manifest, build_dir = _build(restore, store, request, offsets, memory, build_id)
        except BaseException:
            _give_back(restore, session, offsets)
            raise
        finally:
            os.close(pidfd)
        # before the resume, which may fail: the next checkpoint is over this one regardless
        restore.checkpoint_base = Path(build_dir)
    except BaseException:
        _resume_after_failure(api)
        raise
    if api is not None:
        _vm_state(api, "Resumed")
    return {"checkpoint": restore.checkpoints_begun, "build_id": str(manifest.build_id),
            "name": request.name, "written_pages": count, "pages_read": len(offsets),
            "bytes_stored": manifest.stats.bytes_stored,
            "seconds": round(time.monotonic() - paused, 6),
            "paused_seconds": round(time.monotonic() - started, 6) if api else None}


def _take(restore: Restore, build_id: uuid.UUID) -> tuple[Any, int, int]:
    """(the written set, its written pages, a pidfd of the VM of our own), on the reactor's
    thread, where the session's pidfd is open: the session may end and close it meanwhile.
    The set starts again, against `build_id`."""
    session = restore.session
    assert session is not None

    def take() -> tuple[Any, int, int]:
        assert session.peer is not None
        _refuse_restarted(restore)
        offsets, count = session.take_written(True)
        session.written_base = build_id
        return offsets, count, os.dup(session.peer.pidfd)

    return _on_serving_thread(restore, session, take)


def _refuse_restarted(restore: Restore) -> None:
    """RequestError (409) once GET written?new_interval=1 has taken pages out of the set, or
    a failed checkpoint could not put its pages back: a checkpoint would miss them. Checked
    before the request waits, and again with the take on the reactor's thread, where such a
    GET that came in meanwhile has taken its pages."""
    if restore.interval_restarted:
        raise RequestError(f"restore {restore.id}: its written set was restarted by GET "
                           "written?new_interval=1, so a checkpoint would miss those pages",
                           409)
    if restore.written_lost:
        raise RequestError(f"restore {restore.id}: {LOST}, so a checkpoint would miss them",
                           409)


def _background(restore: Restore, store: Path, request: CheckpointRequest, build_id: uuid.UUID
                ) -> dict[str, Any]:
    """Pause (through the Firecracker API, if the restore has it), take the written set with
    its pages pending (Session.take_for_copy), resume, and copy them on a thread of its own
    (preimage.py). Holds restore.checkpointing; the copy releases it, or this on an error."""
    session = restore.session
    assert session is not None and session.peer is not None
    peer = session.peer
    api = restore.load.api_socket if restore.load is not None else None
    memory = GuestMemory(peer.pid, -1, peer.regions)
    preimages = Preimages(memory, session.header.metadata.size)
    started = time.monotonic()
    copying = False
    try:
        if api is not None:
            _vm_state(api, "Paused")
        try:
            offsets, count, live, memory.pidfd = _take_for_copy(restore, preimages, build_id)
            status = {"checkpoint": restore.checkpoints_begun, "name": request.name,
                      "state": "copying", "written_pages": count, "pages_read": len(live)}
            restore.note_checkpoint(status)
            assert session.installer is not None
            pending = [(st.region, st.pending) for st in session.installer.states.values()]
            paused = PausedMemory(preimages, pending, live, request.copy_rate)
            copy = threading.Thread(target=_copy, name=f"checkpoint-{restore.id}", daemon=True,
                                    args=(restore, session, store, request, build_id, offsets,
                                          paused, status))
            try:
                copy.start()
            except BaseException as e:  # no thread: the copy ends before it began
                _end_copy(restore, session, offsets, paused, status,
                          {"state": "failed", "error": str(e)}, started)
                raise
            copying = True
        except BaseException:
            _resume_after_failure(api)
            raise
        if api is not None:
            _vm_state(api, "Resumed")
    finally:
        if not copying:
            restore.checkpointing.release()
    return {**status, "paused_seconds": round(time.monotonic() - started, 6) if api else None}


def _take_for_copy(restore: Restore, preimages: Preimages, build_id: uuid.UUID
                   ) -> tuple[Any, int, Any, int]:
    """Session.take_for_copy's answer and a pidfd of the VM of our own (as `_take`)."""
    session = restore.session
    assert session is not None

    def take() -> tuple[Any, int, Any, int]:
        assert session.peer is not None
        _refuse_restarted(restore)
        offsets, count, live = session.take_for_copy(preimages)
        session.written_base = build_id
        return offsets, count, live, os.dup(session.peer.pidfd)

    return _on_serving_thread(restore, session, take)


def _on_serving_thread(restore: Restore, session: Session, take: Callable[[], T]) -> T:
    """`take()` run by the session's serving thread; its failure a 409 naming the restore."""
    try:
        return session.call(take, CALL_WAIT)
    except RequestError:
        raise
    except FcsnapError as e:
        raise RequestError(f"restore {restore.id}: {e}", 409) from None


def _copy(restore: Restore, session: Session, store: Path, request: CheckpointRequest,
          build_id: uuid.UUID, offsets: Any, memory: PausedMemory, status: dict[str, Any]
          ) -> None:
    """The background copy: build the generation from the pages as they were at the pause,
    then `_end_copy`."""
    started = time.monotonic()
    outcome: dict[str, Any] = {"state": "failed", "error": "internal error"}
    try:
        manifest, build_dir = _build(restore, store, request, offsets, memory, build_id)
        restore.checkpoint_base = Path(build_dir)
        outcome = {"state": "done", "build_id": str(manifest.build_id),
                   "bytes_stored": manifest.stats.bytes_stored}
    except Exception as e:  # whatever it was, the pages go back and the VM runs on
        if not isinstance(e, FcsnapError):
            traceback.print_exc()
        outcome = {"state": "failed", "error": redact(str(e))}
    finally:
        _end_copy(restore, session, offsets, memory, status, outcome, started)


def _end_copy(restore: Restore, session: Session, offsets: Any, memory: PausedMemory,
              status: dict[str, Any], outcome: dict[str, Any], started: float) -> None:
    """Whatever became of the copy: a failed one gives its pages back; nothing is pending
    any more; its outcome goes into the restore's checkpoint states; the next checkpoint may
    start."""
    try:
        if outcome["state"] != "done":
            _give_back(restore, session, offsets)
        with contextlib.suppress(FcsnapError):  # ended meanwhile: nothing is pending
            session.call(session.end_copy, CALL_WAIT)
        os.close(memory.preimages.memory.pidfd)
        restore.note_checkpoint({**status, **outcome, "preimages": memory.preimages.kept,
                                 "copy_seconds": round(time.monotonic() - started, 6)})
    finally:
        restore.checkpointing.release()


def _give_back(restore: Restore, session: Session, offsets: Any) -> None:
    """A checkpoint that failed after its take: the pages go back into the written set.
    Where the serving thread does not take them (the session ended meanwhile, or it did not
    answer in time), the set misses them from now on: `restore.written_lost`. The set is
    against the build it was against before the take again (or none, where a client started
    a new interval meanwhile)."""
    base = restore.checkpoint_base

    def give_back() -> None:
        session.give_back_written(offsets)
        if session.written_base is not None:  # None: a client's new interval since the take
            session.written_base = (uuid.UUID(base.name) if base is not None
                                    else session.header.metadata.build_id)

    try:
        session.call(give_back, CALL_WAIT)
    except FcsnapError:
        restore.written_lost = True


def _build(restore: Restore, store: Path, request: CheckpointRequest, offsets: Any,
           memory: GuestMemory | PausedMemory, build_id: uuid.UUID) -> tuple[Any, Path | str]:
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
                                      options, parent, holes_are_zero=False,
                                      build_id=build_id)
        finally:
            if reader is not None:
                reader.close()
    return result


def _alive_at_end(chunks: Any, memory: GuestMemory | PausedMemory) -> Any:
    """The chunks, then a check that the VM outlived the reads (before anything is
    published: a recycled pid must not have been read)."""
    yield from chunks
    memory.check_alive()


def _resume_after_failure(api: Path | None) -> None:
    """Resume a VM paused through its API after the checkpoint failed: what went wrong is
    the answer, not a resume that fails too (a VM that exited cannot be resumed)."""
    if api is not None:
        with contextlib.suppress(FcsnapError):
            _vm_state(api, "Resumed")


def _vm_state(api: Path, state: str) -> None:
    response = firecracker_api.call(api, "PATCH", "/vm", {"state": state}, API_TIMEOUT)
    if response.status >= 300:
        raise FcsnapError(f"Firecracker refused to set the VM {state}: "
                          f"{response.fault_message()}")
