"""Commands around the store: ws merge (working-set files) and demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fcsnap.cli.common import Json, Quiet, command, print_json, usage_error

app = typer.Typer()
ws = typer.Typer(help="Working-set files (restore --record-ws).", no_args_is_help=True)


@command(ws, "merge", ["fcsnap ws merge run1.ws run2.ws run3.ws --min-runs 2 -o web.ws"],
         help="Merge working sets recorded on several runs of one guest: the pages seen in at "
              "least K of them, each at its mean position in the runs that saw it.")
def ws_merge(
    files: Annotated[list[Path], typer.Argument(
        metavar="WS...", help="Recorded working sets.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", metavar="FILE", help="The merged working set.",
        show_default=False)],
    min_runs: Annotated[int | None, typer.Option(
        "--min-runs", metavar="K", help="Keep pages seen in at least K of the runs (default: "
        "all, the intersection).")] = None,
    quiet: Quiet = False, json_out: Json = False,
) -> int:
    from fcsnap.workingset import merge_working_set_files

    runs = len(files)
    if min_runs is not None and not 1 <= min_runs <= runs:
        usage_error(f"--min-runs: must be between 1 and {runs}, the number of WS files")
    pages = merge_working_set_files(files, min_runs, output)
    if json_out:
        print_json({"output": str(output), "pages": pages, "runs": runs,
                    "min_runs": runs if min_runs is None else min_runs})
    elif not quiet:
        kept = f"in at least {min_runs}" if min_runs is not None else "in all"
        print(f"fcsnap: {output}: {pages} pages seen {kept} of {runs} runs", file=sys.stderr)
    return 0


@command(app, "demo", ["fcsnap demo", "fcsnap demo --threads 8"])
def demo(threads: Annotated[int, typer.Option(
        "--threads", metavar="N", help="Faulting threads in the stand-in VM.")] = 4) -> int:
    """Pack, diff, inspect and lazily restore a bundled snapshot, checking every byte."""
    from fcsnap.demo import run_demo

    run_demo(threads)
    return 0


app.add_typer(ws, name="ws")
