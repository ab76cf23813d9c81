"""What a request that has ended leaves behind: token counters, finish reasons, latency histograms, its log row."""

from __future__ import annotations

from server.metrics import Metrics
from server.records.record import RequestRecord
from server.serving.plan import Outcome


def observe(metrics: Metrics, model: str, outcome: Outcome) -> None:
    """Finish reasons, and for generations that reached a model their tokens and latencies, labelled ``model``."""
    for finish in outcome.finish_reasons:
        if finish is not None:
            metrics.request_success_total.labels(model, finish).inc()
    if not outcome.runs:  # a cache hit, or nothing reached the model
        return
    metrics.prompt_tokens_total.labels(model).inc(outcome.usage.prompt_tokens)
    metrics.generation_tokens_total.labels(model).inc(outcome.usage.completion_tokens)
    ttft, itl, e2e, queue = (
        metrics.time_to_first_token_seconds.labels(model),
        metrics.inter_token_latency_seconds.labels(model),
        metrics.e2e_request_latency_seconds.labels(model),
        metrics.request_queue_time_seconds.labels(model),
    )
    for run in outcome.runs:
        admitted = run.admitted_at
        if admitted is None:
            continue
        if run.started_at is not None:
            queue.observe(max(0.0, run.started_at - admitted))
        if run.first_token_at is not None:
            ttft.observe(run.first_token_at - admitted)
        for gap in run.token_gaps:
            itl.observe(gap)
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
