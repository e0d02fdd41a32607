"""Adaptive fault-around (fcsnap/uffd/faultaround.py, csrc/fastpath.c `adaptive_window`):
one page per scattered fault, growing windows for each thread reading in order, the same
windows on the compiled and the Python path; and --record-ws recording what the guest faulted.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_hotpath
import test_restore
from helpers import check_served, restore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hotpath import GUEST, Served, assert_paths_agree, needs_compiled
from test_restore import PAGE, SIZE

from fcsnap.errors import FcsnapError, FetchPending
from fcsnap.options import ADAPTIVE, parse_fault_around
from fcsnap.uffd import fastpath
from fcsnap.uffd.faultaround import ADAPTIVE_MAX, STREAMS
from fcsnap.uffd.installer import DONE
from fcsnap.workingset import read_working_set

guest = test_hotpath.guest
lineages = test_restore.lineages
PAGES = GUEST // PAGE
MOST = ADAPTIVE_MAX // PAGE


def serve_python(served: Served, page: int) -> None:
    assert served.installer.fault(served.addr + page * PAGE) is DONE


def serve_compiled(served: Served, fast: fastpath.FastPath, page: int) -> None:
    outcome = fastpath.lib.fp_fault(fast.ctx, served.addr + page * PAGE)
    if outcome == fastpath.lib.FP_DEFER:  # a removed page: the server hands it to Python
        serve_python(served, page)
    else:
        assert outcome == fastpath.lib.FP_DONE


def read_in_order(served: Served, first: int, last: int, serve) -> None:  # noqa: ANN001
    """Fault every missing page of [first, last) in order, as a thread reading does."""
    for page in range(first, last):
        if not served.state.present[page]:
            serve(served, page)


@pytest.mark.parametrize("path", ["python", pytest.param("compiled", marks=needs_compiled)])
def test_scattered_faults_get_one_page_each(guest, path) -> None:
    """A scattered working set costs one page per fault, as with no fault-around."""
    s = Served(guest, ADAPTIVE, 64 << 20)
    try:
        fast = fastpath.FastPath(s.installer) if path == "compiled" else None
        pages = np.random.default_rng(3).choice(PAGES, 400, replace=False)
        for page in pages.tolist():
            if fast is None:
                serve_python(s, page)
            else:
                serve_compiled(s, fast, page)
        if fast is not None:
            fast.add_stats(s.stats)
        assert s.state.present[pages].all()
        # a fault next to one of the last STREAMS ones continues it (4 pages): rare here
        assert len(pages) <= int(s.state.present.sum()) == s.stats.pages_served
        assert s.stats.pages_served < 1.05 * len(pages)
    finally:
        s.close()


@pytest.mark.parametrize("path", ["python", pytest.param("compiled", marks=needs_compiled)])
def test_threads_reading_in_order_get_growing_windows(guest, path) -> None:
    """Four interleaved sequential readers (one stream each) reach the largest window fast:
    reading all 16 MiB takes a few dozen faults, and the bytes are right."""
    s = Served(guest, ADAPTIVE, 64 << 20)
    try:
        fast = fastpath.FastPath(s.installer) if path == "compiled" else None
        serve = serve_python if fast is None else (lambda sv, p: serve_compiled(sv, fast, p))
        shares = [range(k * PAGES // 4, (k + 1) * PAGES // 4) for k in range(4)]
        cursors = [iter(share) for share in shares]
        faults = 0
        while cursors:
            for cursor in list(cursors):  # round robin: the streams interleave
                page = next((p for p in cursor if not s.state.present[p]), None)
                if page is None:
                    cursors.remove(cursor)
                    continue
                serve(s, page)
                faults += 1
        if fast is not None:
            fast.add_stats(s.stats)
        assert s.state.present.all()
        # per stream: 1+4+16+64+128+256 pages, then MOST at a time
        assert faults <= 4 * (6 + (PAGES // 4) // MOST)
        assert int(s.state.streams[1 : 2 * STREAMS : 2].max()) == MOST
        for i in np.random.default_rng(1).choice(PAGES, 50).tolist():
            assert s.page(i) == guest.memory[i].tobytes()
    finally:
        s.close()


steps = st.lists(
    st.one_of(
        st.tuples(st.just("fault"), st.integers(0, PAGES - 1), st.integers(1, 1)),
        st.tuples(st.just("read"), st.integers(0, PAGES - 1), st.integers(2, 3000)),
        st.tuples(st.just("remove"), st.integers(0, PAGES - 1), st.integers(1, 80)),
    ),
    min_size=1, max_size=30,
)


@needs_compiled
@pytest.mark.parametrize("budget", [64 << 20, 4 << 20], ids=["mapped", "bounded"])
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=steps)
def test_compiled_and_python_choose_the_same_windows(guest, budget, sequence) -> None:
    """Scattered faults, reads in order and balloon removes through each path leave the
    same pages present with the same bytes, the same stream tables and the same stats."""
    python = Served(guest, ADAPTIVE, budget)
    compiled = Served(guest, ADAPTIVE, budget)
    try:
        fast = fastpath.FastPath(compiled.installer)
        for kind, page, extra in sequence:
            if kind == "remove":
                count = min(extra, PAGES - page)
                python.remove(page, count)
                compiled.remove(page, count)
            elif kind == "fault":
                if not python.state.present[page]:
                    serve_python(python, page)
                    serve_compiled(compiled, fast, page)
            else:
                last = min(PAGES, page + extra)
                read_in_order(python, page, last, serve_python)
                read_in_order(compiled, page, last, lambda sv, p: serve_compiled(sv, fast, p))
            assert np.array_equal(python.state.streams, compiled.state.streams)
        assert_paths_agree(python, compiled, fast, guest)
    finally:
        python.close()
        compiled.close()


def test_fault_around_option_values() -> None:
    assert parse_fault_around("adaptive") == parse_fault_around(" Adaptive ") == ADAPTIVE
    assert parse_fault_around("64K") == 64 << 10
    assert parse_fault_around("0") == 0
    with pytest.raises(FcsnapError, match="invalid fault-around size"):
        parse_fault_around("lots")


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_default_restore_serves_in_order_readers_in_few_faults(
        lineages, procs, path, monkeypatch) -> None:
    """The default (adaptive) restore: every byte right, far fewer faults than pages for
    threads reading in order, on both paths."""
    use_path(path, monkeypatch)
    lineage = lineages["none", PAGE]
    out = restore(procs, lineage, (), threads=2)
    check_served(out, lineage)
    assert out.stats["pages_served"] == SIZE // PAGE
    assert out.stats["faults"] * 16 < SIZE // PAGE
    assert (out.stats["compiled_faults"] > 0) == (path == "compiled")


def use_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "python":
        monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1")
    elif fastpath.lib is None:
        pytest.skip("the compiled fault path is not built (no C compiler)")


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_recording_holds_the_pages_the_guest_faulted(
        lineages, procs, tmp_path, path, monkeypatch) -> None:
    """With the default fault-around, --record-ws serves one page per fault and records
    exactly the pages the guest read, in its order, not windows around them; the compiled
    loop serves and records on its own."""
    use_path(path, monkeypatch)
    lineage = lineages["none", PAGE]
    ws = tmp_path / "ws"
    out = restore(procs, lineage, ("--record-ws", str(ws)), touch=0.05, order="sequential",
                  threads=1)
    check_served(out, lineage)
    recorded = read_working_set(ws, SIZE)
    touched = round(0.05 * SIZE / PAGE)
    assert len(recorded) == out.stats["faults"] == out.stats["pages_served"] == touched
    assert np.all(np.diff(recorded) > 0)  # in the order the guest read them
    assert (out.stats["compiled_faults"] == out.stats["faults"]) == (path == "compiled")


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_recording_random_reads_of_two_threads(
        lineages, procs, tmp_path, path, monkeypatch) -> None:
    """Two threads reading random pages: the recording holds each page read exactly once,
    and nothing else."""
    use_path(path, monkeypatch)
    lineage = lineages["none", PAGE]
    ws = tmp_path / "ws"
    out = restore(procs, lineage, ("--record-ws", str(ws)), touch=0.2, order="random",
                  seed=4, threads=2)
    check_served(out, lineage)
    recorded = read_working_set(ws, SIZE)
    assert len(recorded) == out.stats["pages_served"] == round(0.2 * SIZE / PAGE)


def test_fixed_window_while_recording_records_faulted_pages_only(
        lineages, procs, tmp_path) -> None:
    """Told a fixed window, the recording run installs windows but records only the pages
    that faulted (docs/restore.md, "Working sets", says what that leaves out)."""
    lineage = lineages["none", PAGE]
    ws = tmp_path / "ws"
    out = restore(procs, lineage, ("--record-ws", str(ws), "--fault-around", "64K"),
                  touch=0.05, order="sequential", threads=1)
    check_served(out, lineage)
    recorded = read_working_set(ws, SIZE)
    assert len(recorded) == out.stats["faults"] < out.stats["pages_served"]


def pending_on(served: Served, pending: set[int]) -> None:
    """Guest pages in `pending` are still being fetched (object storage): a read of any of
    them answers FetchPending, as the chunk cache does for a fault server."""
    locate = served.pages.locate

    def waiting(offset: int, length: int):  # noqa: ANN202
        if pending.intersection(range(offset // PAGE, -(-(offset + length) // PAGE))):
            raise FetchPending("being fetched")
        return locate(offset, length)

    served.pages.locate = waiting  # type: ignore[method-assign]


def test_a_fault_waiting_on_a_fetch_takes_no_stream_and_no_window(guest) -> None:
    """Asked again while its bytes are fetched, a fault takes no further stream slot (that
    would push out other readers' streams) and is served one page; pages of its window still
    being fetched do not hold up a page that is there."""
    s = Served(guest, ADAPTIVE, 64 << 20)
    try:
        pending: set[int] = set()
        pending_on(s, pending)
        read_in_order(s, 0, 64, serve_python)  # one stream, its window grown
        scattered = PAGES // 2
        pending.add(scattered)
        with pytest.raises(FetchPending):
            s.installer.fault(s.addr + scattered * PAGE)
        streams = s.state.streams.copy()
        for _ in range(3 * STREAMS):
            with pytest.raises(FetchPending):
                s.installer.fault(s.addr + scattered * PAGE, since=1)
        assert (s.state.streams == streams).all()
        pending.clear()
        served = s.stats.pages_served
        assert s.installer.fault(s.addr + scattered * PAGE, since=1) is DONE
        assert s.stats.pages_served == served + 1
        # the in-order reader goes on: its next window's far pages are not fetched yet
        nxt = int(np.flatnonzero(~s.state.present[64:])[0]) + 64
        pending.update(range(nxt + 1, nxt + MOST))
        assert s.installer.fault(s.addr + nxt * PAGE) is DONE
        assert s.state.present[nxt] and not s.state.present[nxt + 1:nxt + MOST].any()
        assert s.page(nxt) == guest.memory[nxt].tobytes()
    finally:
        s.close()
