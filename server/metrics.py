"""Every Prometheus metric, defined once per app on its own registry (many apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class Metrics:
    """The metrics of one app instance (SPEC §6 names)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests_total = Counter(
            "llm_server_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.rate_limited_total = Counter(
            "llm_server_rate_limited_total",
            "Requests refused by a short-window limit (limit = requests, tokens or concurrency).",
            ["role", "limit"],
            registry=self.registry,
        )
        self.quota_exceeded_total = Counter(
            "llm_server_quota_exceeded_total",
            "Requests refused because the key's monthly quota is exhausted.",
            ["role"],
            registry=self.registry,
        )
        self.cache_hits_total = Counter(
            "llm_server_cache_hits_total", "Completion cache hits.", ["model_name"], registry=self.registry
        )
        self.cache_misses_total = Counter(
            "llm_server_cache_misses_total", "Completion cache misses.", ["model_name"], registry=self.registry
        )
