"""Build options as people give them ('zstd:9', '2M', '256K'), checked before any work starts.

The command line and the Python API take the same spellings, so both parse them here; a value
that can never work is a UsageError (exit status 2 on the command line).
"""

from __future__ import annotations

from fcsnap.errors import UsageError
from fcsnap.units import BLOCK_SIZES, PAGE, parse_size

DEFAULT_LEVEL = 3  # zstd's own default level
DEFAULT_FRAME_SIZE = 256 << 10  # uncompressed bytes per zstd frame: what serving a page decodes
MAX_FRAME = 1 << 30
ADAPTIVE = -1  # restore's fault_around: choose the window per region (the default)
PURE_PYTHON_ENV = "FCSNAP_PURE_PYTHON"  # "1": no compiled module is used (fault path, pack's scan)
S3_SCHEME = "s3://"  # a --store starting so is a bucket (fcsnap/store/backends/s3.py)


def check_store_text(text: str) -> str:
    """A --store as typed. `s3:/x`, `s3:x` and `S3://x` are refused with the URL meant: read as
    a directory, each would make a store nobody asked for (a directory named so is `./s3:x`)."""
    if text[:3].lower() == "s3:" and not text.startswith(S3_SCHEME):
        raise UsageError(f"invalid store {text!r}: did you mean s3://{text[3:].lstrip('/')}?")
    return text


def parse_compression(text: str | None) -> tuple[str, int]:
    """None, 'none', 'zstd' or 'zstd:LEVEL' -> (compression, level)."""
    kind, _, level = (text or "none").partition(":")
    if kind == "none" and not level:
        return "none", DEFAULT_LEVEL
    if kind == "zstd":
        try:
            value = int(level) if level else DEFAULT_LEVEL
        except ValueError:
            value = 0
        if not 1 <= value <= 22:
            raise UsageError(f"invalid zstd level in {text!r}: use 1 to 22")
        return "zstd", value
    raise UsageError(f"invalid compression {text!r}: use none, zstd or zstd:LEVEL")


def parse_e2b_compression(text: str | None) -> tuple[str, int]:
    """export's codecs: those of parse_compression, and 'lz4' (E2B's LZ4 frames)."""
    if text == "lz4":
        return "lz4", 0
    try:
        return parse_compression(text)
    except UsageError:
        raise UsageError(f"invalid compression {text!r}: use none, zstd, zstd:LEVEL or "
                         "lz4") from None


E2B_MAX_FRAME = 64 << 20  # the largest E2B data frame fcsnap reads (docs/FORMAT.md §10.1)


def parse_e2b_frame_size(value: int | str) -> int:
    """export's uncompressed bytes per frame: whole pages, at most the largest frame
    fcsnap's E2B reader decodes."""
    size = value if isinstance(value, int) else parse_size(value, "frame size")
    if size < PAGE or size % PAGE or size > E2B_MAX_FRAME:
        raise UsageError(f"invalid frame size {value!r}: a multiple of 4K up to 64M")
    return size


def parse_block_size(value: int | str) -> int:
    """4K (pages) or 2M (hugepage guests), as bytes."""
    size = value if isinstance(value, int) else parse_size(value, "block size")
    if size not in BLOCK_SIZES:
        raise UsageError(f"invalid block size {value!r}: use 4K or 2M")
    return size


def parse_frame_size(value: int | str) -> int:
    """Uncompressed bytes per zstd frame: whole pages, at most 1G."""
    size = value if isinstance(value, int) else parse_size(value, "frame size")
    if size < PAGE or size % PAGE or size > MAX_FRAME:
        raise UsageError(f"invalid frame size {value!r}: a multiple of 4K up to 1G")
    return size


def parse_offset(value: int | str) -> int:
    """A byte offset into guest memory (4096, 0x7f3000, 2M)."""
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"invalid offset {value}: must not be negative")
        return value
    return parse_size(value, "offset")


def parse_fault_around(value: int | str) -> int:
    """restore --fault-around: "adaptive" (ADAPTIVE) or a fixed size in bytes (0: one page)."""
    if isinstance(value, int):
        return value
    if value.strip().lower() == "adaptive":
        return ADAPTIVE
    return parse_size(value, "fault-around size (or 'adaptive')")


def parse_cache_size(value: int | str) -> int:
    """restore --cache-size: the most the host chunk cache of S3 stores holds, in bytes."""
    size = value if isinstance(value, int) else parse_size(value, "cache size")
    if size <= 0:
        raise UsageError(f"invalid cache size {value!r}: must be more than 0")
    return size
