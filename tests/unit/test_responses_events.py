"""A Responses turn: its response object, its output, and the stream events its chat completion chunks become."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.openai.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChoiceDelta,
    ChoiceDeltaFunction,
    ChoiceDeltaToolCall,
    ChunkChoice,
    FunctionCall,
    SystemMessage,
    ToolCall,
    UserMessage,
)
from schemas.openai.common import CompletionTokensDetails, CompletionUsage, PromptTokensDetails
from schemas.openai.errors import ErrorBody, ErrorResponse
from schemas.openai.responses import (
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    MessageItem,
    OutputFunctionCall,
    OutputItemAdded,
    OutputItemDone,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    ReasoningTextDelta,
    ReasoningTextDone,
    Response,
    ResponseCompleted,
    ResponseEvent,
    ResponseFailed,
    ResponseIncomplete,
    ResponsesRequest,
    TextFormat,
)
from server.serving.responses.events import TurnEvents
from server.serving.responses.items import output_as_input, parse_input, with_ids
from server.serving.responses.turn import Turn, begin_turn, new_response_id, output_of, usage_of
from server.serving.responses.upstream import chat_usage

USAGE = CompletionUsage(
    prompt_tokens=11,
    completion_tokens=7,
    total_tokens=18,
    completion_tokens_details=CompletionTokensDetails(reasoning_tokens=3),
)


def turn(history: list[Any] | None = None, **fields: Any) -> Turn:
    req = msgspec.convert({"model": "m", "input": "hi", **fields}, ResponsesRequest)
    return begin_turn(req, "served", history or [], new_response_id())


def completion(message: ChatCompletionMessage, finish: str) -> ChatCompletion:
    choice = ChatChoice(index=0, message=message, finish_reason=finish)
    return ChatCompletion(id="c", created=0, model="served", choices=[choice], usage=USAGE)


def chunk(
    delta: ChoiceDelta | None = None, finish: str | None = None, usage: CompletionUsage | None = None
) -> ChatCompletionChunk:
    choices = [] if delta is None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
    return ChatCompletionChunk(id="c", created=0, model="served", choices=choices, usage=usage)


def call_start(index: int, call_id: str, name: str, arguments: str = "") -> ChatCompletionChunk:
    function = ChoiceDeltaFunction(name=name, arguments=arguments)
    return chunk(
        ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(index=index, id=call_id, type="function", function=function)])
    )


def call_arguments(index: int, fragment: str) -> ChatCompletionChunk:
    function = ChoiceDeltaFunction(arguments=fragment)
    return chunk(ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(index=index, function=function)]))


def stream(t: Turn, chunks: list[ChatCompletionChunk]) -> tuple[TurnEvents, list[ResponseEvent]]:
    events = TurnEvents(t)
    out = events.start()
    for c in chunks:
        out += events.push(c)
    return events, out + events.finish()


def types(events: list[ResponseEvent]) -> list[str]:
    return [msgspec.inspect.type_info(type(e)).tag for e in events]  # type: ignore[attr-defined]


def without_ids(output: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in msgspec.to_builtins(item).items() if k != "id"} for item in output]


# ---- turn ----------------------------------------------------------------------------------------------------------
def test_begin_turn_joins_history_and_new_input_with_ids() -> None:
    history = with_ids(parse_input([{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}]))
    t = turn(history, input=[{"role": "user", "content": "second"}], instructions="be brief")
    assert t.items[:2] == history
    assert len(t.items) == 3
    new = t.items[2]
    assert isinstance(new, MessageItem)
    assert new.id is not None and new.id.startswith("msg_")
    assert t.chat.messages == [
        SystemMessage(content="be brief"),
        UserMessage(content="first"),
        AssistantMessage(content="one"),
        UserMessage(content="second"),
    ]
    assert t.id.startswith("resp_") and t.model == "served"


def test_response_echoes_the_request_with_defaults() -> None:
    r = turn().response("in_progress")
    assert (r.status, r.model, r.output, r.usage, r.error, r.incomplete_details) == (
        "in_progress",
        "served",
        [],
        None,
        None,
        None,
    )
    assert (r.tool_choice, r.text.format, r.parallel_tool_calls) == ("auto", TextFormat(type="text"), True)
    assert (r.temperature, r.top_p, r.metadata, r.tools, r.store, r.background) == (1.0, 1.0, {}, [], True, False)
    assert r.completed_at is None
    asked = turn(
        tool_choice={"type": "function", "name": "get"},
        tools=[{"type": "function", "name": "get"}],
        text={"format": {"type": "json_object"}},
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.5,
        metadata={"k": "v"},
        max_output_tokens=9,
    ).response("completed")
    assert (asked.tool_choice, asked.text.format.type, asked.parallel_tool_calls) == (
        {"type": "function", "name": "get"},
        "json_object",
        False,
    )
    assert (asked.temperature, asked.top_p, asked.metadata, asked.max_output_tokens) == (0.2, 0.5, {"k": "v"}, 9)
    assert [tool.name for tool in asked.tools] == ["get"]
    assert asked.completed_at is not None


def test_finished_by_stop_is_completed_with_reasoning_text_and_usage() -> None:
    message = ChatCompletionMessage(content="hello", reasoning_content="think")
    r = turn().finished(completion(message, "stop"))
    assert (r.status, r.incomplete_details) == ("completed", None)
    reasoning, text = r.output
    assert isinstance(reasoning, OutputReasoning) and isinstance(text, OutputMessage)
    assert [part.text for part in reasoning.content] == ["think"]
    assert text.content == [OutputText(text="hello")]
    assert (reasoning.status, text.status) == ("completed", "completed")
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (11, 7, 18)
    assert r.usage.output_tokens_details.reasoning_tokens == 3


def test_finished_by_length_is_incomplete_with_its_last_item_incomplete() -> None:
    message = ChatCompletionMessage(content="hel", reasoning_content="think")
    r = turn(max_output_tokens=5).finished(completion(message, "length"))
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert [item.status for item in r.output] == ["completed", "incomplete"]
    assert r.completed_at is None


def test_finished_by_tool_calls_gives_the_calls() -> None:
    calls = [ToolCall(id="c1", function=FunctionCall(name="get", arguments='{"a": 1}'))]
    r = turn().finished(completion(ChatCompletionMessage(content=None, tool_calls=calls), "tool_calls"))
    (call,) = r.output
    assert isinstance(call, OutputFunctionCall)
    assert (call.call_id, call.name, call.arguments, call.status) == ("c1", "get", '{"a": 1}', "completed")
    assert call.id.startswith("fc_")


def test_output_of_nothing_is_one_empty_message() -> None:
    (item,) = output_of(ChatCompletionMessage(content=None), truncated=False)
    assert isinstance(item, OutputMessage)
    assert (item.content, item.status) == ([OutputText(text="")], "completed")


def test_usage_without_reasoning_details_counts_no_reasoning_tokens() -> None:
    usage = usage_of(CompletionUsage(prompt_tokens=2, completion_tokens=3, total_tokens=5))
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens == 0


def test_cached_prompt_tokens_become_cached_input_tokens_both_ways() -> None:
    chat = CompletionUsage(
        prompt_tokens=40,
        completion_tokens=3,
        total_tokens=43,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=32),
    )
    assert usage_of(chat).input_tokens_details.cached_tokens == 32
    upstream = {
        "input_tokens": 40,
        "output_tokens": 3,
        "total_tokens": 43,
        "input_tokens_details": {"cached_tokens": 32},
    }
    assert chat_usage(upstream)["prompt_tokens_details"] == {"cached_tokens": 32}


# ---- events --------------------------------------------------------------------------------------------------------
FULL = [
    chunk(ChoiceDelta(role="assistant", content="")),
    chunk(ChoiceDelta(reasoning_content="thi")),
    chunk(ChoiceDelta(reasoning_content="nk")),
    chunk(ChoiceDelta(content="Hel")),
    chunk(ChoiceDelta(content="lo")),
    call_start(0, "c1", "get"),
    call_arguments(0, '{"a"'),
    call_arguments(0, ": 1}"),
    call_start(1, "c2", "put", "{}"),
    chunk(ChoiceDelta(), finish="tool_calls"),
    chunk(usage=USAGE),
]


def test_a_full_stream_gives_the_events_in_order() -> None:
    _, events = stream(turn(), FULL)
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_item_events_agree_on_ids_indexes_and_texts() -> None:
    events_, events = stream(turn(), FULL)
    added = [e for e in events if isinstance(e, OutputItemAdded)]
    done = [e for e in events if isinstance(e, OutputItemDone)]
    assert [e.output_index for e in added] == [0, 1, 2, 3]
    assert [e.output_index for e in done] == [0, 1, 2, 3]
    ids = [e.item.id for e in added]
    assert [e.item.id for e in done] == ids
    assert len(set(ids)) == 4
    assert [e.item.status for e in added] == ["in_progress"] * 4
    assert [e.item.status for e in done] == ["completed"] * 4
    for e in events:
        if isinstance(e, ContentPartAdded | ContentPartDone | OutputTextDelta | OutputTextDone):
            assert (e.item_id, e.content_index) == (ids[e.output_index], 0)
        if isinstance(e, ReasoningTextDelta | ReasoningTextDone | FunctionCallArgumentsDelta):
            assert e.item_id == ids[e.output_index]
    assert [e.delta for e in events if isinstance(e, ReasoningTextDelta)] == ["thi", "nk"]
    assert [e.text for e in events if isinstance(e, ReasoningTextDone)] == ["think"]
    assert [e.delta for e in events if isinstance(e, OutputTextDelta)] == ["Hel", "lo"]
    assert [e.text for e in events if isinstance(e, OutputTextDone)] == ["Hello"]
    args_done = [e for e in events if isinstance(e, FunctionCallArgumentsDone)]
    assert [(e.item_id, e.name, e.arguments) for e in args_done] == [(ids[2], "get", '{"a": 1}'), (ids[3], "put", "{}")]
    last = events[-1]
    assert isinstance(last, ResponseCompleted)
    assert last.response is events_.response
    assert [item.id for item in last.response.output] == ids


def test_the_streamed_response_equals_the_non_streamed_one() -> None:
    t = turn()
    _, events = stream(t, FULL)
    final = events[-1]
    assert isinstance(final, ResponseCompleted)
    calls = [
        ToolCall(id="c1", function=FunctionCall(name="get", arguments='{"a": 1}')),
        ToolCall(id="c2", function=FunctionCall(name="put", arguments="{}")),
    ]
    message = ChatCompletionMessage(content="Hello", reasoning_content="think", tool_calls=calls)
    whole = t.finished(completion(message, "tool_calls"))
    assert_same_response(final.response, whole)
    assert final.response.status == "completed"
    assert final.response.usage == whole.usage


def assert_same_response(streamed: Response, whole: Response) -> None:
    assert without_ids(streamed.output) == without_ids(whole.output)
    for name in ("status", "incomplete_details", "usage", "error", "model", "id"):
        assert getattr(streamed, name) == getattr(whole, name)


def test_a_truncated_stream_is_incomplete() -> None:
    t = turn(max_output_tokens=3)
    chunks = [
        chunk(ChoiceDelta(role="assistant")),
        chunk(ChoiceDelta(content="Hel")),
        chunk(ChoiceDelta(), finish="length"),
        chunk(usage=USAGE),
    ]
    _, events = stream(t, chunks)
    final = events[-1]
    assert isinstance(final, ResponseIncomplete)
    assert types(events)[-3:] == ["response.content_part.done", "response.output_item.done", "response.incomplete"]
    done = [e for e in events if isinstance(e, OutputItemDone)]
    assert [e.item.status for e in done] == ["incomplete"]
    whole = t.finished(completion(ChatCompletionMessage(content="Hel"), "length"))
    assert_same_response(final.response, whole)


def test_an_empty_stream_ends_with_one_empty_message() -> None:
    t = turn()
    _, events = stream(
        t, [chunk(ChoiceDelta(role="assistant")), chunk(ChoiceDelta(), finish="stop"), chunk(usage=USAGE)]
    )
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]
    assert isinstance(final, ResponseCompleted)
    assert_same_response(final.response, t.finished(completion(ChatCompletionMessage(content=None), "stop")))


def test_a_failure_ends_open_items_incomplete_and_fails_the_response() -> None:
    events = TurnEvents(turn())
    out = events.start()
    for c in FULL[:4]:
        out += events.push(c)
    error = ErrorResponse(error=ErrorBody(message="engine died", type="server_error", param=None, code="engine_error"))
    failed = events.fail(error)
    assert types(failed) == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    seq = [e.sequence_number for e in out + failed]
    assert seq == list(range(len(seq)))
    err = failed[3]
    assert isinstance(err, ErrorEvent)
    assert (err.code, err.message, err.param) == ("engine_error", "engine died", None)
    end = failed[-1]
    assert isinstance(end, ResponseFailed)
    assert end.response.status == "failed"
    assert end.response.error is not None
    assert (end.response.error.code, end.response.error.message) == ("engine_error", "engine died")
    assert [item.status for item in end.response.output] == ["completed", "incomplete"]


def test_a_failure_without_a_code_gives_the_error_type() -> None:
    events = TurnEvents(turn())
    events.start()
    error = ErrorResponse(error=ErrorBody(message="boom", type="server_error", param=None, code=None))
    err, end = events.fail(error)
    assert isinstance(err, ErrorEvent) and isinstance(end, ResponseFailed)
    assert err.code == "server_error"
    assert end.response.output == []


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_streamed_output_is_the_next_turns_history(finish: str) -> None:
    t = turn()
    _, events = stream(t, [chunk(ChoiceDelta(content="Hello")), chunk(ChoiceDelta(), finish=finish)])
    final = events[-1]
    assert isinstance(final, ResponseCompleted | ResponseIncomplete)
    assert final.response.usage is None
    nxt = turn(t.items + output_as_input(final.response.output), input="and then?")
    assert nxt.chat.messages[-2:] == [AssistantMessage(content="Hello"), UserMessage(content="and then?")]
