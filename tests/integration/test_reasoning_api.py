"""Reasoning models over HTTP: ``reasoning_content`` (whole and streamed), ``chat_template_kwargs``, usage details.

Local models are the scripted FakeEngine behind chat templates written for the tests (``tests/fakes/templates.py``);
a remote model is the fake upstream sending vLLM's ``reasoning_content``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.settings import Settings
from tests.checks import frames
from tests.fakes.replies import chat_chunk, chat_json, sse, usage_chunk
from tests.fakes.templates import PLAIN, QWEN3_LIKE, R1_LIKE, TemplateTokenizer, templated_engine
from tests.fakes.upstream import MockUpstream, serving

USER = [{"role": "user", "content": "hi"}]
THINKS = ["<think>", "hm", "</think>", "Hi"]


@contextmanager
def client(
    settings: Settings, api_key: str, script: Sequence[str], template: str = QWEN3_LIKE, parser: str = "auto"
) -> Iterator[TestClient[Litestar]]:
    engine = templated_engine(template, script)
    app = create_app(msgspec.structs.replace(settings, reasoning_parser=parser), engine=engine)
    with TestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {api_key}"
        yield http


def chat(http: TestClient[Litestar], **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": "fake", "messages": USER, **body})


def streamed(http: TestClient[Litestar], **body: Any) -> tuple[list[dict[str, Any]], str, str]:
    """The stream's chunks, its joined reasoning and its joined content."""
    r = chat(http, stream=True, stream_options={"include_usage": True}, **body)
    assert r.status_code == 200, r.text
    chunks, done = frames(r.text)
    assert done
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    thought = "".join(d.get("reasoning_content", "") for d in deltas)
    return chunks, thought, "".join(d.get("content", "") for d in deltas)


@pytest.mark.parametrize(
    ("script", "template"),
    [
        (THINKS, QWEN3_LIKE),
        (["<th", "ink>", "h", "m</th", "ink>\n\nH", "i"], QWEN3_LIKE),  # markers cut across pieces
        (["\n", "<think>", "hm", "</think>", "\n\n", "Hi"], QWEN3_LIKE),
        (["hm", "</think>", "Hi"], R1_LIKE),  # the generation prompt opened the reasoning
        (THINKS, PLAIN),  # REASONING_PARSER=think below
    ],
    ids=["whole-markers", "split-markers", "blank-lines", "opened-by-template", "forced"],
)
def test_reasoning_goes_to_reasoning_content(
    settings: Settings, api_key: str, script: list[str], template: str
) -> None:
    parser = "think" if template == PLAIN else "auto"
    with client(settings, api_key, script, template, parser) as http:
        body = chat(http).json()
        chunks, thought, content = streamed(http)
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hi",
        "refusal": None,
        "reasoning_content": "hm",
    }
    assert (thought, content) == ("hm", "Hi")
    assert all("<think>" not in c and "</think>" not in c for c in (thought, content))
    usage = body["usage"]
    assert usage["completion_tokens"] == len(script) + 1  # + EOS
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning < usage["completion_tokens"]
    assert chunks[-1]["usage"] == usage


def test_reasoning_tokens_count_the_markers(settings: Settings, api_key: str) -> None:
    with client(settings, api_key, THINKS) as http:
        usage = chat(http).json()["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}  # <think>, hm, </think>


def test_no_markers_in_the_output_leaves_it_unchanged(settings: Settings, api_key: str) -> None:
    with client(settings, api_key, ["Hel", "lo"]) as http:
        body = chat(http).json()
        chunks, thought, content = streamed(http)
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello",
        "refusal": None,
        "reasoning_content": None,
    }
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert (thought, content) == ("", "Hello")
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 0}


@pytest.mark.parametrize(("template", "parser"), [(PLAIN, "auto"), (QWEN3_LIKE, "none")])
def test_without_a_parser_the_wire_format_is_untouched(
    settings: Settings, api_key: str, template: str, parser: str
) -> None:
    with client(settings, api_key, THINKS, template, parser) as http:
        body = chat(http).json()
        chunks, thought, content = streamed(http)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "<think>hm</think>Hi", "refusal": None}
    plain = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}  # no reasoning_tokens
    assert set(body["usage"]) == plain
    assert (thought, content) == ("", "<think>hm</think>Hi")
    assert set(chunks[-1]["usage"]) == plain


def test_reasoning_cut_by_max_tokens_has_no_content(settings: Settings, api_key: str) -> None:
    with client(settings, api_key, ["<think>", "a", "b", "c"]) as http:
        body = chat(http, max_tokens=3).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["reasoning_content"] == "ab" and choice["message"]["content"] is None
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_chat_template_kwargs_reach_the_template(settings: Settings, api_key: str) -> None:
    engine = templated_engine(QWEN3_LIKE, ["Hi"])
    app = create_app(settings, engine=engine)
    with TestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {api_key}"
        plain = chat(http)
        off = chat(http, chat_template_kwargs={"enable_thinking": False})
        bad = chat(http, chat_template_kwargs={"add_generation_prompt": False})
    assert plain.status_code == off.status_code == 200
    tok = engine.tokenizer
    assert isinstance(tok, TemplateTokenizer)
    assert tok.rendered[0].endswith("<|im_start|>assistant\n")
    assert tok.rendered[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert off.json()["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"] + len(
        "<think>\n\n</think>\n\n"
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "chat_template_kwargs.add_generation_prompt"


def test_tool_calls_are_parsed_after_the_reasoning(settings: Settings, api_key: str) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    # The test template shows no tool-call format (a real Qwen3 template names <tool_call>): the parser is named.
    settings = msgspec.structs.replace(settings, tool_call_parser="hermes")
    with client(settings, api_key, ["<think>", "need weather", "</think>", "\n", call]) as http:
        body = chat(http, tools=tools).json()
        chunks, thought, content = streamed(http, tools=tools)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == "need weather"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert (thought, content) == ("need weather", "")
    calls = [
        d["tool_calls"][0] for c in chunks if c["choices"] for d in [c["choices"][0]["delta"]] if "tool_calls" in d
    ]
    assert calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Paris"}'


# ---- remote models --------------------------------------------------------------------------------------------


def reasoning_upstream(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    """A vLLM-like upstream serving a reasoning model."""
    usage = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    usage["completion_tokens_details"] = {"reasoning_tokens": 3}  # type: ignore[assignment]
    if not body.get("stream"):
        return httpx.Response(200, json=chat_json("Hi", reasoning_content="hm") | {"usage": usage})
    last = usage_chunk() | {"usage": usage}
    return sse(
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"reasoning_content": "h"}),
        chat_chunk({"reasoning": "m"}),  # newer vLLM's name
        chat_chunk({"content": "Hi"}, "stop"),
        last,
    )


def test_a_remote_models_reasoning_passes_through(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(reasoning_upstream)
    kwargs = {"enable_thinking": True, "nested": {"a": [1]}}
    with serving(settings, mock, api_key) as (http, _):
        body = http.post(
            "/v1/chat/completions", json={"model": "remote", "messages": USER, "chat_template_kwargs": kwargs}
        ).json()
        r = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": USER, "stream": True, "stream_options": {"include_usage": True}},
        )
    assert body["choices"][0]["message"]["reasoning_content"] == "hm"
    assert body["choices"][0]["message"]["content"] == "Hi"
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    chunks, done = frames(r.text)
    assert done
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hm"
    assert "".join(d.get("content", "") for d in deltas) == "Hi"
    assert all(set(d) <= {"role", "content"} or set(d) == {"reasoning_content"} for d in deltas if d)
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
    assert mock.posts[0].body["chat_template_kwargs"] == kwargs  # forwarded as is
    assert "chat_template_kwargs" not in mock.posts[1].body


def test_a_cache_hit_splits_its_text_the_same_way(settings: Settings, api_key: str) -> None:
    with client(settings, api_key, ["<think>", "h", "m", "</think>", "Hi"]) as http:
        first = chat(http, temperature=0).json()
        again = chat(http, temperature=0).json()
        chunks, thought, content = streamed(http, temperature=0)
    assert again["id"] != first["id"]
    assert again["choices"] == first["choices"]
    assert (thought, content) == ("hm", "Hi")
    # The cache keeps texts, not token boundaries: a hit counts its reasoning by re-tokenizing it (the test
    # tokenizer spells the markers a character at a time), never more than the completion's tokens.
    details = again["usage"]["completion_tokens_details"]
    assert 0 < details["reasoning_tokens"] <= again["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]
    assert chunks[-1]["usage"] == again["usage"]


def test_template_kwargs_that_set_the_rendering_are_refused_for_every_model(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(reasoning_upstream)
    body = {"messages": USER, "chat_template_kwargs": {"chat_template": "{{ messages * 100000 }}"}}
    with serving(settings, mock, api_key) as (http, _):
        remote = http.post("/v1/chat/completions", json=body | {"model": "remote"})
        local = http.post("/v1/chat/completions", json=body | {"model": "local"})
    for r in (remote, local):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "chat_template_kwargs.chat_template"
    assert mock.calls == 0
