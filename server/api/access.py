"""Per-request timing, the request-duration histogram and the access log (one line per request)."""

from __future__ import annotations

import logging
import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from server.api.context import context_of
from server.api.requestid import request_id_of
from server.metrics import Metrics

access_log = logging.getLogger("server.access")


def timing_middleware(metrics: Metrics) -> Any:
    """Litestar middleware factory: observe the duration to the last body byte and write the access log.

    Runs around every routed request (after routing, so the route template is known). A stream that ends by a
    client disconnect never sends its last body message; ``finally`` still observes and logs it.
    """

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = 0

            async def wrapped(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, wrapped)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                metrics.request_duration_seconds.labels(route).observe(elapsed)
                log_access(scope, route, status or 499, elapsed)

        return middleware

    return factory


def log_access(scope: Scope, route: str, status: int, elapsed_s: float) -> None:
    """One access-log record; ``/v1`` requests carry their request-log fields (never the key itself)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    method = scope.get("method", "")
    extra: dict[str, Any] = {
        "request_id": request_id_of(scope),
        "method": method,
        "route": route,
        "status": status,
        "latency_ms": round(elapsed_s * 1000, 2),
    }
    record = context_of(scope).record
    if record is not None:
        extra |= {
            "key_id": record.key_id,
            "model": record.model,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "cached": record.cached,
            "error_type": record.error_type,
        }
    access_log.info(
        "%s %s %d %.1fms %s",
        method,
        scope.get("path", route),
        status,
        elapsed_s * 1000,
        extra["request_id"],
        extra=extra,
    )
