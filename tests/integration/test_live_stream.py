"""Streaming through a real uvicorn socket: SDK streaming and client disconnects."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest
from litestar import Litestar

from server.engine.fake import FakeEngine
from tests.live import live_server


def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_sdk_stream_over_a_socket(make_app: Callable[..., Litestar], api_key: str) -> None:
    with (
        live_server(make_app(script=["a", "b", "c"], delay_s=0.01)) as base,
        openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0) as client,
    ):
        stream = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}], stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "abc"


@pytest.mark.anyio
async def test_async_sdk_over_a_socket(make_app: Callable[..., Litestar], api_key: str) -> None:
    with live_server(make_app(script=["x", "y"])) as base:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0) as client:
            out = await client.completions.create(model="fake", prompt="p", max_tokens=5)
            assert out.choices[0].text == "xy"
            stream = await client.completions.create(model="fake", prompt="p", max_tokens=5, stream=True)
            assert "".join([c.choices[0].text async for c in stream if c.choices]) == "xy"


def test_client_gone_before_a_non_stream_answer_aborts_the_engine_request(
    make_app: Callable[..., Litestar], api_key: str
) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    engine = FakeEngine(["tok"] * 500, delay_s=0.02)  # a 10 s answer
    with live_server(make_app(engine)) as base:
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=0.3, headers=auth)
        assert wait_for(lambda: len(engine.aborted) == 1), "engine never saw the disconnect"
        assert engine.active_requests == 0 and engine.completed == []


def test_client_disconnect_aborts_the_engine_request(make_app: Callable[..., Litestar], api_key: str) -> None:
    auth = {"Authorization": f"Bearer {api_key}"}
    engine = FakeEngine(["tok"] * 500, delay_s=0.02)
    with live_server(make_app(engine)) as base:
        body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True}
        with (
            httpx.Client(base_url=base, timeout=10, headers=auth) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(6)]
            assert any("tok" in line for line in seen)
        # The connection is closed: the engine must see the abort promptly and hold nothing.
        assert wait_for(lambda: len(engine.aborted) == 1), "engine never saw the disconnect"
        assert engine.active_requests == 0
        assert engine.completed == []
        # ... and the next request is served.
        r2 = httpx.post(
            f"{base}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=10, headers=auth
        )
        assert r2.status_code == 200
        assert r2.json()["choices"][0]["message"]["content"] == "toktoktok"
