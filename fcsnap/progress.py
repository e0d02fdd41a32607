"""Progress bars for long commands: shown on a terminal, silent otherwise or with --quiet."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

if TYPE_CHECKING:
    from fcsnap.store.ops import Progress


@contextlib.contextmanager
def progress_bar(description: str, total: int, quiet: bool) -> Iterator[Progress]:
    """Yield an `advance(bytes)` callback driving a rich bar over `total` bytes."""
    if quiet or not sys.stdout.isatty():
        yield lambda _n: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
