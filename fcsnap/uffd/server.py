"""`fcsnap restore`: one session (session.py) on one reactor (reactor.py) on the main thread,
with signals.

The session and the reactor are the same code the daemon (fcsnap/daemon/restores.py) runs for
many VMs; here the session has a build of its own and SIGTERM/SIGINT become its stop, as they
should for a process that serves one VM.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.errors import FcsnapError
from fcsnap.uffd.installer import InstallStats
from fcsnap.uffd.reactor import Reactor
from fcsnap.uffd.session import ServeOptions, Session, stats_json
from fcsnap.uffd.shared import SharedBuild

if TYPE_CHECKING:
    from fcsnap.store.backends.remote import RemoteStore

__all__ = ["FaultServer", "ServeOptions", "stats_json"]


class FaultServer:
    """Serves one VM from one build; `run` returns the process exit status."""

    def __init__(self, build_dir: Path, options: ServeOptions,
                 store: RemoteStore | None = None) -> None:
        """`store`: the store in object storage whose mirror `build_dir` is in."""
        self.options = options
        self.build = SharedBuild(build_dir, options.cache_bytes, store=store)
        try:
            self.session = Session(self.build, options)
        except BaseException:
            self.build.close()
            raise

    @property
    def stats(self) -> InstallStats:
        return self.session.stats

    @property
    def exit_reason(self) -> str | None:
        """Why serving ended; None until it has."""
        return self.session.exit_reason

    def run(self, handle_signals: bool = True) -> int:
        """Listen, serve one VM until it exits (0) or SIGTERM/SIGINT (0, VM killed unless
        every page is in); any exception kills the VM and propagates. Without
        `handle_signals`, the caller's handlers call `stop` (restore's, opening.py)."""
        old = ({s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
               if handle_signals else {})
        ended: list[BaseException | None] = []
        try:
            self.session.listen()
            reactor = Reactor()
            try:
                reactor.add(self.session, lambda _session, error: ended.append(error))
                reactor.run_until_idle()
            finally:
                reactor.close()
        finally:
            self.build.close()
            self._restore_signals(old)
            self.session.close()  # after: no handler of ours can run stop() any more
        if ended and ended[0] is not None:
            raise ended[0]
        return 0

    def stop(self) -> None:
        self.session.stop()

    def fail(self, error: FcsnapError) -> None:
        self.session.fail(error)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.session.stop()

    @staticmethod
    def _restore_signals(old: dict[signal.Signals, Any]) -> None:
        for signum, handler in old.items():
            signal.signal(signum, handler)
