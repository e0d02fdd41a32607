"""Every fault served is timed, by the compiled loop and by Python alike: the daemon's
`fcsnap_fault_service_seconds` histogram (parsed by prometheus-client's own parser) and the
`fault_latency` of each restore's stats count exactly the faults the restores served.

Real parts: the daemon as its own process, the Firecracker stand-in with real userfaultfd,
every byte it reads compared with the memory file. Every wait has a deadline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_daemon import Build, Daemon
from test_restore_faults import WAIT

from fcsnap.store.operations import ops
from fcsnap.store.operations.builder import BuildOptions
from fcsnap.testing.memimage import synthetic_memory, write_full
from fcsnap.uffd import fastpath, latency

SIZE = 8 << 20


def raw_store(root: Path) -> tuple[Path, Build]:
    """A store in `root` holding one raw build named "web": the kind the compiled loop
    serves."""
    write_full(root / "web.mem", synthetic_memory(SIZE, seed=71))
    head = ops.pack(root / "web.mem", root / "store", BuildOptions(name="web"))[1]
    return root / "store", Build("web", head.name, root / "web.mem")


@pytest.fixture(scope="module")
def raw_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Build]:
    return raw_store(tmp_path_factory.mktemp("latency"))


@pytest.fixture(params=["compiled", "python"])
def fault_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The fault path the daemon serves with (FCSNAP_PURE_PYTHON=1 is inherited by it)."""
    if request.param == "compiled" and not fastpath.compiled():
        pytest.skip("the compiled fault path is not built (no C compiler at install)")
    if request.param == "python":
        monkeypatch.setenv(fastpath.PURE_PYTHON_ENV, "1")
    return request.param


@pytest.fixture
def daemon(fault_path: str, raw_build, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(raw_build[0], tmp_path)
    yield d
    d.close()


def histogram(daemon: Daemon, build_id: str) -> dict[str, float]:
    """The fault service histogram's samples for one build: le -> cumulative count, and
    "count" and "sum"."""
    families = {f.name: f for f in text_string_to_metric_families(daemon.metrics_text())}
    family = families["fcsnap_fault_service_seconds"]
    assert family.type == "histogram"
    samples: dict[str, float] = {}
    for s in family.samples:
        if s.labels.get("build_id") != build_id:
            continue
        key = s.labels["le"] if s.name.endswith("_bucket") else s.name.rsplit("_", 1)[1]
        samples[key] = s.value
    return samples


def test_every_fault_served_is_in_the_histogram(raw_build, fault_path: str, daemon: Daemon
                                                ) -> None:
    """Two VMs (two vCPUs each) fault in all their memory; the histogram's count is the sum
    of their faults, on the compiled path (its faults timed in C) and in pure Python."""
    _, build = raw_build
    ids = [daemon.restore("web", f"vm{i}")["id"] for i in range(2)]
    vms = [daemon.vm(f"vm{i}", build, threads=2) for i in range(2)]
    for vm in vms:
        assert vm.wait(WAIT) == 0, vm.communicate(timeout=WAIT)[1]
    documents = [daemon.wait_ended(i) for i in ids]
    faults = sum(d["faults"] for d in documents)
    assert faults > 0
    compiled = sum(d["compiled_faults"] for d in documents)
    if fault_path == "compiled":
        assert compiled > faults // 2  # the C loop served (and timed) most of them
    else:
        assert compiled == 0
    for d in documents:
        summary = d["fault_latency"]
        assert summary["count"] == d["faults"]
        assert summary["p50_us"] <= summary["p99_us"] <= summary["max_us"]
        assert summary["mean_us"] > 0
    samples = histogram(daemon, build.build_id)
    assert samples["count"] == faults
    assert samples["+Inf"] == faults
    bounds = sorted((float(le), n) for le, n in samples.items() if le not in ("count", "sum"))
    assert len(bounds) == latency.BUCKETS
    counts = [n for _, n in bounds]
    assert counts == sorted(counts)  # cumulative
    assert 0 < samples["sum"] < faults * 1.0  # real durations, each well under a second


@pytest.mark.parametrize(("ns", "expected"), [
    (0, 0), (1, 0), (1000, 0), (1001, 1), (2000, 1), (2001, 2), (4000, 2), (4001, 3),
    (1 << 40, latency.BUCKETS - 1),
])
def test_bucket_edges(ns: int, expected: int) -> None:
    """Bucket k holds latencies of at most 2**k us, as csrc/fastpath.c's note_latency counts."""
    assert latency.bucket(ns) == expected


def test_summary_names_the_buckets_of_the_median_p99_and_slowest() -> None:
    """--stats' fault_latency: the upper bounds of the buckets holding them (None: past the
    last bound), from a histogram filled as the installer fills it."""
    histogram = latency.new_histogram()
    for ns in [500] * 60 + [3_000] * 39 + [50_000] + [2 * 10**9]:
        latency.observe(histogram, ns)
    summary = latency.summary(histogram)
    assert summary["count"] == 101
    assert summary["p50_us"] == 1.0
    assert summary["p99_us"] == 64.0  # the 100th of 101: 50 us
    assert summary["max_us"] is None  # over a second
    assert summary["mean_us"] == round((60 * 500 + 39 * 3000 + 50_000 + 2 * 10**9) / 101 / 1000, 2)
    assert latency.summary(latency.new_histogram())["count"] == 0
