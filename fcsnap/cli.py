"""The `fcsnap` command line. Commands stay thin: they parse options and render results.

Every runtime failure is an FcsnapError (or OSError) and becomes one line on stderr with exit
status 1; `--debug` or FCSNAP_DEBUG=1 shows the traceback instead. Usage errors exit 2.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fcsnap import __version__
from fcsnap.errors import FcsnapError
from fcsnap.header import load_header
from fcsnap.inspection import inspect_report
from fcsnap.store.layout import HEADER, resolve_build
from fcsnap.units import format_bytes, parse_size

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Firecracker memory snapshots: pack into a generational store, restore lazily.",
)
out = Console()
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


def _header_arg(arg: str, store: Path | None) -> tuple[Path, Path | None]:
    """Resolve BUILD|HEADER to a header file and the store around it (if any)."""
    path = Path(arg)
    if path.is_file():
        return path, path.parent.parent if path.name == HEADER else None
    build = resolve_build(arg, store)
    return build / HEADER, build.parent


@app.command()
def inspect(
    target: str = typer.Argument(..., metavar="BUILD|HEADER"),
    store: Path | None = typer.Option(None, "--store", help="Store holding BUILD."),
    mappings: bool = typer.Option(False, "--mappings", help="List every mapping run."),
    at: list[str] = typer.Option(
        [], "--at", metavar="OFFSET", help="Which build serves this byte? (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show a header: metadata, the builds it reads, its runs, and lookups."""
    header_path, around = _header_arg(target, store)
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
        runs = Table(title="Mappings")
        for col in ("offset", "length", "build", "storage offset"):
            runs.add_column(col, justify="left" if col == "build" else "right")
        for m in report["mappings"]:
            runs.add_row(
                f"{m['offset']:#x}", f"{m['length']:#x}", m["build_id"],
                f"{m['build_storage_offset']:#x}",
            )
        out.print(runs)
    if "lookups" in report:
        found = Table(title="Lookups")
        for col in ("offset", "build", "storage offset", "bytes left in run"):
            found.add_column(col, justify="left" if col == "build" else "right")
        for row in report["lookups"]:
            found.add_row(
                f"{row['offset']:#x}", row["build_id"], f"{row['storage_offset']:#x}",
                str(row["remaining_length"]),
            )
        out.print(found)


def main() -> None:
    """Console entry point: one clear line and exit 1 for runtime failures."""
    try:
        app()
    except (FcsnapError, OSError) as e:
        if _state["debug"]:
            traceback.print_exc()
        message = str(e) if isinstance(e, FcsnapError) else f"{e.strerror or e}: {e.filename}"
        print(f"fcsnap: error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("fcsnap: interrupted", file=sys.stderr)
        sys.exit(130)
