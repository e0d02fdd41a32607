"""Fault service latency: one small histogram per session, in fixed log-spaced buckets.

Both fault paths count into the same int64 array (the compiled loop through a pointer into
it, the Python installer directly), so every fault served is timed whichever path served it,
and a reader (the daemon's /metrics, the --stats document) only sums arrays. Bucket k counts
faults served in at most 2**k microseconds (1 us .. ~1 s), the last one anything slower; the
slot after the buckets holds the sum of every latency, in nanoseconds.

Keep BUCKETS and bucket() in step with FP_LATENCY_BUCKETS and note_latency in
csrc/fastpath.c (fastpath.py asserts the count). A plain array: C writes it through a pointer,
and a reader only sums it.
"""

from __future__ import annotations

from array import array
from itertools import accumulate
from typing import Any

Histogram = array  # of "q": BUCKETS counts, then the sum in ns

BUCKETS = 22  # 2**0 .. 2**20 us, then +Inf
SUM = BUCKETS  # the slot holding the sum of the latencies, ns
BOUNDS_S = tuple((1 << k) * 1e-6 for k in range(BUCKETS - 1))  # upper bounds, seconds


def new_histogram() -> Histogram:
    """Zeroed counts, then the sum slot."""
    return array("q", bytes(8 * (BUCKETS + 1)))


def bucket(ns: int) -> int:
    """The bucket of a latency of `ns` nanoseconds: the first k with ns <= 2**k us."""
    micros = max(1, -(-ns // 1000))
    return min((micros - 1).bit_length(), BUCKETS - 1)


def observe(histogram: Histogram, ns: int) -> None:
    histogram[bucket(ns)] += 1
    histogram[SUM] += ns


def add(total: Histogram, other: Histogram) -> None:
    """Fold `other` into `total`."""
    for k, value in enumerate(other):
        total[k] += value


def cumulative(histogram: Histogram) -> list[tuple[str, int]]:
    """(le, cumulative count) pairs as Prometheus wants them, +Inf last."""
    counts = list(accumulate(histogram[:BUCKETS]))
    return [*((repr(b), c) for b, c in zip(BOUNDS_S, counts, strict=False)),
            ("+Inf", counts[-1])]


def _bound_us(k: int) -> float | None:
    return float(1 << k) if k < BUCKETS - 1 else None  # None: beyond the last bound


def summary(histogram: Histogram) -> dict[str, Any]:
    """The --stats document's view: count, mean, and the upper bound (us) of the bucket
    holding the median, the 99th percentile and the slowest fault (null: over ~1 s)."""
    running = list(accumulate(histogram[:BUCKETS]))
    total = running[-1]
    if total == 0:
        return {"count": 0, "mean_us": None, "p50_us": None, "p99_us": None, "max_us": None}

    def quantile(q: float) -> float | None:
        return _bound_us(next(k for k, n in enumerate(running) if n >= q * total))

    return {
        "count": total,
        "mean_us": round(histogram[SUM] / total / 1000, 2),
        "p50_us": quantile(0.5),
        "p99_us": quantile(0.99),
        "max_us": _bound_us(running.index(total)),
    }
