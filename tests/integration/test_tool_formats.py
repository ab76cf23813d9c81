"""Tool-call formats through the API: each family's template, its answers parsed whole and streamed, the format
detected from the template or named by ``TOOL_CALL_PARSER``, and the 400 for a template that knows no tools."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.settings import Settings
from tests.fakes.templated import (
    HERMES_TEMPLATE,
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    NO_TOOLS_TEMPLATE,
    templated_engine,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Weather in Paris, and 1+2?"}]
EXPECTED = [("get_weather", '{"city":"Paris"}'), ("add", '{"a":1,"b":2}')]

# Each family's answer with two calls, in BPE-like pieces that split its markers and JSON mid-way.
ANSWERS: dict[str, list[str]] = {
    "hermes": [
        "<tool_",
        "call>\n",
        '{"name": "get_',
        'weather", "arguments": {"city": ',
        '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "add", "argu',
        'ments": {"a": 1, "b": 2}}\n</tool_call>',
    ],
    "llama3_json": [
        "<|python_tag|>",
        '{"name": "get_weather", ',
        '"parameters": {"city": "Pa',
        'ris"}}; {"name": "add", "parameters": ',
        '{"a": 1, "b": 2}}',
    ],
    "mistral": [
        "[TOOL_",
        "CALLS][",
        '{"name": "get_weather", "arguments": {"city": ',
        '"Paris"}}, {"name": "add", "arguments": {"a": 1,',
        ' "b": 2}}]',
    ],
    # Newer Mistral templates: one [TOOL_CALLS]name[ARGS]{...} per call.
    "mistral_named": [
        "[TOOL_CALLS]",
        "get_weather[ARGS]",
        '{"city": ',
        '"Paris"}',
        "[TOOL_CALLS]add[ARGS]",
        '{"a": 1, "b": 2}',
    ],
}
TEMPLATES = {
    "hermes": HERMES_TEMPLATE,
    "llama3_json": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "mistral_named": MISTRAL_TEMPLATE,
}


@pytest.fixture
def serve(settings: Settings, authed: Callable[[Any], Any]) -> Callable[..., TestClient[Litestar]]:
    """A client of an app serving a templated FakeEngine, with ``TOOL_CALL_PARSER`` as given."""

    def make(template: str, script: Sequence[str], parser: str = "auto") -> TestClient[Litestar]:
        app_settings = msgspec.structs.replace(settings, tool_call_parser=parser)
        client: TestClient[Litestar] = authed(
            TestClient(create_app(app_settings, engine=templated_engine(template, script)))
        )
        return client

    return make


def chat(client: TestClient[Litestar], **body: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "fake", "messages": USER, **body})


def streamed(client: TestClient[Litestar], **body: Any) -> tuple[str, list[tuple[str, str]], list[str], list[Any]]:
    """Content, calls (name, joined arguments), finish reasons and tool-call deltas of a streamed answer."""
    r = chat(client, stream=True, **body)
    assert r.status_code == 200, r.text
    content, calls, finishes, deltas = "", {}, [], []
    for line in r.text.splitlines():
        if not line.startswith("data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        delta = choice["delta"]
        content += delta.get("content") or ""
        for tc in delta.get("tool_calls") or []:
            deltas.append(tc)
            entry = calls.setdefault(tc["index"], ["", ""])
            entry[0] += tc["function"].get("name") or ""
            entry[1] += tc["function"].get("arguments") or ""
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    return content, [tuple(calls[i]) for i in sorted(calls)], finishes, deltas  # type: ignore[misc]


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_each_family_is_detected_and_parsed_whole_and_streamed(
    serve: Callable[..., TestClient[Litestar]], family: str
) -> None:
    with serve(TEMPLATES[family], ANSWERS[family]) as client:
        r = chat(client, tools=[WEATHER, ADD])
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        calls = choice["message"]["tool_calls"]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == EXPECTED
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)

        content, stream_calls, finishes, deltas = streamed(client, tools=[WEATHER, ADD])
        assert (content, stream_calls, finishes) == ("", EXPECTED, ["tool_calls"])
        # Each call is announced (id and name) before its arguments stream, in fragments as they arrive.
        for index, (name, _) in enumerate(EXPECTED):
            mine = [d for d in deltas if d["index"] == index]
            assert mine[0]["id"].startswith("call_") and mine[0]["function"] == {"name": name, "arguments": ""}
            assert all("id" not in d and "name" not in d["function"] for d in mine[1:])
        assert len([d for d in deltas if d["index"] == 0]) > 2


@pytest.mark.parametrize("family", ["llama3_json", "mistral"])
def test_plain_answers_stay_content(serve: Callable[..., TestClient[Litestar]], family: str) -> None:
    script = ["The ", "weather ", "is ", "fine; ", "[1, 2]"]
    with serve(TEMPLATES[family], script) as client:
        r = chat(client, tools=[WEATHER])
        message = r.json()["choices"][0]["message"]
        assert (message["content"], "tool_calls" in message) == ("The weather is fine; [1, 2]", False)
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert streamed(client, tools=[WEATHER])[:3] == ("The weather is fine; [1, 2]", [], ["stop"])


def test_mistral_content_before_the_calls(serve: Callable[..., TestClient[Litestar]]) -> None:
    script = ["Let me check.", " [TOOL_CALLS]", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]']
    with serve(MISTRAL_TEMPLATE, script) as client:
        message = chat(client, tools=[WEATHER]).json()["choices"][0]["message"]
        assert message["content"] == "Let me check."
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
        assert streamed(client, tools=[WEATHER])[:3] == ("Let me check.", [EXPECTED[0]], ["tool_calls"])


def test_the_template_decides_the_format(serve: Callable[..., TestClient[Litestar]]) -> None:
    """A Hermes answer from a model whose template asks for Llama 3 JSON is not a call (and keeps its text)."""
    with serve(LLAMA3_TEMPLATE, [*ANSWERS["hermes"][:4], '"Paris"}}\n</tool_call>']) as client:
        message = chat(client, tools=[WEATHER]).json()["choices"][0]["message"]
        assert "tool_calls" not in message
        assert message["content"].startswith('<tool_call>\n{"name": "get_weather"')


def test_the_setting_overrides_detection(serve: Callable[..., TestClient[Litestar]]) -> None:
    with serve(HERMES_TEMPLATE, ANSWERS["mistral"], parser="mistral") as client:
        calls = chat(client, tools=[WEATHER, ADD]).json()["choices"][0]["message"]["tool_calls"]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == EXPECTED


def test_a_template_without_tools_is_a_clear_400_unless_a_parser_is_named(
    serve: Callable[..., TestClient[Litestar]],
) -> None:
    with serve(NO_TOOLS_TEMPLATE, ANSWERS["llama3_json"]) as client:
        r = chat(client, tools=[WEATHER])
        assert r.status_code == 400
        error = r.json()["error"]
        assert (error["param"], error["code"], error["type"]) == ("tools", "tools_unsupported", "invalid_request_error")
        assert "--tool-call-parser" in error["message"]
        # tool_choice "none" offers no tools, so nothing is refused; no tools at all neither.
        assert chat(client, tools=[WEATHER], tool_choice="none").status_code == 200
        assert chat(client).status_code == 200
    with serve(NO_TOOLS_TEMPLATE, ANSWERS["llama3_json"], parser="llama3_json") as client:
        calls = chat(client, tools=[WEATHER, ADD]).json()["choices"][0]["message"]["tool_calls"]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == EXPECTED


def test_tool_history_renders_in_the_family_format(settings: Settings, authed: Callable[[Any], Any]) -> None:
    history = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"P"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"},
    ]
    engine = templated_engine(MISTRAL_TEMPLATE, ["ok"])
    with authed(TestClient(create_app(settings, engine=engine))) as client:
        r = client.post("/v1/chat/completions", json={"model": "fake", "messages": history, "tools": [WEATHER]})
        assert r.status_code == 200, r.text
    prompt = engine.tokenizer.decode(list(engine.requests[0].prompt_token_ids))
    assert '<|assistant|>[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "P"}}]<|tool|>3 degrees' in prompt


def test_named_parser_is_parallel_limited(serve: Callable[..., TestClient[Litestar]]) -> None:
    """``parallel_tool_calls: false`` keeps one call; the rest of the answer is content, as with Hermes."""
    with serve(LLAMA3_TEMPLATE, ANSWERS["llama3_json"]) as client:
        message = chat(client, tools=[WEATHER, ADD], parallel_tool_calls=False).json()["choices"][0]["message"]
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
        assert message["content"] == '; {"name": "add", "parameters": {"a": 1, "b": 2}}'
