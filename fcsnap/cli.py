"""The `fcsnap` command line. Commands stay thin: they parse options and render results.

Every runtime failure is an FcsnapError (or OSError) and becomes one line on stderr with exit
status 1; `--debug` or FCSNAP_DEBUG=1 shows the traceback instead. Usage errors exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from fcsnap import __version__
from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.inspection import inspect_report
from fcsnap.progress import progress_bar
from fcsnap.store import ops
from fcsnap.store.builder import BuildOptions
from fcsnap.store.layout import HEADER
from fcsnap.store.manifest import Manifest, read_manifest
from fcsnap.store.names import check_vm_name
from fcsnap.store.stores import Store, current_head, open_optional, open_store, resolve
from fcsnap.units import format_bytes, parse_size

if TYPE_CHECKING:
    from fcsnap.uffd.listener import SocketAccess

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring lines join into paragraphs, as in --help text
    help="Firecracker memory snapshots: pack into a generational store, restore lazily.",
)
out = Console(soft_wrap=True)
_state = {"debug": os.environ.get("FCSNAP_DEBUG") == "1"}


def _version(value: bool) -> None:
    if value:
        print(f"fcsnap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    if debug:
        _state["debug"] = True


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _header_arg(arg: str, store: Store | None) -> tuple[Path, Path | None]:
    """Resolve BUILD|HEADER to a header file and the store around it (if any). A path that
    exists and is not a directory is a header file, whatever else it is: reading it says."""
    path = Path(arg)
    if path.exists() and not path.is_dir() and (store is None or "/" in arg):
        return path, path.parent.parent if path.name == HEADER else None
    build = resolve(arg, store)
    return build / HEADER, build.parent


@app.command()
def inspect(
    target: str = typer.Argument(..., metavar="BUILD|HEADER"),
    store_url: str | None = typer.Option(
        None, "--store", help="Store holding BUILD: a directory or s3://BUCKET/PREFIX."
    ),
    mappings: bool = typer.Option(False, "--mappings", help="List every mapping run."),
    at: list[str] = typer.Option(
        [], "--at", metavar="OFFSET", help="Which build serves this byte? (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a header: metadata, the builds it reads, its runs, and lookups."""
    header_path, around = _header_arg(target, open_optional(store_url))
    header = load_header(header_path)
    offsets = [parse_size(text, what="offset") for text in at]
    report = inspect_report(header, around, mappings, offsets)
    if as_json:
        print_json(report)
        return
    render_inspect(report)


def render_inspect(report: dict[str, Any]) -> None:
    meta = report["metadata"]
    table = Table(title="Header", show_header=False)
    for key in ("version", "generation", "build_id", "base_build_id"):
        table.add_row(key, str(meta[key]))
    table.add_row("block_size", format_bytes(meta["block_size"]))
    table.add_row("size", f"{format_bytes(meta['size'])} ({meta['size']} bytes)")
    table.add_row("mappings", str(report["mapping_count"]))
    if "pinned" in report:
        unpinned = "no (unpinned: ancestors trusted by id)"
        table.add_row("pinned", "yes" if report["pinned"] else unpinned)
    out.print(table)
    builds = Table(title="Builds read by this generation")
    for col in ("build", "generation", "runs", "blocks", "bytes", "share"):
        if col == "build":
            builds.add_column(col, no_wrap=True, min_width=36)
        else:
            builds.add_column(col, justify="right")
    for row in report["builds"]:
        gen = "?" if row["generation"] is None else str(row["generation"])
        builds.add_row(
            row["build_id"], gen, str(row["mappings"]), str(row["blocks"]),
            format_bytes(row["bytes"]), f"{row['share']:.1%}",
        )
    zero = report["zero"]
    builds.add_row(
        "(zeros)", "", str(zero["mappings"]), "", format_bytes(zero["bytes"]),
        f"{zero['share']:.1%}",
    )
    out.print(builds)
    if "mappings" in report:
        out.print(_hex_table("Mappings", ("offset", "length", "build", "storage offset"), (
            (f"{m['offset']:#x}", f"{m['length']:#x}", m["build_id"],
             f"{m['build_storage_offset']:#x}")
            for m in report["mappings"]
        )))
    if "lookups" in report:
        columns = ("offset", "build", "storage offset", "bytes left in run")
        out.print(_hex_table("Lookups", columns, (
            (f"{r['offset']:#x}", r["build_id"], f"{r['storage_offset']:#x}",
             str(r["remaining_length"]))
            for r in report["lookups"]
        )))


def _hex_table(title: str, columns: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> Table:
    """A table of offsets and sizes: numbers right-aligned, the build id left."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "build" else "right")
    for row in rows:
        table.add_row(*row)
    return table


def parse_compression(text: str) -> tuple[str, int]:
    """'none', 'zstd' or 'zstd:LEVEL' -> (compression, level)."""
    kind, _, level = text.partition(":")
    if kind == "none" and not level:
        return "none", 3
    if kind == "zstd":
        try:
            value = int(level) if level else 3
        except ValueError:
            value = 0
        if not 1 <= value <= 22:
            raise FcsnapError(f"invalid zstd level in {text!r}: use 1 to 22")
        return "zstd", value
    raise FcsnapError(f"invalid --compress {text!r}: use none, zstd or zstd:LEVEL")


def build_options(
    block_size: str, compress: str, frame_size: str, name: str | None, vmstate: Path | None,
    working_set: Path | None = None,
) -> BuildOptions:
    bs = parse_size(block_size, "block size")
    if bs not in (4096, 2 << 20):
        raise FcsnapError(f"invalid --block-size {block_size!r}: use 4K or 2M")
    if name is not None:
        check_vm_name(name)  # before anything else: a bad name costs nothing
    compression, level = parse_compression(compress)
    frame = parse_size(frame_size, "frame size")
    if frame < 4096 or frame % 4096 or frame > 1 << 30:
        raise FcsnapError(f"invalid --frame-size {frame_size!r}: a multiple of 4K up to 1G")
    return BuildOptions(bs, compression, level, frame, name, vmstate, working_set=working_set)


def name_head(
    store: Store, name: str | None, build_arg: str | None = None, build_dir: Path | None = None
) -> uuid.UUID | None:
    """The build `name` points at as the command starts (None: no such name): publishing the
    name at the end is a compare-and-swap against it. When the command's BUILD argument is
    that same name, it is the build the argument resolved to, not a second look."""
    if name is None:
        return None
    if build_arg == name and build_dir is not None:
        return uuid.UUID(build_dir.name)
    return current_head(store, name)


def report_build(manifest: Manifest, path: Path | str, as_json: bool, verb: str) -> None:
    data = manifest.to_json()
    data["path"] = str(path)
    if as_json:
        print_json(data)
        return
    s = manifest.stats
    out.print(
        f"[bold]{verb}[/bold] build {manifest.build_id} (generation {manifest.generation}) "
        f"at {path}"
    )
    out.print(
        f"  blocks: {s.blocks_total} total, {s.blocks_stored} stored, {s.blocks_zero} zero, "
        f"{s.blocks_deduplicated} deduplicated, {s.blocks_inherited} inherited"
    )
    out.print(
        f"  diff: {format_bytes(s.bytes_stored)} of blocks, {format_bytes(s.bytes_written)} "
        f"on disk ({manifest.compression}) for {format_bytes(manifest.size)} of memory"
    )


BLOCK_SIZE = typer.Option("4K", "--block-size", help="4K, or 2M for hugepage guests.")
COMPRESS = typer.Option("none", "--compress", help="none, zstd or zstd:LEVEL.")
FRAME_SIZE = typer.Option("256K", "--frame-size", help="Uncompressed bytes per zstd frame.")
NAME = typer.Option(None, "--name", help="Point vms/NAME at the new build.")
VMSTATE = typer.Option(None, "--vmstate", help="Firecracker vmstate file, kept as snapfile.")
WORKING_SET = typer.Option(
    None, "--working-set",
    help="Store these pages first, in this order (restore --record-ws), so that restore "
    "--prefetch-ws reads the diff sequentially.",
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
JSON = typer.Option(False, "--json", help="Print one JSON object.")
STORE = typer.Option(..., "--store", help="The store: a directory, or s3://BUCKET/PREFIX.")


@app.command()
def pack(
    memfile: Path = typer.Argument(..., help="Firecracker memory file."),
    store_url: str = STORE,
    block_size: str = BLOCK_SIZE,
    compress: str = COMPRESS,
    frame_size: str = FRAME_SIZE,
    name: str | None = NAME,
    vmstate: Path | None = VMSTATE,
    working_set: Path | None = WORKING_SET,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Pack a memory file as generation 0 of a new lineage."""
    store = open_store(store_url)
    options = build_options(block_size, compress, frame_size, name, vmstate, working_set)
    options = replace(options, name_expected=name_head(store, name), verb="pack")
    total = memfile.stat().st_size if memfile.is_file() else 0
    with progress_bar("pack", total, quiet or as_json) as advance:
        manifest, path = ops.pack(memfile, store, options, advance)
    report_build(manifest, path, as_json, "packed")


@app.command()
def diff(
    memfile: Path = typer.Argument(..., help="Firecracker memory file of the next snapshot."),
    base: str = typer.Option(..., "--base", help="Parent build: directory, id or VM name."),
    store_url: str = STORE,
    sparse_diff: bool = typer.Option(
        False, "--sparse-diff",
        help="MEMFILE is a Firecracker Diff snapshot: holes are unchanged pages, not zeros.",
    ),
    block_size: str | None = typer.Option(
        None, "--block-size", help="Must match the base build's (the default)."
    ),
    compress: str = COMPRESS,
    frame_size: str = FRAME_SIZE,
    name: str | None = NAME,
    vmstate: Path | None = VMSTATE,
    working_set: Path | None = WORKING_SET,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Store what changed since BASE as the next generation."""
    store = open_store(store_url)
    if name is not None:
        check_vm_name(name)  # before anything else: a bad name costs nothing
    base_dir = resolve(base, store, lazy=sparse_diff)
    base_block_size = read_manifest(base_dir).block_size
    options = build_options(
        block_size or str(base_block_size), compress, frame_size, name, vmstate, working_set
    )
    options = replace(options, name_expected=name_head(store, name, base, base_dir), verb="diff")
    if options.block_size != base_block_size:
        raise FcsnapError(
            f"--block-size {block_size} differs from the base build's {base_block_size}"
        )
    total = memfile.stat().st_size if memfile.is_file() else 0
    with progress_bar("diff", total, quiet or as_json) as advance:
        manifest, path = ops.diff(memfile, base_dir, store, options, sparse_diff, advance)
    report_build(manifest, path, as_json, "diffed")


@app.command()
def squash(
    build: str = typer.Argument(..., metavar="BUILD"),
    store_url: str = STORE,
    name: str | None = NAME,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Flatten BUILD into a new generation 0 with the same content and no ancestors."""
    store = open_store(store_url)
    if name is not None:
        check_vm_name(name)  # before anything else: a bad name costs nothing
    build_dir = resolve(build, store, lazy=True)
    source = read_manifest(build_dir)
    options = BuildOptions(
        block_size=source.block_size,
        compression=source.compression,
        level=source.compression_level or 3,
        frame_size=source.frame_size or BuildOptions.frame_size,
        name=name,
        name_expected=name_head(store, name, build, build_dir),
        verb="squash",
    )
    with progress_bar("squash", source.size, quiet or as_json) as advance:
        manifest, path = ops.squash(build_dir, store, options, advance)
    report_build(manifest, path, as_json, "squashed")


@app.command()
def unpack(
    build: str = typer.Argument(..., metavar="BUILD"),
    output: Path = typer.Option(..., "-o", "--output", help="Memory file to write."),
    store_url: str | None = typer.Option(
        None, "--store", help="Store holding BUILD: a directory or s3://BUCKET/PREFIX."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    quiet: bool = QUIET,
) -> None:
    """Rebuild the full memory file of BUILD (sparse where zero)."""
    build_dir = resolve(build, open_optional(store_url), lazy=True)
    header = load_header(build_dir)
    data = sum(m.length for m in header.mappings if not m.is_zero)
    with progress_bar("unpack", data, quiet) as advance:
        ops.unpack(build_dir, output, force, advance)
    if not quiet:
        out.print(f"wrote {output} ({format_bytes(header.metadata.size)})")


@app.command()
def verify(
    build: str = typer.Argument(..., metavar="BUILD"),
    store_url: str | None = typer.Option(
        None, "--store", help="Store holding BUILD: a directory or s3://BUCKET/PREFIX."
    ),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Check BUILD and every build it reads: files, sizes, and every block's hash."""
    build_dir = resolve(build, open_optional(store_url), data=True)
    total = sum(
        read_manifest(build_dir.parent / str(b)).stats.bytes_stored
        for b in load_header(build_dir).build_ids()
        if (build_dir.parent / str(b)).is_dir()
    )
    with progress_bar("verify", total, quiet or as_json) as advance:
        result = ops.verify(build_dir, advance)
    if as_json:
        print_json(result)
    elif not quiet:
        out.print(
            f"[green]ok[/green]: build {result['build_id']} (generation {result['generation']}), "
            f"{result['builds_checked']} builds, {result['blocks_checked']} blocks checked"
            + ("" if result["pinned"] else " (unpinned: ancestors are trusted by id)")
        )


@app.command()
def restore(
    vm: str = typer.Option(..., "--vm", metavar="BUILD", help="Build to serve: dir, id or name."),
    socket_path: Path = typer.Option(..., "--socket", help="Unix socket Firecracker connects to."),
    store_url: str | None = typer.Option(
        None, "--store", help="Store holding BUILD: a directory or s3://BUCKET/PREFIX."
    ),
    stats: Path | None = typer.Option(None, "--stats", help="Write serving statistics (JSON)."),
    verify_pages: bool = typer.Option(
        False, "--verify", help="Check every block against its hash before installing it."
    ),
    handshake_timeout: float = typer.Option(
        10.0, "--handshake-timeout", help="Seconds a connected VM has to send its regions."
    ),
    cache_mb: int = typer.Option(
        64, "--cache-mb",
        help="Memory for diff data: decompressed frames (zstd), mapped pages (raw).",
    ),
    fault_around: str = typer.Option(
        "256K", "--fault-around",
        help="Install up to this much contiguous memory around a fault in one copy (0: off).",
    ),
    record_ws: Path | None = typer.Option(
        None, "--record-ws", help="Write the pages the guest faulted, in order (working set)."
    ),
    prefetch_ws: Path | None = typer.Option(
        None, "--prefetch-ws", help="Install this working set right after the handshake."
    ),
    populate: bool = typer.Option(
        False, "--populate", help="Then install every other page in the background."
    ),
    eager: bool = typer.Option(
        False, "--eager", help="Install every page before serving any fault."
    ),
    firecracker_api: Path | None = typer.Option(
        None, "--firecracker-api", metavar="SOCK",
        help="Firecracker's API socket: once listening, have it load the snapshot from us "
        "(PUT /snapshot/load, resuming the VM). Paths are sent absolute.",
    ),
    vmstate: Path | None = typer.Option(
        None, "--vmstate", help="vmstate file Firecracker loads (default: the build's snapfile)."
    ),
    track_dirty_pages: bool = typer.Option(
        False, "--track-dirty-pages", help="Have the loaded VM track dirty pages."
    ),
    api_timeout: float = typer.Option(
        30.0, "--api-timeout", help="Seconds Firecracker has to answer the snapshot load."
    ),
    socket_owner: str | None = typer.Option(
        None, "--socket-owner", metavar="UID[:GID]",
        help="Give the socket to this user (and group), e.g. a jailed Firecracker's; that uid "
        "may connect too.",
    ),
    socket_mode: str = typer.Option(
        "0600", "--socket-mode", metavar="MODE", help="The socket file's permissions (octal)."
    ),
    allow_uid: list[str] = typer.Option(
        [], "--allow-uid", metavar="UID",
        help="Also admit connections from this uid (repeatable). Admitted always: this "
        "process's uid and the --socket-owner's.",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir",
        help="S3 stores: the host chunk cache (default ~/.cache/fcsnap/chunks).",
    ),
    cache_size: str = typer.Option(
        "10G", "--cache-size", help="S3 stores: the most the chunk cache holds."
    ),
    fetch_timeout: float = typer.Option(
        30.0, "--fetch-timeout",
        help="S3 stores: seconds a fetch may take, retries included; then the VM is killed.",
    ),
    quiet: bool = QUIET,
) -> None:
    """Serve BUILD's memory to one Firecracker VM over userfaultfd, lazily.

    Exits 0 when the VM exits. SIGTERM/SIGINT also exit 0, killing the VM unless every page
    is already in place (a VM whose page server is gone would freeze at its next fault).
    With --firecracker-api, a load Firecracker refuses (or never answers) exits 1, killing
    the VM if it connected."""
    from fcsnap.store.layout import SNAPFILE
    from fcsnap.uffd.firecracker_api import Response, SnapshotLoad, load_body
    from fcsnap.uffd.server import FaultServer, ServeOptions

    access = _socket_access(socket_owner, socket_mode, allow_uid)
    from fcsnap.store.stores import add_fetch_stats, serve_source

    build_dir, fetched = serve_source(
        vm, None if store_url is None else open_store(store_url, fetch_timeout), cache_dir,
        parse_size(cache_size, "cache size"), fetch_timeout,
    )
    load: SnapshotLoad | None = None
    if firecracker_api is not None:
        if api_timeout <= 0:
            raise typer.BadParameter("must be more than 0 seconds", param_hint="'--api-timeout'")
        if vmstate is None and not (build_dir / SNAPFILE).is_file():
            raise typer.BadParameter(
                f"build {build_dir.name} has no {SNAPFILE}: give the vmstate file",
                param_hint="'--vmstate'",
            )
        body = load_body(vmstate or build_dir / SNAPFILE, socket_path, track_dirty_pages)
        load = SnapshotLoad(firecracker_api, body, api_timeout)
    elif vmstate is not None or track_dirty_pages:
        raise typer.BadParameter("--vmstate and --track-dirty-pages need --firecracker-api")

    def loaded(response: Response) -> None:
        if not quiet:
            print(f"fcsnap: Firecracker loaded the snapshot (HTTP {response.status})",
                  file=sys.stderr, flush=True)

    def listening() -> None:
        # Announced only now: a socket that cannot be created is then the one line on stderr.
        if not quiet:
            print(f"fcsnap: serving {build_dir.name} on {socket_path}", file=sys.stderr, flush=True)
        if load is not None:
            load.start(server.fail, loaded)  # in the background: Firecracker answers after accept

    options = ServeOptions(
        socket=socket_path,
        verify=verify_pages,
        stats_path=stats,
        handshake_timeout=handshake_timeout,
        cache_bytes=max(0, cache_mb) << 20,
        fault_around=parse_size(fault_around, "fault-around size"),
        record_ws=record_ws,
        prefetch_ws=prefetch_ws,
        populate=populate,
        eager=eager,
        on_listening=listening,
        access=access,
    )
    server = FaultServer(build_dir, options)
    status = server.run()
    if fetched is not None and stats is not None:
        add_fetch_stats(stats, fetched)
    if not quiet:
        s = server.stats
        print(
            f"fcsnap: {server.exit_reason}: {s.faults} faults, {s.pages_served} pages "
            f"({format_bytes(s.bytes_served)}) served",
            file=sys.stderr,
        )
    if load is not None and (error := load.finish()) is not None:
        raise error
    raise typer.Exit(status)


def _socket_access(owner: str | None, mode: str, allowed: list[str]) -> SocketAccess:
    """restore's --socket-owner/--socket-mode/--allow-uid as a SocketAccess (usage errors: 2)."""
    from fcsnap.uffd.listener import SocketAccess, parse_mode, parse_owner, parse_uid  # noqa: F811

    def parsed(option: str, parse: Any, text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=f"'{option}'") from None

    uid, gid = parsed("--socket-owner", parse_owner, owner) if owner else (None, None)
    return SocketAccess(
        mode=parsed("--socket-mode", parse_mode, mode), owner_uid=uid, owner_gid=gid,
        allowed_uids=frozenset(parsed("--allow-uid", parse_uid, u) for u in allowed),
    )


@app.command(name="ls")
def list_store(
    name: str | None = typer.Argument(None, metavar="NAME", help="Show this name's lineage."),
    store_url: str = STORE,
    builds: bool = typer.Option(
        False, "--builds", help="List every build: size, readers, live fraction."
    ),
    as_json: bool = JSON,
) -> None:
    """List the store's names (or every build, or one name's lineage) and the bytes they hold.

    A build's live fraction is the share of its stored bytes some name's head still reads."""
    from fcsnap.store import listing
    from fcsnap.store.stores import scan_store

    view = scan_store(open_store(store_url))
    if name is not None:
        report = listing.lineage_report(view, name)
    elif builds:
        report = listing.builds_report(view)
    else:
        report = listing.names_report(view)
    if as_json:
        print_json(report)
        return
    if name is not None:
        render_lineage(report)
        return
    if builds:
        render_builds(report["builds"])
    else:
        render_names(report["names"])
    render_summary(report["summary"])


def _add_column(table: Table, title: str, left: bool) -> None:
    """Build ids are never wrapped: they are copied into other commands."""
    if title in ("build", "head"):
        table.add_column(title, no_wrap=True, min_width=36)
    else:
        table.add_column(title, justify="left" if left else "right")


def _print_wide(table: Table) -> None:
    """Store tables hold build ids and several sizes: wider than 80 columns when piped."""
    (out if out.is_terminal else Console(soft_wrap=True, width=150)).print(table)


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def render_names(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Names")
    for col in ("name", "head", "gen", "created", "memory", "lineage", "shared", "head reads"):
        _add_column(table, col, left=col in ("name", "head", "created"))
    for r in rows:
        table.add_row(
            r["name"], r["head"] or "?", "?" if r["generation"] is None else str(r["generation"]),
            r["created_at"] or "?",
            "?" if r["memory_bytes"] is None else format_bytes(r["memory_bytes"]),
            format_bytes(r["lineage_bytes"]), format_bytes(r["shared_bytes"]),
            _fraction(r["live_fraction"]),
        )
    _print_wide(table)
    for r in rows:
        if "error" in r:
            out.print(f"[red]{r['name']}: {r['error']}[/red]", markup=True, highlight=False)


def render_builds(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Builds")
    for col in ("build", "gen", "parent", "on disk", "live", "read by"):
        _add_column(table, col, left=col in ("build", "parent", "read by"))
    for r in rows:
        readers = ", ".join(r["read_by"]) or "[yellow]unreferenced[/yellow]"
        table.add_row(
            r["build_id"], "?" if r["generation"] is None else str(r["generation"]),
            (r["parent"] or "-")[:8], format_bytes(r["disk_bytes"]),
            _fraction(r["live_fraction"]), readers,
        )
    _print_wide(table)
    for r in rows:
        if "error" in r:
            out.print(f"[red]{r['build_id']}: {r['error']}[/red]", markup=True, highlight=False)


def render_summary(s: dict[str, Any]) -> None:
    amp = "-" if s["amplification"] is None else f"{s['amplification']:.2f}x"
    out.print(
        f"{s['names']} names, {s['builds']} builds ({s['unreferenced_builds']} unreferenced): "
        f"{format_bytes(s['disk_bytes'])} on disk, heads read {format_bytes(s['live_bytes'])} "
        f"(space amplification {amp})"
    )


def render_lineage(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['name']}: lineage of {report['head']}")
    for col in ("gen", "build", "created", "on disk", "head reads"):
        _add_column(table, col, left=col in ("build", "created"))
    for r in report["generations"]:
        if r["missing"]:
            table.add_row("?", r["build_id"], "[red]missing[/red]", "", "")
            continue
        table.add_row(
            "?" if r["generation"] is None else str(r["generation"]), r["build_id"],
            r["created_at"] or "?", format_bytes(r["disk_bytes"]),
            f"{format_bytes(r['head_reads_bytes'])} ({_fraction(r['head_reads_fraction'])})",
        )
    _print_wide(table)


@app.command()
def rm(
    names: list[str] = typer.Argument(..., metavar="NAME", help="Names to remove."),
    store_url: str = STORE,
    quiet: bool = QUIET,
) -> None:
    """Remove names (never builds: `fcsnap gc` deletes the builds no name reads any more).

    Either every NAME is removed or, when one does not exist, none."""
    from fcsnap.store.stores import remove_names

    for row in remove_names(open_store(store_url), names):
        if not quiet:
            out.print(f"removed {row['name']} (was {row['head']})")


@app.command()
def gc(
    store_url: str = STORE,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List what would be deleted and the bytes freed; change nothing."
    ),
    grace: str = typer.Option(
        "1h", "--grace", metavar="DURATION",
        help="Keep unreferenced builds younger than this (0, 90s, 30m, 1h, 2d).",
    ),
    repack_below: float | None = typer.Option(
        None, "--repack-below", metavar="FRACTION",
        help="First squash every name whose head reads less than FRACTION of the bytes its "
        "lineage stores, so the partly dead builds become garbage.",
    ),
    as_json: bool = JSON,
) -> None:
    """Delete every build no name's head reads, and what killed commands left behind.

    A build only an older generation of a name read is garbage once no head reads it. Builds
    another command is using (restore, a diff's base, a build not yet named) are kept."""
    from fcsnap.store.stores import collect
    from fcsnap.units import parse_duration

    if repack_below is not None and not 0 < repack_below <= 1:
        raise typer.BadParameter("must be a fraction in (0, 1]", param_hint="'--repack-below'")
    report = collect(
        open_store(store_url), parse_duration(grace, "--grace"), dry_run, repack_below
    )
    if as_json:
        print_json(report)
        return
    render_gc(report)


def render_gc(report: dict[str, Any]) -> None:
    dry = report["dry_run"]
    for row in report["repacked"]:
        if "skipped" in row:
            out.print(f"not repacked {row['name']}: {row['skipped']}")
        else:
            verb = "would repack" if dry else "repacked"
            target = "" if dry else (
                f" as {row['new_head']} ({format_bytes(row['new_head_disk_bytes'])})"
            )
            out.print(
                f"{verb} {row['name']} (its head read {row['live_fraction']:.1%} of its "
                f"lineage){target}"
            )
    deleted = report["would_delete" if dry else "deleted"]
    for row in deleted:
        verb = "would delete" if dry else "deleted"
        out.print(f"{verb} build {row['build_id']} ({format_bytes(row['disk_bytes'])})")
    for row in report["kept"]:
        out.print(f"kept unreferenced build {row['build_id']}: {row['reason']}")
    for name in report["leftovers"]:
        out.print(f"{'would remove' if dry else 'removed'} leftover {name}")
    freed = report["bytes_to_free" if dry else "bytes_freed"]
    after = report["after"]
    amp = "-" if after["amplification"] is None else f"{after['amplification']:.2f}x"
    written = sum(r.get("new_head_disk_bytes", 0) for r in report["repacked"])
    repack = f", repacks wrote {format_bytes(written)}" if written else ""
    out.print(
        f"{'would free' if dry else 'freed'} {format_bytes(freed)} in {len(deleted)} builds"
        f"{repack}; {format_bytes(after['disk_bytes'])} on disk (space amplification {amp})"
    )


def _copy(build: str, source: str, dest: str, as_json: bool, quiet: bool, verb: str) -> None:
    from fcsnap.store.transfer import copy_lineage

    report = copy_lineage(build, open_store(source), open_store(dest), verb)
    if as_json:
        print_json(report)
    elif not quiet:
        copied = [b for b in report["builds"] if b["copied"]]
        out.print(
            f"{verb}ed {report['name'] or report['head']}: {len(copied)} builds copied "
            f"({format_bytes(report['bytes_copied'])}), "
            f"{len(report['builds']) - len(copied)} already there"
        )


FROM = typer.Option(..., "--from", help="Store to copy from: a directory or s3://BUCKET/PREFIX.")
TO = typer.Option(..., "--to", help="Store to copy to: a directory or s3://BUCKET/PREFIX.")


@app.command()
def push(
    build: str = typer.Argument(..., metavar="NAME|BUILD"),
    source: str = FROM,
    dest: str = TO,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Copy a build and every build it reads to another store (a NAME is published there too).

    Builds already there are kept (checked against the head's pins); every build copied is
    checked, block by block, before it becomes visible."""
    _copy(build, source, dest, as_json, quiet, "push")


@app.command()
def pull(
    build: str = typer.Argument(..., metavar="NAME|BUILD"),
    source: str = FROM,
    dest: str = TO,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """The same copy as push, for who thinks of it from the receiving side."""
    _copy(build, source, dest, as_json, quiet, "pull")


@app.command()
def demo(
    threads: int = typer.Option(4, "--threads", help="Faulting threads in the stand-in VM."),
) -> None:
    """Pack, diff, inspect and lazily restore a bundled snapshot, checking every byte."""
    from fcsnap.demo import run_demo

    run_demo(out, threads)


def main() -> None:
    """Console entry point: one clear line and exit 1 for runtime failures."""
    try:
        app()
    except (FcsnapError, OSError) as e:
        if _state["debug"]:
            traceback.print_exc()
        if isinstance(e, FcsnapError):
            message = str(e)
        else:  # an OSError of a write has no file name: then say what was being done
            message = f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}"
        print(f"fcsnap: error: {message}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug: still one line, and the traceback on request
        if _state["debug"]:
            traceback.print_exc()
        print(
            f"fcsnap: error: internal error ({type(e).__name__}: {e}); "
            "run with --debug or FCSNAP_DEBUG=1 for the traceback",
            file=sys.stderr,
        )
        sys.exit(1)
