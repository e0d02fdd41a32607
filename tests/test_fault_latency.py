"""`fcsnap restore --stats`: every fault served is timed exactly once, whichever path served
it (the compiled loop, or Python for ballooned pages, retries and FCSNAP_PURE_PYTHON=1).

Real parts: the restore process, the Firecracker stand-in with real userfaultfd checking every
byte, and a balloon giving pages back amid faults (REMOVE events, EAGAIN retries).
"""

from __future__ import annotations

import test_hotpath
import test_restore
from helpers import Lineage, check_served, restore
from test_restore import PAGE

lineages = test_restore.lineages  # the fixtures, shared
path = test_hotpath.path


def test_every_fault_is_timed_once_with_threads_and_a_balloon(lineages, procs, path) -> None:
    """Four threads on the same pages (refaults, EEXIST) and a balloon cycling mid-run
    (faults on removed pages, handed to Python, and retries): the histogram counts each fault
    served once."""
    lineage: Lineage = lineages[("none", PAGE)]
    out = restore(procs, lineage, ("--fault-around", "64K"), threads=4, shared_pages=True,
                  balloon=[(64 * PAGE, 32 * PAGE)], balloon_cycles=3, order="random")
    check_served(out, lineage)
    stats = out.stats
    assert stats["remove_events"] >= 1
    test_hotpath.compiled_share(stats, path)
    timed = stats["fault_latency"]
    assert timed["count"] == stats["faults"] > 0
    assert 0 < timed["mean_us"] < 1e6
    assert timed["p50_us"] <= timed["p99_us"] <= (timed["max_us"] or float("inf"))
