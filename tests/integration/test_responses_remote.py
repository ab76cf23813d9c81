"""``/v1/responses`` for remote models: translated to chat completions for a chat upstream, forwarded to an upstream
that serves ``/v1/responses`` (``responses_api = true``); the state stays here either way."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from server.settings import Settings
from tests.conftest import sdk
from tests.fakes.replies import chat_chunk, chat_json, sse, usage_chunk
from tests.fakes.upstream import TARGET, USAGE, MockUpstream, serving

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
RESPONSES_USAGE = {
    "input_tokens": 21,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 2},
    "total_tokens": 26,
}


def upstream_response(*output: dict[str, Any], status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {
        "id": "resp_upstream",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": TARGET,
        "output": list(output),
        "usage": RESPONSES_USAGE,
        **extra,
    }


def message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_up",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def function_call(call_id: str = "call_up_1", arguments: str = '{"city":"Paris"}') -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_up",
        "call_id": call_id,
        "name": "get_weather",
        "arguments": arguments,
        "status": "completed",
    }


def events_bytes(*events: dict[str, Any]) -> bytes:
    return b"".join(
        f"event: {e['type']}\ndata: {json.dumps({**e, 'sequence_number': i})}\n\n".encode()
        for i, e in enumerate(events)
    )


def responses_stream(*deltas: str, final: dict[str, Any]) -> httpx.Response:
    item = {"type": "message", "id": "msg_up", "role": "assistant", "status": "in_progress", "content": []}
    events = [
        {"type": "response.created", "response": {**final, "status": "in_progress", "output": []}},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        *(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_up",
                "output_index": 0,
                "content_index": 0,
                "delta": d,
            }
            for d in deltas
        ),
        {"type": "response.completed", "response": final},
    ]
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events_bytes(*events))


# ---- translated to chat completions ------------------------------------------------------------------------------


def test_a_chat_upstream_runs_the_turn_as_a_chat_completion(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(lambda request, body: httpx.Response(200, json=chat_json("Bonjour!")))
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        first = client.responses.create(model="remote", input="Say hello", instructions="Be French.")
        second = client.responses.create(model="remote", input="Again", previous_response_id=first.id)
    assert first.output_text == "Bonjour!" and first.status == "completed" and first.model == "remote"
    assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (11, 2)
    seen = mock.posts[1]
    assert seen.path == "/v1/chat/completions" and seen.body["model"] == TARGET
    # The earlier turn's instructions are not carried; its output is.
    assert seen.body["messages"] == [
        {"role": "user", "content": "Say hello"},
        {"role": "assistant", "content": "Bonjour!"},
        {"role": "user", "content": "Again"},
    ]
    assert mock.posts[0].body["messages"][0] == {"role": "system", "content": "Be French."}
    assert second.previous_response_id == first.id


def test_a_chat_upstreams_tool_call_round_trips(settings: Settings, api_key: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}

    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if body["messages"][-1]["role"] == "tool":
            return httpx.Response(200, json=chat_json("Sunny in Paris."))
        return httpx.Response(200, json=chat_json(None, "tool_calls", tool_calls=[call]))

    mock = MockUpstream(reply)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        first = client.responses.create(model="remote", input="Weather?", tools=[WEATHER])  # type: ignore[list-item]
        (fc,) = first.output
        assert fc.type == "function_call" and fc.call_id == "call_1" and fc.arguments == '{"city":"Paris"}'
        answer = [{"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
        second = client.responses.create(model="remote", input=answer, previous_response_id=first.id, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert second.output_text == "Sunny in Paris."
    sent = mock.posts[1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2] == {
        "role": "tool",
        "content": "sunny",
        "tool_call_id": "call_1",
    }
    assert mock.posts[0].body["tools"][0]["function"]["name"] == "get_weather"


def test_a_chat_upstreams_stream_becomes_response_events(settings: Settings, api_key: str) -> None:
    chunks = [chat_chunk({"content": "Hel"}), chat_chunk({"content": "lo"}, "stop"), usage_chunk()]
    mock = MockUpstream(lambda request, body: sse(*chunks))
    with serving(settings, mock, api_key) as (http, _):
        events = list(sdk(http, api_key).responses.create(model="remote", input="hi", stream=True))
        stored = sdk(http, api_key).responses.retrieve(events[-1].response.id)  # type: ignore[union-attr]
    assert [e.type for e in events][-1] == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]  # type: ignore[union-attr]
    assert "".join(deltas) == "Hello" and stored.output_text == "Hello"
    assert stored.usage is not None and stored.usage.total_tokens == USAGE["total_tokens"]


# ---- forwarded to an upstream that serves /v1/responses ----------------------------------------------------------


def test_forwarding_sends_the_whole_conversation_statelessly(settings: Settings, api_key: str) -> None:
    replies = iter([upstream_response(message("First answer")), upstream_response(message("Second answer"))])
    mock = MockUpstream(lambda request, body: httpx.Response(200, json=next(replies)))
    with serving(settings, mock, api_key, responses_api=True) as (http, _):
        client = sdk(http, api_key)
        first = client.responses.create(model="remote", input="One", instructions="Be brief.", max_output_tokens=50)
        second = client.responses.create(model="remote", input="Two", previous_response_id=first.id)
        items = client.responses.input_items.list(second.id, order="asc")
    assert first.id.startswith("resp_") and first.id != "resp_upstream" and first.model == "remote"
    assert first.output_text == "First answer" and second.output_text == "Second answer"
    assert first.usage is not None
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.total_tokens) == (21, 5, 26)
    assert first.usage.output_tokens_details.reasoning_tokens == 2
    one, two = (p.body for p in mock.posts)
    assert mock.posts[0].path == "/v1/responses"
    assert one["store"] is False and one["model"] == TARGET and one["instructions"] == "Be brief."
    assert one["max_output_tokens"] == 50 and "previous_response_id" not in two and "instructions" not in two
    assert one["input"] == [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "One"}]}]
    assert [(i["role"], i["content"][0]["text"]) for i in two["input"]] == [
        ("user", "One"),
        ("assistant", "First answer"),
        ("user", "Two"),
    ]
    assert all("id" not in i for i in two["input"])
    assert [getattr(i, "role", None) for i in items.data] == ["user", "assistant", "user"]


def test_forwarded_function_calls_and_outputs(settings: Settings, api_key: str) -> None:
    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
        if body["input"][-1]["type"] == "function_call_output":
            return httpx.Response(200, json=upstream_response(message("Sunny.")))
        return httpx.Response(200, json=upstream_response(function_call()))

    mock = MockUpstream(reply)
    with serving(settings, mock, api_key, responses_api=True) as (http, _):
        client = sdk(http, api_key)
        first = client.responses.create(model="remote", input="Weather?", tools=[WEATHER])  # type: ignore[list-item]
        answer = [{"type": "function_call_output", "call_id": "call_up_1", "output": "sunny"}]
        second = client.responses.create(model="remote", input=answer, previous_response_id=first.id)  # type: ignore[arg-type]
    (fc,) = first.output
    assert fc.type == "function_call" and fc.call_id == "call_up_1" and fc.name == "get_weather"
    assert second.output_text == "Sunny."
    sent = mock.posts[1].body["input"]
    assert [i["type"] for i in sent] == ["message", "function_call", "function_call_output"]
    assert sent[1]["call_id"] == "call_up_1" and sent[2]["output"] == "sunny"
    assert mock.posts[0].body["tools"] == [WEATHER]


def test_a_forwarded_stream_is_renumbered_and_stored(settings: Settings, api_key: str) -> None:
    final = upstream_response(message("Hello"))
    mock = MockUpstream(lambda request, body: responses_stream("Hel", "lo", final=final))
    with serving(settings, mock, api_key, responses_api=True) as (http, _):
        raw = http.post("/v1/responses", json={"model": "remote", "input": "hi", "stream": True})
        frames = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: ")]
        stored = http.get(f"/v1/responses/{frames[-1]['response']['id']}").json()
    assert mock.posts[0].body["stream"] is True and "stream_options" not in mock.posts[0].body
    assert [f["sequence_number"] for f in frames] == list(range(len(frames)))
    assert frames[-1]["type"] == "response.completed" and frames[-1]["response"]["model"] == "remote"
    assert "".join(f["delta"] for f in frames if f["type"] == "response.output_text.delta") == "Hello"
    assert stored["output"][0]["content"][0]["text"] == "Hello" and stored["usage"]["total_tokens"] == 26


def test_an_incomplete_forwarded_response_stays_incomplete(settings: Settings, api_key: str) -> None:
    cut = upstream_response(message("Partial"), status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    mock = MockUpstream(lambda request, body: httpx.Response(200, json=cut))
    with serving(settings, mock, api_key, responses_api=True) as (http, _):
        response = sdk(http, api_key).responses.create(model="remote", input="hi", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens" and response.output_text == "Partial"


def test_a_forwarded_stream_that_fails_ends_failed(settings: Settings, api_key: str) -> None:
    failed = {"type": "response.failed", "response": upstream_response(status="failed", error={"message": "boom"})}
    body = events_bytes({"type": "response.output_text.delta", "delta": "Hel"}, failed)
    mock = MockUpstream(
        lambda request, _: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    )
    with serving(settings, mock, api_key, responses_api=True) as (http, _):
        raw = http.post("/v1/responses", json={"model": "remote", "input": "hi", "stream": True})
        frames = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: ")]
        stored = http.get(f"/v1/responses/{frames[-1]['response']['id']}").json()
    assert [f["type"] for f in frames][-2:] == ["error", "response.failed"]
    assert frames[-2]["code"] == "upstream_error" and "boom" in frames[-2]["message"]
    assert stored["status"] == "failed" and stored["error"]["code"] == "upstream_error"


def test_a_forwarded_answer_without_usage_is_estimated(settings: Settings, api_key: str) -> None:
    bare = upstream_response(message("Hello there"))
    del bare["usage"]
    mock = MockUpstream(lambda request, body: httpx.Response(200, json=bare))
    with serving(settings, mock, api_key, responses_api=True) as (http, _):
        r = http.post("/v1/responses", json={"model": "remote", "input": "hi"})
    assert r.status_code == 200 and r.headers["x-usage-estimated"] == "true"
    assert r.json()["usage"]["output_tokens"] > 0


@pytest.mark.parametrize("responses_api", [False, True])
def test_remote_400s_match_the_local_checks(settings: Settings, api_key: str, responses_api: bool) -> None:
    mock = MockUpstream(lambda request, body: httpx.Response(200, json=chat_json()))
    bad_tool = {"type": "function", "name": "bad name!"}
    with serving(settings, mock, api_key, responses_api=responses_api) as (http, _):
        r = http.post("/v1/responses", json={"model": "remote", "input": "hi", "tools": [bad_tool]})
        hosted = http.post("/v1/responses", json={"model": "remote", "input": "hi", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools[0]")
    assert hosted.status_code == 400 and hosted.json()["error"]["param"] == "tools[0].type"
    assert mock.calls == 0
