"""memfile.hashes: one xxh3-128 digest per stored block, in storage order (docs/FORMAT.md §5).

Layout (little-endian): magic b"FCSH", version u16 (1), algorithm u16 (1 = xxh3-128), block size
u64, count u64, then `count` 16-byte digests (xxh3-128 canonical, big-endian, as xxhash prints).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import xxhash

from fcsnap.errors import FcsnapError
from fcsnap.files import read_regular
from fcsnap.store.format.manifest import sidecar_pin as sidecar_pin  # the pin of a sidecar's bytes
from fcsnap.units import BLOCK_SIZES

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"FCSH"
VERSION = 1
XXH3_128 = 1
DIGEST_SIZE = 16
HEAD = struct.Struct("<4sHHQQ")

digest = xxhash.xxh3_128_digest


def zero_digest(block_size: int) -> bytes:
    return digest(bytes(block_size))


def dump_hashes(block_size: int, digests: bytes) -> bytes:
    """The sidecar bytes for concatenated digests."""
    return HEAD.pack(MAGIC, VERSION, XXH3_128, block_size, len(digests) // DIGEST_SIZE) + digests


def parse_hashes(data: bytes, source: str = "memfile.hashes") -> tuple[int, np.ndarray]:
    """(block size, digests as an (n, 16) uint8 array); FcsnapError on any inconsistency.
    (numpy is imported here, not by the module: a pack writes sidecars and never reads one.)"""
    import numpy as np

    if len(data) < HEAD.size:
        raise FcsnapError(f"{source}: too short for a hash sidecar ({len(data)} bytes)")
    magic, version, algorithm, block_size, count = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise FcsnapError(f"{source}: not a hash sidecar (bad magic {magic!r})")
    if version != VERSION:
        raise FcsnapError(f"{source}: unsupported hash sidecar version {version}")
    if algorithm != XXH3_128:
        raise FcsnapError(f"{source}: unknown hash algorithm id {algorithm}")
    if block_size not in BLOCK_SIZES:
        raise FcsnapError(f"{source}: block size {block_size} is neither 4 KiB nor 2 MiB")
    body = len(data) - HEAD.size
    if body != count * DIGEST_SIZE:
        raise FcsnapError(
            f"{source}: says {count} digests but holds {body} bytes of them "
            f"({count * DIGEST_SIZE} expected)"
        )
    table = np.frombuffer(data, dtype=np.uint8, offset=HEAD.size).reshape(count, DIGEST_SIZE)
    return block_size, table


def read_hashes(path: Path) -> tuple[int, np.ndarray]:
    return parse_hashes(read_regular(path, "hash sidecar"), str(path))
