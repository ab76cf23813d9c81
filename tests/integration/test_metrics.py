"""The metrics contract (names and labels) after real requests, and the JSON access log."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.engine.fake import FakeEngine
from server.logs import JSONFormatter
from server.settings import Settings
from tests.conftest import add_role_key
from tests.live import live_server

MSGS = [{"role": "user", "content": "hi"}]


def scrape(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metric_deltas_after_real_requests(make_app: Callable[..., Litestar], settings: Settings, api_key: str) -> None:
    limited = asyncio.run(add_role_key(settings, "rl", rpm=1))
    app = make_app(FakeEngine(["a", "b", "c"], delay_s=0.001))
    with TestClient(app) as http:
        h = {"Authorization": f"Bearer {api_key}"}
        before = scrape(http.get("/metrics").text)
        http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS}, headers=h)  # 3 tokens + EOS
        http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS, "stream": True}, headers=h)
        http.post("/v1/completions", json={"model": "fake", "prompt": "ab", "max_tokens": 2}, headers=h)  # length
        http.post("/v1/chat/completions", json={"model": "nope", "messages": MSGS}, headers=h)  # 404
        g = {"prompt": "x", "temperature": 0, "max_new_tokens": 5}
        http.post("/v1/generate", json=g, headers=h)
        http.get("/admin/usage", headers=h)  # flush the cache entry
        assert http.post("/v1/generate", json=g, headers=h).json()["cached"] is True
        lh = {"Authorization": f"Bearer {limited}"}
        http.get("/v1/models", headers=lh)
        for _ in range(2):
            http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS}, headers=lh)
        after = scrape(http.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert delta("llm_server_requests_total", **chat, status="2xx") == 3
    assert delta("llm_server_requests_total", **chat, status="4xx") == 2  # the 404 and the rate-limited one
    assert delta("llm_server_request_success_total", model_name="fake", finished_reason="stop") == 5
    assert delta("llm_server_request_success_total", model_name="fake", finished_reason="length") == 1
    # Engine tokens: the cache hit generated nothing.
    assert delta("llm_server_generation_tokens_total", model_name="fake") == 4 + 4 + 2 + 4 + 4
    assert delta("llm_server_prompt_tokens_total", model_name="fake") > 0
    assert delta("llm_server_cache_hits_total", model_name="fake") == 1
    assert delta("llm_server_cache_misses_total", model_name="fake") == 1
    assert delta("llm_server_rate_limited_total", role="rl", limit="requests") == 1
    assert delta("llm_server_errors_total", type="invalid_request_error") == 1
    assert delta("llm_server_errors_total", type="requests") == 1
    assert delta("llm_server_time_to_first_token_seconds_count", model_name="fake") == 5
    assert delta("llm_server_e2e_request_latency_seconds_count", model_name="fake") == 5
    assert delta("llm_server_request_queue_time_seconds_count", model_name="fake") == 5
    assert delta("llm_server_inter_token_latency_seconds_count", model_name="fake") == 3 + 3 + 1 + 3 + 3
    assert delta("llm_server_request_duration_seconds_count", route="/v1/chat/completions") == 5
    assert value(after, "llm_server_num_requests_running", model_name="fake") == 0
    assert value(after, "llm_server_num_requests_waiting", model_name="fake") == 0
    # Labels stay bounded: an unknown path is "unmatched", never the raw path.
    text = http_text_after_unknown(app, api_key)
    assert "/v1/this/path/does/not/exist" not in text and 'route="unmatched"' in text
    assert api_key not in text


def http_text_after_unknown(app: Litestar, api_key: str) -> str:
    with TestClient(app) as http:
        http.get("/v1/this/path/does/not/exist", headers={"Authorization": f"Bearer {api_key}"})
        return http.get("/metrics").text


def test_running_gauge_returns_to_zero_after_a_disconnect(make_app: Callable[..., Litestar], api_key: str) -> None:
    engine = FakeEngine(["t"] * 500, delay_s=0.01)
    with live_server(make_app(engine)) as base:
        auth = {"Authorization": f"Bearer {api_key}"}
        body = {"model": "fake", "messages": MSGS, "stream": True}
        with (
            httpx.Client(base_url=base, timeout=10, headers=auth) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
            during = scrape(httpx.get(f"{base}/metrics").text)
            assert value(during, "llm_server_num_requests_running", model_name="fake") == 1
        deadline = time.monotonic() + 5
        while True:
            now = scrape(httpx.get(f"{base}/metrics").text)
            if value(now, "llm_server_num_requests_running", model_name="fake") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert value(now, "llm_server_num_requests_running", model_name="fake") == 0
        assert value(now, "llm_server_num_requests_waiting", model_name="fake") == 0
        # A cancelled request is not a success, and its duration is still observed.
        assert value(now, "llm_server_request_success_total", model_name="fake", finished_reason="stop") == 0
        assert value(now, "llm_server_request_duration_seconds_count", route="/v1/chat/completions") >= 1


def test_json_access_log_has_the_fields_and_no_secret(
    make_app: Callable[..., Litestar], api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.access")
    with TestClient(make_app(FakeEngine(["ok"]))) as http:
        h = {"Authorization": f"Bearer {api_key}", "x-request-id": "client-trace-42"}
        r = http.post("/v1/chat/completions", json={"model": "fake", "messages": MSGS}, headers=h)
        assert r.headers["x-request-id"] == "client-trace-42"
        http.get("/health")
    lines = [JSONFormatter().format(rec) for rec in caplog.records if rec.name == "server.access"]
    objs = [json.loads(line) for line in lines]
    chat = next(o for o in objs if o["route"] == "/v1/chat/completions")
    for field in ("timestamp", "level", "request_id", "method", "route", "status", "latency_ms", "key_id", "model",
                  "prompt_tokens", "completion_tokens", "cached", "error_type"):  # fmt: skip
        assert field in chat, field
    assert chat["request_id"] == "client-trace-42" and chat["status"] == 200 and chat["key_id"].startswith("key_")
    assert chat["completion_tokens"] == 2 and chat["cached"] is False and chat["model"] == "fake"
    health = next(o for o in objs if o["route"] == "/health")
    assert health["status"] == 200 and health["request_id"].startswith("req_")
    assert all(api_key not in line for line in lines)
