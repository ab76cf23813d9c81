"""Remote (``backend = "openai"``) models in process: the upstream's answers re-framed into our exact wire format.

Chat and text completions, streamed or not, through raw HTTP and the official SDK; a quirky upstream stream;
forwarded extensions; the native routes on a remote model.

The same paths against real upstream processes are in ``test_remote.py``; the fake upstream is in
``tests/fakes``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.settings import Settings
from tests.checks import frames
from tests.conftest import sdk
from tests.fakes.replies import (
    answers,
    chat_chunk,
)
from tests.fakes.upstream import MSGS, TARGET, USAGE, MockUpstream, serving

pytestmark = pytest.mark.usefixtures("quick_backoff")


# ---- re-framing ---------------------------------------------------------------------------------------


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
