"""Which blocks of a chunk just read hold data (the rest are zero pages, never stored).

Compiled (csrc/blockscan.c, built at install like the fault path) when it can be: a zero block
is read whole, a data block only to its first non-zero word, with the GIL released. Without
it (no C compiler at install, or FCSNAP_PURE_PYTHON=1) each block is compared with a zero block
by `bytes.startswith` (memcmp), same results. Neither imports numpy: a pack does not load it.
"""

from __future__ import annotations

import os
from functools import cache

from fcsnap.options import PURE_PYTHON_ENV

try:
    from fcsnap.store.operations._blockscan import ffi, lib
except ImportError:  # not compiled: no C compiler when fcsnap was installed
    ffi = lib = None


def nonzero_blocks(data: bytes | bytearray | memoryview, block_size: int) -> list[int]:
    """The positions (0, 1, ...) of the blocks of `data` (whole blocks of `block_size`, a
    multiple of 256) that hold a non-zero byte, ascending."""
    count = len(data) // block_size
    if lib is not None and os.environ.get(PURE_PYTHON_ENV, "") != "1":
        out = ffi.new("int64_t[]", count)
        found = lib.bs_nonzero(ffi.from_buffer("uint8_t[]", data), count, block_size, out)
        return ffi.unpack(out, found)
    whole = data if isinstance(data, bytes | bytearray) else bytes(data)
    zero = _zero_block(block_size)
    return [j for j in range(count) if not whole.startswith(zero, j * block_size)]


@cache
def _zero_block(block_size: int) -> bytes:
    return bytes(block_size)
