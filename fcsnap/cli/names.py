"""Commands on a store, its names and lifecycle: init, ls, tag, rm, gc, push, pull."""

from __future__ import annotations

from typing import Annotated

import typer

from fcsnap.cli.common import (
    STORE,
    Json,
    Quiet,
    StoreOpt,
    checked,
    command,
    duration,
    fraction,
    open_store,
    print_json,
)

app = typer.Typer()


@command(app, "init", [
    "fcsnap init /srv/snaps",
    "fcsnap init s3://bucket/snaps",
], help="Create a store: a new or empty directory, or an empty s3://BUCKET/PREFIX.\n\n"
        "Every other command refuses a --store that is not a store. On a store, init changes "
        "nothing and succeeds (a store made by an older fcsnap gets its marker).")
def init(
    store: Annotated[str, typer.Argument(
        metavar="STORE", help="A directory, or s3://BUCKET/PREFIX.", show_default=False,
        callback=checked("check_store_text"))],
    quiet: Quiet = False, json_out: Json = False,
) -> int:
    from fcsnap.store.backends.stores import make_store

    _, found = make_store(store)
    result = {"MISSING": "created", "EMPTY": "created", "UNMARKED": "adopted"}.get(
        found.name, "exists")
    if json_out:
        print_json({"store": store, "result": result})
    elif not quiet:
        print({"created": f"created store {store}",
               "adopted": f"marked store {store} (made by an older fcsnap)",
               "exists": f"{store} is already a store"}[result])
    return 0


@command(app, "ls", [
    "fcsnap ls --store /srv/snaps",
    "fcsnap ls web --store /srv/snaps",
    "fcsnap ls --builds --store /srv/snaps --json",
], help="List the store's names (or every build, or one name's lineage) and the bytes they "
        "hold.\n\nA build's live fraction is the share of its stored bytes some name's head "
        "still reads.")
def ls(
    name: Annotated[str | None, typer.Argument(
        metavar="NAME", help="Show this name's lineage.", show_default=False)] = None,
    *, store: StoreOpt,
    builds: Annotated[bool, typer.Option(
        "--builds", help="List every build: size, readers, live fraction.")] = False,
    json_out: Json = False,
) -> int:
    from fcsnap.cli.tables import render_builds, render_lineage, render_names, render_summary

    report = open_store(store).ls(name, builds=builds)
    if json_out:
        print_json(report)
    elif name is not None:
        print(render_lineage(report))
    else:
        rows = report["builds"] if builds else report["names"]
        print(render_builds(rows) if builds else render_names(rows))
        print(render_summary(report["summary"]))
    return 0


@command(app, "tag", [
    "fcsnap tag 3f2a9c1e web --store /srv/snaps",
    "fcsnap tag web web-known-good --store /srv/snaps",
], help="Point NAME at an existing build (creating NAME, or moving it).\n\nA compare-and-swap "
        "as `diff --name`: if another command moves NAME meanwhile, nothing changes and tag "
        "fails.")
def tag(
    build: Annotated[str, typer.Argument(
        metavar="BUILD", help="Build id (or a prefix of 4+ hex digits), VM name or build "
        "directory.", show_default=False)],
    name: Annotated[str, typer.Argument(
        metavar="NAME", help="The name to point at BUILD.", show_default=False)],
    store: StoreOpt, quiet: Quiet = False, json_out: Json = False,
) -> int:
    from fcsnap.store.operations.tagging import tag as tag_build

    build_id, before = tag_build(open_store(store).target, build, name)
    if json_out:
        print_json({"name": name, "build_id": str(build_id),
                    "previous": None if before is None else str(before)})
    elif not quiet:
        was = "new name" if before is None else f"was {before}"
        print(f"{name} -> {build_id} ({was})")
    return 0


@command(app, "rm", ["fcsnap rm web old-web --store /srv/snaps"],
         help="Remove names (never builds: 'fcsnap gc' deletes the builds no name reads any "
              "more).\n\nEither every NAME is removed or, when one does not exist, none.")
def rm(
    names: Annotated[list[str], typer.Argument(
        metavar="NAME...", help="Names to remove.", show_default=False)],
    store: StoreOpt, quiet: Quiet = False, json_out: Json = False,
) -> int:
    removed = open_store(store).rm(*names)
    if json_out:
        print_json({"removed": removed})
        return 0
    for row in removed:
        if not quiet:
            print(f"removed {row['name']} (was {row['head']})")
    return 0


@command(app, "gc", [
    "fcsnap gc --store /srv/snaps --dry-run",
    "fcsnap gc --store /srv/snaps --grace 10m --repack-below 0.5",
], help="Delete every build no name's head reads, and what killed commands left behind.\n\n"
        "A build only an older generation of a name read is garbage once no head reads it. "
        "Builds another command is using (restore, a diff's base, a build not yet named) are "
        "kept.")
def gc(
    store: StoreOpt,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be deleted and the bytes freed; change "
        "nothing.")] = False,
    grace: Annotated[float, typer.Option(
        "--grace", metavar="DURATION", parser=duration, rich_help_panel=STORE,
        help="Keep unreferenced builds younger than this (0, 90s, 30m, 1h, 2d).")] = "1h",
    repack_below: Annotated[float | None, typer.Option(
        "--repack-below", metavar="FRACTION", callback=fraction, rich_help_panel=STORE,
        help="First squash every name whose head reads less than FRACTION of the bytes its "
             "lineage stores, so the partly dead builds become garbage.")] = None,
    json_out: Json = False,
) -> int:
    from fcsnap.cli.tables import render_gc

    report = open_store(store).gc(grace=grace, dry_run=dry_run, repack_below=repack_below)
    if json_out:
        print_json(report)
    else:
        print(render_gc(report))
    return 0


def _copy(verb: str, build: str, source: str, dest: str, init: bool, quiet: bool,
          json_out: bool) -> int:
    """push and pull: the same copy of a lineage between two stores."""
    from fcsnap.units import format_bytes, plural

    origin, target = open_store(source), open_store(dest, init)
    report = origin.push(build, target) if verb == "push" else target.pull(build, origin)
    if json_out:
        print_json(report)
    elif not quiet:
        copied = [b for b in report["builds"] if b["copied"]]
        print(
            f"{verb}ed {report['name'] or report['head']}: "
            f"{plural(len(copied), 'build')} copied ({format_bytes(report['bytes_copied'])}), "
            f"{len(report['builds']) - len(copied)} already there"
        )
    return 0


CopyArg = Annotated[str, typer.Argument(
    metavar="NAME|BUILD", help="What to copy, with its lineage.", show_default=False)]
FromOpt = Annotated[str, typer.Option(
    "--from", metavar="STORE", help="Store to copy from: a directory, or s3://BUCKET/PREFIX.",
    rich_help_panel=STORE, show_default=False, callback=checked("check_store_text"))]
ToOpt = Annotated[str, typer.Option(
    "--to", metavar="STORE", help="Store to copy to: a directory, or s3://BUCKET/PREFIX.",
    rich_help_panel=STORE, show_default=False, callback=checked("check_store_text"))]
ToInit = Annotated[bool, typer.Option(
    "--init", help="If the --to store is missing or empty, make it one (as 'fcsnap init') "
    "once the copy is written: a copy that fails leaves no store.",
    rich_help_panel=STORE)]


@command(app, "push", ["fcsnap push web --from /srv/snaps --to s3://bucket/snaps"],
         help="Copy a build and every build it reads to another store (a NAME is published "
              "there too).\n\nBuilds already there are kept (checked against the head's pins); "
              "every build copied is checked, block by block, before it becomes visible.")
def push(build: CopyArg, source: FromOpt, dest: ToOpt, init: ToInit = False,
         quiet: Quiet = False, json_out: Json = False) -> int:
    return _copy("push", build, source, dest, init, quiet, json_out)


@command(app, "pull", ["fcsnap pull web --from s3://bucket/snaps --to /srv/snaps"],
         help="The same copy as push, for who thinks of it from the receiving side.")
def pull(build: CopyArg, source: FromOpt, dest: ToOpt, init: ToInit = False,
         quiet: Quiet = False, json_out: Json = False) -> int:
    return _copy("pull", build, source, dest, init, quiet, json_out)
