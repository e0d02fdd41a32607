"""Progress bars for long commands: shown on a terminal, silent otherwise or with --quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from fcsnap.api import Progress


@contextlib.contextmanager
def progress_bar(description: str, quiet: bool) -> Iterator[Progress | None]:
    """Yield the `progress(bytes, total)` callback of a rich bar, or None where none is shown
    (rich is imported only for a terminal: a piped command does not pay for it)."""
    if quiet or not sys.stdout.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda n, total: bar.update(task, total=total, advance=n)
