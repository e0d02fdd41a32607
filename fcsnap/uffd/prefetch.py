"""The working-set prefetch: the pages a recorded restore faulted, installed right after the
handshake, as fast as the kernel takes them.

A working set is thousands of scattered pages (a tenth of a 1 GiB guest is 26,000) that the
guest needs before it gets anywhere, so the work per page is kept down to its ioctl: a batch
at a time gets its regions and sources from numpy, pages next to each other in guest memory
and in storage go in one UFFDIO_COPY, and a build laid out by `pack --working-set` holds a
batch's sources in one stretch of its diff, mapped (raw) or decompressed (zstd) once per
batch. The server serves faults between batches: pages of the working set one page each
(the prefetch brings the rest), others with fault-around, so the guest never waits for the
whole prefetch.

Installs do not wake anyone (DONTWAKE): a vCPU waiting on a page a batch installed has its
fault event queued, and the server, reading events after the batch, finds the page present
and wakes it. So a waiting vCPU is woken once per batch, not once per page: on a shared core,
waking it at every copy would switch to it and back for each page.
"""

from __future__ import annotations

import numpy as np

from fcsnap.header import ZEROS
from fcsnap.uffd import abi, fastpath
from fcsnap.uffd.installer import Installer, RegionState
from fcsnap.uffd.regions import Region
from fcsnap.units import PAGE

BATCH_MAX = 8 << 20  # batches double from the server's batch size up to this


class Prefetch:
    """The working set's pages, in fault order, with a cursor; `step` installs a batch.

    The first batch is `batch_bytes`, so the guest gets its first pages soon; each next one
    is twice the last, up to BATCH_MAX: every batch costs a round of array work and a look
    at the uffd, which at 1 MiB a batch took a fifth of a working set's prefetch time."""

    def __init__(self, installer: Installer, offsets: np.ndarray, batch_bytes: int) -> None:
        self.installer = installer
        self.batch_bytes = max(PAGE, batch_bytes)
        self.batch_max = max(self.batch_bytes, BATCH_MAX)
        self.regions = sorted(installer.regions.regions, key=lambda r: r.offset)
        starts = np.array([r.offset for r in self.regions], np.int64)
        ends = starts + np.array([r.size for r in self.regions], np.int64)
        sizes = np.array([r.page_size for r in self.regions], np.int64)
        index = np.maximum(np.searchsorted(starts, offsets, "right") - 1, 0)
        inside = (offsets >= starts[index]) & (offsets < ends[index])
        index, offsets = index[inside], offsets[inside]
        pages = (offsets - starts[index]) // sizes[index]
        # A 2 MiB page holds many recorded 4 KiB offsets: it goes in where its first was.
        _, first = np.unique(index * (1 << 40) + pages, return_index=True)
        keep = np.sort(first)
        self.index, self.pages = index[keep], pages[keep]
        for i, region in enumerate(self.regions):
            installer.states[region.base].wanted[self.pages[self.index == i]] = True
        self.pos = 0

    def step(self) -> bool:
        """Install about batch_bytes of the working set; False once all of it has been
        handled. An install the kernel refuses for now (EAGAIN: events to read first) ends
        the batch early, to be resumed there."""
        region = self.regions[int(self.index[self.pos])] if self.pos < len(self.pages) else None
        if region is None:
            return False
        end = min(self.pos + max(1, self.batch_bytes // region.page_size), len(self.pages))
        self.batch_bytes = min(self.batch_max, 2 * self.batch_bytes)
        while self.pos < end:
            i = int(self.index[self.pos])
            stop = self.pos + int(np.argmax(np.append(self.index[self.pos : end] != i, True)))
            done, stopped = self._install(self.regions[i], self.pages[self.pos : stop])
            self.pos += done
            if stopped:
                break
        return self.pos < len(self.pages)

    def _install(self, region: Region, pages: np.ndarray) -> tuple[int, bool]:
        """Install `pages` of one region, in order; (entries handled, stopped early)."""
        installer = self.installer
        state = installer.states[region.base]
        todo_at = np.flatnonzero(~(state.present[pages] | state.removed[pages]))
        if region.page_size != PAGE:  # hugetlb: few, big pages, taken one by one
            for k in todo_at.tolist():
                if self._fallback(region, int(pages[k]), 1):
                    return k, True
            return len(pages), False
        todo = pages[todo_at]
        n = len(todo)
        owner, storage = installer.pages.where(region.offset + todo * PAGE)
        source = np.zeros(n, np.int64)  # 0: no address at hand, ask `locate`
        try:
            for o in np.unique(owner[owner != ZEROS]).tolist():
                mine = owner == o
                sources = installer.pages.span_sources(o, storage[mine])
                if sources is not None:
                    source[mine] = sources
            # a run: pages next to each other in guest memory and in their source
            cut = np.ones(n, bool)
            cut[1:] = (todo[1:] != todo[:-1] + 1) | (owner[1:] != owner[:-1]) | (
                (owner[1:] != ZEROS) & ((storage[1:] != storage[:-1] + PAGE)
                                       | ((source[1:] != 0) & (source[1:] != source[:-1] + PAGE))))
            starts = np.flatnonzero(cut)
            counts = np.diff(starts, append=n)
            whole, stopped_at = self._copy_runs(region, todo, owner, source, starts, counts)
        finally:
            installer.pages.release_spans()
        self._account(state, todo, owner, starts[whole], counts[whole])
        if stopped_at is not None:
            return int(todo_at[starts[stopped_at]]), True
        return len(pages), False

    def _copy_runs(
        self, region: Region, todo: np.ndarray, owner: np.ndarray, source: np.ndarray,
        starts: np.ndarray, counts: np.ndarray,
    ) -> tuple[np.ndarray, int | None]:
        """One UFFDIO_COPY/ZEROPAGE per run, stretches of runs at a time in one call into C
        (copy_runs); runs without an address, and any the kernel turns down, go through the
        installer's own path. Returns the runs installed here whole (for `_account`) and the
        run where an install stopped, if one did."""
        zero = owner[starts] == ZEROS
        dst = (region.base + todo[starts] * PAGE).astype(np.uint64)
        src = np.where(zero, 0, source[starts]).astype(np.uint64)
        lengths = (counts * PAGE).astype(np.uint64)
        direct = zero | (src != 0)
        whole: list[np.ndarray] = []
        r, n = 0, len(starts)
        while r < n:
            done = 0
            if direct[r]:
                stop = r + int(np.argmin(np.append(direct[r:], False)))
                copied, done = copy_runs(self.installer, region, dst[r:stop], src[r:stop],
                                         lengths[r:stop])
                whole.append(np.arange(r, r + copied))
                r += copied
                if r == stop:
                    continue
                done //= PAGE  # run r stopped part way (EEXIST, EAGAIN, ...)
            page, count = int(todo[starts[r]]), int(counts[r])
            if done:  # part of the run went in before the kernel stopped
                o = int(owner[starts[r]])
                build = None if o == ZEROS else self.installer.pages.builds[o]
                self.installer.note_installed(
                    self.installer.states[region.base], page, done, build)
                self.installer.stats.prefetched_pages += done
            if self._fallback(region, page + done, count - done):
                return np.concatenate([np.zeros(0, np.int64), *whole]), r
            r += 1
        return np.concatenate([np.zeros(0, np.int64), *whole]), None

    def _fallback(self, region: Region, page: int, count: int) -> bool:
        """Pages [page, page+count) through the installer (it narrows to source runs,
        assembles, verifies, and handles EEXIST); True if it had to stop."""
        installed, resume = self.installer.install_span(region, page, page + count)
        self.installer.stats.prefetched_pages += installed
        return resume is not None

    def _account(
        self, state: RegionState, todo: np.ndarray, owner: np.ndarray, starts: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """Mark and count the runs `_copy_runs` installed whole, all at once."""
        if not len(starts):
            return
        at = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
        owners = owner[at]
        state.present[todo[at]] = True
        stats = self.installer.stats
        stats.installs += len(starts)
        stats.pages_served += len(at)
        stats.bytes_served += len(at) * PAGE
        stats.prefetched_pages += len(at)
        zero = owners == ZEROS
        stats.zero_pages += int(zero.sum())
        built, pages = np.unique(owners[~zero], return_counts=True)
        for o, n in zip(built.tolist(), pages.tolist(), strict=True):
            stats.per_build_pages[self.installer.pages.builds[o]] += n


def copy_runs(installer: Installer, region: Region, dst: np.ndarray, src: np.ndarray,
              lengths: np.ndarray) -> tuple[int, int]:
    """Install runs of `region` in order with DONTWAKE (write-protected where it is registered
    for it): run k is lengths[k] bytes at dst[k], copied from src[k], or zeros where src[k] is
    0. (Runs done whole, bytes of the next one installed before it failed.) The loop is in C
    when compiled (fp_copy_runs): at thousands of runs per working set, a Python call per run
    costs as much as the copies."""
    uffd, wp = installer.uffd, installer.states[region.base].wp
    if fastpath.compiled():
        ffi, lib = fastpath.ffi, fastpath.lib
        err, part = ffi.new("int *"), ffi.new("int64_t *")
        done = lib.fp_copy_runs(
            uffd, ffi.from_buffer("uint64_t[]", dst), ffi.from_buffer("uint64_t[]", src),
            ffi.from_buffer("uint64_t[]", lengths), len(dst), wp, installer.zeros_addr,
            len(installer.zeros) // PAGE * PAGE, err, part)
        return int(done), int(part[0])
    mode = abi.UFFDIO_COPY_MODE_DONTWAKE
    for k, (d, s, length) in enumerate(zip(dst.tolist(), src.tolist(), lengths.tolist(),
                                           strict=True)):
        try:
            if s == 0 and wp:
                installer.zeros_wp(d, length, mode)
            elif s == 0:
                abi.zeropage(uffd, d, length, abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE)
            else:
                abi.copy(uffd, d, s, length, mode | abi.UFFDIO_COPY_MODE_WP if wp else mode)
        except abi.UffdError as e:
            return k, e.copied
    return len(dst), 0
