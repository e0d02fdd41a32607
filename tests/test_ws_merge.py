"""`fcsnap ws merge`: pages seen in at least K of N recorded runs, in mean fault order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import fcsnap_here as fcsnap  # in this process: the merge is tested here
from hypothesis import given, settings
from hypothesis import strategies as st

from fcsnap.errors import FcsnapError
from fcsnap.workingset import (
    dump_working_set,
    merge_working_sets,
    parse_working_set,
    read_working_set,
)

SIZE = 1 << 20
P = 4096


def run(name: str, *pages: int) -> tuple[str, int, np.ndarray]:
    return name, SIZE, np.array([p * P for p in pages], np.int64)


def test_intersection_and_k_of_n_in_mean_fault_order() -> None:
    runs = [run("a", 1, 2, 3, 4), run("b", 4, 2, 5, 1), run("c", 2, 1, 6, 7)]
    # positions: 1: 0, .75, .25 -> .333; 2: .25, .25, 0 -> .167; 3: .5; 4: .75, 0 -> .375;
    # 5: .5; 6: .5; 7: .75
    _, both = merge_working_sets(runs, 3)
    assert (both // P).tolist() == [2, 1]
    _, two = merge_working_sets(runs, 2)
    assert (two // P).tolist() == [2, 1, 4]
    _, any_run = merge_working_sets(runs, 1)
    assert (any_run // P).tolist() == [2, 1, 4, 3, 5, 6, 7]  # ties (.5) by offset


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(0, SIZE // P - 1), unique=True, max_size=40),
                min_size=1, max_size=5), st.data())
def test_merge_keeps_exactly_the_pages_seen_k_times(runs, data) -> None:
    k = data.draw(st.integers(1, len(runs)))
    size, merged = merge_working_sets([run(str(i), *r) for i, r in enumerate(runs)], k)
    counts: dict[int, int] = {}
    for r in runs:
        for page in r:
            counts[page] = counts.get(page, 0) + 1
    assert size == SIZE
    assert sorted((merged // P).tolist()) == sorted(p for p, n in counts.items() if n >= k)
    parse_working_set(dump_working_set(size, merged.tolist()))  # a valid working-set file


def test_runs_of_other_guests_or_bad_k_are_refused() -> None:
    with pytest.raises(FcsnapError, match="b: recorded for 2097152 bytes.*not runs of the same"):
        merge_working_sets([run("a", 1), ("b", 2 * SIZE, np.array([0], np.int64))], 1)
    with pytest.raises(FcsnapError, match="--min-runs must be between 1 and 2"):
        merge_working_sets([run("a", 1), run("b", 1)], 3)


def write(path: Path, size: int, *pages: int) -> Path:
    path.write_bytes(dump_working_set(size, [p * P for p in pages]))
    return path


def test_cli_merges_and_writes_a_readable_file(tmp_path) -> None:
    a = write(tmp_path / "a.ws", SIZE, 3, 1, 2)
    b = write(tmp_path / "b.ws", SIZE, 3, 9, 1)
    out = tmp_path / "out.ws"
    done = fcsnap("ws", "merge", a, b, "-o", out)
    assert done.returncode == 0, done.stderr
    assert "2 pages seen in all of 2 runs" in done.stderr
    assert (read_working_set(out, SIZE) // P).tolist() == [3, 1]
    done = fcsnap("ws", "merge", a, b, "--min-runs", "1", "-o", out, "--quiet")
    assert done.returncode == 0 and done.stderr == ""
    assert sorted((read_working_set(out, SIZE) // P).tolist()) == [1, 2, 3, 9]


@pytest.mark.parametrize(("case", "status", "message"), [
    ("other-size", 1, "recorded for 2097152 bytes of guest memory"),
    ("garbage", 1, "not a working-set file"),
    ("missing", 1, "missing.ws"),
    ("k-zero", 2, "--min-runs"),
    ("k-too-big", 2, "--min-runs"),
    ("no-output-dir", 1, "cannot write"),
])
def test_cli_bad_input_is_one_line(tmp_path, case, status, message) -> None:
    a = write(tmp_path / "a.ws", SIZE, 1, 2)
    b = write(tmp_path / "b.ws", SIZE, 2)
    out = tmp_path / "out.ws"
    extra: list[str | Path] = []
    if case == "other-size":
        b = write(tmp_path / "b.ws", 2 * SIZE, 2)
    elif case == "garbage":
        b.write_bytes(b"not a working set, but long enough to have a header")
    elif case == "missing":
        b = tmp_path / "missing.ws"
    elif case == "k-zero":
        extra = ["--min-runs", "0"]
    elif case == "k-too-big":
        extra = ["--min-runs", "3"]
    elif case == "no-output-dir":
        out = tmp_path / "nope" / "out.ws"
    done = fcsnap("ws", "merge", a, b, "-o", out, *extra)
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    if status == 1:
        assert done.stderr.startswith("fcsnap: error: ") and done.stderr.count("\n") == 1
    assert not out.exists()
