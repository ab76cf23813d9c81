"""Remote (``backend = "openai"``) models in process: the app in front of a mock upstream (``httpx.MockTransport``).

Re-framing into our exact wire format, usage (upstream's or estimated), tool calls and logprobs, error mapping and
retries, the upstream key's confinement, the gateway's limits on a remote model, the upstream's concurrency slots,
``/readyz`` and ``/v1/models``. The same paths against real upstream processes are in ``test_remote.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
from litestar.testing import TestClient

from server.app import create_app
from server.providers import upstream as upstream_module
from server.providers.upstream import Upstream
from server.settings import Settings
from server.wiring.models import ServedModels
from server.wiring.state import app_state
from tests.integration.test_gateway import _log_rows
from tests.live import live_server
from tests.upstream import (
    CHAT_STREAM,
    MSGS,
    TARGET,
    UPSTREAM_KEY,
    USAGE,
    MockUpstream,
    Reply,
    answers,
    assert_error,
    build,
    chat_chunk,
    chat_json,
    frames,
    remote_entry,
    role_key,
    sdk,
    serving,
    sse,
    sse_bytes,
    text_json,
    usage_chunk,
    usage_of,
)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "BACKOFF_BASE_S", 0.001)


# ---- 2. re-framing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_chat_stream_is_reframed_into_our_format(settings: Settings, api_key: str, include_usage: bool) -> None:
    mock = MockUpstream(answers)
    body: dict[str, Any] = {"model": "remote", "messages": MSGS, "stream": True, "temperature": 0.5}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    chunks, done = frames(r.text)
    assert done
    first = chunks[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["id"].startswith("chatcmpl-") and first["id"] != "upstream-id-1"
    assert {c["id"] for c in chunks} == {first["id"]}
    assert {c["created"] for c in chunks} == {first["created"]} and first["created"] > 1_000_000_000
    assert {c["model"] for c in chunks} == {"remote"}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    with_choices = [c for c in chunks if c["choices"]]
    deltas = [c["choices"][0]["delta"] for c in with_choices[1:]]
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert [f for f in finishes if f is not None] == ["stop"]  # exactly one finish chunk
    assert finishes[-1] == "stop"
    content = [d for d in deltas if d.get("content")]
    assert [d["content"] for d in content] == ["Hel", "lo", "!"]
    assert all(set(d) == {"content"} for d in content)  # content chunks carry only content, never empty ones
    assert all(d.get("content") or with_choices[i + 1]["choices"][0]["finish_reason"] for i, d in enumerate(deltas))
    if include_usage:
        *rest, last = chunks
        assert last["choices"] == [] and last["usage"] == USAGE  # the upstream's own counts
        assert all("usage" in c and c["usage"] is None for c in rest)
    else:
        assert all(c["choices"] for c in chunks)
        assert all(c.get("usage") is None for c in chunks)
    (seen,) = mock.posts
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == TARGET
    assert seen.body["stream_options"] == {"include_usage": True}  # forced even when the client did not ask
    assert seen.body["messages"] == MSGS and seen.body["temperature"] == 0.5 and seen.body["stream"] is True


def test_chat_stream_through_the_sdk(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        stream = sdk(http, api_key).chat.completions.create(
            model="remote",
            messages=MSGS,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices].count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == USAGE | {"completion_tokens_details": None, "prompt_tokens_details": None}
    assert {c.model for c in chunks} == {"remote"}
    assert len({c.id for c in chunks}) == 1


def test_chat_non_stream_through_the_sdk(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        raw = sdk(http, api_key).chat.completions.with_raw_response.create(model="remote", messages=MSGS)  # type: ignore[arg-type]
        out = raw.parse()
    assert out.object == "chat.completion" and out.model == "remote"
    assert out.id.startswith("chatcmpl-") and out.id != "upstream-id-1"
    assert out.choices[0].message.content == "Hello!" and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (11, 2)
    assert "x-usage-estimated" not in raw.headers
    (seen,) = mock.posts
    assert seen.body["model"] == TARGET and "stream_options" not in seen.body


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_completions_stream_is_reframed(settings: Settings, api_key: str, include_usage: bool) -> None:
    mock = MockUpstream(answers)
    body: dict[str, Any] = {"model": "remote", "prompt": "ab", "stream": True, "max_tokens": 3}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    chunks, done = frames(r.text)
    assert done
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert {c["model"] for c in chunks} == {"remote"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert len({c["created"] for c in chunks}) == 1
    with_choices = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in with_choices) == "Hello!"
    assert all(c["choices"][0]["text"] or c["choices"][0]["finish_reason"] for c in with_choices)  # no empty pieces
    assert [c["choices"][0]["finish_reason"] for c in with_choices if c["choices"][0]["finish_reason"]] == ["length"]
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == USAGE
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all(c.get("usage") is None for c in chunks) and all(c["choices"] for c in chunks)
    (seen,) = mock.posts
    assert seen.path == "/v1/completions"
    assert seen.body["model"] == TARGET and seen.body["prompt"] == "ab" and seen.body["max_tokens"] == 3
    assert seen.body["stream_options"] == {"include_usage": True}


def test_completions_stream_through_the_sdk(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        parts = list(client.completions.create(model="remote", prompt="ab", stream=True, max_tokens=3))
        whole = client.completions.create(model="remote", prompt="ab", max_tokens=3)
    assert "".join(p.choices[0].text for p in parts if p.choices) == "Hello!"
    assert [p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason] == ["length"]
    assert whole.model == "remote" and whole.choices[0].text == "Hello!" and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.total_tokens == 13


def test_quirky_upstream_stream_with_two_choices(settings: Settings, api_key: str) -> None:
    """CRLF line ends, comments, ``data:`` without a space, its own role chunks, usage inside the finish chunk,
    a repeated finish chunk and two interleaved choices: the client still sees exactly our format."""

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out = chat_chunk(delta, finish)
        out["choices"][0]["index"] = index
        return out

    last = chunk(1, {}, "length") | {"usage": USAGE}
    pieces = [
        chunk(0, {"role": "assistant", "content": ""}),
        chunk(1, {"role": "assistant"}),
        chunk(0, {"content": "A"}),
        chunk(1, {"content": "B"}),
        chunk(0, {}, "stop"),
        chunk(0, {}, "stop"),  # repeated
        chunk(1, {"content": "b"}),
        last,
    ]
    raw = b": keep-alive\r\n\r\n" + b"".join(b"data:" + json.dumps(c).encode() + b"\r\n\r\n" for c in pieces)
    raw += b"data: [DONE]\r\n\r\n"
    mock = MockUpstream(
        lambda request, _: httpx.Response(200, content=raw, headers={"content-type": "text/event-stream"})
    )
    body = {"model": "remote", "messages": MSGS, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json=body)
    chunks, done = frames(r.text)
    assert done and mock.posts[0].body["n"] == 2
    *rest, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == USAGE and all(c["usage"] is None for c in rest)
    texts: dict[int, str] = {0: "", 1: ""}
    roles: dict[int, int] = {0: 0, 1: 0}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for c in rest:
        (choice,) = c["choices"]
        i = choice["index"]
        if "role" in choice["delta"]:
            assert choice["delta"] == {"role": "assistant", "content": ""} and not texts[i] and not finishes[i]
            roles[i] += 1
        else:
            assert roles[i] == 1  # the role chunk comes first
        texts[i] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[i].append(choice["finish_reason"])
        else:
            assert not finishes[i]  # nothing after a choice's finish chunk
    assert roles == {0: 1, 1: 1}
    assert texts == {0: "A", 1: "Bb"}
    assert finishes == {0: ["stop"], 1: ["length"]}


def test_known_extensions_are_forwarded_unknown_fields_dropped_and_metrics_use_our_name(
    settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        out = sdk(http, api_key).chat.completions.create(
            model="remote",
            messages=MSGS,  # type: ignore[arg-type]
            extra_body={"top_k": 3, "repetition_penalty": 1.1, "guided_choice": ["a", "b"]},
        )
        metrics = http.get("/metrics").text
    assert out.choices[0].message.content == "Hello!"
    (seen,) = mock.posts
    assert (seen.body["top_k"], seen.body["repetition_penalty"]) == (3, 1.1)
    assert "guided_choice" not in seen.body  # unknown here: never forwarded (the gateway cannot account for it)
    assert 'llm_server_prompt_tokens_total{model_name="remote"} 11.0' in metrics
    assert 'llm_server_generation_tokens_total{model_name="remote"} 2.0' in metrics
    assert 'llm_server_request_success_total{finished_reason="stop",model_name="remote"} 1.0' in metrics
    assert 'llm_server_num_requests_running{model_name="remote"} 0.0' in metrics
    assert TARGET not in metrics


def test_native_generate_and_stream_go_to_the_upstream_completions(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        g = http.post("/v1/generate", json={"model": "remote", "prompt": "ab", "max_new_tokens": 3, "top_k": 5})
        s = http.post("/v1/stream", json={"prompt": "ab", "max_new_tokens": 3, "stop": ["zz"]})  # default model
    assert g.status_code == 200, g.text
    assert g.json() == {
        "model": "remote",
        "output": "Hello!",
        "finish_reason": "length",
        "usage": USAGE,
        "cached": False,
    }
    assert s.status_code == 200, s.text
    events, done = frames(s.text)
    assert done
    assert [e["output"] for e in events] == ["Hel", "lo", "!", ""]
    assert all(set(e) == {"output"} for e in events[:-1])
    assert events[-1] == {"output": "", "finish_reason": "length", "usage": USAGE}
    first, second = mock.posts
    assert first.path == second.path == "/v1/completions"
    assert first.body["model"] == TARGET and first.body["prompt"] == "ab" and first.body["max_tokens"] == 3
    assert first.body["top_k"] == 5 and first.body["stream"] is False and "stream_options" not in first.body
    assert second.body["stream"] is True and second.body["stream_options"] == {"include_usage": True}
    assert second.body["stop"] == ["zz"] and second.body["model"] == TARGET


# ---- 3. estimated usage ----------------------------------------------------------------------------------


def test_usage_is_estimated_when_the_upstream_reports_none(settings: Settings, api_key: str) -> None:
    def no_usage(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if body.get("stream"):
            return sse(*CHAT_STREAM[:-1])  # no usage chunk
        if body["messages"][0]["content"] == "reported":
            return httpx.Response(200, json=chat_json())
        return httpx.Response(200, json=chat_json(usage=False))

    mock = MockUpstream(no_usage)
    with serving(settings, mock, api_key) as (http, _):
        plain = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        streamed = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}},
        )
        reported = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": [{"role": "user", "content": "reported"}]}
        )
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-usage-estimated"] == "true"
    usage = plain.json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chunks, done = frames(streamed.text)
    assert done and chunks[-1]["choices"] == []
    s_usage = chunks[-1]["usage"]
    assert s_usage["completion_tokens"] >= 3  # three content pieces were counted
    assert s_usage["total_tokens"] == s_usage["prompt_tokens"] + s_usage["completion_tokens"]
    assert reported.json()["usage"] == USAGE and "x-usage-estimated" not in reported.headers
    rows = [r for r in _log_rows(settings) if r["route"] == "/v1/chat/completions"]
    assert [(r["usage_estimated"], r["status"]) for r in rows] == [(1, 200), (1, 200), (0, 200)]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert rows[1]["completion_tokens"] == s_usage["completion_tokens"] and rows[1]["ttft_ms"] is not None
    assert (rows[2]["prompt_tokens"], rows[2]["completion_tokens"]) == (11, 2)
    assert {r["model"] for r in rows} == {"remote"}


# ---- 4. tool calls and logprobs --------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CALL = {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
TOOL_STREAM = [
    chat_chunk({"role": "assistant", "content": None}),
    chat_chunk(
        {
            "tool_calls": [
                {"index": 0, "id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]
        }
    ),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]}),
    chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ':"Paris"}'}}]}),
    chat_chunk({}, "tool_calls"),
    usage_chunk(),
]


def test_tool_calls_pass_through(settings: Settings, api_key: str) -> None:
    def tools(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        assert body["tools"] == TOOLS and body["tool_choice"] == "auto"
        if body.get("stream"):
            return sse(*TOOL_STREAM)
        return httpx.Response(200, json=chat_json(None, "tool_calls", tool_calls=[TOOL_CALL]))

    mock = MockUpstream(tools)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        out = client.chat.completions.create(model="remote", messages=MSGS, tools=TOOLS, tool_choice="auto")  # type: ignore[arg-type]
        r = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": MSGS, "tools": TOOLS, "tool_choice": "auto", "stream": True},
        )
    assert mock.calls == 2
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert (call.id, call.type, call.function.name, call.function.arguments) == (
        "call_abc",
        "function",
        "get_weather",
        '{"city":"Paris"}',
    )
    chunks, done = frames(r.text)
    assert done
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (
        sum(1 for c in chunks if c["choices"][0]["delta"].get("role")) == 1
    )  # the upstream's role chunk is not repeated
    pieces = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert pieces[0] == {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert "".join(p["function"].get("arguments", "") for p in pieces) == '{"city":"Paris"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["tool_calls"]
    assert {c["model"] for c in chunks} == {"remote"} and len({c["id"] for c in chunks}) == 1


CHAT_LOGPROBS = {
    "content": [
        {
            "token": "Hel",
            "logprob": -0.25,
            "bytes": [72, 101, 108],
            "top_logprobs": [{"token": "Hel", "logprob": -0.25, "bytes": [72, 101, 108]}],
        },
        {"token": "lo!", "logprob": -1.5, "bytes": [108, 111, 33], "top_logprobs": []},
    ]
}
TEXT_LOGPROBS = {
    "tokens": ["Hel", "lo!"],
    "token_logprobs": [-0.25, -1.5],
    "top_logprobs": [{"Hel": -0.25}, {"lo!": -1.5}],
    "text_offset": [0, 3],
}


def test_logprobs_pass_through_when_well_formed(settings: Settings, api_key: str) -> None:
    def with_logprobs(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        bad = body.get("user") == "bad"
        if request.url.path.endswith("/chat/completions"):
            if body.get("stream"):
                first = chat_chunk({"content": "Hel"})
                first["choices"][0]["logprobs"] = {"content": [CHAT_LOGPROBS["content"][0]]}
                return sse(first, chat_chunk({"content": "lo!"}, "stop"), usage_chunk())
            out = chat_json("Hello!")
            out["choices"][0]["logprobs"] = {"content": "garbage"} if bad else CHAT_LOGPROBS
            return httpx.Response(200, json=out)
        out = text_json("Hello!")
        out["choices"][0]["logprobs"] = TEXT_LOGPROBS
        return httpx.Response(200, json=out)

    mock = MockUpstream(with_logprobs)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        chat = client.chat.completions.create(model="remote", messages=MSGS, logprobs=True, top_logprobs=1)  # type: ignore[arg-type]
        bad = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": MSGS, "logprobs": True, "user": "bad"}
        )
        text = client.completions.create(model="remote", prompt="ab", logprobs=1)
        stream = list(client.chat.completions.create(model="remote", messages=MSGS, logprobs=True, stream=True))  # type: ignore[arg-type]
    assert mock.posts[0].body["logprobs"] is True and mock.posts[0].body["top_logprobs"] == 1
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    assert [t.token for t in chat.choices[0].logprobs.content] == ["Hel", "lo!"]
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].logprob == -0.25
    assert bad.status_code == 200 and bad.json()["choices"][0]["logprobs"] is None  # dropped, not a 5xx
    assert bad.json()["choices"][0]["message"]["content"] == "Hello!"
    assert text.choices[0].logprobs is not None
    assert text.choices[0].logprobs.tokens == ["Hel", "lo!"] and text.choices[0].logprobs.text_offset == [0, 3]
    streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs is not None]
    assert len(streamed) == 1 and streamed[0].content is not None and streamed[0].content[0].token == "Hel"


# ---- 5. errors -------------------------------------------------------------------------------------------


def openai_error(status: int, message: str, type_: str, param: str | None, code: str | None, **headers: str) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return lambda request, _: httpx.Response(status, json=body, headers=headers)


def sequence(*replies: Reply) -> Reply:
    """The n-th POST gets the n-th reply (the last one repeats)."""
    count = 0

    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | Awaitable[httpx.Response]:
        nonlocal count
        count += 1
        return replies[min(count, len(replies)) - 1](request, body)

    return reply


def status_only(status: int) -> Reply:
    return lambda request, _: httpx.Response(status, text=f"upstream says {status}")


def refuse_connection(request: httpx.Request, _: dict[str, Any]) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


async def too_slow(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    await asyncio.sleep(2.0)
    return answers(request, body)


def test_upstream_400_passes_through_with_its_message_param_and_code(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(
        openai_error(400, "temperature is weird here", "invalid_request_error", "temperature", "invalid_value")
    )
    with serving(settings, mock, api_key) as (http, _):
        with pytest.raises(openai.BadRequestError) as err:
            sdk(http, api_key).chat.completions.create(model="remote", messages=MSGS)  # type: ignore[arg-type]
        stream = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
    e = err.value
    assert e.status_code == 400 and isinstance(e.body, dict) and e.body["message"] == "temperature is weird here"
    assert (e.param, e.code, e.type) == ("temperature", "invalid_value", "invalid_request_error")
    assert stream.headers["content-type"].startswith("application/json")  # refused before any stream byte
    assert assert_error(stream, 400, "invalid_request_error", "invalid_value")["param"] == "temperature"
    assert mock.calls == 2  # a client error is never retried


def test_upstream_429_passes_through_with_retry_after(settings: Settings, api_key: str) -> None:
    reply = openai_error(429, "Slow down", "requests", None, "rate_limit_exceeded", **{"retry-after": "7"})
    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    error = assert_error(r, 429, "requests", "rate_limit_exceeded")
    assert error["message"] == "Slow down" and r.headers["retry-after"] == "7"
    assert mock.calls == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_upstream_refusing_the_gateway_is_502_not_the_clients_fault(
    settings: Settings, api_key: str, status: int
) -> None:
    reply = openai_error(status, "Invalid API key or model", "invalid_request_error", None, "invalid_api_key")
    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        s = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
    for resp in (r, s):
        error = assert_error(resp, 502, "server_error", "upstream_error")
        assert "Invalid API key" not in error["message"] and error["param"] is None
        assert "operator" in error["message"]
    assert mock.calls == 2  # not retried


def test_upstream_500_is_502_and_not_retried(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(status_only(500))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert_error(r, 502, "server_error", "upstream_error")
    assert mock.calls == 1


def test_upstream_503_twice_then_success_is_retried(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(sequence(status_only(503), status_only(503), answers))
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello!"
    assert mock.calls == 3
    assert mock.posts[0].body == mock.posts[2].body  # the same request sent again


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (status_only(502), 502, "upstream_error"),
        (status_only(504), 504, "upstream_timeout"),
        (status_only(503), 503, "overloaded"),
        (refuse_connection, 502, "upstream_error"),
    ],
    ids=["502", "504", "503", "connect-error"],
)
def test_retryable_failures_give_up_after_retries_plus_one(
    settings: Settings, api_key: str, reply: Reply, status: int, code: str
) -> None:
    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        s = http.post("/v1/completions", json={"model": "remote", "prompt": "ab", "stream": True})
    assert_error(r, status, "server_error", code)
    assert_error(s, status, "server_error", code)  # a stream that fails before its first byte is a proper status
    assert mock.calls == 2 * 3  # retries = 2
    if status == 503:
        assert r.headers["retry-after"].isdigit()


def test_retries_follow_the_entry(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(refuse_connection)
    with serving(settings, mock, api_key, retries=0) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert_error(r, 502, "server_error", "upstream_error")
    assert mock.calls == 1


def test_slow_upstream_is_504_upstream_timeout(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(too_slow, honor_timeouts=True)
    with serving(settings, mock, api_key, timeout_s=0.2) as (http, up):
        started = time.monotonic()
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        elapsed = time.monotonic() - started
        s = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        assert up.running == 0  # the slots were given back
    assert_error(r, 504, "server_error", "upstream_timeout")
    assert_error(s, 504, "server_error", "upstream_timeout")
    assert elapsed < 1.5
    assert mock.calls == 2  # a request the upstream may be working on is not sent again


async def breaking_body(*chunks: dict[str, Any], exc: Exception) -> AsyncIterator[bytes]:
    yield sse_bytes(*chunks, done=False)
    await asyncio.sleep(0)
    raise exc


@pytest.mark.parametrize(
    ("stream_reply", "code"),
    [
        (
            lambda: httpx.Response(
                200, content=breaking_body(chat_chunk({"content": "Hel"}), exc=httpx.ReadError("connection reset"))
            ),
            "upstream_error",
        ),
        (
            lambda: httpx.Response(
                200, content=breaking_body(chat_chunk({"content": "Hel"}), exc=httpx.ReadTimeout("read timed out"))
            ),
            "upstream_timeout",
        ),
        (lambda: sse(chat_chunk({"content": "Hel"}), chat_chunk({"content": "lo"})), "upstream_error"),  # no finish
        (lambda: sse(chat_chunk({"content": "Hel"}), done=False), "upstream_error"),  # closed, no [DONE], no finish
        (lambda: sse(chat_chunk({"content": "Hel"}), {"error": {"message": "CUDA out of memory"}}), "upstream_error"),
        (lambda: sse(chat_chunk({"content": "Hel"}), "{not json"), "upstream_error"),
        (lambda: sse(chat_chunk({"content": "Hel"}), chat_chunk({"tool_calls": [{"index": "x"}]})), "upstream_error"),
    ],
    ids=["read-error", "read-timeout", "no-finish", "cut-short", "error-frame", "malformed-chunk", "bad-tool-call"],
)
def test_stream_broken_midway_ends_with_an_error_frame(
    settings: Settings, api_key: str, stream_reply: Callable[[], httpx.Response], code: str
) -> None:
    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        return stream_reply() if body.get("stream") else answers(request, body)

    mock = MockUpstream(reply)
    with serving(settings, mock, api_key, max_concurrency=1, timeout_s=1.0) as (http, up):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        assert up.running == 0
        after = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})  # the slot is free
    assert r.status_code == 200
    chunks, done = frames(r.text)
    assert not done and "[DONE]" not in r.text
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hel"}
    *_, last = chunks
    assert set(last) == {"error"}
    assert last["error"]["code"] == code and last["error"]["type"] == "server_error"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert after.status_code == 200, after.text
    assert mock.calls == 2  # a stream that broke after its first byte is not retried
    broken, ok = _log_rows(settings)
    assert (broken["status"], broken["error_type"], ok["error_type"]) == (200, code, None)


@pytest.mark.parametrize(
    "content",
    [b"<html>bad gateway</html>", b'{"choices": []}', b'{"choices": [{"message": {"tool_calls": [1]}}]}'],
    ids=["not-json", "no-choices", "bad-tool-call"],
)
def test_malformed_upstream_json_is_502(settings: Settings, api_key: str, content: bytes) -> None:
    mock = MockUpstream(
        lambda request, _: httpx.Response(200, content=content, headers={"content-type": "application/json"})
    )
    with serving(settings, mock, api_key) as (http, _):
        r = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    error = assert_error(r, 502, "server_error", "upstream_error")
    assert "malformed" in error["message"]
    assert mock.calls == 1


# ---- 6. the upstream key stays between the gateway and the upstream --------------------------------------


def test_upstream_key_is_sent_upstream_and_nowhere_else(
    settings: Settings, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def echoing(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        # Upstreams that echo the credential they were given in an error (some proxies do).
        what = body.get("user")
        if what == "401":
            return openai_error(401, f"Incorrect API key provided: {UPSTREAM_KEY}", "auth", None, None)(request, body)
        if what == "400":
            return openai_error(400, f"bad request for key {UPSTREAM_KEY}", "invalid_request_error", None, None)(
                request, body
            )
        if what == "500":
            return httpx.Response(500, text=f"internal error, key={UPSTREAM_KEY}")
        if what == "frame":  # an error frame mid-stream that quotes the key
            return sse(chat_chunk({"content": "x"}), {"error": {"message": f"lost key {UPSTREAM_KEY}"}}, done=False)
        return answers(request, body)

    mock = MockUpstream(echoing)
    responses: list[httpx.Response] = []
    with serving(settings, mock, api_key) as (http, up):
        with http.portal() as portal:
            portal.call(up.check)
        for user in (None, "401", "400", "500"):
            body: dict[str, Any] = {"model": "remote", "messages": MSGS}
            if user:
                body["user"] = user
            responses.append(http.post("/v1/chat/completions", json=body))
            responses.append(http.post("/v1/chat/completions", json=body | {"stream": True}))
        frame = {"model": "remote", "messages": MSGS, "user": "frame", "stream": True}
        responses.append(http.post("/v1/chat/completions", json=frame))
        responses.append(http.post("/v1/generate", json={"prompt": "ab", "max_new_tokens": 3}))
        responses += [http.get("/readyz"), http.get("/metrics"), http.get("/v1/models"), http.get("/admin/usage")]
    assert [r.status_code for r in responses[:8]] == [200, 200, 502, 502, 400, 400, 502, 502]
    assert responses[4].json()["error"]["message"].startswith("bad request for key")  # passed through, key removed
    assert "lost key [redacted]" in responses[8].text and '"code":"upstream_error"' in responses[8].text
    assert mock.auth_headers and set(mock.auth_headers) == {f"Bearer {UPSTREAM_KEY}"}  # POSTs and health checks
    assert mock.calls == 10
    for r in responses:
        assert UPSTREAM_KEY not in r.text, (r.request.url, r.text)
        assert all(UPSTREAM_KEY not in v for v in r.headers.values())
    assert UPSTREAM_KEY not in caplog.text
    assert all(UPSTREAM_KEY not in str(rec.args) and UPSTREAM_KEY not in rec.getMessage() for rec in caplog.records)
    for path in settings.data_dir.iterdir():
        if path.is_file():
            assert UPSTREAM_KEY.encode() not in path.read_bytes(), path


def test_an_upstream_without_a_key_gets_no_authorization_header(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    up = Upstream(remote_entry(api_key_env=None), None, transport=httpx.MockTransport(mock.handle))
    served = ServedModels()
    served.add("remote", up)
    with TestClient(create_app(settings, models=served)) as http:
        r = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": MSGS},
            headers={"Authorization": f"Bearer {api_key}"},
        )
    assert r.status_code == 200, r.text
    assert mock.posts[0].headers.get("authorization") is None  # the client's own key is never forwarded
    assert api_key not in str(mock.posts[0].headers)


# ---- 7. the gateway on a remote model --------------------------------------------------------------------


def test_model_allowlist_applies_to_remote_models(settings: Settings, api_key: str) -> None:
    local_only = role_key(settings, "local-only", allowed_models=["local"])
    mock = MockUpstream(answers)
    with serving(settings, mock, local_only) as (http, _):
        client = sdk(http, local_only)
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="remote", messages=MSGS)  # type: ignore[arg-type]
        streamed = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        native = http.post("/v1/generate", json={"prompt": "ab"})  # the default model is the remote one
        local = client.chat.completions.create(model="local", messages=MSGS)  # type: ignore[arg-type]
    assert err.value.code == "model_not_allowed" and err.value.type == "permission_error"
    assert_error(streamed, 403, "permission_error", "model_not_allowed")
    assert_error(native, 403, "permission_error", "model_not_allowed")
    assert local.choices[0].message.content == "Local"
    assert mock.calls == 0


def test_rpm_limit_and_headers_on_a_remote_model(settings: Settings) -> None:
    key = role_key(settings, "rpm2", rpm=2, tpm=100_000)
    mock = MockUpstream(answers)
    with serving(settings, mock, key) as (http, _):
        first = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        second = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "stream": True})
        third = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000" and first.headers["x-ratelimit-reset-requests"]
    assert second.headers["x-ratelimit-remaining-requests"] == "0"  # sent with a stream's headers too
    error = assert_error(third, 429, "requests", "rate_limit_exceeded")
    assert "request" in error["message"].lower()
    assert third.headers["retry-after"].isdigit() and int(third.headers["retry-after-ms"]) > 0
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert mock.calls == 2  # the refused request never reached the upstream


def test_monthly_quota_on_a_remote_model(settings: Settings) -> None:
    key = role_key(settings, "one-request", monthly_requests=1)
    mock = MockUpstream(answers)
    with serving(settings, mock, key) as (http, _):
        ok = http.post("/v1/completions", json={"model": "remote", "prompt": "ab"})
        refused = http.post("/v1/completions", json={"model": "remote", "prompt": "ab", "stream": True})
    assert ok.status_code == 200, ok.text
    assert_error(refused, 429, "insufficient_quota", "insufficient_quota")
    assert refused.headers["x-should-retry"] == "false"
    assert mock.calls == 1


@pytest.mark.parametrize("quota", [None, 1_000_000], ids=["no-quota", "with-quota"])
def test_usage_is_reconciled_to_the_upstream_counts(settings: Settings, api_key: str, quota: int | None) -> None:
    key = role_key(settings, "metered", monthly_tokens=quota)
    mock = MockUpstream(answers)
    long_prompt = [{"role": "user", "content": "word " * 200}]  # estimated at far more than the upstream's 11
    with serving(settings, mock, key) as (http, _):
        r1 = http.post("/v1/chat/completions", json={"model": "remote", "messages": long_prompt})
        r2 = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": long_prompt, "stream": True, "max_tokens": 50}
        )
        r3 = http.post("/v1/generate", json={"model": "remote", "prompt": "word " * 200, "max_new_tokens": 20})
        assert r1.status_code == r2.status_code == r3.status_code == 200
        assert usage_of(http, api_key, "metered-key") == {"tokens": 3 * 13, "requests": 3}


def test_completion_cache_hit_on_a_remote_model(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    body = {"model": "remote", "messages": MSGS, "temperature": 0}
    with serving(settings, mock, api_key) as (http, _):
        first = http.post("/v1/chat/completions", json=body)
        http.get("/admin/usage")  # the writer stores cache entries in batches; this flushes them
        second = http.post("/v1/chat/completions", json=body)
        streamed = http.post("/v1/chat/completions", json=body | {"stream": True})
        other = http.post("/v1/chat/completions", json=body | {"temperature": 0.7})
        changed = http.post("/v1/chat/completions", json=body | {"max_tokens": 9})
    assert "x-cache" not in first.headers
    assert second.headers["x-cache"] == "HIT"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"] == USAGE
    assert second.json()["id"] != first.json()["id"] and second.json()["model"] == "remote"
    assert "x-usage-estimated" not in second.headers
    assert streamed.headers["x-cache"] == "HIT"
    chunks, done = frames(streamed.text)
    assert done and "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]
    assert "x-cache" not in other.headers and "x-cache" not in changed.headers
    assert mock.calls == 3  # first, the non-deterministic one and the one with another max_tokens


def test_role_max_tokens_cap_is_forwarded(settings: Settings) -> None:
    key = role_key(settings, "capped", max_tokens=7)
    mock = MockUpstream(answers)
    with serving(settings, mock, key) as (http, _):
        omitted = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS})
        smaller = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "max_tokens": 5})
        newer = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": MSGS, "max_completion_tokens": 6}
        )
        above = http.post("/v1/chat/completions", json={"model": "remote", "messages": MSGS, "max_tokens": 8})
    assert omitted.status_code == smaller.status_code == newer.status_code == 200
    assert assert_error(above, 400, "invalid_request_error", above.json()["error"]["code"])["param"] == "max_tokens"
    assert mock.calls == 3
    # one value under both names, whichever the client used (an upstream honours one or the other)
    assert [(p.body["max_tokens"], p.body["max_completion_tokens"]) for p in mock.posts] == [(7, 7), (5, 5), (6, 6)]


# ---- 8. the upstream's concurrency slots -----------------------------------------------------------------


async def slow_answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    await asyncio.sleep(0.4)
    return answers(request, body)


def concurrent_posts(base: str, key: str, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            body = {"model": "remote", "messages": MSGS}
            return list(await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(n))))

    return asyncio.run(go())


def test_a_second_request_waits_for_the_upstream_slot(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(slow_answer)
    app, _ = build(settings, mock, max_concurrency=1, timeout_s=5.0)
    with live_server(app) as base:
        started = time.monotonic()
        rs = concurrent_posts(base, api_key, 2)
        elapsed = time.monotonic() - started
    assert [r.status_code for r in rs] == [200, 200], [r.text for r in rs]
    assert mock.calls == 2 and mock.max_in_flight == 1
    assert elapsed >= 0.8  # one after the other


def test_a_waiter_gives_up_with_503_after_timeout(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(slow_answer)  # slower than timeout_s; this mock does not time out requests
    app, _ = build(settings, mock, max_concurrency=1, timeout_s=0.15)
    with live_server(app) as base:
        rs = concurrent_posts(base, api_key, 2)
    assert sorted(r.status_code for r in rs) == [200, 503], [r.text for r in rs]
    refused = next(r for r in rs if r.status_code == 503)
    error = assert_error(refused, 503, "server_error", "overloaded")
    assert "concurrency" in error["message"] and refused.headers["retry-after"].isdigit()
    assert mock.calls == 1 and mock.max_in_flight == 1


# ---- 9. /readyz ------------------------------------------------------------------------------------------


def test_readyz_reports_upstream_health_and_stays_200(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers, models=None)  # down from the start
    with serving(settings, mock, api_key) as (http, up):
        deadline = time.monotonic() + 5
        while up.health.status == "unknown" and time.monotonic() < deadline:  # the first background check
            time.sleep(0.01)
        statuses = []
        for models in (None, [TARGET, "other"], ["other"], None):
            mock.models = models
            with http.portal() as portal:
                health = portal.call(up.check)
            r = http.get("/readyz")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["status"] == "ready" and body["models"] == ["remote", "local"]
            entry = body["upstreams"]["remote"]
            assert entry["status"] == health.status and entry["checked_at"]
            statuses.append((entry["status"], entry["error"]))
        # A dead upstream does not stop the gateway from answering for the other models.
        local = http.post("/v1/chat/completions", json={"model": "local", "messages": MSGS})
    assert local.status_code == 200
    (s1, e1), (s2, e2), (s3, e3), (s4, _) = statuses
    assert (s1, s2, s3, s4) == ("down", "ok", "degraded", "down")
    assert e1 == "ConnectError" and e2 is None and TARGET in e3


def test_upstream_check_without_the_app() -> None:
    mock = MockUpstream(answers)
    up = Upstream(remote_entry(), UPSTREAM_KEY, transport=httpx.MockTransport(mock.handle))

    async def go() -> list[str]:
        try:
            seen = [(await up.check()).status]
            mock.models = ["nope"]
            seen.append((await up.check()).status)
            mock.models = None
            seen.append((await up.check()).status)
            return seen
        finally:
            await up.aclose()

    assert asyncio.run(go()) == ["ok", "degraded", "down"]
    assert up.health.status == "down" and up.health.latency_ms is None


# ---- 10. /v1/models --------------------------------------------------------------------------------------


def test_models_lists_local_and_remote(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(answers)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        listed = client.models.list()
        remote = client.models.retrieve("remote")
        missing = http.get("/v1/models/nope")
        chat_missing = http.post("/v1/chat/completions", json={"model": TARGET, "messages": MSGS})
    assert [m.id for m in listed.data] == ["remote", "local"]
    assert remote.id == "remote" and remote.object == "model" and remote.created > 0
    assert_error(missing, 404, "invalid_request_error", "model_not_found")
    assert_error(chat_missing, 404, "invalid_request_error", "model_not_found")  # the upstream's name is not ours
    assert mock.calls == 0


# ---- a client gone while the gateway waits for the upstream's headers ------------------------------------


async def slow_headers(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    if not body.get("stream"):
        return answers(request, body)
    await asyncio.sleep(0.6)  # the client leaves while the gateway waits for the upstream's headers
    return sse(chat_chunk({"content": "late"}), chat_chunk({}, "stop"))


def test_a_stream_whose_client_left_before_the_upstream_answered_releases_everything(
    settings: Settings, api_key: str
) -> None:
    mock = MockUpstream(slow_headers)
    app, up = build(settings, mock, max_concurrency=1)
    body = json.dumps({"model": "remote", "messages": MSGS, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            time.sleep(0.2)  # admitted and waiting upstream; then the client goes away
        deadline = time.monotonic() + 5
        while (up.running or app_state(app).lifecycle.in_flight) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert up.running == 0 and app_state(app).lifecycle.in_flight == 0  # the slot and the request were settled
        # the single slot is free again: the next request is served
        r = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "remote", "messages": MSGS}, timeout=10)  # fmt: skip
    assert r.status_code == 200 and mock.calls == 2
    abandoned = _log_rows(settings)[0]  # the upstream request was cancelled: nothing generated, nothing billed
    assert (abandoned["status"], abandoned["error_type"], abandoned["completion_tokens"]) == (
        499,
        "client_closed_request",
        0,
    )


async def very_slow_answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    await asyncio.sleep(5)
    return answers(request, body)


def test_a_non_stream_client_that_leaves_cancels_the_upstream_request(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(very_slow_answer)
    app, up = build(settings, mock, timeout_s=10.0)
    with live_server(app) as base:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {api_key}"},
                       json={"model": "remote", "messages": MSGS}, timeout=0.3)  # fmt: skip
        while (mock.in_flight or up.running) and time.monotonic() - started < 3:
            time.sleep(0.02)
        assert mock.in_flight == 0 and up.running == 0  # cancelled long before the upstream's 5 s answer
        assert time.monotonic() - started < 3
        while not _log_rows(settings) and time.monotonic() - started < 5:  # the writer flushes every 0.5 s
            time.sleep(0.05)
    (row,) = _log_rows(settings)
    assert (row["status"], row["error_type"], row["completion_tokens"]) == (499, "client_closed_request", 0)
