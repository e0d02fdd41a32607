"""Helper threads that leave signals to the main thread.

Python runs signal handlers in the main thread only, but the kernel hands a process-directed
signal (SIGTERM from an orchestrator, SIGINT) to any thread that does not block it. Handed to
a helper thread, it leaves the main thread asleep in poll() - `restore` waiting for a VM would
not stop. A thread started here blocks every signal, so the kernel picks the main thread.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def block_signals() -> None:
    """Block every signal in the calling thread (a pool's initializer: the pool's threads, and
    the threads they start, such as zstd's, leave SIGTERM and SIGINT to the main thread, which
    is then woken from waiting on them rather than after their work is done)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


@contextlib.contextmanager
def signals_wake(fd: int) -> Iterator[None]:
    """While the block runs in the main thread, a signal with a Python handler also writes a
    byte to `fd` (non-blocking), whichever thread the kernel handed it to: the main thread,
    asleep in epoll_wait or read on that pipe, wakes and runs the handler. Without it, a
    SIGTERM taken by a thread that is not ours (numpy's BLAS threads take signals), as
    happens while the main thread holds signals for a moment in `start_signal_free`, would
    leave the main thread asleep. Elsewhere than the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(old)


def start_signal_free(thread: threading.Thread) -> threading.Thread:
    """Start `thread` with every signal blocked (a new thread inherits its creator's mask;
    the creator's own mask is restored at once, and a signal pending meanwhile reaches it)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return thread
