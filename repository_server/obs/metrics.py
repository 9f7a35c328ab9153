"""Prometheus metrics. One registry per process, injected (tests make their own).

Per-request HTTP statistics do not go through prometheus_client's `labels().inc()` and
`Histogram.observe()`: on the certificate download path (one core, ~20k requests/s) those
cost about 7% of the CPU in a py-spy profile (a lock, a label tuple lookup and a bucket search
per call, twice). Instead `RequestStats` keeps plain integers per (listener, route) and a
custom collector turns them into the same counter and histogram families at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 10.0)


@dataclass
class RouteStats:
    """Counters for one (listener, route): status counts and a latency histogram."""

    statuses: dict[int, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total_seconds: float = 0.0

    def record(self, status: int, seconds: float) -> None:
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_seconds += seconds


class RequestStats(Collector):
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], RouteStats] = {}

    def route(self, listener: str, route: str) -> RouteStats:
        return self.routes.setdefault((listener, route), RouteStats())

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("smki_http_requests", "HTTP requests answered",
                                       labels=["listener", "route", "status"])
        latency = HistogramMetricFamily(
            "smki_http_request_seconds", "Time from request received to response written",
            labels=["listener", "route"])
        for (listener, route), stats in sorted(self.routes.items()):
            for status, count in sorted(stats.statuses.items()):
                requests.add_metric([listener, route, str(status)], count)
            cumulative, running = [], 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), stats.buckets, strict=True):
                running += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", running))
            latency.add_metric([listener, route], cumulative, stats.total_seconds)
        yield requests
        yield latency


def register_process(registry: CollectorRegistry) -> None:
    """What every Prometheus exporter says about itself: smki_build_info{version, python},
    process_* (CPU, memory, open files, start time: ProcessCollector) and python_info."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from prometheus_client import Info, PlatformCollector, ProcessCollector

    try:
        ours = version("smki-repository")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ours = "unknown"
    Info("smki_build", "The running smki-repository", registry=registry).info(
        {"version": ours, "python": platform.python_version()})
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        register_process(self.registry)
        self.http = RequestStats()
        self.registry.register(self.http)
        self.tls_refused = Counter(
            "smki_tls_refused", "TLS connections refused during the handshake, by listener"
            " and reason (per peer: table tls_refusals)", ["listener", "reason"],
            registry=self.registry)
        self.over_cap = Counter(
            "smki_connections_over_cap", "Connections closed at once because the listener"
            " had its maximum open (those in a TLS handshake count)", ["listener"],
            registry=self.registry)
        self.replica_applied = Gauge(
            "smki_replica_applied", "The last change (sequence number) in this node's read"
            " replica", registry=self.registry)
        self.replica_behind = Gauge(
            "smki_replica_behind_changes", "Changes committed in the store and not yet in this"
            " node's read replica", registry=self.registry)
        self.replica_behind_seconds = Gauge(
            "smki_replica_behind_seconds", "Age of the oldest change not yet in this node's"
            " read replica (0: caught up)", registry=self.registry)
        self.replica_bytes = Gauge(
            "smki_replica_bytes", "Size of this node's read replica file", registry=self.registry)
