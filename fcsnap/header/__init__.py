"""The header: its byte format, and the one parser, checker and writer of it (format.py)."""

from fcsnap.header.format import (
    NIL,
    WRITE_VERSION,
    ZEROS,
    Header,
    HeaderError,
    Lookup,
    Mapping,
    Metadata,
    check,
    decode,
    encode,
    load_header,
    parse_header,
    to_records,
)
from fcsnap.units import BLOCK_SIZES, PAGE

__all__ = [
    "BLOCK_SIZES",
    "NIL",
    "PAGE",
    "WRITE_VERSION",
    "ZEROS",
    "Header",
    "HeaderError",
    "Lookup",
    "Mapping",
    "Metadata",
    "check",
    "decode",
    "encode",
    "load_header",
    "parse_header",
    "to_records",
]
