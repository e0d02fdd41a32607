"""Helper threads that leave signals to the main thread.

Python runs signal handlers in the main thread only, but the kernel hands a process-directed
signal (SIGTERM from an orchestrator, SIGINT) to any thread that does not block it. Handed to
a helper thread, it leaves the main thread asleep in poll() - `restore` waiting for a VM would
not stop. A thread started here blocks every signal, so the kernel picks the main thread.
"""

from __future__ import annotations

import signal
import threading


def block_signals() -> None:
    """Block every signal in the calling thread (a pool's initializer: the pool's threads, and
    the threads they start, such as zstd's, leave SIGTERM and SIGINT to the main thread, which
    is then woken from waiting on them rather than after their work is done)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def start_signal_free(thread: threading.Thread) -> threading.Thread:
    """Start `thread` with every signal blocked (a new thread inherits its creator's mask;
    the creator's own mask is restored at once, and a signal pending meanwhile reaches it)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return thread
