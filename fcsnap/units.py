"""Sizes and offsets as people type them (4K, 2M, 0x1000) and as they read them."""

from __future__ import annotations

from fcsnap.errors import UsageError

PAGE = 4096
"""The x86-64 base page: the unit of guest memory, of mappings and of working sets."""
HUGE_PAGE = 2 << 20
BLOCK_SIZES = (PAGE, HUGE_PAGE)
"""The block sizes a store may use: one base page, or one 2 MiB hugepage."""

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """Parse '4096', '0x1000', '4K', '2M', '1G' (binary units, optional 'iB'/'B')."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if raw.startswith("0X"):
            return int(raw, 16)
        suffix = raw[-1:] if raw[-1:] in _SUFFIXES else ""
        number = int(raw[: len(raw) - len(suffix)])
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: use e.g. 4096, 0x1000, 4K, 2M") from None
    if number < 0:
        raise UsageError(f"invalid {what} {text!r}: must not be negative")
    return number * _SUFFIXES[suffix]


def format_bytes(n: float) -> str:
    value = float(n)
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"


_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, what: str = "duration") -> float:
    """Parse '0', '90s', '30m', '1h', '2d', '1w' into seconds. A number other than 0 needs
    its unit: `--grace 1` meant as an hour must not delete builds a second old."""
    raw = text.strip().lower()
    suffix = raw[-1:] if raw[-1:].isalpha() else ""
    try:
        number = float(raw[: len(raw) - len(suffix)])
    except ValueError:
        number = -1.0
    if (suffix or "s") not in _DURATIONS or not 0 <= number < float("inf"):
        raise UsageError(f"invalid {what} {text!r}: use e.g. 0, 90s, 30m, 1h, 2d")
    if not suffix and number:
        raise UsageError(f"invalid {what} {text!r}: give a unit, s, m, h, d or w (e.g. "
                         f"{text.strip()}s, {text.strip()}h)")
    return number * _DURATIONS[suffix or "s"]


def format_block_size(n: int) -> str:
    """A block size as `--block-size` takes it (4K, 2M): one unit wherever block sizes appear."""
    for suffix in ("T", "G", "M", "K"):
        if n and n % _SUFFIXES[suffix] == 0:
            return f"{n // _SUFFIXES[suffix]}{suffix}"
    return str(n)


def plural(count: int, noun: str) -> str:
    """'1 build', '2 builds'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
