"""The `fcsnap` command tree: the root (its help, --version, --debug, completion); the commands,
one module per group, are built when used (fcsnap/cli/lazy.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from fcsnap.cli.lazy import LazyGroup

DESCRIPTION = "Firecracker memory snapshots: pack into a generational store, restore lazily."
EPILOG = (
    "Run 'fcsnap COMMAND --help' for a command's options and examples. Exit status: 0 done, "
    "1 a runtime failure (one line 'fcsnap: error: ...'), 2 a usage error, 130 interrupted, "
    "143 terminated."
)

app = typer.Typer(
    name="fcsnap", help=DESCRIPTION, epilog=EPILOG, no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode="rich",
    pretty_exceptions_enable=False, cls=LazyGroup,
)  # the commands: fcsnap.cli.lazy.WHERE


def _version(value: bool) -> None:
    if value:
        from fcsnap import __version__

        print(f"fcsnap {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option(
        "--debug", help="Show the traceback of a failure (anywhere on the line; or "
        "FCSNAP_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """Firecracker memory snapshots: pack into a generational store, restore lazily."""
