"""Commands that serve memory: restore (one VM, or through the daemon) and serve (the daemon).

Annotations are evaluated once, at import (no `from __future__ import annotations`): typer reads
a command's signature four times while building it, and would evaluate restore's 35 annotated
options from text each time, a good part of what building it costs.
"""

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fcsnap.cli.common import (
    DAEMON,
    FAULTS,
    FC_API,
    OUTPUT,
    STORE,
    AllowUid,
    CacheDir,
    CacheSize,
    FetchTimeout,
    Json,
    LazyFetch,
    Quiet,
    SocketMode,
    SocketOwner,
    StoreOfBuild,
    StoreOpt,
    at_least_one,
    command,
    print_json,
    socket_access,
    usage_error,
)

app = typer.Typer()

RESTORE_TEXT = """\
Serve BUILD's memory to one Firecracker VM over userfaultfd, lazily.

Exits 0 when the VM exits. SIGTERM/SIGINT also exit 0, killing the VM unless every
page is already in place (a VM whose page server is gone would freeze at its next
fault). With --firecracker-api, a load Firecracker refuses (or never answers) exits 1,
killing the VM if it connected."""


@command(app, "restore", [
    "fcsnap restore web --store /srv/snaps --socket /run/web.uffd",
    "fcsnap restore web --store /srv/snaps --socket /run/web.uffd "
    "--firecracker-api /run/fc.sock --prefetch-ws web.ws",
    "fcsnap restore web --socket /run/web.uffd --daemon /run/fcsnap.sock",
], help=RESTORE_TEXT)
def restore(
    build: Annotated[str | None, typer.Argument(
        metavar="BUILD", help="Build to serve: directory, id or VM name (an E2B/Wrenn build "
        "directory or id is served as it is).",
        show_default=False)] = None,
    *,
    vm: Annotated[str | None, typer.Option(
        "--vm", metavar="BUILD", help="The same as BUILD.")] = None,
    socket: Annotated[Path, typer.Option(
        "--socket", metavar="PATH", help="Unix socket Firecracker connects to.",
        show_default=False)],
    store: StoreOfBuild = None,
    stats: Annotated[Path | None, typer.Option(
        "--stats", metavar="FILE", help="Write serving statistics (JSON).",
        rich_help_panel=OUTPUT)] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check every block against its hash before installing it (not for "
        "E2B/Wrenn builds: they have no block hashes).",
        rich_help_panel=FAULTS)] = False,
    handshake_timeout: Annotated[float, typer.Option(
        "--handshake-timeout", metavar="SECONDS", rich_help_panel=FAULTS,
        help="Seconds a connected VM has to send its regions.")] = 10.0,
    cache_mb: Annotated[int, typer.Option(
        "--cache-mb", metavar="N", rich_help_panel=FAULTS,
        help="Memory for diff data: decompressed frames (zstd), mapped pages (raw).")] = 64,
    fault_around: Annotated[str, typer.Option(
        "--fault-around", metavar="SIZE|adaptive", rich_help_panel=FAULTS,
        help="Install this much contiguous memory around a fault in one copy (0: one page); "
             "adaptive: grow the window while the guest reads in order, one page when it "
             "scatters.")] = "adaptive",
    record_ws: Annotated[Path | None, typer.Option(
        "--record-ws", metavar="FILE", rich_help_panel=FAULTS,
        help="Write the pages the guest faulted, in order (working set).")] = None,
    prefetch_ws: Annotated[Path | None, typer.Option(
        "--prefetch-ws", metavar="FILE", rich_help_panel=FAULTS,
        help="Install this working set right after the handshake.")] = None,
    populate: Annotated[bool, typer.Option(
        "--populate", help="Then install every other page in the background.",
        rich_help_panel=FAULTS)] = False,
    eager: Annotated[bool, typer.Option(
        "--eager", help="Install every page before serving any fault.",
        rich_help_panel=FAULTS)] = False,
    track_writes: Annotated[bool, typer.Option(
        "--track-writes", rich_help_panel=FAULTS,
        help="Track the pages the guest writes: register its memory for write-protect too "
             "(memory Firecracker registered MISSING|WP is tracked without it).")] = False,
    written: Annotated[Path | None, typer.Option(
        "--written", metavar="FILE", rich_help_panel=OUTPUT,
        help="Write the pages the guest wrote (the written set, for diff --written) when the "
             "restore ends; implies --track-writes.")] = None,
    firecracker_api: Annotated[Path | None, typer.Option(
        "--firecracker-api", metavar="SOCK", rich_help_panel=FC_API,
        help="Firecracker's API socket: once listening, have it load the snapshot from us "
             "(PUT /snapshot/load, resuming the VM). Paths are sent absolute.")] = None,
    vmstate: Annotated[Path | None, typer.Option(
        "--vmstate", metavar="FILE", rich_help_panel=FC_API,
        help="vmstate file Firecracker loads (default: the build's snapfile).")] = None,
    track_dirty_pages: Annotated[bool, typer.Option(
        "--track-dirty-pages", help="Have the loaded VM track dirty pages.",
        rich_help_panel=FC_API)] = False,
    api_timeout: Annotated[float, typer.Option(
        "--api-timeout", metavar="SECONDS", rich_help_panel=FC_API,
        help="Seconds Firecracker has to answer the snapshot load.")] = 30.0,
    socket_owner: SocketOwner = None, socket_mode: SocketMode = None,
    allow_uid: AllowUid = None,
    cache_dir: CacheDir = None, cache_size: CacheSize = "10G",
    fetch_timeout: FetchTimeout = 30.0, lazy_fetch: LazyFetch = False,
    daemon: Annotated[Path | None, typer.Option(
        "--daemon", metavar="API", rich_help_panel=DAEMON,
        help="Ask the 'fcsnap serve' daemon at this API socket to serve the VM (BUILD is in "
             "the daemon's store); print the restore's id and exit 0 once the socket listens "
             "(with --firecracker-api, once Firecracker has loaded the snapshot; exit 1 with "
             "its message if it refused).")] = None,
    quiet: Quiet = False, json_out: Json = False,
) -> int:
    vm = _one_build(build, vm)
    options = dict(locals())
    access = socket_access(socket_owner, socket_mode, allow_uid)
    if daemon is not None:
        return _restore_via_daemon(options, access)
    from fcsnap import api

    def listening(build_dir: Path) -> None:
        # Announced only now: a socket that cannot be created is then the one line on stderr.
        if not quiet:
            print(f"fcsnap: serving {build_dir.name} on {socket}", file=sys.stderr, flush=True)

    def loaded(response: Any) -> None:
        if not quiet:
            print(f"fcsnap: Firecracker loaded the snapshot (HTTP {response.status})",
                  file=sys.stderr, flush=True)

    served = api.restore(
        vm, socket, store=store, firecracker_api=firecracker_api, vmstate=vmstate,
        track_dirty_pages=track_dirty_pages, api_timeout=api_timeout, on_listening=listening,
        on_loaded=loaded, verify=verify, stats_path=stats, handshake_timeout=handshake_timeout,
        cache_bytes=max(0, cache_mb) << 20, fault_around=fault_around, record_ws=record_ws,
        prefetch_ws=prefetch_ws, populate=populate, eager=eager, track_writes=track_writes,
        written=written, access=access,
        cache_dir=cache_dir, cache_size=cache_size, fetch_timeout=fetch_timeout,
        lazy_fetch=lazy_fetch,
    )
    if json_out:
        from fcsnap.uffd.session import stats_json

        print_json(stats_json(served.stats, {"exit_reason": served.exit_reason,
                                             "status": served.status}))
    elif not quiet:
        from fcsnap.units import format_bytes

        s = served.stats
        print(
            f"fcsnap: {served.exit_reason}: {s.faults} faults, {s.pages_served} pages "
            f"({format_bytes(s.bytes_served)}) served",
            file=sys.stderr,
        )
    return served.status


def _one_build(build: str | None, vm: str | None) -> str:
    """restore's build, given as BUILD or as --vm BUILD (the same, or one of them)."""
    if build is None and vm is None:
        usage_error("Missing argument 'BUILD' (or --vm BUILD)")
    if build is not None and vm is not None and build != vm:
        usage_error(f"BUILD {build!r} and --vm {vm!r} differ: give one")
    return build if build is not None else vm  # type: ignore[return-value]


def _restore_via_daemon(o: dict[str, Any], access: Any) -> int:
    """restore --daemon: the options as the daemon's POST /restores takes them (texts as
    typed), checked here first as the daemon checks them (a bad value: exit 2, no request);
    print the restore's id once its socket listens."""
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context

    from fcsnap.daemon.client import restore_via_daemon
    from fcsnap.restore_options import check_restore

    from_env = get_current_context().get_parameter_source("store") is ParameterSource.ENVIRONMENT
    if o["store"] is not None and not from_env:  # FCSNAP_STORE names this host's store
        usage_error("--store: the daemon serves its own store")
    check_restore(
        fault_around=o["fault_around"], handshake_timeout=o["handshake_timeout"],
        firecracker_api=o["firecracker_api"], vmstate=o["vmstate"],
        track_dirty_pages=o["track_dirty_pages"], api_timeout=o["api_timeout"], access=access,
    )
    keys = ("socket", "stats", "verify", "handshake_timeout", "fault_around", "record_ws",
            "prefetch_ws", "populate", "eager", "firecracker_api", "vmstate",
            "track_dirty_pages", "api_timeout", "track_writes", "written", "socket_owner",
            "socket_mode")
    answer = restore_via_daemon(o["daemon"], o["vm"], {
        **{key: o[key] for key in keys}, "allow_uid": o["allow_uid"] or [],
    })
    print(answer["id"])
    return 0


@command(app, "serve", [
    "fcsnap serve --store /srv/snaps --api /run/fcsnap.sock --preload web",
], help="Run the restore daemon: many VMs served at once, each build opened once for all.\n\n"
        "HTTP/1.1 with JSON on the Unix socket --api: POST /restores, GET /restores, GET "
        "/restores/ID, DELETE /restores/ID, GET /metrics, GET /healthz. SIGTERM/SIGINT end "
        "every restore as they end 'restore' and exit 0.")
def serve(
    store: StoreOpt,
    api: Annotated[Path, typer.Option(
        "--api", metavar="PATH", help="The API's Unix socket.", show_default=False)],
    cache_mb: Annotated[int, typer.Option(
        "--cache-mb", metavar="N",
        help="Memory for diff data, for every build and VM together.")] = 256,
    preload: Annotated[list[str] | None, typer.Option(
        "--preload", metavar="BUILD", rich_help_panel=STORE,
        help="Open this build (name, id or directory; repeatable) before the API listens and "
             "keep it open until the daemon stops: no POST waits for opening it (gc cannot "
             "remove it meanwhile).")] = None,
    cache_dir: CacheDir = None, cache_size: CacheSize = "10G",
    fetch_timeout: FetchTimeout = 30.0, lazy_fetch: LazyFetch = False,
    reactors: Annotated[int | None, typer.Option(
        "--reactors", metavar="N", callback=at_least_one,
        help="Threads serving the VMs, each any number of them (default: one per CPU the "
             "daemon may use).")] = None,
    output_dir: Annotated[Path | None, typer.Option(
        "--output-dir", metavar="DIR", rich_help_panel=OUTPUT,
        help="Requests may have stats, record_ws and written files written under DIR (none "
             "elsewhere; without this option, none at all).")] = None,
    max_api_connections: Annotated[int, typer.Option(
        "--max-api-connections", metavar="N", callback=at_least_one,
        help="API connections served at once; more are answered 503.")] = 64,
    socket_owner: SocketOwner = None, socket_mode: SocketMode = None,
    allow_uid: AllowUid = None,
) -> int:
    from fcsnap.daemon.main import run_daemon
    from fcsnap.store.backends.s3 import is_s3_url
    from fcsnap.store.backends.stores import open_store

    access = socket_access(socket_owner, socket_mode, allow_uid)
    if is_s3_url(store):  # the cache directory is checked before the bucket is asked
        from fcsnap.daemon.remote import RemoteBuilds
        from fcsnap.options import parse_cache_size
        from fcsnap.store.backends.chunk_cache import ChunkCache, default_cache_dir

        cache = ChunkCache(cache_dir or default_cache_dir(), parse_cache_size(cache_size),
                           fetch_rest=not lazy_fetch)
        source: Any = RemoteBuilds(open_store(store, fetch_timeout), cache, fetch_timeout)
    else:
        source = open_store(store)
    return run_daemon(source, api, access, max(0, cache_mb) << 20, preload or [], reactors,
                      _output_dir(output_dir), max_api_connections)


def _output_dir(path: Path | None) -> Path | None:
    """serve --output-dir: an existing directory, kept as its real path (symlinks resolved
    once, here: below it none are followed)."""
    from fcsnap.errors import FcsnapError

    if path is None:
        return None
    if not path.is_dir():
        raise FcsnapError(f"--output-dir {path}: not a directory")
    return Path(os.path.realpath(path))
