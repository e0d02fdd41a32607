"""Commands that write or read one build: pack, diff, squash, unpack, verify, inspect."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fcsnap.cli.common import (
    BUILD,
    OUTPUT,
    PROG,
    BuildArg,
    Compress,
    FrameSize,
    InitOpt,
    Json,
    NameOpt,
    Quiet,
    StoreOfBuild,
    StoreOpt,
    Vmstate,
    WorkingSet,
    checked,
    command,
    note_unnamed,
    open_store,
    print_json,
    report_build,
)

app = typer.Typer()

MemfileArg = Annotated[Path, typer.Argument(
    metavar="MEMFILE", help="Firecracker memory file.", show_default=False)]


@command(app, "pack", [
    "fcsnap pack mem.snap --store /srv/snaps --name web",
    "fcsnap pack mem.snap --init --store /srv/new-store --name web",
    "fcsnap pack mem.snap --store s3://bucket/snaps --name web --compress zstd:9 "
    "--vmstate vm.snap",
])
def pack(
    memfile: MemfileArg, store: StoreOpt, name: NameOpt = None, init: InitOpt = False,
    block_size: Annotated[str, typer.Option(
        "--block-size", metavar="4K|2M", callback=checked("parse_block_size"),
        help="4K, or 2M for hugepage guests.", rich_help_panel=BUILD)] = "4K",
    compress: Compress = "none", frame_size: FrameSize = "256K", vmstate: Vmstate = None,
    working_set: WorkingSet = None, quiet: Quiet = False, json_out: Json = False,
) -> int:
    """Pack a memory file as generation 0 of a new lineage."""
    from fcsnap.progress import progress_bar

    with progress_bar("pack", quiet or json_out) as progress:
        build = open_store(store, init).pack(
            memfile, name=name, compress=compress, block_size=block_size,
            frame_size=frame_size, vmstate=vmstate, working_set=working_set, progress=progress,
        )
    report_build(build, json_out, quiet, "packed")
    note_unnamed(build, name, quiet or json_out)
    return 0


@command(app, "diff", [
    "fcsnap diff mem2.snap --base web --store /srv/snaps --name web",
    "fcsnap diff mem.diff --sparse-diff --base web --store /srv/snaps --name web",
])
def diff(
    memfile: Annotated[Path, typer.Argument(
        metavar="MEMFILE", help="Firecracker memory file of the next snapshot.",
        show_default=False)],
    base: Annotated[str, typer.Option(
        "--base", metavar="BUILD", help="The parent build: directory, id or VM name.",
        show_default=False)],
    store: StoreOpt, name: NameOpt = None,
    sparse_diff: Annotated[bool, typer.Option(
        "--sparse-diff", help="MEMFILE is a Firecracker Diff snapshot: holes are unchanged "
        "pages, not zeros.")] = False,
    holes_are_zeros: Annotated[bool, typer.Option(
        "--holes-are-zeros", help="MEMFILE's holes are zeros (a sparse copy of a Full "
        "snapshot). Without either option, holes over pages the base holds as data are "
        "refused.")] = False,
    written: Annotated[Path | None, typer.Option(
        "--written", metavar="FILE", help="MEMFILE is a Full snapshot of a VM restored from "
        "BASE and this its written set (restore --written): read only those pages.")] = None,
    block_size: Annotated[str | None, typer.Option(
        "--block-size", metavar="4K|2M", callback=checked("parse_block_size"),
        help="Must match the base build's (the default).", rich_help_panel=BUILD)] = None,
    compress: Compress = "none", frame_size: FrameSize = "256K", vmstate: Vmstate = None,
    working_set: WorkingSet = None, quiet: Quiet = False, json_out: Json = False,
) -> int:
    """Store what changed since BASE (the parent) as the next generation."""
    from fcsnap.cli.common import usage_error
    from fcsnap.progress import progress_bar

    if sparse_diff and holes_are_zeros:
        usage_error("--sparse-diff and --holes-are-zeros exclude each other")
    with progress_bar("diff", quiet or json_out) as progress:
        build = open_store(store).diff(
            memfile, base=base, name=name, compress=compress, block_size=block_size,
            frame_size=frame_size, sparse=sparse_diff, holes_are_zeros=holes_are_zeros,
            vmstate=vmstate, working_set=working_set, written=written, progress=progress,
        )
    report_build(build, json_out, quiet, "diffed")
    note_unnamed(build, name, quiet or json_out)
    return 0


@command(app, "squash", ["fcsnap squash web --store /srv/snaps --name web"])
def squash(build: BuildArg, store: StoreOpt, name: NameOpt = None, quiet: Quiet = False,
           json_out: Json = False) -> int:
    """Flatten BUILD into a new generation 0 with the same content and no ancestors."""
    from fcsnap.progress import progress_bar

    with progress_bar("squash", quiet or json_out) as progress:
        result = open_store(store).squash(build, name=name, progress=progress)
    report_build(result, json_out, quiet, "squashed")
    return 0


@command(app, "unpack", ["fcsnap unpack web --store /srv/snaps -o mem.snap"])
def unpack(
    build: BuildArg,
    output: Annotated[Path, typer.Option(
        "-o", "--output", metavar="FILE", help="Memory file to write.", show_default=False)],
    store: StoreOfBuild = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.",
                                        rich_help_panel=OUTPUT)] = False,
    quiet: Quiet = False, json_out: Json = False,
) -> int:
    """Rebuild the full memory file of BUILD (sparse where zero)."""
    from fcsnap import api
    from fcsnap.progress import progress_bar

    with progress_bar("unpack", quiet or json_out) as progress:
        written = api.unpack(build, output, store=store, force=force, progress=progress)
    if json_out:
        print_json({"output": str(written), "size": written.stat().st_size})
    elif not quiet:
        from fcsnap.units import format_bytes

        print(f"wrote {written} ({format_bytes(written.stat().st_size)})")
    return 0


@command(app, "verify", ["fcsnap verify web --store /srv/snaps"])
def verify(build: BuildArg, store: StoreOfBuild = None, quiet: Quiet = False,
           json_out: Json = False) -> int:
    """Check BUILD and every build it reads: files, sizes, and every block's hash."""
    from fcsnap import api
    from fcsnap.progress import progress_bar
    from fcsnap.units import plural

    with progress_bar("verify", quiet or json_out) as progress:
        result = api.verify(build, store=store, progress=progress)
    if json_out:
        print_json(result.to_json())
    elif not quiet and not isinstance(result, api.Verification):
        print(result.summary())  # an E2B/Wrenn build: what its data allowed to check
    elif not quiet:
        print(
            f"ok: build {result.build_id} (generation {result.generation}): "
            f"{plural(result.builds_checked, 'build')} and "
            f"{plural(result.blocks_checked, 'block')} checked"
            + ("" if result.pinned else " (unpinned: ancestors are trusted by id)")
        )
    return 0


@command(app, "inspect", [
    "fcsnap inspect web --store /srv/snaps",
    "fcsnap inspect /srv/snaps/BUILD_ID/memfile.header --mappings --at 0x7f3000",
])
def inspect(
    target: Annotated[str, typer.Argument(
        metavar="BUILD|HEADER", help="Build directory, build id, VM name, or any "
        "memfile.header.", show_default=False)],
    store: StoreOfBuild = None,
    mappings: Annotated[bool, typer.Option(
        "--mappings", help="List every mapping.", rich_help_panel=OUTPUT)] = False,
    at: Annotated[list[str] | None, typer.Option(
        "--at", metavar="OFFSET", callback=checked("parse_offset"), rich_help_panel=OUTPUT,
        help="Which build serves this byte? (repeatable)")] = None,
    json_out: Json = False,
) -> int:
    """Show a header: metadata, the builds it reads, its mappings, and lookups."""
    from fcsnap import api
    from fcsnap.cli.tables import render_inspect

    inspection = api.inspect(target, store=store, mappings=mappings, at=at or [])
    if json_out:
        print_json(inspection.to_json())
    else:
        print(render_inspect(inspection))
    errors = inspection.report.get("pin_errors")
    if errors:  # reported in full above; the exit status and one line say it failed
        sys.stdout.flush()
        print(f"{PROG}: error: {errors[0]}", file=sys.stderr)
        return 1
    return 0


@command(app, "import", [
    "fcsnap import /srv/e2b/BUILD_ID --store /srv/snaps --name web --compress zstd",
    "fcsnap import s3://bucket/e2b/BUILD_ID --store /srv/snaps --name web",
], help="Import an E2B/Wrenn lineage: one build per generation, with E2B's build ids.")
def import_e2b(
    src: Annotated[str, typer.Argument(
        metavar="SRC", show_default=False,
        help="The newest E2B/Wrenn build directory (<build_id>/memfile.header and its memfile, "
             "memfile.zstd or memfile.lz4), its ancestors beside it; or s3://BUCKET/PREFIX/"
             "<build_id> in a bucket laid out so.")],
    store: StoreOpt, name: NameOpt = None, init: InitOpt = False,
    compress: Annotated[str, typer.Option(
        "--compress", metavar="none|zstd|zstd:LEVEL", callback=checked("parse_compression"),
        help="Compression of the diffs.", rich_help_panel=BUILD)] = "none",
    quiet: Quiet = False, json_out: Json = False,
) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("import", quiet or json_out) as progress:
        builds = open_store(store, init).import_e2b(src, name=name, compress=compress,
                                                    progress=progress)
    if json_out:
        print_json({"builds": [build.to_json() for build in builds]})
    elif not quiet:
        for build in builds:
            print(f"imported build {build.build_id} (generation {build.generation}) at "
                  f"{build.path}")
    return 0


@command(app, "export", [
    "fcsnap export web --store /srv/snaps -o /srv/e2b --compress zstd",
], help="Write BUILD's lineage as an E2B store (version-4 headers) in OUTDIR.")
def export_e2b(
    build: BuildArg, store: StoreOpt,
    output: Annotated[Path, typer.Option(
        "-o", "--output", metavar="OUTDIR", show_default=False,
        help="Directory of the E2B store: <build_id>/memfile.header and its data.")],
    compress: Annotated[str, typer.Option(
        "--compress", metavar="none|zstd|zstd:LEVEL|lz4",
        callback=checked("parse_e2b_compression"), rich_help_panel=BUILD,
        help="memfile (none), or memfile.zstd or memfile.lz4 in frames.")] = "none",
    frame_size: Annotated[str, typer.Option(
        "--frame-size", metavar="SIZE", callback=checked("parse_e2b_frame_size"),
        help="Uncompressed bytes per frame (E2B's default).", rich_help_panel=BUILD)] = "2M",
    quiet: Quiet = False,
) -> int:
    from fcsnap.progress import progress_bar

    with progress_bar("export", quiet) as progress:
        written = open_store(store).export_e2b(build, output, compress=compress,
                                               frame_size=frame_size, progress=progress)
    if not quiet:
        for path in written:
            print(f"wrote E2B build {path}")
    return 0
