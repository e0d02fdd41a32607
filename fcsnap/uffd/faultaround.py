"""How much to install around a fault: a fixed window, or one chosen from what the guest does.

A window the guest does not need costs it time: the copy of a 256 KiB window delays the vCPU
waiting on one page of it, and a guest touching a scattered working set needs none of it. A
guest reading memory in order, on the other hand, gains from every page installed ahead. The
adaptive window follows the kernel's file readahead: each region keeps a few recent *streams*
(where the last window installed for one ended, and that window's size); a fault landing within
the next window's reach of a stream's end continues it and grows its window (x4 while small,
then x2, up to ADAPTIVE_MAX), any other fault starts a new stream of one page. Scattered faults
so cost one page each, as with no fault-around at all, and each thread reading in order soon
gets large windows (one stream each, up to STREAMS threads).

The stream table is a numpy array per region that the compiled loop (csrc/fastpath.c,
`choose_window`) reads and updates the same way, so both paths choose the same windows.
"""

from __future__ import annotations

import numpy as np

ADAPTIVE_MAX = 1 << 20  # the largest adaptive window, bytes
STREAMS = 8  # streams tracked per region: threads reading in order at once
CURSOR = 2 * STREAMS  # index of the next slot to replace, after the (end, window) pairs


def new_streams() -> np.ndarray:
    """A region's empty stream table: STREAMS (end page, window pages) pairs and a cursor."""
    table = np.zeros(2 * STREAMS + 1, np.int64)
    table[0:CURSOR:2] = -1  # no stream ends anywhere yet
    return table


def grown(window: int, most: int) -> int:
    """The next window of a stream that went on (readahead's ramp-up)."""
    return min(most, window * 4 if window * 16 < most else window * 2)


def adaptive_window(streams: np.ndarray, page: int, pages: int, most: int) -> tuple[int, int]:
    """The window [page, hi) to install for a fault on `page` of a region of `pages` pages,
    `most` pages at the largest; updates the stream table."""
    table = streams.tolist()  # one conversion: element reads of an array cost more
    for slot in range(STREAMS):
        end, window = table[2 * slot], table[2 * slot + 1]
        if end <= page < end + window:  # the stream goes on
            window = grown(window, most)
            break
    else:
        slot = table[CURSOR]
        streams[CURSOR] = (slot + 1) % STREAMS
        window = 1
    hi = min(pages, page + window)
    streams[2 * slot], streams[2 * slot + 1] = hi, window
    return page, hi


def fixed_window(page: int, pages: int, window: int) -> tuple[int, int]:
    """The aligned window of `window` pages holding `page`."""
    lo = page - page % window
    return lo, min(pages, lo + window)
