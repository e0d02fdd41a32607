"""Helper threads leave SIGTERM/SIGINT to the main thread, which runs Python's handlers and is
the one to wake from waiting for a VM (a signal the kernel handed to a helper thread would
leave `restore` asleep in poll(): test_restore.py::test_sigterm_before_any_vm hung so once)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from fcsnap.threads import start_signal_free
from fcsnap.uffd.firecracker_api import SnapshotLoad

WAIT = 30


def blocked_now() -> set[signal.Signals]:
    return signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_signal_free_thread_blocks_signals_and_ours_stay_as_they_were() -> None:
    before = blocked_now()
    seen: list[set[signal.Signals]] = []
    thread = start_signal_free(threading.Thread(target=lambda: seen.append(blocked_now())))
    thread.join(WAIT)
    assert {signal.SIGTERM, signal.SIGINT} <= seen[0]
    assert blocked_now() == before


def test_the_snapshot_load_thread_is_signal_free(tmp_path: Path) -> None:
    """Its callbacks run in the thread: a load to a missing API socket fails there."""
    seen: list[set[signal.Signals]] = []
    done = threading.Event()

    def failed(_error: object) -> None:
        seen.append(blocked_now())
        done.set()

    SnapshotLoad(tmp_path / "no-api.sock", {}, timeout=WAIT).start(failed, lambda _r: None)
    assert done.wait(WAIT)
    assert {signal.SIGTERM, signal.SIGINT} <= seen[0]
