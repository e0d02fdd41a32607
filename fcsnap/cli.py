"""The `fcsnap` command line: parse options, call the Python API (fcsnap.api), print results.

argparse (standard library) rather than a framework: it costs a few milliseconds where typer
costs hundreds (bench/startup.py), and the help text, `-h` and exit statuses do not change with
a dependency's release. Modules are imported by the command that needs them: `--help` costs
little more than the interpreter, and `restore` loads numpy on a thread while it opens the
store and listens.

Exit statuses: 0 done, 1 a runtime failure (one line `fcsnap: error: ...`; `--debug` or
FCSNAP_DEBUG=1 adds the traceback; none when a pipe's reader stopped early), 2 a usage error
(one line too), 130 interrupted (SIGINT), 143 terminated (SIGTERM; `restore` and `serve`
handle SIGTERM themselves once serving: they exit 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fcsnap import __version__

if TYPE_CHECKING:
    from fcsnap.api import Build, Inspection

PROG = "fcsnap"
USAGE_ERROR = 2
INTERRUPTED = 130
TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so that a command stopped by
    either (a service manager, `timeout`, `kill`) undoes its staging and partial output the
    same way."""


def _terminate(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut cleanup
    raise Terminated


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error, with where to look; exit status 2.
    Options are spelled in full: an abbreviation accepted today would break when an option
    sharing its prefix is added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        usage_error(message, self.prog)


def usage_error(message: str, prog: str = PROG) -> NoReturn:
    print(f"{PROG}: error: {message} (see '{prog} --help')", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _value(name: str) -> Callable[[str], str]:
    """An argparse type that checks a value with fcsnap.options.<name> (imported when a value
    is parsed, not at start-up). Its UsageError becomes argparse's, so a bad value stops the
    command before any work, with exit status 2. The text is kept: the API parses the same
    spellings itself."""

    def convert(text: str) -> str:
        from fcsnap import options
        from fcsnap.errors import UsageError

        try:
            getattr(options, name)(text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return convert


# -- output ----------------------------------------------------------------------------------


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def report_build(build: Build, args: argparse.Namespace, verb: str) -> None:
    """The new build: one JSON object with --json, else a summary unless --quiet."""
    from fcsnap.units import format_bytes

    if args.json:
        print_json(build.to_json())
        return
    if args.quiet:
        return
    s = build.stats
    print(f"{verb} build {build.build_id} (generation {build.generation}) at {build.path}")
    print(
        f"  blocks: {s.blocks_total} total, {s.blocks_stored} stored, {s.blocks_zero} zero, "
        f"{s.blocks_deduplicated} deduplicated, {s.blocks_inherited} inherited"
    )
    print(
        f"  diff: {format_bytes(s.bytes_stored)} of blocks, {format_bytes(s.bytes_written)} "
        f"on disk ({build.compression}) for {format_bytes(build.size)} of memory"
    )


def _build_cell(build_id: str) -> str:
    """Zero mappings carry the nil build id in the header (and in --json); tables say so."""
    from fcsnap.header import NIL

    return "(zeros)" if build_id == str(NIL) else build_id


def _pinned_text(report: dict[str, Any]) -> str:
    """inspect's `pinned` row: what the check of the pins found, never a bare yes."""
    if not report["pinned"]:
        return "no (unpinned: ancestors trusted by id)"
    errors = report["pin_errors"]
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"FAILED: {errors[0]}{more}"
    return "yes (every build read matches its pin)"
def _render_builds_section(section: dict, lookups: list[dict] | None) -> list[str]:
    """E2B's V4/V5 builds section: the flags, per build its size, checksum and frame table,
    the frames themselves (with --mappings), and the frame each lookup falls in."""
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    title = f"E2B builds section (flags {section['flags']:#04x})" + (
        " (incomplete, pending upload: a peer's header, the build's data not yet stored)"
        if section["incomplete_pending_upload"] else "")
    rows = [
        (b["build_id"], format_bytes(b["file_size"]), b["sha256"] or "unknown (zeros)",
         b["compression"], str(b["frames"]), format_bytes(b["frames_uncompressed_bytes"]),
         format_bytes(b["frames_compressed_bytes"]))
        for b in section["builds"]
    ]
    columns = ("build", "file size", "sha256", "compression", "frames", "uncompressed",
               "compressed")
    parts = [table(columns, rows, title=title,
                   left=("build", "sha256"))]
    frame_rows = [
        (b["build_id"], str(i), f"{f['uncompressed_offset']:#x}", f"{f['uncompressed_length']:#x}",
         f"{f['compressed_offset']:#x}", f"{f['compressed_length']:#x}")
        for b in section["builds"] for i, f in enumerate(b.get("frame_table", ()))
    ]
    if frame_rows:
        columns = ("build", "frame", "uncompressed offset", "length", "compressed offset",
                   "length")
        parts.append(table(columns, frame_rows, title="Frames", left=("build",)))
    if lookups:
        rows = [
            (f"{r['offset']:#x}", _build_cell(r["build_id"]),
             *((f"{f['uncompressed_offset']:#x}", f"{f['uncompressed_length']:#x}",
                f"{f['compressed_offset']:#x}", f"{f['compressed_length']:#x}")
               if (f := r["frame"]) else ("-", "-", "-", "-")))
            for r in lookups
        ]
        columns = ("offset", "build", "frame uncompressed offset", "length",
                   "compressed offset", "length")
        parts.append(table(columns, rows, title="Frames holding the looked-up offsets",
                           left=("build",)))
    return parts


def render_inspect(inspection: Inspection) -> str:
    """The plain-text tables of `inspect`: the header, the builds it reads (and its zeros),
    then the mappings and lookups asked for. The same words as the JSON report."""
    from fcsnap.render import table
    from fcsnap.units import format_block_size, format_bytes

    report = inspection.report
    meta = report["metadata"]
    if meta["generation"] == 0:
        parent = "none (generation 0)"
    else:
        parent = meta["parent_build_id"] or "unknown (no build.json beside the header)"
    header = table((), [
        ("build_id", meta["build_id"]),
        ("generation", str(meta["generation"])),
        ("parent_build_id", parent),
        ("base_build_id", f"{meta['base_build_id']} (generation 0 of this lineage)"),
        ("version", str(meta["version"])),
        ("block_size", format_block_size(meta["block_size"])),
        ("size", f"{format_bytes(meta['size'])} ({meta['size']} bytes)"),
        ("mappings", str(report["mapping_count"])),
        *([("pinned", _pinned_text(report))] if "pinned" in report else []),
    ], title=f"Header {inspection.path}")
    rows = [
        (row["build_id"], "?" if row["generation"] is None else str(row["generation"]),
         str(row["mappings"]), str(row["blocks"]), format_bytes(row["bytes"]),
         f"{row['share']:.1%}")
        for row in report["builds"]
    ]
    zero = report["zero"]
    rows.append((
        "(zeros)", "", str(zero["mappings"]), str(zero["bytes"] // meta["block_size"]),
        format_bytes(zero["bytes"]), f"{zero['share']:.1%}",
    ))
    columns = ("build", "generation", "mappings", "blocks", "bytes", "share")
    parts = [header, table(columns, rows, title="Builds read by this generation", left=("build",))]
    if "e2b" in report:
        parts += _render_builds_section(report["e2b"], report.get("lookups"))
    if "mappings" in report:
        columns = ("offset", "length", "build", "build_storage_offset")
        parts.append(table(columns, (
            (f"{m['offset']:#x}", f"{m['length']:#x}", _build_cell(m["build_id"]),
             f"{m['build_storage_offset']:#x}")
            for m in report["mappings"]
        ), title="Mappings", left=("build",)))
    if "lookups" in report:
        columns = ("offset", "build", "build_storage_offset", "remaining_length")
        parts.append(table(columns, (
            (f"{r['offset']:#x}", _build_cell(r["build_id"]), f"{r['build_storage_offset']:#x}",
             f"{r['remaining_length']:#x}")
            for r in report["lookups"]
        ), title="Lookups", left=("build",)))
    return "\n\n".join(parts)


# -- commands --------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from fcsnap import api

    inspection = api.inspect(args.target, store=args.store, mappings=args.mappings, at=args.at)
    if args.json:
        print_json(inspection.to_json())
    else:
        print(render_inspect(inspection))
    errors = inspection.report.get("pin_errors")
    if errors:  # reported in full above; the exit status and one line say it failed
        sys.stdout.flush()
        print(f"{PROG}: error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


def _store(args: argparse.Namespace) -> Any:
    from fcsnap.api import Store

    return Store(args.store)


def cmd_pack(args: argparse.Namespace) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("pack", args.quiet or args.json) as progress:
        build = _store(args).pack(
            args.memfile, name=args.name, compress=args.compress, block_size=args.block_size,
            frame_size=args.frame_size, vmstate=args.vmstate, working_set=args.working_set,
            progress=progress,
        )
    report_build(build, args, "packed")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("diff", args.quiet or args.json) as progress:
        build = _store(args).diff(
            args.memfile, base=args.base, name=args.name, compress=args.compress,
            block_size=args.block_size, frame_size=args.frame_size, sparse=args.sparse_diff,
            holes_are_zeros=args.holes_are_zeros, vmstate=args.vmstate,
            working_set=args.working_set, written=args.written, progress=progress,
        )
    report_build(build, args, "diffed")
    return 0


def cmd_squash(args: argparse.Namespace) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("squash", args.quiet or args.json) as progress:
        build = _store(args).squash(args.build, name=args.name, progress=progress)
    report_build(build, args, "squashed")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("import", args.quiet or args.json) as progress:
        builds = _store(args).import_e2b(args.src, name=args.name, compress=args.compress,
                                         progress=progress)
    if args.json:
        print_json([build.to_json() for build in builds])
    elif not args.quiet:
        for build in builds:
            print(f"imported build {build.build_id} (generation {build.generation}) at "
                  f"{build.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("export", args.quiet) as progress:
        written = _store(args).export_e2b(args.build, args.output, compress=args.compress,
                                          progress=progress)
    if not args.quiet:
        for path in written:
            print(f"wrote E2B build {path}")
    return 0


def cmd_unpack(args: argparse.Namespace) -> int:
    from fcsnap import api
    from fcsnap.progress import progress_bar

    with progress_bar("unpack", args.quiet) as progress:
        output = api.unpack(
            args.build, args.output, store=args.store, force=args.force, progress=progress
        )
    if not args.quiet:
        from fcsnap.units import format_bytes

        print(f"wrote {output} ({format_bytes(output.stat().st_size)})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from fcsnap import api
    from fcsnap.progress import progress_bar
    from fcsnap.units import plural

    with progress_bar("verify", args.quiet or args.json) as progress:
        result = api.verify(args.build, store=args.store, progress=progress)
    if args.json:
        print_json(result.to_json())
    elif not args.quiet and not isinstance(result, api.Verification):
        print(result.summary())  # an E2B/Wrenn build: what its data allowed to check
    elif not args.quiet:
        print(
            f"ok: build {result.build_id} (generation {result.generation}): "
            f"{plural(result.builds_checked, 'build')} and "
            f"{plural(result.blocks_checked, 'block')} checked"
            + ("" if result.pinned else " (unpinned: ancestors are trusted by id)")
        )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.daemon is not None:
        return _restore_via_daemon(args)
    from fcsnap import api, deferred

    # Serving needs numpy once a VM connects, not to listen: it loads on a thread from now
    # on, while the store is opened and the socket made, and is in by the time a VM that
    # connects right away faults.
    deferred.load_in_background(deferred.defer("numpy"))
    quiet = args.quiet

    def listening(build_dir: Path) -> None:
        # Announced only now: a socket that cannot be created is then the one line on stderr.
        if not quiet:
            print(f"fcsnap: serving {build_dir.name} on {args.socket}", file=sys.stderr,
                  flush=True)

    def loaded(response: Any) -> None:
        if not quiet:
            print(f"fcsnap: Firecracker loaded the snapshot (HTTP {response.status})",
                  file=sys.stderr, flush=True)

    served = api.restore(
        args.vm, args.socket, store=args.store, firecracker_api=args.firecracker_api,
        vmstate=args.vmstate, track_dirty_pages=args.track_dirty_pages,
        api_timeout=args.api_timeout, on_listening=listening, on_loaded=loaded,
        verify=args.verify, stats_path=args.stats, handshake_timeout=args.handshake_timeout,
        cache_bytes=max(0, args.cache_mb) << 20, fault_around=args.fault_around,
        record_ws=args.record_ws, prefetch_ws=args.prefetch_ws, populate=args.populate,
        eager=args.eager, track_writes=args.track_writes, written=args.written,
        access=_socket_access(args), cache_dir=args.cache_dir,
        cache_size=args.cache_size, fetch_timeout=args.fetch_timeout,
        lazy_fetch=args.lazy_fetch,
    )
    if not quiet:
        from fcsnap.units import format_bytes

        s = served.stats
        print(
            f"fcsnap: {served.exit_reason}: {s.faults} faults, {s.pages_served} pages "
            f"({format_bytes(s.bytes_served)}) served",
            file=sys.stderr,
        )
    return served.status


def _restore_via_daemon(args: argparse.Namespace) -> int:
    """restore --daemon: the options as the daemon's POST /restores takes them (texts as
    typed), checked here first as the daemon checks them (a bad value: exit 2, no request);
    print the restore's id once its socket listens."""
    from fcsnap.daemon.client import restore_via_daemon
    from fcsnap.restore_options import check_restore

    if args.store is not None:
        usage_error("argument --store: the daemon serves its own store", f"{PROG} restore")
    check_restore(
        fault_around=args.fault_around, handshake_timeout=args.handshake_timeout,
        firecracker_api=args.firecracker_api, vmstate=args.vmstate,
        track_dirty_pages=args.track_dirty_pages, api_timeout=args.api_timeout,
        access=_socket_access(args),
    )
    answer = restore_via_daemon(args.daemon, args.vm, dict(
        socket=args.socket, stats=args.stats, verify=args.verify,
        handshake_timeout=args.handshake_timeout, fault_around=args.fault_around,
        record_ws=args.record_ws, prefetch_ws=args.prefetch_ws, populate=args.populate,
        eager=args.eager, firecracker_api=args.firecracker_api, vmstate=args.vmstate,
        track_dirty_pages=args.track_dirty_pages, api_timeout=args.api_timeout,
        track_writes=args.track_writes, written=args.written, socket_owner=args.socket_owner,
        socket_mode=args.socket_mode, allow_uid=args.allow_uid,
    ))
    print(answer["id"])
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Ask the daemon for a checkpoint of a restore; print the new build's id."""
    from fcsnap.daemon.client import checkpoint_via_daemon

    answer = checkpoint_via_daemon(args.daemon, args.restore, args.name)
    print(answer["build_id"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fcsnap.daemon.main import run_daemon
    from fcsnap.store.backends.s3 import is_s3_url

    store: Any = Path(args.store)
    if is_s3_url(args.store):
        from fcsnap.daemon.remote import RemoteBuilds
        from fcsnap.options import parse_cache_size
        from fcsnap.store.backends.chunk_cache import ChunkCache, default_cache_dir
        from fcsnap.store.backends.stores import open_store

        cache = ChunkCache(args.cache_dir or default_cache_dir(),
                           parse_cache_size(args.cache_size), fetch_rest=not args.lazy_fetch)
        store = RemoteBuilds(open_store(args.store, args.fetch_timeout), cache,
                             args.fetch_timeout)
    if args.reactors is not None and args.reactors < 1:
        usage_error(f"argument --reactors: invalid value {args.reactors}: at least 1",
                    f"{PROG} serve")
    if args.max_api_connections < 1:
        usage_error(f"argument --max-api-connections: invalid value "
                    f"{args.max_api_connections}: at least 1", f"{PROG} serve")
    return run_daemon(store, args.api, _socket_access(args), max(0, args.cache_mb) << 20,
                      args.preload, args.reactors, _output_dir(args.output_dir),
                      args.max_api_connections)


def _output_dir(path: Path | None) -> Path | None:
    """serve --output-dir: an existing directory, kept as its real path (symlinks resolved
    once, here: below it none are followed)."""
    from fcsnap.errors import FcsnapError

    if path is None:
        return None
    if not path.is_dir():
        raise FcsnapError(f"--output-dir {path}: not a directory")
    return Path(os.path.realpath(path))


def _socket_access(args: argparse.Namespace) -> Any:
    """--socket-owner/--socket-mode/--allow-uid (restore's, serve's) as one value, checked
    as the daemon checks a request's (a bad one is a UsageError: exit 2)."""
    from fcsnap.restore_options import socket_access

    return socket_access(args.socket_owner, args.socket_mode, args.allow_uid)


def cmd_ls(args: argparse.Namespace) -> int:
    from fcsnap.store.backends.stores import open_store, scan_store
    from fcsnap.store.operations import listing

    view = scan_store(open_store(args.store))
    if args.name is not None:
        report = listing.lineage_report(view, args.name)
    elif args.builds:
        report = listing.builds_report(view)
    else:
        report = listing.names_report(view)
    if args.json:
        print_json(report)
    elif args.name is not None:
        print(render_lineage(report))
    else:
        rows = report["builds"] if args.builds else report["names"]
        print(render_builds(rows) if args.builds else render_names(rows))
        print(render_summary(report["summary"]))
    return 0


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _generation(value: int | None) -> str:
    return "?" if value is None else str(value)


def render_names(rows: list[dict[str, Any]]) -> str:
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    columns = ("name", "head", "gen", "created", "memory", "lineage", "shared", "head reads")
    text = table(columns, [(
        r["name"], r["head"] or "?", _generation(r["generation"]), r["created_at"] or "?",
        "?" if r["memory_bytes"] is None else format_bytes(r["memory_bytes"]),
        format_bytes(r["lineage_bytes"]), format_bytes(r["shared_bytes"]),
        _fraction(r["live_fraction"]),
    ) for r in rows], title="Names", left=("name", "head", "created"))
    errors = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([text, *errors])


def _readers(row: dict[str, Any]) -> str:
    """`ls --builds`' read-by column: the names whose heads read the build, and those whose
    head it is without reading it (it stores nothing they read); `unreferenced` as the JSON
    and the summary count it."""
    heads = [f"{name} (head)" for name in row["head_of"] if name not in row["read_by"]]
    return ", ".join([*row["read_by"], *heads]) or ("unreferenced" if row["unreferenced"] else "-")


def render_builds(rows: list[dict[str, Any]]) -> str:
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    columns = ("build", "gen", "parent", "on disk", "live", "read by")
    text = table(columns, [(
        r["build_id"], _generation(r["generation"]), r["parent"] or "-",
        format_bytes(r["disk_bytes"]), _fraction(r["live_fraction"]), _readers(r),
    ) for r in rows], title="Builds", left=("build", "parent", "read by"))
    errors = [f"{r['build_id']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join([text, *errors])


def render_summary(s: dict[str, Any]) -> str:
    from fcsnap.units import format_bytes, plural

    amp = "-" if s["amplification"] is None else f"{s['amplification']:.2f}x"
    return (
        f"{plural(s['names'], 'name')}, {plural(s['builds'], 'build')} "
        f"({s['unreferenced_builds']} unreferenced): {format_bytes(s['disk_bytes'])} on disk, "
        f"heads read {format_bytes(s['live_bytes'])} (space amplification {amp})"
    )


def render_lineage(report: dict[str, Any]) -> str:
    from fcsnap.render import table
    from fcsnap.units import format_bytes

    def reads(r: dict[str, Any]) -> str:
        if "pin_error" in r:
            return "FAILS ITS PIN"
        if "error" in r:
            return "DAMAGED"
        return f"{format_bytes(r['head_reads_bytes'])} ({_fraction(r['head_reads_fraction'])})"

    rows = [
        ("?", r["build_id"], "missing", "", "") if r["missing"] else (
            _generation(r["generation"]), r["build_id"], r["created_at"] or "?",
            format_bytes(r["disk_bytes"]), reads(r),
        )
        for r in report["generations"]
    ]
    text = table(("gen", "build", "created", "on disk", "head reads"), rows,
                 title=f"{report['name']}: lineage of {report['head']}",
                 left=("build", "created"))
    pinned = {
        True: "pins: every build the head reads matches its pin",
        False: "pins: none (unpinned: ancestors trusted by id)",
        None: "pins: not checked (the head's build.json cannot be read)",
    }[report["pinned"]]
    errors = [f"{r['build_id']}: {r['error']}" for r in report["generations"] if "error" in r]
    if report["pin_errors"]:
        pinned = "pins: FAILED"
    return "\n".join([text, pinned, *report["pin_errors"], *errors])


def cmd_rm(args: argparse.Namespace) -> int:
    from fcsnap.store.backends.stores import open_store
    from fcsnap.store.operations.gc import remove_names

    for row in remove_names(open_store(args.store), args.names):
        if not args.quiet:
            print(f"removed {row['name']} (was {row['head']})")
    return 0


def _duration(text: str) -> float:
    """An argparse type for --grace (0, 90s, 30m, 1h, 2d)."""
    from fcsnap.errors import FcsnapError
    from fcsnap.units import parse_duration

    try:
        return parse_duration(text, "--grace")
    except FcsnapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fraction_arg(text: str) -> float:
    """An argparse type for --repack-below: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"invalid --repack-below {text!r}: a fraction in (0, 1]")
    return value


def cmd_gc(args: argparse.Namespace) -> int:
    from fcsnap.store.backends.stores import open_store
    from fcsnap.store.operations.gc import collect

    report = collect(open_store(args.store), args.grace, args.dry_run, args.repack_below)
    if args.json:
        print_json(report)
    else:
        print(render_gc(report))
    return 0


def render_gc(report: dict[str, Any]) -> str:
    from fcsnap.units import format_bytes, plural

    dry = report["dry_run"]
    lines = []
    for row in report["repacked"]:
        if "skipped" in row:
            lines.append(f"not repacked {row['name']}: {row['skipped']}")
            continue
        target = "" if dry else (
            f" as {row['new_head']} ({format_bytes(row['new_head_disk_bytes'])})"
        )
        lines.append(
            f"{'would repack' if dry else 'repacked'} {row['name']} (its head read "
            f"{row['live_fraction']:.1%} of its lineage){target}"
        )
    deleted = report["would_delete" if dry else "deleted"]
    for row in deleted:
        lines.append(
            f"{'would delete' if dry else 'deleted'} build {row['build_id']} "
            f"({format_bytes(row['disk_bytes'])})"
        )
    for row in report["kept"]:
        lines.append(f"kept unreferenced build {row['build_id']}: {row['reason']}")
    for name in report["leftovers"]:
        lines.append(f"{'would remove' if dry else 'removed'} leftover {name}")
    for lease in report.get("stale_leases", ()):
        lines.append(
            f"ignored stale lease {lease['lease']} ({lease['holder']}, not refreshed for "
            f"{lease['age_s']:g}s, expires after {lease['expires_after_s']:g}s)"
            f"{'' if dry else '; removed'}"
        )
    freed = report["bytes_to_free" if dry else "bytes_freed"]
    after = report["after"]
    amp = "-" if after["amplification"] is None else f"{after['amplification']:.2f}x"
    written = sum(r.get("new_head_disk_bytes", 0) for r in report["repacked"])
    repack = f", repacks wrote {format_bytes(written)}" if written else ""
    lines.append(
        f"{'would free' if dry else 'freed'} {format_bytes(freed)} in "
        f"{plural(len(deleted), 'build')}{repack}; {format_bytes(after['disk_bytes'])} on disk "
        f"(space amplification {amp})"
    )
    return "\n".join(lines)


def cmd_ws_merge(args: argparse.Namespace) -> int:
    from fcsnap.workingset import merge_working_set_files

    runs = len(args.files)
    if args.min_runs is not None and not 1 <= args.min_runs <= runs:
        usage_error(f"argument --min-runs: must be between 1 and {runs}, the number of WS files",
                    f"{PROG} ws merge")
    pages = merge_working_set_files(args.files, args.min_runs, args.output)
    if not args.quiet:
        kept = f"in at least {args.min_runs}" if args.min_runs is not None else "in all"
        print(f"fcsnap: {args.output}: {pages} pages seen {kept} of {runs} runs",
              file=sys.stderr)
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    """push and pull: the same copy of a lineage between two stores."""
    from fcsnap.store.backends.stores import open_store
    from fcsnap.store.operations.transfer import copy_lineage
    from fcsnap.units import format_bytes, plural

    report = copy_lineage(args.build, open_store(args.source), open_store(args.dest), args.verb)
    if args.json:
        print_json(report)
    elif not args.quiet:
        copied = [b for b in report["builds"] if b["copied"]]
        print(
            f"{args.verb}ed {report['name'] or report['head']}: "
            f"{plural(len(copied), 'build')} copied ({format_bytes(report['bytes_copied'])}), "
            f"{len(report['builds']) - len(copied)} already there"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fcsnap.demo import run_demo

    run_demo(args.threads)
    return 0


# -- the parser ------------------------------------------------------------------------------

DESCRIPTION = "Firecracker memory snapshots: pack into a generational store, restore lazily."
EPILOG = (
    "Run 'fcsnap COMMAND --help' for a command's options. Exit status: 0 done, 1 a runtime\n"
    "failure (one line 'fcsnap: error: ...'), 2 a usage error, 130 interrupted."
)
RESTORE_TEXT = """\
Serve BUILD's memory to one Firecracker VM over userfaultfd, lazily.

Exits 0 when the VM exits. SIGTERM/SIGINT also exit 0, killing the VM unless every
page is already in place (a VM whose page server is gone would freeze at its next
fault). With --firecracker-api, a load Firecracker refuses (or never answers) exits 1,
killing the VM if it connected."""


def _command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], text: str
) -> argparse.ArgumentParser:
    summary = text.split("\n", 1)[0]
    sub = commands.add_parser(
        name, help=summary, description=text, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub.set_defaults(handler=handler)
    # Also after the command; SUPPRESS keeps a --debug given before it from being reset.
    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                     help="Show the traceback of a failure.")
    return sub


def _add_build_options(sub: argparse.ArgumentParser) -> None:
    """The options of every command that writes a build from a memory file."""
    sub.add_argument("--compress", default="none", type=_value("parse_compression"),
                     metavar="none|zstd|zstd:LEVEL", help="Compression of the diff (none).")
    sub.add_argument("--frame-size", default="256K", type=_value("parse_frame_size"),
                     metavar="SIZE", help="Uncompressed bytes per zstd frame (256K).")
    sub.add_argument("--vmstate", type=Path, metavar="FILE",
                     help="Firecracker vmstate file, kept in the build as snapfile.")
    sub.add_argument("--working-set", type=Path, metavar="FILE",
                     help="Store these pages first, in this order (restore --record-ws), so "
                          "that restore --prefetch-ws reads the diff sequentially.")


def _add_store(sub: argparse.ArgumentParser, option: str = "--store", what: str = "The store",
               dest: str | None = None) -> None:
    sub.add_argument(option, required=True, metavar="STORE", dest=dest or option[2:],
                     help=f"{what}: a directory, or s3://BUCKET/PREFIX.")


def _add_write_options(sub: argparse.ArgumentParser) -> None:
    """--store, --name, --quiet and --json of the commands that write a build."""
    _add_store(sub)
    sub.add_argument("--name", metavar="NAME", help="Point vms/NAME at the new build.")
    _add_quiet(sub)
    _add_json(sub)


def _add_quiet(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("-q", "--quiet", action="store_true", help="No progress bar or summary.")


def _add_json(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="Print one JSON object.")


def _add_store_of_build(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--store", metavar="STORE",
                     help="Store holding BUILD: a directory, or s3://BUCKET/PREFIX (not needed "
                          "for a build directory).")


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="Show the traceback of a failure.")
    parser.add_argument("--version", action="version", version=f"fcsnap {__version__}")
    commands = parser.add_subparsers(
        dest="command", title="commands", metavar="COMMAND", parser_class=Parser, required=True
    )

    sub = _command(commands, "inspect", cmd_inspect, "Show a header: metadata, the builds it "
                   "reads, its mappings, and lookups.")
    sub.add_argument("target", metavar="BUILD|HEADER",
                     help="Build directory, build id, VM name, or any memfile.header.")
    _add_store_of_build(sub)
    sub.add_argument("--mappings", action="store_true", help="List every mapping.")
    sub.add_argument("--at", action="append", default=[], type=_value("parse_offset"),
                     metavar="OFFSET", help="Which build serves this byte? (repeatable)")
    _add_json(sub)

    sub = _command(commands, "pack", cmd_pack, "Pack a memory file as generation 0 of a new "
                   "lineage.")
    sub.add_argument("memfile", type=Path, metavar="MEMFILE", help="Firecracker memory file.")
    sub.add_argument("--block-size", default="4K", type=_value("parse_block_size"),
                     metavar="4K|2M", help="4K (the default), or 2M for hugepage guests.")
    _add_build_options(sub)
    _add_write_options(sub)

    sub = _command(commands, "diff", cmd_diff, "Store what changed since BASE (the parent) as "
                   "the next generation.")
    sub.add_argument("memfile", type=Path, metavar="MEMFILE",
                     help="Firecracker memory file of the next snapshot.")
    sub.add_argument("--base", required=True, metavar="BUILD",
                     help="The parent build: directory, id or VM name.")
    holes = sub.add_mutually_exclusive_group()
    holes.add_argument("--sparse-diff", action="store_true",
                       help="MEMFILE is a Firecracker Diff snapshot: holes are unchanged pages, "
                            "not zeros.")
    holes.add_argument("--holes-are-zeros", action="store_true",
                       help="MEMFILE's holes are zeros (a sparse copy of a Full snapshot). "
                            "Without either option, holes over pages the base holds as data "
                            "are refused.")
    sub.add_argument("--written", type=Path, metavar="FILE",
                     help="MEMFILE is a Full snapshot of a VM restored from BASE and this its "
                          "written set (restore --written): read only those pages.")
    sub.add_argument("--block-size", type=_value("parse_block_size"), metavar="4K|2M",
                     help="Must match the base build's (the default).")
    _add_build_options(sub)
    _add_write_options(sub)

    sub = _command(commands, "import", cmd_import, "Import an E2B/Wrenn lineage: one build "
                   "per generation, with E2B's build ids.")
    sub.add_argument("src", type=Path, metavar="SRC",
                     help="The newest E2B/Wrenn build directory (<build_id>/memfile.header and "
                          "its memfile, memfile.zstd or memfile.lz4), its ancestors beside it.")
    sub.add_argument("--compress", default="none", type=_value("parse_compression"),
                     metavar="none|zstd|zstd:LEVEL", help="Compression of the diffs (none).")
    _add_write_options(sub)

    sub = _command(commands, "export", cmd_export, "Write BUILD's lineage as an E2B store "
                   "(version-4 headers) in OUTDIR.")
    sub.add_argument("build", metavar="BUILD", help="Build directory, build id or VM name.")
    _add_store(sub)
    sub.add_argument("-o", "--output", required=True, type=Path, metavar="OUTDIR",
                     help="Directory of the E2B store: <build_id>/memfile.header and its data.")
    sub.add_argument("--compress", default="none", type=_value("parse_compression"),
                     metavar="none|zstd|zstd:LEVEL",
                     help="memfile (none) or memfile.zstd in 2 MiB frames.")
    _add_quiet(sub)

    sub = _command(commands, "squash", cmd_squash, "Flatten BUILD into a new generation 0 with "
                   "the same content and no ancestors.")
    sub.add_argument("build", metavar="BUILD", help="Build directory, build id or VM name.")
    _add_write_options(sub)

    sub = _command(commands, "unpack", cmd_unpack, "Rebuild the full memory file of BUILD "
                   "(sparse where zero).")
    sub.add_argument("build", metavar="BUILD", help="Build directory, build id or VM name.")
    sub.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                     help="Memory file to write.")
    _add_store_of_build(sub)
    sub.add_argument("--force", action="store_true", help="Replace an existing output file.")
    _add_quiet(sub)

    sub = _command(commands, "verify", cmd_verify, "Check BUILD and every build it reads: "
                   "files, sizes, and every block's hash.")
    sub.add_argument("build", metavar="BUILD", help="Build directory, build id or VM name.")
    _add_store_of_build(sub)
    _add_quiet(sub)
    _add_json(sub)

    sub = _command(commands, "restore", cmd_restore, RESTORE_TEXT)
    _restore_options(sub)

    sub = _command(commands, "serve", cmd_serve, "Run the restore daemon: many VMs served at "
                   "once, each build opened once for all.\n\nHTTP/1.1 with JSON on the Unix "
                   "socket --api: POST /restores, GET /restores[/ID],\nDELETE /restores/ID, GET "
                   "/metrics, GET /healthz. SIGTERM/SIGINT end every restore as\nthey end "
                   "'restore' and exit 0.")
    _add_store(sub)
    sub.add_argument("--api", type=Path, required=True, metavar="PATH",
                     help="The API's Unix socket.")
    sub.add_argument("--cache-mb", type=int, default=256, metavar="N",
                     help="Memory for diff data, for every build and VM together (256).")
    sub.add_argument("--preload", nargs="+", action="extend", default=[], metavar="BUILD",
                     help="Open these builds (name, id or directory) before the API listens "
                     "and keep them open until the daemon stops: no POST waits for opening "
                     "them (gc cannot remove them meanwhile).")
    _add_fetch_options(sub)
    sub.add_argument("--reactors", type=int, default=None, metavar="N",
                     help="Threads serving the VMs, each any number of them (one per CPU "
                          "the daemon may use).")
    sub.add_argument("--output-dir", type=Path, metavar="DIR",
                     help="Requests may have stats and record_ws files written under DIR "
                          "(none elsewhere; without this option, none at all).")
    sub.add_argument("--max-api-connections", type=int, default=64, metavar="N",
                     help="API connections served at once; more are answered 503 (64).")
    _add_socket_access(sub, "API socket", "call the API")

    sub = _command(commands, "checkpoint", cmd_checkpoint, "The next generation of a VM a "
                   "daemon serves with track_writes, from the pages it wrote.\n\nThe VM must be "
                   "paused (the daemon pauses and resumes it itself when the restore has\n"
                   "firecracker_api); the pages written since the last checkpoint are read from "
                   "its memory\nand stored as a diff over that checkpoint (at first: the build "
                   "served), published as NAME.")
    sub.add_argument("restore", metavar="ID", help="The restore's id (as restore --daemon "
                     "printed it).")
    sub.add_argument("--daemon", type=Path, required=True, metavar="API",
                     help="The daemon's API socket.")
    sub.add_argument("--name", required=True, metavar="NAME",
                     help="The name to publish the checkpoint under.")

    for verb, text in (
        ("push", "Copy a build and every build it reads to another store (a NAME is published "
                 "there too).\n\nBuilds already there are kept (checked against the head's "
                 "pins); every build copied is\nchecked, block by block, before it becomes "
                 "visible."),
        ("pull", "The same copy as push, for who thinks of it from the receiving side."),
    ):
        sub = _command(commands, verb, cmd_copy, text)
        sub.set_defaults(verb=verb)
        sub.add_argument("build", metavar="NAME|BUILD", help="What to copy, with its lineage.")
        _add_store(sub, "--from", "Store to copy from", dest="source")
        _add_store(sub, "--to", "Store to copy to", dest="dest")
        _add_quiet(sub)
        _add_json(sub)

    sub = _command(commands, "ls", cmd_ls, "List the store's names (or every build, or one "
                   "name's lineage) and the bytes they hold.\n\nA build's live fraction is the "
                   "share of its stored bytes some name's head still reads.")
    sub.add_argument("name", nargs="?", metavar="NAME", help="Show this name's lineage.")
    _add_store(sub)
    sub.add_argument("--builds", action="store_true",
                     help="List every build: size, readers, live fraction.")
    _add_json(sub)

    sub = _command(commands, "rm", cmd_rm, "Remove names (never builds: 'fcsnap gc' deletes "
                   "the builds no name reads any more).\n\nEither every NAME is removed or, when "
                   "one does not exist, none.")
    sub.add_argument("names", nargs="+", metavar="NAME", help="Names to remove.")
    _add_store(sub)
    _add_quiet(sub)

    sub = _command(commands, "gc", cmd_gc, "Delete every build no name's head reads, and what "
                   "killed commands left behind.\n\nA build only an older generation of a name "
                   "read is garbage once no head reads it. Builds another command is using\n"
                   "(restore, a diff's base, a build not yet named) are kept.")
    _add_store(sub)
    sub.add_argument("--dry-run", action="store_true",
                     help="List what would be deleted and the bytes freed; change nothing.")
    sub.add_argument("--grace", default=3600.0, type=_duration, metavar="DURATION",
                     help="Keep unreferenced builds younger than this (0, 90s, 30m, 1h, 2d; 1h).")
    sub.add_argument("--repack-below", type=_fraction_arg, metavar="FRACTION",
                     help="First squash every name whose head reads less than FRACTION of the "
                          "bytes its lineage stores, so the partly dead builds become garbage.")
    _add_json(sub)

    ws = commands.add_parser("ws", help="Working-set files (restore --record-ws).",
                             description="Working-set files (restore --record-ws).")
    ws_commands = ws.add_subparsers(dest="ws_command", title="commands", metavar="COMMAND",
                                    parser_class=Parser, required=True)
    sub = _command(ws_commands, "merge", cmd_ws_merge, "Merge working sets recorded on several "
                   "runs of one guest: the pages seen in at least K of them, each at its mean "
                   "position in the runs that saw it.")
    sub.add_argument("files", nargs="+", type=Path, metavar="WS", help="Recorded working sets.")
    sub.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                     help="The merged working set.")
    sub.add_argument("--min-runs", type=int, metavar="K",
                     help="Keep pages seen in at least K of the runs (default: all, the "
                          "intersection).")
    _add_quiet(sub)

    sub = _command(commands, "demo", cmd_demo, "Pack, diff, inspect and lazily restore a "
                   "bundled snapshot, checking every byte.")
    sub.add_argument("--threads", type=int, default=4, metavar="N",
                     help="Faulting threads in the stand-in VM (4).")
    return parser


def _restore_options(sub: argparse.ArgumentParser) -> None:
    add = sub.add_argument
    add("--vm", required=True, metavar="BUILD", help="Build to serve: directory, id or VM name.")
    add("--socket", type=Path, required=True, metavar="PATH",
        help="Unix socket Firecracker connects to.")
    _add_store_of_build(sub)
    add("--stats", type=Path, metavar="FILE", help="Write serving statistics (JSON).")
    add("--verify", action="store_true",
        help="Check every block against its hash before installing it.")
    add("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
        help="Seconds a connected VM has to send its regions (10).")
    add("--cache-mb", type=int, default=64, metavar="N",
        help="Memory for diff data: decompressed frames (zstd), mapped pages (raw) (64).")
    add("--fault-around", default="adaptive", metavar="SIZE|adaptive",
        help="Install this much contiguous memory around a fault in one copy (0: one page); "
             "adaptive (the default): grow the window while the guest reads in order, one "
             "page when it scatters.")
    add("--record-ws", type=Path, metavar="FILE",
        help="Write the pages the guest faulted, in order (working set).")
    add("--prefetch-ws", type=Path, metavar="FILE",
        help="Install this working set right after the handshake.")
    add("--populate", action="store_true",
        help="Then install every other page in the background.")
    add("--eager", action="store_true", help="Install every page before serving any fault.")
    add("--track-writes", action="store_true",
        help="Track the pages the guest writes: register its memory for write-protect too "
             "(memory Firecracker registered MISSING|WP is tracked without it).")
    add("--written", type=Path, metavar="FILE",
        help="Write the pages the guest wrote (the written set, for diff --written) when the "
             "restore ends; implies --track-writes.")
    add("--firecracker-api", type=Path, metavar="SOCK",
        help="Firecracker's API socket: once listening, have it load the snapshot from us "
             "(PUT /snapshot/load, resuming the VM). Paths are sent absolute.")
    add("--vmstate", type=Path, metavar="FILE",
        help="vmstate file Firecracker loads (default: the build's snapfile).")
    add("--track-dirty-pages", action="store_true",
        help="Have the loaded VM track dirty pages.")
    add("--api-timeout", type=float, default=30.0, metavar="SECONDS",
        help="Seconds Firecracker has to answer the snapshot load (30).")
    _add_socket_access(sub, "socket", "connect")
    _add_fetch_options(sub)
    add("--daemon", type=Path, metavar="API",
        help="Ask the 'fcsnap serve' daemon at this API socket to serve the VM (BUILD is in "
             "the daemon's store); print the restore's id and exit 0 once the socket listens "
             "(with --firecracker-api, once Firecracker has loaded the snapshot; exit 1 with "
             "its message if it refused).")
    _add_quiet(sub)


def _add_fetch_options(sub: argparse.ArgumentParser) -> None:
    """--cache-dir, --cache-size, --fetch-timeout: serving a store in S3 (restore, serve)."""
    add = sub.add_argument
    add("--cache-dir", type=Path, metavar="DIR",
        help="S3 stores: the host chunk cache (default ~/.cache/fcsnap/chunks).")
    add("--cache-size", default="10G", type=_value("parse_cache_size"), metavar="SIZE",
        help="S3 stores: the most the chunk cache holds (10G).")
    add("--fetch-timeout", type=float, default=30.0, metavar="SECONDS",
        help="S3 stores: seconds a fetch may take, retries included; then the VM is killed "
             "(30).")
    add("--lazy-fetch", action="store_true",
        help="S3 stores: fetch only what faults, fault-around and --prefetch-ws read (by "
             "default the rest of what the build reads of its raw diffs follows in the "
             "background).")


def _add_socket_access(sub: argparse.ArgumentParser, what: str, verb: str) -> None:
    """--socket-owner, --socket-mode, --allow-uid: who may use a socket (restore's, serve's)."""
    add = sub.add_argument
    add("--socket-owner", metavar="UID[:GID]",
        help=f"Give the {what} file to this user (and group), e.g. a jailed Firecracker's; "
             f"that uid may {verb} too.")
    add("--socket-mode", metavar="MODE",
        help=f"The {what} file's permissions, octal (0600).")
    add("--allow-uid", action="append", default=[],
        metavar="UID", help="Also admit connections from this uid (repeatable). Admitted "
                            "always: this process's uid and the --socket-owner's.")


# -- entry point -----------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    """Parse and run one command; return its exit status. Raises what the command raised."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        _state["debug"] = True
    return args.handler(args)


_state = {"debug": os.environ.get("FCSNAP_DEBUG") == "1"}

# Commands whose process ends at once when they succeed (see _end_now).
END_NOW = frozenset({"pack", "diff", "squash"})


def _end_now(status: int) -> NoReturn:
    """End the process without tearing the interpreter down: freeing every object of numpy
    and of the interpreter costs a build command about a tenth of its time, and no one waits
    for it. Exit handlers run first and output is flushed; with a thread of ours still
    running, the ordinary exit waits for it instead."""
    import atexit
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(status)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console entry point: one clear line and exit 1 for runtime failures, 2 for usage."""
    from fcsnap.errors import FcsnapError, UsageError, redact

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        status = run(argv)
        sys.stdout.flush()
        if argv is None and _command_name(argv) in END_NOW:  # the process's own command line
            _end_now(status)
    except UsageError as e:
        _traceback()
        usage_error(redact(str(e)), f"{PROG} {_command_name(argv)}".rstrip())
    except (FcsnapError, OSError) as e:
        if isinstance(e, BrokenPipeError) and _reader_gone():
            # `fcsnap inspect ... | head`: the reader has what it wanted; nothing to report.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        _traceback()
        if isinstance(e, FcsnapError):
            message = str(e)
        else:  # an OSError of a write has no file name: then say what was being done
            message = f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}"
        print(f"{PROG}: error: {redact(message)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        sys.exit(TERMINATED if terminated else INTERRUPTED)
    except Exception as e:  # a bug: still one line, and the traceback on request
        _traceback()
        print(
            f"{PROG}: error: internal error ({type(e).__name__}: {redact(str(e))}); "
            "run with --debug or FCSNAP_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(status)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (a broken pipe of a socket, say to
    Firecracker, is a failure to report)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _traceback() -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exc()


def _command_name(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    return next((w for w in words if not w.startswith("-")), "")
