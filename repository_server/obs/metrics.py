"""Prometheus metrics. One registry per process, injected (tests make their own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "smki_http_requests", "HTTP requests answered", ["listener", "route", "status"],
            registry=self.registry)
        self.latency = Histogram(
            "smki_http_request_seconds", "Time from request received to response written",
            ["listener", "route"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 3, 10))
        self.lodged = Counter(
            "smki_lodged_objects", "Objects lodged, by kind and outcome", ["kind", "outcome"],
            registry=self.registry)
        self.tls_refused = Counter(
            "smki_lodge_tls_refused", "Lodging connections refused during the TLS handshake",
            registry=self.registry)
        self.cache_entries = Gauge(
            "smki_cache_certificates", "Certificates held in the response cache",
            registry=self.registry)
