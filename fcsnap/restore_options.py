"""restore's options, checked in one place for every way of asking for a restore.

`fcsnap restore`, the Python API's `restore` and the daemon's `POST /restores` all pass the
values they were given (texts as typed, or values already typed) through `check_restore`, so a
value is refused by all three with the same line. Lines name options in the command line's
spelling (`--api-timeout`); the daemon's keys are those names with `_` for `-`. Each front
end keeps its own way of saying "refused": exit status 2, UsageError, HTTP 400.

What depends on the build (its snapfile) is checked once the build is found:
`RestoreOptions.snapshot_load`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fcsnap.errors import UsageError
from fcsnap.options import ADAPTIVE, parse_fault_around
from fcsnap.uffd.listener import SocketAccess, parse_mode, parse_owner, parse_uid

if TYPE_CHECKING:
    from fcsnap.uffd.firecracker_api import SnapshotLoad

T = TypeVar("T")
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_API_TIMEOUT = 30.0


@dataclass(frozen=True)
class RestoreOptions:
    """The checked values serving uses (the rest of restore's options need no checking)."""

    fault_around: int = ADAPTIVE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    access: SocketAccess = field(default_factory=SocketAccess)
    firecracker_api: Path | None = None
    vmstate: Path | None = None
    track_dirty_pages: bool = False
    api_timeout: float = DEFAULT_API_TIMEOUT

    def snapshot_load(self, build_dir: Path, socket: Path) -> SnapshotLoad | None:
        """Firecracker's load request for `build_dir` served at `socket` (None without
        --firecracker-api), written for the version Firecracker says it is (asked now, before
        anything listens); UsageError when the build has no snapfile and no --vmstate,
        FcsnapError when Firecracker cannot be asked or is too old."""
        if self.firecracker_api is None:
            return None
        from fcsnap.store.format.layout import SNAPFILE
        from fcsnap.uffd.firecracker_api import SnapshotLoad, firecracker_version, load_body

        if self.vmstate is None and not (build_dir / SNAPFILE).is_file():
            raise UsageError(f"build {build_dir.name} has no {SNAPFILE}: give --vmstate")
        state = self.vmstate if self.vmstate is not None else build_dir / SNAPFILE
        version = firecracker_version(self.firecracker_api, self.api_timeout)
        body = load_body(state, socket, self.track_dirty_pages, version)
        return SnapshotLoad(self.firecracker_api, body, self.api_timeout)


def check_restore(
    *, fault_around: int | str = "adaptive",
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    firecracker_api: str | Path | None = None, vmstate: str | Path | None = None,
    track_dirty_pages: bool = False, api_timeout: float = DEFAULT_API_TIMEOUT,
    access: SocketAccess | None = None,
) -> RestoreOptions:
    """restore's options checked; UsageError naming the first that can never work."""
    if handshake_timeout < 0:
        raise UsageError(f"invalid --handshake-timeout {handshake_timeout:g}: must not be "
                         "negative")
    if firecracker_api is None and (vmstate is not None or track_dirty_pages):
        raise UsageError("--vmstate and --track-dirty-pages need --firecracker-api")
    if api_timeout <= 0:
        raise UsageError(f"invalid --api-timeout {api_timeout:g}: must be more than 0 seconds")
    return RestoreOptions(
        fault_around=parse_fault_around(fault_around),
        handshake_timeout=float(handshake_timeout),
        access=access if access is not None else SocketAccess(),
        firecracker_api=None if firecracker_api is None else Path(firecracker_api),
        vmstate=None if vmstate is None else Path(vmstate),
        track_dirty_pages=track_dirty_pages,
        api_timeout=float(api_timeout),
    )


def socket_access(
    owner: str | None = None, mode: str | int | None = None, allow: Iterable[str | int] = ()
) -> SocketAccess:
    """--socket-owner, --socket-mode, --allow-uid as typed (restore's socket, the daemon's
    API socket); UsageError naming the option whose value names no user, group or mode."""
    uid, gid = _parsed("--socket-owner", parse_owner, owner) if owner else (None, None)
    return SocketAccess(
        mode=0o600 if mode is None else mode if isinstance(mode, int)
        else _parsed("--socket-mode", parse_mode, mode),
        owner_uid=uid, owner_gid=gid,
        allowed_uids=frozenset(
            u if isinstance(u, int) else _parsed("--allow-uid", parse_uid, u) for u in allow
        ),
    )


def _parsed(option: str, parse: Callable[[str], T], text: str) -> T:
    try:
        return parse(text)
    except ValueError as e:
        raise UsageError(f"invalid {option}: {e}") from None
