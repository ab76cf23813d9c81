"""Where a request is observed: its request-log record, timing, the request metrics and the access log.

:func:`timing_middleware` runs around every routed request: it opens the ``/v1`` request-log record, queues it when
the response starts, observes the duration and writes the access log; while tracing is on it also holds a generation
request's span, current while the request runs and ended with its last body message (a stream's settlement).
:func:`count_response` counts every response, routed or not.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from server import tracing
from server.api.context import context_of, request_id_of
from server.metrics import Metrics, status_class
from server.records.record import RequestRecord
from server.records.writer import BatchWriter

access_log = logging.getLogger("server.access")

OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/generate": "text_completion",
    "/v1/stream": "text_completion",
    "/v1/embeddings": "embeddings",
}
"""The GenAI operation of each traced route (``POST`` only): the generation routes."""


def timing_middleware(metrics: Metrics, writer: BatchWriter) -> Any:
    """Litestar middleware factory: the request-log record, the duration to the last body byte, the access log.

    Runs around every routed request (after routing, so the route template is known). A ``/v1`` request gets its
    request-log record here, before its guard and handler run; the record is queued when the response starts,
    unless it is a stream that has started well (the stream's settlement queues it once it has ended). A stream
    that ends by a client disconnect never sends its last body message; ``finally`` still observes and logs it.
    """

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            if tracing.TRACER is not None and (span := start_span(scope)) is not None:
                await traced(span, scope, receive, send)
                return
            await observed(scope, receive, send)

        async def traced(span: Span, scope: Scope, receive: Receive, send: Send) -> None:
            status = 0

            async def noted(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                await observed(scope, receive, noted)
            except BaseException as exc:
                span.record_exception(exc)
                raise
            finally:
                otel_context.detach(token)
                end_span(span, status or 499, context_of(scope).record)

        async def observed(scope: Scope, receive: Receive, send: Send) -> None:
            started = time.perf_counter()
            status = 0
            record = open_record(scope)

            async def wrapped(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    if record is not None:
                        record.status = status
                        if not record.streaming or status >= 400:
                            writer.add_row(record)
                await send(message)

            try:
                await app(scope, receive, wrapped)
            finally:
                elapsed = time.perf_counter() - started
                route = scope.get("path_template") or "unmatched"
                metrics.child(metrics.request_duration_seconds, route).observe(elapsed)
                log_access(scope, route, status or 499, elapsed)

        return middleware

    return factory


def start_span(scope: Scope) -> Span | None:
    """The span of a generation request (``None`` for other routes): a server span, the child of the request's
    ``traceparent`` when it has one."""
    route = scope.get("path_template") or ""
    operation = OPERATIONS.get(route)
    if operation is None or scope.get("method") != "POST" or tracing.TRACER is None:
        return None
    carrier = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in scope.get("headers", ())
        if k in (b"traceparent", b"tracestate")
    }
    return tracing.TRACER.start_span(
        f"POST {route}",
        tracing.extract(carrier),
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "POST",
            "http.route": route,
            "url.path": scope["path"],
            "gen_ai.operation.name": operation,
            "llm_server.request_id": request_id_of(scope),
        },
    )


def end_span(span: Span, status: int, record: RequestRecord | None) -> None:
    """End a request span with its HTTP status (an error status from 500 on, and for a failed stream) and, for an
    error answer, ``error.type``: the code the client got (the request log's), else the status."""
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_attribute("error.type", (record.error_type if record is not None else None) or str(status))
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def open_record(scope: Scope) -> RequestRecord | None:
    """The request-log record of a ``/v1`` request (``None`` for other routes), kept in its context."""
    if not scope["path"].startswith("/v1/"):
        return None
    context = context_of(scope)
    if context.record is None:
        context.record = RequestRecord(
            request_id=request_id_of(scope),
            route=scope.get("path_template") or scope["path"],
            method=str(scope.get("method", "GET")),
        )
    return context.record


def count_response(metrics: Metrics) -> Any:
    """``before_send`` hook: count each response in ``llm_server_requests_total`` by route, method and status class.

    A hook rather than part of :func:`timing_middleware` because Litestar runs middleware only for routed requests:
    an unknown path (404, counted as route ``unmatched``) or method (405) reaches only the app-level hooks.
    """

    async def hook(message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start":
            route = scope.get("path_template") or "unmatched"
            method, status = str(scope.get("method", "")), status_class(message["status"])
            metrics.child(metrics.requests_total, route, method, status).inc()

    return hook


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
