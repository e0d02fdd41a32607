"""The guest memory regions Firecracker sends in its UFFD handshake (docs/FORMAT.md §9.4).

Three payload versions exist: v1.1-v1.6 {base_host_virt_addr, size, offset}; v1.7-v1.11 add
page_size_kib; v1.12+ send page_size and page_size_kib with the same value. Despite its name,
page_size_kib is in bytes.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from fcsnap.errors import FcsnapError
from fcsnap.units import HUGE_PAGE, PAGE

PAGE_SIZES = (PAGE, HUGE_PAGE)
MAX_REGIONS = 1024


class HandshakeError(FcsnapError):
    """Firecracker's handshake is malformed or does not fit the build being served."""


@dataclass(frozen=True, slots=True)
class Region:
    base: int  # host virtual address in Firecracker's process
    size: int
    offset: int  # offset of the region in the memory file
    page_size: int

    @property
    def end(self) -> int:
        return self.base + self.size


def _field(obj: dict, key: str, index: int) -> int:
    value = obj[key]
    if type(value) is not int or value < 0 or value >= 1 << 64:
        raise HandshakeError(f"region {index}: {key} is not an unsigned 64-bit integer: {value!r}")
    return value


def parse_regions(payload: bytes, memory_size: int) -> list[Region]:
    """Parse the JSON region array and check it fits guest memory of `memory_size` bytes."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        preview = payload[:60].decode("utf-8", "replace")
        raise HandshakeError(f"handshake is not a JSON region array: {preview!r}") from None
    if not isinstance(raw, list) or not raw:
        raise HandshakeError("handshake must be a non-empty JSON array of regions")
    if len(raw) > MAX_REGIONS:
        raise HandshakeError(f"handshake lists {len(raw)} regions, more than {MAX_REGIONS}")
    regions = []
    for i, obj in enumerate(raw):
        if not isinstance(obj, dict):
            raise HandshakeError(f"region {i} is not a JSON object")
        for key in ("base_host_virt_addr", "size", "offset"):
            if key not in obj:
                raise HandshakeError(f"region {i}: missing {key}")
        sizes = {_field(obj, k, i) for k in ("page_size", "page_size_kib") if k in obj}
        if len(sizes) > 1:
            raise HandshakeError(f"region {i}: page_size and page_size_kib disagree: {sizes}")
        page_size = sizes.pop() if sizes else PAGE
        if page_size not in PAGE_SIZES:
            raise HandshakeError(f"region {i}: page size {page_size} is neither 4 KiB nor 2 MiB")
        region = Region(
            _field(obj, "base_host_virt_addr", i), _field(obj, "size", i),
            _field(obj, "offset", i), page_size,
        )
        if region.size == 0 or (region.base | region.size | region.offset) % page_size:
            raise HandshakeError(
                f"region {i}: address {region.base:#x}, size {region.size:#x} and offset "
                f"{region.offset:#x} must be non-zero multiples of its page size {page_size}"
            )
        if region.end > 1 << 64:
            raise HandshakeError(f"region {i}: [{region.base:#x}, +{region.size:#x}) runs past "
                                 "the end of the address space")
        if region.offset + region.size > memory_size:
            raise HandshakeError(
                f"region {i}: memory-file range [{region.offset:#x}, "
                f"{region.offset + region.size:#x}) is beyond the snapshot's "
                f"{memory_size:#x} bytes of guest memory (wrong build for this VM?)"
            )
        regions.append(region)
    by_offset = sorted(regions, key=lambda r: r.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.size > b.offset:
            raise HandshakeError(
                f"regions overlap in the memory file at {b.offset:#x}"
            )
    by_base = sorted(regions, key=lambda r: r.base)
    for a, b in zip(by_base, by_base[1:], strict=False):
        if a.end > b.base:
            raise HandshakeError(f"regions overlap in Firecracker's memory at {b.base:#x}")
    return by_base


class RegionMap:
    """Finds the region of a faulting host address (binary search over region bases)."""

    def __init__(self, regions: list[Region]) -> None:
        self.regions = sorted(regions, key=lambda r: r.base)
        self._bases = [r.base for r in self.regions]

    def find(self, address: int) -> Region | None:
        i = bisect.bisect_right(self._bases, address) - 1
        if i >= 0 and address < self.regions[i].end:
            return self.regions[i]
        return None
