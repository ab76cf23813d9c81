"""Prefix caching through the app on the tiny model: ``cached_tokens`` per route, scopes per key, and the metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.engine.hf import HFEngine
from server.exchange.exchange import prefix_scope
from tests.conftest import create_test_key, migrated_settings, ready_client

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful assistant. Answer with one short sentence about the weather and nothing else. " * 4
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello?"}]


@pytest.fixture(params=["key", "global"])
def served(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[TestClient[Any], str, str, str]]:
    settings, key = migrated_settings(
        tmp_path, model=str(tiny_model_dir), dtype="float32", cache_enabled=False, prefix_cache_scope=request.param
    )
    other = asyncio.run(create_test_key(settings, name="other"))
    engine = HFEngine(settings.model, served_model_name="tiny", data_dir=tmp_path, device="cpu", dtype="float32")
    with ready_client((engine, create_app(settings, engine=engine), key)) as client:
        yield client, key, other, request.param


def chat(client: TestClient[Any], key: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0} | extra
    response = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def cached(usage: dict[str, Any]) -> int:
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_cached_tokens_per_route_and_scope(served: tuple[TestClient[Any], str, str, str]) -> None:
    client, key, other, scope = served
    first = chat(client, key)["usage"]
    assert cached(first) == 0
    again = chat(client, key, max_tokens=3)["usage"]
    assert again["prompt_tokens"] == first["prompt_tokens"]
    whole_blocks = (first["prompt_tokens"] - 1) // 16 * 16
    assert whole_blocks > 0 and cached(again) == whole_blocks
    stranger = chat(client, other, max_tokens=2)["usage"]
    assert cached(stranger) == (0 if scope == "key" else whole_blocks)  # another key learns nothing by default
    headers = {"Authorization": f"Bearer {key}"}
    prompt = SYSTEM + " Once upon a time"
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    completions = [client.post("/v1/completions", json=body, headers=headers).json()["usage"] for _ in range(2)]
    assert cached(completions[0]) == 0 < cached(completions[1])
    streamed = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "stream": True}
        | {"stream_options": {"include_usage": True}},
        headers=headers,
    )
    assert f'"prompt_tokens_details":{{"cached_tokens":{whole_blocks}}}' in streamed.text
    metrics = client.get("/metrics").text
    hits = float(re.search(r'llm_server_prefix_cache_hits_total\{model_name="tiny"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    queries = float(re.search(r'llm_server_prefix_cache_queries_total\{model_name="tiny"\} (\S+)', metrics).group(1))  # type: ignore[union-attr]
    assert 0 < hits < queries
    assert re.search(r'llm_server_prefix_cache_memory_bytes\{model_name="tiny"\} [1-9]', metrics)
    assert 'llm_server_kv_cache_usage_ratio{model_name="tiny"} 0.0' in metrics  # idle now
    assert 'llm_server_preemptions_total{model_name="tiny"} 0.0' in metrics


def test_scopes_are_distinct_per_kind() -> None:
    class Role:
        name = "team"

    class Caller:
        key_id = "k1"
        role = Role()

    caller: Any = Caller()
    assert prefix_scope(caller, "key") == "key:k1"
    assert prefix_scope(caller, "role") == "role:team"
    assert prefix_scope(caller, "global") == ""
