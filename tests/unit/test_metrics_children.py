"""``Metrics.child``: a labelled child remembered for the hot paths counts exactly what ``labels()`` would."""

from __future__ import annotations

import pytest
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


def test_observe_all_counts_what_observing_one_by_one_counts() -> None:
    import random

    from server.metrics import ITL_BUCKETS, observe_all

    rng = random.Random(7)
    amounts = [rng.choice(ITL_BUCKETS) for _ in range(40)]  # on the bounds themselves
    amounts += [rng.random() * 3 for _ in range(200)] + [0.0, 1e9, 1e-12]

    def samples(metrics: Metrics) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for s in next(iter(metrics.inter_token_latency_seconds.collect())).samples]

    one_by_one, at_once = Metrics(), Metrics()
    for amount in amounts:
        one_by_one.child(one_by_one.inter_token_latency_seconds, "m").observe(amount)
    observe_all(at_once.child(at_once.inter_token_latency_seconds, "m"), amounts[:100])
    observe_all(at_once.child(at_once.inter_token_latency_seconds, "m"), amounts[100:])
    observe_all(at_once.child(at_once.inter_token_latency_seconds, "m"), [])
    expected, got = samples(one_by_one), samples(at_once)
    assert [s[:2] for s in got] == [s[:2] for s in expected]
    for (name, labels, want), (_, _, value) in zip(expected, got, strict=True):
        if name.endswith("_sum"):  # added up in another order
            assert value == pytest.approx(want, rel=1e-12)
        elif not name.endswith("_created"):
            assert value == want, (name, labels)
    assert dict((s[1].get("le"), s[2]) for s in got if s[0].endswith("_bucket"))["+Inf"] == len(amounts)
