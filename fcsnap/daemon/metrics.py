"""`GET /metrics`: the daemon's counters in Prometheus text format (prometheus-client).

Everything is read from the sessions at scrape time (live ones plus the totals of ended ones),
so serving never pays for metrics beyond its own counting. That includes the fault service
histogram: each session counts every fault it serves, in the compiled loop or in Python, into
its own fixed buckets (fcsnap/uffd/latency.py), and a scrape sums them per build.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fcsnap.daemon.restores import COUNTERS, Restores
from fcsnap.uffd import latency

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HELP = {
    "faults": "Page faults read from the VMs' userfaultfds.",
    "pages_served": "Pages installed (faults, fault-around, prefetch, populate).",
    "bytes_served": "Bytes of guest memory installed.",
    "zero_pages": "Pages installed as zeros.",
    "compiled_faults": "Faults served by the compiled loop.",
    "remove_events": "Balloon REMOVE events.",
    "retries": "Faults retried after EAGAIN.",
}

FETCH_HELP = {  # a store in S3: metric, FetchStats field, help (the host chunk cache's use)
    "fetched_bytes": ("fetched_bytes", "Bytes fetched from the S3 store."),
    "fetch_requests": ("fetch_requests", "Range requests to the S3 store."),
    "chunk_cache_hits": ("cache_hits", "Chunks and frames found in the host chunk cache."),
    "chunk_cache_misses": ("cache_misses", "Chunks and frames fetched into the host cache."),
    "chunk_cache_discarded": ("cache_discarded", "Host cache files removed as short, "
                              "unreadable or failing their check (then fetched again)."),
}


class DaemonMetrics:
    """The registry `/metrics` renders: a collector over the restores."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restores: Restores | None = None

    def attach(self, restores: Restores) -> None:
        self.restores = restores
        self.registry.register(_RestoresCollector(restores))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RestoresCollector(Collector):
    def __init__(self, restores: Restores) -> None:
        self.restores = restores

    def collect(self) -> Iterator[Metric]:
        restores = self.restores
        totals = restores.counter_totals()
        for key in COUNTERS:
            family = CounterMetricFamily(f"fcsnap_{key}", HELP[key], labels=["build_id"])
            for (name, build_id), value in sorted(totals.items()):
                if name == key:
                    family.add_metric([build_id], value)
            yield family
        service = HistogramMetricFamily(
            "fcsnap_fault_service_seconds",
            "Time to serve one fault, from reading it to waking the vCPU (both fault paths).",
            labels=["build_id"])
        for build_id, histogram in sorted(restores.latency_totals().items()):
            service.add_metric([build_id], latency.cumulative(histogram),
                               histogram[latency.SUM] / 1e9)
        yield service
        yield GaugeMetricFamily("fcsnap_restores_active", "Restores listening or serving.",
                                value=len(restores.live()))
        ended = CounterMetricFamily("fcsnap_restores_ended", "Restores ended, by reason.",
                                    labels=["reason"])
        for reason, count in sorted(restores.ended_by_reason.items()):
            ended.add_metric([reason], count)
        yield ended
        cache = restores.builds.frames
        yield GaugeMetricFamily("fcsnap_cache_bytes", "Decompressed frames held (all builds).",
                                value=cache.cached)
        yield GaugeMetricFamily("fcsnap_cache_budget_bytes", "The daemon's --cache-mb.",
                                value=cache.budget)
        yield CounterMetricFamily("fcsnap_cache_hits", "Frame cache hits.", value=cache.hits)
        yield CounterMetricFamily("fcsnap_cache_misses", "Frame cache misses (decompressions).",
                                  value=cache.misses)
        fetches = getattr(restores.store, "cache", None)  # a store in S3 (daemon/remote.py)
        if fetches is not None:
            stats = fetches.stats
            for name, (key, text) in FETCH_HELP.items():
                yield CounterMetricFamily(f"fcsnap_{name}", text, value=getattr(stats, key))
        builds = restores.builds
        yield GaugeMetricFamily("fcsnap_builds_open", "Builds open (shared by their restores).",
                                value=len(builds.open_builds()))
        yield CounterMetricFamily("fcsnap_build_opens", "Times a build was opened.",
                                  value=builds.opened)
        yield CounterMetricFamily("fcsnap_header_parses",
                                  "Build openings that parsed the header (not kept from before).",
                                  value=builds.header_parses)
