"""What a restore session is told: its socket, its outputs, how it serves (a module of its own,
light enough for restore to check its options with before it listens: opening.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.options import ADAPTIVE
from fcsnap.outputs import check_output
from fcsnap.uffd.listener import SocketAccess

if TYPE_CHECKING:
    from fcsnap.uffd.watchdog import Watchdog


@dataclass
class ServeOptions:
    """How one session serves: restore's options, or a daemon's request's."""

    socket: Path
    verify: bool = False
    stats_path: Path | None = None
    handshake_timeout: float = 10.0
    cache_bytes: int = 64 << 20
    on_listening: Callable[[], None] | None = None  # e.g. ask Firecracker to load the snapshot
    fault_around: int = ADAPTIVE  # bytes installed around a fault (faultaround.py)
    record_ws: Path | None = None  # write the pages the guest faulted, in order
    track_writes: bool = False  # register MISSING-only memory for write-protect too
    written: Path | None = None  # write the pages the guest wrote (the written set) at the end
    prefetch_ws: Path | None = None  # install these pages right after the handshake
    populate: bool = False  # then install every other page in the background
    eager: bool = False  # install every page before serving any fault
    batch_bytes: int = 1 << 20  # background work between two looks at the uffd
    access: SocketAccess = field(default_factory=SocketAccess)  # mode, owner, admitted uids
    watchdog: Watchdog | None = None  # a shared one (a daemon's); None: run() starts its own
    output_root: Path | None = None  # stats_path and record_ws must be under it (a daemon's)
    more_stats: Callable[[], dict[str, Any]] | None = None  # others' counters (S3 fetches)
    listener: socket.socket | None = None  # listening at `socket` already (opening.py)

    def check_outputs(self) -> None:
        """Refuse now (OutputError) an output file that could not be written at the end."""
        for what, path in (("--stats", self.stats_path), ("--record-ws", self.record_ws),
                           ("--written", self.written)):
            if path is not None:
                check_output(path, what, self.output_root)
