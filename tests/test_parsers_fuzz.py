"""Fuzzing the hash sidecar and build.json parsers: a correct result or an FcsnapError with a
message, never another exception, and work in proportion to the input, not to what it claims.

(The header, seek table, handshake regions and working sets have their fuzz tests next to the
rest of their tests, E2B's V4/V5 headers in test_e2b_headers.py (the whole file, and the body
under the LZ4 layer), the handshake as received from a socket in test_handshake.py;
bench/fuzz/run.py runs all nine for longer.)
"""

from __future__ import annotations

import json
import time
import tracemalloc
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.errors import FcsnapError
from fcsnap.header import BLOCK_SIZES
from fcsnap.store.format.hashes import (
    DIGEST_SIZE,
    HEAD,
    MAGIC,
    VERSION,
    XXH3_128,
    dump_hashes,
    parse_hashes,
)
from fcsnap.store.format.manifest import COMPRESSIONS, Manifest, Stats, parse_manifest
from fcsnap.workingset import HEAD as WS_HEAD
from fcsnap.workingset import MAGIC as WS_MAGIC
from fcsnap.workingset import dump_working_set, parse_working_set

EXAMPLES = settings(max_examples=300, deadline=None)


# -- hash sidecar -----------------------------------------------------------------------------


def check_hashes(data: bytes) -> None:
    """parse_hashes gives back exactly what dump_hashes would write, or a named error."""
    try:
        block_size, table = parse_hashes(data)
    except FcsnapError as e:
        assert str(e).startswith("memfile.hashes: ")
        return
    assert block_size in BLOCK_SIZES
    assert table.shape == (len(table), DIGEST_SIZE) and table.dtype == np.uint8
    assert dump_hashes(block_size, table.tobytes()) == data


def sidecar(count: int, block_size: int = 4096) -> bytes:
    return dump_hashes(block_size, bytes(i % 251 for i in range(count * DIGEST_SIZE)))


@EXAMPLES
@given(st.binary(max_size=200))
def test_hashes_arbitrary_bytes(blob: bytes) -> None:
    check_hashes(blob)
    check_hashes(HEAD.pack(MAGIC, VERSION, XXH3_128, 4096, len(blob) // DIGEST_SIZE) + blob)


@EXAMPLES
@given(
    count=st.integers(0, 6),
    block_size=st.sampled_from(BLOCK_SIZES),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=3),
    cut=st.integers(0, 8),
    tail=st.binary(max_size=20),
)
def test_hashes_mutated(
    count: int, block_size: int, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    blob = bytearray(sidecar(count, block_size))
    for position, mask in flips:
        blob[position % len(blob)] ^= mask
    check_hashes(bytes(blob[: len(blob) - cut]) + tail)


@pytest.mark.parametrize("count", [2**64 - 1, 2**63, 10**12, 1 << 40])
def test_hashes_huge_count_with_tiny_body_fails_without_allocating(count: int) -> None:
    data = HEAD.pack(MAGIC, VERSION, XXH3_128, 4096, count) + bytes(3 * DIGEST_SIZE)
    refused_cheaply(parse_hashes, data, f"says {count} digests but holds 48 bytes")


def refused_cheaply(parse: Callable[[bytes], object], data: bytes, message: str) -> None:
    """`parse` refuses `data` with `message`, in under 0.5 s and 64 KiB: a count field that
    promises more than the data holds must not be believed."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(FcsnapError, match=message):
            parse(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10
    assert time.perf_counter() - started < 0.5


def test_hashes_table_is_a_view_of_the_input() -> None:
    """Memory in proportion to the input: the digests are not copied."""
    data = sidecar(1000)
    _, table = parse_hashes(data)
    assert len(table) == 1000 and not table.flags.owndata


# -- build.json -------------------------------------------------------------------------------

GEN0 = uuid.UUID("11111111-1111-4111-8111-111111111111")
GEN1 = uuid.UUID("22222222-2222-4222-8222-222222222222")
VALID: dict[str, Any] = {
    "build_id": str(GEN1),
    "parent_build_id": str(GEN0),
    "generation": 1,
    "base_build_id": str(GEN0),
    "block_size": 4096,
    "size": 1 << 20,
    "compression": "zstd",
    "compression_level": 3,
    "frame_size": 256 << 10,
    "created_at": "2025-01-01T00:00:00+00:00",
    "fcsnap_version": "0.1.0",
    "source": "mem.snap",
    "stats": {"blocks_total": 256, "blocks_stored": 12, "bytes_stored": 49152},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    | st.sampled_from([str(GEN0), "zstd", "none", 4096, 2 << 20, 0, -1, 2**64, 2**64 - 1]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def check_manifest(data: bytes) -> None:
    """parse_manifest gives a manifest keeping every rule, which survives a round trip, or a
    named error."""
    try:
        manifest = parse_manifest(data)
    except FcsnapError as e:
        assert str(e).startswith("build.json: ")
        return
    assert isinstance(manifest, Manifest)
    assert manifest.block_size in BLOCK_SIZES and manifest.compression in COMPRESSIONS
    assert manifest.size > 0 and manifest.size % manifest.block_size == 0
    assert (manifest.parent_build_id is None) == (manifest.generation == 0)
    assert manifest.compression == "none" or manifest.frame_size
    numbers = [manifest.generation, manifest.size, *vars(manifest.stats).values()]
    assert all(type(n) is int and 0 <= n < 1 << 64 for n in numbers)
    again = parse_manifest(json.dumps(manifest.to_json()).encode())
    assert again == manifest


def test_valid_manifest_round_trips() -> None:
    manifest = parse_manifest(json.dumps(VALID).encode())
    assert manifest.stats == Stats(blocks_total=256, blocks_stored=12, bytes_stored=49152)
    check_manifest(json.dumps(VALID).encode())


@EXAMPLES
@given(st.binary(max_size=300))
def test_manifest_arbitrary_bytes(blob: bytes) -> None:
    check_manifest(blob)


@EXAMPLES
@given(json_values)
def test_manifest_arbitrary_json(value: Any) -> None:
    check_manifest(json.dumps(value).encode())


@EXAMPLES
@given(
    changes=st.dictionaries(st.sampled_from(sorted(VALID)), json_values, max_size=3),
    dropped=st.sets(st.sampled_from(sorted(VALID)), max_size=2),
    stats=st.dictionaries(st.sampled_from(sorted(Stats.__dataclass_fields__)), json_values,
                          max_size=2),
)
def test_manifest_mutated_fields(
    changes: dict[str, Any], dropped: set[str], stats: dict[str, Any]
) -> None:
    raw = {**VALID, **changes}
    if "stats" not in changes:
        raw["stats"] = {**VALID["stats"], **stats}
    for key in dropped:
        raw.pop(key, None)
    check_manifest(json.dumps(raw).encode())


@EXAMPLES
@given(st.data())
def test_manifest_mutated_bytes(data: st.DataObject) -> None:
    blob = bytearray(json.dumps(VALID).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    check_manifest(bytes(blob[: data.draw(st.integers(0, len(blob)))]))


@pytest.mark.parametrize("blob", [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 1000 + b"]" * 1000])
def test_manifest_deep_nesting_is_an_error_not_a_recursion_crash(blob: bytes) -> None:
    with pytest.raises(FcsnapError):
        parse_manifest(blob)


# -- working sets ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2**64 - 1, 2**61, 1 << 40])
def test_working_set_huge_count_with_tiny_body_fails_without_allocating(count: int) -> None:
    data = WS_HEAD.pack(WS_MAGIC, 1, 0, 1 << 30, count) + bytes(24)
    refused_cheaply(parse_working_set, data, f"says {count} pages but holds 24 bytes")




def test_working_set_offsets_past_2_63_are_not_wrapped_negative() -> None:
    """Offsets are checked as stored (u64): 0xFFFF...F000 once became -4096 and passed."""
    with pytest.raises(FcsnapError, match="beyond"):
        parse_working_set(dump_working_set(1 << 20, [2**64 - 4096]))
    with pytest.raises(FcsnapError, match="below 2"):
        parse_working_set(dump_working_set(2**63, [0]))
