"""`fcsnap serve`: the daemon's life, from listening on its API socket to its last restore.

The VMs are served by a fixed pool of reactor threads (restores.py), the API by http.server's
threads. The main thread owns the signals and nothing else: SIGTERM/SIGINT stop the API (no
new restores), then end every restore as `restore`'s SIGTERM does (each VM is killed unless
every page is installed), then hang up on the watchdog. A SIGKILLed daemon cannot do any of
that: the one watchdog all its sessions share sees it die and kills every VM still watched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from fcsnap.daemon.api import MAX_CONNECTIONS, ApiServer
from fcsnap.daemon.metrics import DaemonMetrics
from fcsnap.daemon.restores import Restores, log
from fcsnap.errors import FcsnapError
from fcsnap.threads import signals_wake
from fcsnap.uffd.listener import SocketAccess, listen
from fcsnap.uffd.watchdog import Watchdog, WatchdogError

if TYPE_CHECKING:
    from fcsnap.daemon.remote import RemoteBuilds


def run_daemon(store: Path | RemoteBuilds, api_path: Path, access: SocketAccess,
               cache_bytes: int, preload: list[str] | None = None,
               reactors: int | None = None, output_dir: Path | None = None,
               max_connections: int = MAX_CONNECTIONS) -> int:
    """Serve the API until SIGTERM/SIGINT; 0 once every restore has ended. The `preload`
    builds are open before the API listens (an unknown one: FcsnapError, nothing listens).
    `reactors`: threads serving the VMs (None: one per CPU this process may use).
    `output_dir`: the directory under which requests may name stats, record_ws and written files
    (None: they may name none). `max_connections`: API connections served at once (more
    are answered 503)."""
    if isinstance(store, Path) and not store.is_dir():
        raise FcsnapError(f"store {store} is not a directory")
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(stop_w, False)  # written from signal handlers (signals_wake)
    old = {s: signal.signal(s, lambda *_: _wake(stop_w)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            watchdog = Watchdog.start()
        except WatchdogError as e:
            raise FcsnapError(str(e)) from e
        try:
            metrics = DaemonMetrics()
            restores = Restores(store, cache_bytes, watchdog, reactors, output_dir)
            metrics.attach(restores)
            try:
                restores.preload(preload or [])
                sock = listen(api_path, access)
            except BaseException:
                restores.stop_all()  # closes the builds preloaded
                raise
            inode = os.stat(api_path).st_ino
            server = ApiServer(sock, access, restores, metrics, max_connections)
            thread = threading.Thread(target=server.serve_forever, args=(0.2,), name="api",
                                      daemon=True)
            thread.start()
            log(f"serving restores from {store} on {api_path}")
            try:
                with signals_wake(stop_w):  # whichever thread takes the signal
                    os.read(stop_r, 1)  # until a signal
            finally:
                server.shutdown()
                server.server_close()
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(api_path).st_ino == inode:
                        os.unlink(api_path)
                restores.stop_all()
            log(f"stopped; {sum(restores.ended_by_reason.values())} restores served")
        finally:
            watchdog.close()
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        os.close(stop_r)
        os.close(stop_w)
    return 0


def _wake(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, b"x")
