"""Write tracking: which guest memory is registered for write-protect, and the written set.

A VM whose memory is registered MISSING|WP (E2B's Firecracker builds) learns which pages the
guest dirtied from write-protect faults, so every page the server installs on its own account
(a read fault, fault-around, prefetch, populate, eager) must go in write-protected, and only the
page a write fault asked for goes in writable. `restore --track-writes` does the same for memory
Firecracker registered MISSING only: the server, holding the VM's uffd, adds WP to the regions
right after the handshake (uffd ioctls act on the memory of the process that made the uffd).

Whether a region is registered for WP is asked of the kernel, not assumed from an option:
UFFDIO_WRITEPROTECT lifting protection (without waking anyone) on the whole region answers
ENOENT where WP is not registered. At the handshake nothing is installed yet, so it changes
nothing (UFFDIO_REGISTER's `ioctls` answer would not do: it reflects the mode asked for, not
the range's; /proc/PID/smaps needs ptrace access to a VMM that may run as another user).

The written set is kept per region page: WRITTEN once the guest wrote it (a write fault on a
missing page, or a WP fault), REMOVED once a balloon gave it back (it reads zeros now, unlike
the build served). Both go into the written-set file: a page in neither reads as it did at the
start of the interval.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fcsnap.errors import FcsnapError
from fcsnap.store.operations.scan import consecutive_runs
from fcsnap.uffd import abi
from fcsnap.uffd.regions import Region
from fcsnap.units import PAGE

WRITTEN = 1  # the guest wrote the page (csrc/fastpath.h FP_WRITTEN)
REMOVED = 2  # a balloon gave it back: it reads zeros (FP_REMOVED)
FAULT_FLAGS = abi.UFFD_PAGEFAULT_FLAG_WRITE | abi.UFFD_PAGEFAULT_FLAG_WP
BUSY_WAIT = 1.0  # seconds the kernel may answer EAGAIN (a balloon's REMOVE in flight)


class RegionState(Protocol):
    """What write tracking reads of a region's state (installer.RegionState, which imports
    this module)."""

    region: Region
    written: np.ndarray  # per page: WRITTEN, REMOVED
    present: np.ndarray  # per page: installed
    pending: np.ndarray  # per page: a background checkpoint has yet to copy it


def fault_token(address: int, flags: int) -> int:
    """A fault as one int: its page-aligned address with its WRITE and WP flags in the low
    bits (how faults are queued, retried and handed between the C loop and Python)."""
    return (address & ~(PAGE - 1)) | (flags & FAULT_FLAGS)


@dataclass(frozen=True)
class Tracking:
    """What the kernel says of a VM's regions: those registered for write-protect (their
    installs go in protected), whether the server added the registration, and whether the
    written set is complete (every region protected, WP faults delivered to the server)."""

    protected: frozenset[int]  # region bases
    added: bool
    recorded: bool

    @property
    def mode(self) -> str | None:
        """The --stats `write_tracking`: "registered" (by the VMM), "added" (--track-writes),
        "partial" (no written set: some regions only, or the kernel resolves the faults,
        WP_ASYNC), None (no region protected)."""
        if not self.protected:
            return None
        if not self.recorded:
            return "partial"
        return "added" if self.added else "registered"


def registered_wp(uffd: int, region: Region, read_events: Callable[[], int]) -> bool:
    """Whether the kernel has `region` registered for write-protect on `uffd` (see the
    module docstring for how it is asked). While the kernel answers EAGAIN (an event such as
    a balloon's REMOVE is to be read first) `read_events` reads what is pending (returning
    how many) and it asks again."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            abi.writeprotect(uffd, region.base, region.size,
                             abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
            return True
        except abi.UffdError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):  # EINVAL: a kernel without WP
                return False
            if e.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise FcsnapError(f"asking whether the region at {region.base:#x} is "
                                  f"write-protected failed: {os.strerror(e.errno)}") from e
        if not read_events():
            time.sleep(0.0005)  # read already: the VMM is finishing the change


def set_up(uffd: int, regions: list[Region], track_writes: bool,
           read_events: Callable[[], int]) -> Tracking:
    """Find the regions registered for WP; with `track_writes`, register the rest MISSING|WP.
    FcsnapError (one line) where the kernel cannot write-protect a region or would resolve
    the faults itself (UFFD_FEATURE_WP_ASYNC: no write would be seen). `read_events` as for
    `registered_wp`."""
    features = abi.uffd_features(uffd)
    if features is None:  # /proc cannot tell: the kernel's answers to REGISTER decide
        features = abi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    protected = {r.base for r in regions if registered_wp(uffd, r, read_events)}
    added = False
    if track_writes:
        if features & abi.UFFD_FEATURE_WP_ASYNC:
            raise FcsnapError("--track-writes: the VM's uffd resolves write-protect faults in "
                              "the kernel (UFFD_FEATURE_WP_ASYNC): no write would be seen")
        for r in regions:
            if r.base not in protected:
                _add_wp(uffd, r, features)
                protected.add(r.base)
                added = True
    recorded = (len(protected) == len(regions)
                and not features & abi.UFFD_FEATURE_WP_ASYNC)
    return Tracking(frozenset(protected), added, recorded)


def _add_wp(uffd: int, region: Region, features: int) -> None:
    """Register one region MISSING|WP (it was MISSING): hugetlb memory only where the VMM's
    uffd asked for UFFD_FEATURE_WP_HUGETLBFS_SHMEM."""
    where = f"the {region.page_size >> 10} KiB-page region at {region.base:#x}"
    if region.page_size != PAGE and not features & abi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM:
        raise FcsnapError(f"--track-writes: the kernel cannot write-protect {where} (hugetlb "
                          "memory, and the VM's uffd lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM)")
    try:
        abi.register(uffd, region.base, region.size,
                     abi.UFFDIO_REGISTER_MODE_MISSING | abi.UFFDIO_REGISTER_MODE_WP)
    except abi.UffdError as e:
        raise FcsnapError(f"--track-writes: the kernel cannot write-protect {where}: "
                          f"{os.strerror(e.errno)}") from e


def offsets(region: Region, pages: np.ndarray) -> np.ndarray:
    """Guest-memory offsets (4 KiB pages) of region pages `pages`, in order."""
    per = region.page_size // PAGE
    first = region.offset + pages.astype(np.int64) * region.page_size
    return (first[:, None] + np.arange(per, dtype=np.int64) * PAGE).ravel()


def written_count(states: Iterable[RegionState]) -> int:
    """4 KiB pages the guest wrote (WRITTEN), over every region."""
    return sum(int(np.count_nonzero(st.written & WRITTEN)) * st.region.page_size
               for st in states) // PAGE


def written_set(states: Iterable[RegionState]) -> np.ndarray:
    """Ascending guest-memory offsets of the 4 KiB pages written or given back (WRITTEN or
    REMOVED), over every region."""
    parts = [offsets(st.region, np.flatnonzero(st.written)) for st in states]
    return np.sort(np.concatenate([np.zeros(0, np.int64), *parts]))


def mark_pending(state: RegionState) -> np.ndarray:
    """Before a background checkpoint's take: mark the pages of `state`'s written set that
    are present pending (preimage.py); their guest-memory offsets."""
    pages = np.flatnonzero(state.written)
    pages = pages[state.present[pages]]
    state.pending[pages] = 1
    return offsets(state.region, pages)


def protect_again(uffd: int, state: RegionState, read_events: Callable[[], int]) -> None:
    """Start a new interval in one region: its written set emptied, then those pages
    write-protected again (in that order: a write after the protection is noted). While the
    kernel answers EAGAIN, `read_events` reads what is pending first. A VM gone: nothing to
    protect."""
    r = state.region
    pages = np.flatnonzero(state.written)
    state.written[pages] = 0
    for first, count in consecutive_runs(pages):
        while True:
            try:
                abi.writeprotect(uffd, r.base + first * r.page_size, count * r.page_size,
                                 abi.UFFDIO_WRITEPROTECT_MODE_WP)
                break
            except abi.UffdError as e:
                if e.errno == errno.ESRCH:
                    return
                if e.errno != errno.EAGAIN:
                    raise FcsnapError(f"write-protecting guest memory at {r.base:#x} again "
                                      f"failed: {os.strerror(e.errno)}") from e
            if not read_events():
                time.sleep(0.0005)  # read already: the VMM is finishing the change


def mark_written(states: Iterable[RegionState], offsets: np.ndarray) -> None:
    """Note the pages at guest-memory `offsets` as written again: a checkpoint that took them
    (and protected them again) and then failed gives them back to the next interval."""
    offsets = np.asarray(offsets, np.int64)
    for st in states:
        r = st.region
        inside = offsets[(offsets >= r.offset) & (offsets < r.offset + r.size)]
        st.written[(inside - r.offset) // r.page_size] |= WRITTEN
