"""What a request that has ended leaves behind: token counters, finish reasons, latency histograms, its log row and,
while tracing is on, the GenAI attributes and child spans of its request span."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from server import tracing
from server.exchange.work import Work
from server.metrics import Metrics, observe_all
from server.records.record import RequestRecord
from server.serving.plan import Outcome, Plan

FIRST_TOKEN_EVENT = "gen_ai.first_token"
"""The request span's event at the first generated token (the time to first token is its offset from the start)."""


def observe(metrics: Metrics, model: str, outcome: Outcome) -> None:
    """Finish reasons, and for generations that reached a model their tokens and latencies, labelled ``model``."""
    for finish in outcome.finish_reasons:
        if finish is not None:
            metrics.child(metrics.request_success_total, model, finish).inc()
    if not outcome.runs:  # a cache hit, or nothing reached the model
        return
    metrics.child(metrics.prompt_tokens_total, model).inc(outcome.usage.prompt_tokens)
    metrics.child(metrics.generation_tokens_total, model).inc(outcome.usage.completion_tokens)
    ttft, itl, e2e, queue = (
        metrics.child(metrics.time_to_first_token_seconds, model),
        metrics.child(metrics.inter_token_latency_seconds, model),
        metrics.child(metrics.e2e_request_latency_seconds, model),
        metrics.child(metrics.request_queue_time_seconds, model),
    )
    for run in outcome.runs:
        admitted = run.admitted_at
        if admitted is None:
            continue
        if run.started_at is not None:
            queue.observe(max(0.0, run.started_at - admitted))
        if run.first_token_at is not None:
            ttft.observe(run.first_token_at - admitted)
        observe_all(itl, run.token_gaps)
        if run.finished and run.last_token_at is not None:
            e2e.observe(run.last_token_at - admitted)


def log_outcome(record: RequestRecord, outcome: Outcome, *, cached: bool, ok: bool, store_text: bool) -> None:
    """Note in the request-log ``record`` how the request ended and what it used."""
    record.prompt_tokens = outcome.usage.prompt_tokens
    record.usage_estimated = outcome.usage_estimated
    record.end(
        completion_tokens=outcome.usage.completion_tokens,
        cached=cached,
        finish_reasons=outcome.finish_reasons,
        ok=ok,
        output_text="\n".join(outcome.texts) if store_text and outcome.texts else None,  # embeddings: none
    )


def trace_request(work: Work) -> Span:
    """The current request span, given what the request asks for (model, max tokens, temperature, top p)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return span
    span.set_attribute("gen_ai.request.model", work.model)
    if isinstance(work, Plan):
        span.set_attribute("gen_ai.request.max_tokens", work.params.max_tokens)
        span.set_attribute("gen_ai.request.temperature", work.params.temperature)
        span.set_attribute("gen_ai.request.top_p", work.params.top_p)
        if work.n != 1:
            span.set_attribute("gen_ai.request.choice.count", work.n)
    return span


def trace_outcome(span: Span, work: Work, outcome: Outcome, error_type: str | None = None) -> None:
    """On the request ``span``: usage, finish reasons, the first-token event, and a ``queue`` and a ``generation``
    child span for each run that reached a model, timed from the run's own clock readings; ``error_type`` (the
    error a stream ended with, after its 200) marks it failed. Never any text."""
    if not span.is_recording() or tracing.TRACER is None:
        return
    if error_type is not None:
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR))
    span.set_attribute("gen_ai.response.model", work.model)
    if isinstance(work, Plan):
        span.set_attribute("gen_ai.response.id", work.id)
    span.set_attribute("gen_ai.usage.input_tokens", outcome.usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", outcome.usage.completion_tokens)
    reasons = [r for r in outcome.finish_reasons if r is not None]
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)
    if work.cached:
        span.set_attribute("llm_server.cache_hit", True)
    firsts = [r.first_token_at for r in outcome.runs if r.first_token_at is not None]
    if firsts:
        span.add_event(FIRST_TOKEN_EVENT, timestamp=tracing.epoch_ns(min(firsts)))
    context = trace.set_span_in_context(span)
    for run in outcome.runs:
        if run.admitted_at is None:
            continue
        started = run.started_at if run.started_at is not None else run.admitted_at
        tracing.TRACER.start_span("queue", context, start_time=tracing.epoch_ns(run.admitted_at)).end(
            tracing.epoch_ns(started)
        )
        if run.started_at is not None:
            generation = tracing.TRACER.start_span("generation", context, start_time=tracing.epoch_ns(started))
            if run.first_token_at is not None:
                generation.add_event(FIRST_TOKEN_EVENT, timestamp=tracing.epoch_ns(run.first_token_at))
            end = run.last_token_at
            generation.end(tracing.epoch_ns(end) if end is not None else None)
