"""Remote models in process: tool calls and logprobs pass through, malformed logprobs are dropped.

The same paths against real upstream processes are in ``test_remote.py``; the fake upstream is in
``tests/fakes``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.settings import Settings
from tests.checks import frames
from tests.conftest import sdk
from tests.fakes.replies import (
    chat_chunk,
    chat_json,
    sse,
    text_json,
    usage_chunk,
)
from tests.fakes.upstream import MSGS, MockUpstream, serving

pytestmark = pytest.mark.usefixtures("quick_backoff")


# ---- tool calls and logprobs --------------------------------------------------------------------------

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
