"""Working-set files: round trip, and fuzzing for 'clear error or correct result'."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.errors import FcsnapError
from fcsnap.workingset import (
    dump_working_set,
    parse_page_set,
    parse_working_set,
    read_working_set,
)

SIZE = 1 << 20


def test_round_trip_keeps_fault_order(tmp_path):
    offsets = [0x5000, 0x1000, 0xF0000, 0]
    path = tmp_path / "ws"
    path.write_bytes(dump_working_set(SIZE, offsets))
    assert read_working_set(path, SIZE).tolist() == offsets
    with pytest.raises(FcsnapError, match="recorded for"):
        read_working_set(path, 2 * SIZE)


@pytest.mark.parametrize(
    "offsets, message",
    [([SIZE], "beyond"), ([0x1001], "page-aligned"), ([0x1000, 0x1000], "twice")],
)
def test_bad_offsets_are_named(offsets, message):
    with pytest.raises(FcsnapError, match=message):
        parse_working_set(dump_working_set(SIZE, offsets))


def test_a_written_set_names_its_build():
    base = uuid.uuid4()
    data = dump_working_set(SIZE, [0x3000, 0x1000], base)
    size, offsets, against = parse_page_set(data, "ws")
    assert (size, offsets.tolist(), against) == (SIZE, [0x3000, 0x1000], base)
    assert parse_page_set(dump_working_set(SIZE, [0x1000]), "ws")[2] is None  # version 1
    with pytest.raises(FcsnapError, match="too short for a written-set file"):
        parse_page_set(data[:30], "ws")


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from([None, uuid.UUID(int=7)]))
def test_fuzz_mutations_clear_error_or_valid(data, base):
    blob = bytearray(dump_working_set(SIZE, [0, 0x3000, 0x2000], base))
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(0, len(blob)))] + data.draw(st.binary(max_size=16))
    try:
        size, offsets, _ = parse_page_set(bytes(blob), "ws")
    except FcsnapError as e:
        assert str(e)
        return
    assert (offsets < size).all() and (offsets % 4096 == 0).all()
    assert len(np.unique(offsets)) == len(offsets)
