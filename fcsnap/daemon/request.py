"""`POST /restores`: a JSON body checked as `fcsnap restore` checks its options.

Keys are restore's options with `_` for `-`; the daemon-wide ones (`--store`, `--cache-mb`)
are the daemon's (in an S3 store, `vm` is resolved in the bucket and served through the host
chunk cache: fcsnap/daemon/remote.py). Paths must be absolute: the daemon's working directory
is not the caller's (`fcsnap restore --daemon` makes them absolute before sending). Here the
body's JSON types are checked; the values go through fcsnap.restore_options, as the command
line's and the Python API's do, so a value is refused with the same line everywhere. Every check
that restore makes before listening is made here or by the session's `listen`, so a bad request
listens on nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcsnap.errors import FcsnapError, UsageError
from fcsnap.outputs import inside
from fcsnap.restore_options import (
    DEFAULT_API_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    check_restore,
    socket_access,
)
from fcsnap.store.format.layout import resolve_build
from fcsnap.store.operations.e2b import e2b_build_dir
from fcsnap.uffd.firecracker_api import SnapshotLoad
from fcsnap.uffd.listener import SocketAccess
from fcsnap.uffd.session import ServeOptions

if TYPE_CHECKING:
    from fcsnap.daemon.remote import RemoteBuilds

BOOLEANS = ("verify", "populate", "eager", "track_dirty_pages", "track_writes")
NUMBERS = {"handshake_timeout": DEFAULT_HANDSHAKE_TIMEOUT, "api_timeout": DEFAULT_API_TIMEOUT}
PATHS = ("stats", "record_ws", "prefetch_ws", "firecracker_api", "vmstate", "written")
OUTPUTS = ("stats", "record_ws", "written")  # files the daemon writes: under its --output-dir only
TEXTS = ("fault_around", "socket_owner", "socket_mode")
KNOWN = {"vm", "socket", "allow_uid", *BOOLEANS, *NUMBERS, *PATHS, *TEXTS}


class RequestError(FcsnapError):
    """A request the daemon refuses: an HTTP status and one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RestoreRequest:
    vm: str
    build_dir: Path
    options: ServeOptions
    load: SnapshotLoad | None


def parse_restore(body: object, store: Path | RemoteBuilds, cache_bytes: int,
                  output_dir: Path | None = None) -> RestoreRequest:
    """The request's build and options; RequestError naming the first thing wrong. The files
    the daemon writes for a request (stats, record_ws) must be under `output_dir`."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise RequestError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(KNOWN))})")
    vm = _text(body, "vm", required=True)
    socket_path = _path(body, "socket", required=True)
    assert vm is not None and socket_path is not None
    for key in BOOLEANS:
        if not isinstance(body.get(key, False), bool):
            raise RequestError(f"{key} must be true or false")
    numbers = {key: _number(body, key, default) for key, default in NUMBERS.items()}
    paths = {key: _path(body, key) for key in PATHS}
    for key in OUTPUTS:
        _check_output_path(key, paths[key], output_dir)
    try:
        checked = check_restore(
            fault_around=_text(body, "fault_around") or "adaptive",
            handshake_timeout=numbers["handshake_timeout"],
            firecracker_api=paths["firecracker_api"], vmstate=paths["vmstate"],
            track_dirty_pages=bool(body.get("track_dirty_pages")),
            api_timeout=numbers["api_timeout"], access=_access(body),
        )
        build_dir = request_build(vm, store, bool(body.get("verify")))
        if isinstance(store, Path) and e2b_build_dir(build_dir, None) is not None:
            from fcsnap.store.operations.e2b_serve import e2b_to_serve  # served as it is

            e2b_to_serve(str(build_dir), None, bool(body.get("verify")))
        load = checked.snapshot_load(build_dir, socket_path)
    except RequestError:
        raise
    except FcsnapError as e:
        raise RequestError(str(e)) from None
    options = ServeOptions(
        socket=socket_path,
        verify=bool(body.get("verify")),
        stats_path=paths["stats"],
        handshake_timeout=checked.handshake_timeout,
        cache_bytes=cache_bytes,
        fault_around=checked.fault_around,
        record_ws=paths["record_ws"],
        prefetch_ws=paths["prefetch_ws"],
        populate=bool(body.get("populate")),
        eager=bool(body.get("eager")),
        track_writes=bool(body.get("track_writes")),
        written=paths["written"],
        access=checked.access,
        output_root=output_dir,
    )
    return RestoreRequest(vm, build_dir, options, load)


def request_build(vm: str, store: Path | RemoteBuilds, verify: bool = False) -> Path:
    """The build directory `vm` (a directory, id or name) stands for in the daemon's store (a
    local one, or a mirror of a build in object storage); RequestError 404 when there is none
    (400 for `verify` of an E2B/Wrenn build in object storage)."""
    try:
        return resolve_build(vm, store) if isinstance(store, Path) else store.resolve(vm, verify)
    except UsageError as e:
        raise RequestError(str(e)) from None
    except FcsnapError as e:
        raise RequestError(str(e), 404) from None


def _check_output_path(key: str, path: Path | None, output_dir: Path | None) -> None:
    """403 for an output file outside the daemon's --output-dir (or any, without one): the
    daemon's user may be root, and its API clients must not choose what it overwrites.
    Symlinks below the directory are refused when the file is written (outputs.py)."""
    if path is None:
        return
    if output_dir is None:
        raise RequestError(f"{key}: this daemon writes no output files (start fcsnap serve "
                           "with --output-dir DIR to allow them under DIR)", 403)
    if not inside(path, output_dir):
        raise RequestError(f"{key} {str(path)!r} is not under {output_dir}, the daemon's "
                           "--output-dir (no '..')", 403)


def _access(body: dict[str, Any]) -> SocketAccess:
    allowed = body.get("allow_uid", [])
    if not isinstance(allowed, list) or not all(
        isinstance(u, str | int) and not isinstance(u, bool) for u in allowed
    ):
        raise RequestError("allow_uid must be a list of uids or user names")
    return socket_access(
        _text(body, "socket_owner"), _text(body, "socket_mode"), [str(u) for u in allowed]
    )


def _text(body: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(f"{key} is required")
        return None
    if isinstance(value, int) and not isinstance(value, bool) and key != "vm":
        return str(value)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key} must be a non-empty string")
    return value


def _path(body: dict[str, Any], key: str, required: bool = False) -> Path | None:
    text = _text(body, key, required)
    if text is None:
        return None
    if "\0" in text or not text.startswith("/"):
        raise RequestError(f"{key} must be an absolute path (the daemon's working directory "
                           f"is not the caller's): {text!r}")
    return Path(text)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise RequestError(f"{key} must be a number of seconds")
    return float(value)
