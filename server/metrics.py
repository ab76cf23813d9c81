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
