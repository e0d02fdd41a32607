"""What the command modules share: the option groups of `--help`, reusable options, value
checks, the command decorator, and printing results.

Options are `Annotated` aliases so that one option reads the same in every command. Values are
checked by callbacks while the line is parsed: a value that can never work is a usage error
(exit status 2) before anything is read or written. The checks import fcsnap.options when a
value is parsed, not at start-up.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

if TYPE_CHECKING:
    from fcsnap.api import Build

PROG = "fcsnap"
F = TypeVar("F", bound=Callable[..., Any])

# The groups of options in `--help` (typer's rich_help_panel).
STORE = "Store"
BUILD = "Build"
OUTPUT = "Output"
S3 = "S3 stores"
FAULTS = "Fault handling"
FC_API = "Firecracker API"
SOCKET = "Socket access"
DAEMON = "Daemon"


class CommandFailed(Exception):
    """What a command raised, carried past the framework (which would turn an interrupt
    into exit 130 and swallow a broken pipe) to fcsnap.cli.main, which reports it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


state: dict[str, Any] = {"command": PROG}


def command(app: typer.Typer, name: str, examples: list[str], **kwargs: Any
            ) -> Callable[[F], F]:
    """Register `fn` as command `name`, its examples in the help's epilog; whatever it raises
    reaches main() as CommandFailed."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **options: Any) -> Any:
            from typer._click.globals import get_current_context

            state["command"] = get_current_context().command_path
            try:
                return fn(*args, **options)
            except SystemExit:
                raise
            except BaseException as e:
                raise CommandFailed(e) from e

        epilog = "Examples:\n\n" + "\n\n".join(f"  {line}" for line in examples)
        app.command(name, epilog=epilog, **kwargs)(run)
        return fn

    return register


def usage_error(message: str) -> None:
    """A usage error found by a command (exit status 2), before it reads or writes."""
    from fcsnap.errors import UsageError

    raise UsageError(message)


def checked(parser: str) -> Callable[[Any], Any]:
    """A callback checking a value (or each of a list) with fcsnap.options.<parser>; its
    UsageError becomes the framework's, exit 2. The text is kept: the API parses the same
    spellings itself."""

    def check(value: Any) -> Any:
        from fcsnap import options
        from fcsnap.errors import UsageError

        for text in value if isinstance(value, list) else [] if value is None else [value]:
            try:
                getattr(options, parser)(text)
            except UsageError as e:
                raise typer.BadParameter(str(e)) from None
        return value

    return check


def at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"{value}: at least 1")
    return value


def duration(text: str) -> float:
    """--grace (0, 90s, 30m, 1h, 2d) in seconds."""
    from fcsnap.errors import FcsnapError
    from fcsnap.units import parse_duration

    try:
        return parse_duration(text, "--grace")
    except FcsnapError as e:
        raise typer.BadParameter(str(e)) from None


def fraction(value: float | None) -> float | None:
    """--repack-below: a fraction in (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g}: a fraction in (0, 1]")
    return value


# -- options every command spells the same way ------------------------------------------------

STORE_HELP = "The store: a directory, or s3://BUCKET/PREFIX."
STORE_ENV = "FCSNAP_STORE"  # the default --store, as restic takes RESTIC_REPOSITORY
StoreOpt = Annotated[str, typer.Option(
    "--store", metavar="STORE", help=STORE_HELP, rich_help_panel=STORE, show_default=False,
    envvar=STORE_ENV, callback=checked("check_store_text"))]
StoreOfBuild = Annotated[str | None, typer.Option(
    "--store", metavar="STORE", rich_help_panel=STORE, envvar=STORE_ENV,
    callback=checked("check_store_text"),
    help="Store holding BUILD: a directory, or s3://BUCKET/PREFIX (not needed for a build "
         "directory).")]
InitOpt = Annotated[bool, typer.Option(
    "--init", help="If the store is missing or empty, make it one (as 'fcsnap init') once "
    "the build is written: a command that fails leaves no store.",
    rich_help_panel=STORE)]
NameOpt = Annotated[str | None, typer.Option(
    "--name", metavar="NAME", help="Point vms/NAME at the new build.", rich_help_panel=STORE)]
Quiet = Annotated[bool, typer.Option(
    "-q", "--quiet", help="No progress bar or summary.", rich_help_panel=OUTPUT)]
Json = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object.", rich_help_panel=OUTPUT)]
BuildArg = Annotated[str, typer.Argument(
    metavar="BUILD", help="Build directory, build id or VM name.", show_default=False)]
Compress = Annotated[str, typer.Option(
    "--compress", metavar="none|zstd|zstd:LEVEL", callback=checked("parse_compression"),
    help="Compression of the diff.", rich_help_panel=BUILD)]
FrameSize = Annotated[str, typer.Option(
    "--frame-size", metavar="SIZE", callback=checked("parse_frame_size"),
    help="Uncompressed bytes per zstd frame.", rich_help_panel=BUILD)]
Vmstate = Annotated[Path | None, typer.Option(
    "--vmstate", metavar="FILE", rich_help_panel=BUILD,
    help="Firecracker vmstate file, kept in the build as snapfile.")]
WorkingSet = Annotated[Path | None, typer.Option(
    "--working-set", metavar="FILE", rich_help_panel=BUILD,
    help="Store these pages first, in this order (restore --record-ws), so that restore "
         "--prefetch-ws reads the diff sequentially.")]
CacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", metavar="DIR", rich_help_panel=S3,
    help="The host chunk cache (default ~/.cache/fcsnap/chunks).")]
CacheSize = Annotated[str, typer.Option(
    "--cache-size", metavar="SIZE", callback=checked("parse_cache_size"), rich_help_panel=S3,
    help="The most the chunk cache holds.")]
FetchTimeout = Annotated[float, typer.Option(
    "--fetch-timeout", metavar="SECONDS", rich_help_panel=S3,
    help="Seconds a fetch may take, retries included; then the VM is killed.")]
LazyFetch = Annotated[bool, typer.Option(
    "--lazy-fetch", rich_help_panel=S3,
    help="Fetch only what faults, fault-around and --prefetch-ws read (by default the rest of "
         "what the build reads of its raw diffs follows in the background).")]
SocketOwner = Annotated[str | None, typer.Option(
    "--socket-owner", metavar="UID:GID", rich_help_panel=SOCKET,
    help="Give the socket file to this user (and group, optional), e.g. a jailed "
         "Firecracker's; that uid may use it too.")]
SocketMode = Annotated[str | None, typer.Option(
    "--socket-mode", metavar="MODE", rich_help_panel=SOCKET,
    help="The socket file's permissions, octal (0600).")]
AllowUid = Annotated[list[str] | None, typer.Option(
    "--allow-uid", metavar="UID", rich_help_panel=SOCKET,
    help="Also admit connections from this uid (repeatable). Admitted always: this process's "
         "uid and the --socket-owner's.")]


def open_store(text: str, init: bool = False) -> Any:
    """The api.Store `--store` names; with `--init`, made a store by the build written."""
    from fcsnap.api import Store

    return Store(text, create=init)


def socket_access(owner: str | None, mode: str | None, allow: list[str] | None) -> Any:
    """--socket-owner/--socket-mode/--allow-uid as one value, checked as the daemon checks a
    request's (a bad one is a UsageError: exit 2)."""
    from fcsnap.restore_options import socket_access as access

    return access(owner, mode, allow or [])


# -- output -----------------------------------------------------------------------------------


JSON_SCHEMA = 1  # the "schema" key of every JSON document printed: raised when one changes


def print_json(data: dict[str, Any]) -> None:
    """One JSON object, its "schema" key first: a key added keeps the version; a key removed,
    renamed or changed in meaning raises it."""
    sys.stdout.write(json.dumps({"schema": JSON_SCHEMA, **data}, indent=2) + "\n")


def note_unnamed(build: Build, name: str | None, quiet: bool) -> None:
    """pack/diff without --name: say on stderr that gc will remove the build (not with
    --quiet or --json: a script asked for silence or for the object alone)."""
    if name is None and not quiet:
        print(f"fcsnap: build {build.build_id} has no name: 'fcsnap gc' removes it once it is "
              "older than the grace period (--grace, 1h); give --name NAME to keep it",
              file=sys.stderr)


def report_build(build: Build, json_out: bool, quiet: bool, verb: str) -> None:
    """The new build: one JSON object with --json, else a summary unless --quiet."""
    from fcsnap.units import format_bytes

    if json_out:
        print_json(build.to_json())
        return
    if quiet:
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
