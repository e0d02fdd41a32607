"""Plain-text output of the command line: aligned tables that never wrap or truncate.

Output is read by people and by scripts (piped to grep, awk, a log), so every cell is printed
whole whatever the terminal's width, and nothing but the text itself is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(
    columns: Sequence[str], rows: Iterable[Sequence[str]], *, title: str | None = None,
    left: Sequence[str] = (),
) -> str:
    """Columns separated by two spaces, numbers right-aligned (the columns named in `left`
    left-aligned), a dashed rule under the heading. Without headings (`columns` empty), a
    key/value list, all left-aligned."""
    body = [list(row) for row in rows]
    grid = ([list(columns)] if columns else []) + body
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))] if grid else []
    if columns:
        aligned_left = {i for i, name in enumerate(columns) if name in left}
    else:
        aligned_left = set(range(len(widths)))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i in aligned_left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    lines = [title] if title else []
    if columns:
        lines += [line(columns), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in body]
    return "\n".join(lines)
