"""OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables ask for it.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``); ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` keeps it off. Everything else (headers, sampler, resource attributes, service name,
default ``llm-server``) the SDK reads from its own variables.

Off, the only cost on a request's path is reading :data:`TRACER` (``None``): no span, context or exporter is ever
created, and the SDK itself is not even imported. The server keeps its own tracer rather than the process-global
provider, so tests install an in-memory exporter with :func:`use_provider` and remove it again.

Spans never carry prompt or output text, keys or key ids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.trace import Tracer

if TYPE_CHECKING:  # the SDK is imported only once tracing is turned on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

TRACER: Tracer | None = None
"""The server's tracer while tracing is on; ``None`` (the default) when it is off."""

_PROVIDER: TracerProvider | None = None
_EXPORTERS = ("otlp", "console")


def wanted(env: Mapping[str, str]) -> list[str]:
    """The exporters the ``OTEL_*`` variables in ``env`` ask for (empty: tracing stays off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if "none" in named:
        return []
    chosen = [e for e in named if e in _EXPORTERS]
    if not chosen and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        chosen = ["otlp"]
    return chosen


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on if the environment asks for it (once per process); whether it is on."""
    if TRACER is not None:
        return True
    environ = os.environ if env is None else env
    exporters = wanted(environ)
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "llm-server"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    use_provider(provider)
    return True


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # only when exporting

    return OTLPSpanExporter()


def use_provider(provider: TracerProvider | None) -> None:
    """Trace to ``provider`` (``None``: tracing off, the previous provider shut down)."""
    global TRACER, _PROVIDER
    previous, _PROVIDER = _PROVIDER, provider
    TRACER = provider.get_tracer("llm-server") if provider is not None else None
    if previous is not None and previous is not provider:
        previous.shutdown()


def extract(headers: Mapping[str, str]) -> Context:
    """The remote parent a request's ``traceparent`` / ``tracestate`` headers name (an empty context if none)."""
    return propagate.extract(headers)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to an outbound request's ``headers``."""
    if TRACER is not None:
        propagate.inject(headers)


def epoch_ns(perf_counter_s: float) -> int:
    """A ``time.perf_counter()`` reading as nanoseconds since the epoch, for a span's start, end or event time.

    The offset between the two clocks is taken now, not once at import: the wall clock may be stepped (NTP) while
    the server runs, and spans timed by the SDK's own ``time_ns()`` must stay on the same footing as these.
    """
    return time.time_ns() - time.perf_counter_ns() + int(perf_counter_s * 1e9)
