"""Synthetic guest memory for tests, benchmarks and the demo.

The mix follows what guest memory looks like: long runs of zero pages (free memory), a few
percent of duplicated pages (shared libraries, page cache copies), and varied data, part of it
compressible (text, page tables, slab) and part not (already compressed or random data).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fcsnap.units import PAGE


def _compressible(rng: np.random.Generator, pages: int) -> np.ndarray:
    """Low-entropy pages: words from a small vocabulary with runs of repeated bytes."""
    vocab = rng.integers(0, 256, size=(64, 16), dtype=np.uint8)
    words = rng.integers(0, 64, size=pages * PAGE // 16)
    return vocab[words].reshape(pages, PAGE)


def synthetic_memory(
    size: int,
    seed: int = 0,
    zero_share: float = 0.6,
    dup_share: float = 0.03,
    compressible_share: float = 0.5,
) -> np.ndarray:
    """A (size // 4096, 4096) uint8 array of guest pages."""
    rng = np.random.default_rng(seed)
    pages = size // PAGE
    mem = np.zeros((pages, PAGE), np.uint8)
    # Zero runs: alternate data and zero runs with geometric lengths until the share is met.
    is_data = np.zeros(pages, bool)
    pos = 0
    while pos < pages:
        data_run = int(rng.geometric(1 / max(2.0, 64 * (1 - zero_share))))
        zero_run = int(rng.geometric(1 / max(2.0, 64 * zero_share)))
        is_data[pos : pos + data_run] = True
        pos += data_run + zero_run
    data_pages = np.flatnonzero(is_data)
    n_comp = int(len(data_pages) * compressible_share)
    comp = rng.permutation(data_pages)[:n_comp]
    mem[comp] = _compressible(rng, len(comp))
    rand_pages = np.setdiff1d(data_pages, comp)
    mem[rand_pages] = np.frombuffer(
        rng.bytes(len(rand_pages) * PAGE), np.uint8
    ).reshape(-1, PAGE)
    n_dup = int(pages * dup_share)
    if n_dup and len(data_pages) > 1:
        src = rng.choice(data_pages, n_dup)
        dst = rng.choice(data_pages, n_dup)
        mem[dst] = mem[src]
    return mem


def evolve(
    mem: np.ndarray, seed: int, dirty_share: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """The next snapshot: a share of pages rewritten, some zeroed, some copied from elsewhere.

    Returns the new pages and the sorted indices of the pages the guest wrote (its dirty set).
    """
    rng = np.random.default_rng(seed)
    pages = len(mem)
    new = mem.copy()
    dirty = np.unique(rng.choice(pages, max(1, int(pages * dirty_share)), replace=False))
    kinds = rng.integers(0, 10, len(dirty))
    rewrite = dirty[kinds < 6]
    new[rewrite] = np.frombuffer(rng.bytes(len(rewrite) * PAGE), np.uint8).reshape(-1, PAGE)
    new[dirty[kinds == 6]] = 0
    copies = dirty[kinds >= 7]
    new[copies] = mem[rng.choice(pages, len(copies))]
    small = dirty[kinds == 9]  # a few bytes changed in place, as most guest writes are
    new[small, :8] = rng.integers(0, 256, size=(len(small), 8), dtype=np.uint8)
    return new, dirty


def write_full(path: Path, mem: np.ndarray) -> None:
    """A Full snapshot memory file: every page written, zeros included."""
    with open(path, "wb") as f:
        f.write(mem.tobytes())


def write_sparse_diff(path: Path, mem: np.ndarray, dirty: np.ndarray) -> None:
    """A Diff snapshot memory file: only the dirty pages hold data, the rest are holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, mem.size)
        for page in dirty.tolist():
            os.pwrite(fd, mem[page].tobytes(), page * PAGE)
    finally:
        os.close(fd)
