"""The header: byte format (format.py) and the mapping algebra over it (algebra.py)."""

from fcsnap.header.algebra import merge, normalize, packed_runs, runs_for_blocks
from fcsnap.header.format import (
    BLOCK_SIZES,
    NIL,
    PAGE,
    WRITE_VERSION,
    Header,
    HeaderError,
    Lookup,
    Mapping,
    Metadata,
    dump_header,
    load_header,
    parse_header,
    validate,
)

__all__ = [
    "BLOCK_SIZES",
    "NIL",
    "PAGE",
    "WRITE_VERSION",
    "Header",
    "HeaderError",
    "Lookup",
    "Mapping",
    "Metadata",
    "dump_header",
    "load_header",
    "merge",
    "normalize",
    "packed_runs",
    "parse_header",
    "runs_for_blocks",
    "validate",
]
