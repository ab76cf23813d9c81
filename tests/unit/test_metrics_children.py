"""``Metrics.child``: a labelled child remembered for the hot paths counts exactly what ``labels()`` would."""

from __future__ import annotations

from prometheus_client import generate_latest

from server.metrics import Metrics


def test_child_is_the_labelled_child_and_counts_in_the_registry() -> None:
    metrics = Metrics()
    first = metrics.child(metrics.requests_total, "/v1/chat/completions", "POST", "2xx")
    assert first is metrics.child(metrics.requests_total, "/v1/chat/completions", "POST", "2xx")
    assert first is metrics.requests_total.labels("/v1/chat/completions", "POST", "2xx")
    first.inc()
    metrics.requests_total.labels("/v1/chat/completions", "POST", "2xx").inc()
    metrics.child(metrics.requests_total, "/health", "GET", "2xx").inc(3)
    # The same values on another metric are another child.
    metrics.child(metrics.prompt_tokens_total, "echo").inc(5)
    metrics.child(metrics.generation_tokens_total, "echo").inc(7)
    text = generate_latest(metrics.registry).decode()
    assert 'llm_server_requests_total{method="POST",route="/v1/chat/completions",status="2xx"} 2.0' in text
    assert 'llm_server_requests_total{method="GET",route="/health",status="2xx"} 3.0' in text
    assert 'llm_server_prompt_tokens_total{model_name="echo"} 5.0' in text
    assert 'llm_server_generation_tokens_total{model_name="echo"} 7.0' in text
