"""Responses items and request translation: decoding ``input``, ids, chat messages, and the 400s they give."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.openai.chat import (
    AssistantMessage,
    ChatCompletionMessage,
    DeveloperMessage,
    FunctionCall,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatText,
    SystemMessage,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from schemas.openai.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputItemList,
    InputText,
    MessageItem,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponsesRequest,
    TextFormat,
)
from schemas.openai.tools import FunctionDefinition, FunctionTool, NamedToolChoice
from server.errors import OpenAIError, invalid_request
from server.serving.responses.items import MAX_INPUT_ITEMS, output_as_input, parse_input, to_messages, with_ids
from server.serving.responses.pages import page
from server.serving.responses.translate import (
    chat_request,
    function_tools,
    reject_unsupported,
    renamed,
    response_format,
    tool_choice,
)
from server.serving.responses.turn import output_of

CALL = {"type": "function_call", "call_id": "c1", "name": "get", "arguments": '{"x": 1}'}
RESULT = {"type": "function_call_output", "call_id": "c1", "output": "42"}


def error_of(fn: Any, *args: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        fn(*args)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value


def messages_of(raw: list[dict[str, Any]]) -> list[Any]:
    return to_messages(with_ids(parse_input(raw)))


# ---- parse_input -------------------------------------------------------------------------------------------------
def test_a_string_is_one_user_message() -> None:
    assert parse_input("hi") == [MessageItem(role="user", content="hi")]


def test_each_item_kind_is_decoded_and_messages_may_leave_out_their_type() -> None:
    items = parse_input(
        [
            {"role": "system", "content": "be brief"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
            CALL,
            RESULT,
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
        ]
    )
    assert items == [
        MessageItem(role="system", content="be brief"),
        MessageItem(role="user", content=[InputText(text="hi")]),
        FunctionCallItem(call_id="c1", name="get", arguments='{"x": 1}'),
        FunctionCallOutputItem(call_id="c1", output="42"),
        ReasoningItem(content=[ReasoningText(text="hm")]),
    ]


def test_an_empty_or_too_long_input_is_refused() -> None:
    empty = error_of(parse_input, [])
    assert (empty.param, empty.code) == ("input", "empty_array")
    long = error_of(parse_input, [{"role": "user", "content": "x"}] * (MAX_INPUT_ITEMS + 1))
    assert (long.param, long.code) == ("input", "array_above_max_length")


def test_an_unknown_type_or_an_item_reference_is_unsupported() -> None:
    unknown = error_of(parse_input, [{"role": "user", "content": "x"}, {"type": "web_search_call"}])
    assert (unknown.param, unknown.code) == ("input[1].type", "unsupported_parameter")
    assert "web_search_call" in unknown.message
    ref = error_of(parse_input, [{"type": "item_reference", "id": "msg_1"}])
    assert (ref.param, ref.code) == ("input[0]", "unsupported_parameter")


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "function_call", "name": "get", "arguments": "{}"}, "input[1].call_id"),
        ({**CALL, "call_id": 7}, "input[1].call_id"),
        ({"role": "bot", "content": "x"}, "input[1].role"),
        ({"role": "user", "content": [{"type": "input_text", "text": 3}]}, "input[1].content[0].text"),
        ({"role": "user", "content": [{"type": "input_text"}]}, "input[1].content[0].text"),
        ({"role": "user"}, "input[1].content"),
    ],
)
def test_a_malformed_item_is_named_down_to_its_field(item: dict[str, Any], param: str) -> None:
    err = error_of(parse_input, [{"role": "user", "content": "x"}, item])
    assert err.param == param
    assert err.code == "invalid_value"
    assert "`" not in err.message
    assert err.message.startswith(f"Invalid '{param}': ")


# ---- with_ids ------------------------------------------------------------------------------------------------------
def test_with_ids_gives_every_item_an_id_and_messages_parts() -> None:
    raw: list[dict[str, Any]] = [
        {"role": role, "content": f"{role} text"} for role in ("user", "system", "developer", "assistant")
    ]
    items = with_ids(parse_input([*raw, CALL, RESULT, {"type": "reasoning", "summary": [{"text": "x" * 1000}]}]))
    prefixes = [item.id.partition("_")[0] for item in items if item.id is not None]
    assert prefixes == ["msg", "msg", "msg", "msg", "fc", "fco"]  # reasoning is never read again: not kept
    assert len({item.id for item in items}) == len(items)
    messages = [item for item in items if isinstance(item, MessageItem)]
    assert [m.content for m in messages] == [
        [InputText(text="user text")],
        [InputText(text="system text")],
        [InputText(text="developer text")],
        [OutputText(text="assistant text")],
    ]
    assert [item.status for item in items] == ["completed"] * 6


def test_what_the_model_never_reads_is_not_kept() -> None:
    """Stored items are carried into every later turn: annotations and logprobs of output text are dropped."""
    part = {"type": "output_text", "text": "hi", "annotations": [{"big": "x" * 10_000}], "logprobs": [{"t": 1}]}
    (item,) = with_ids(parse_input([{"role": "assistant", "content": [part]}]))
    assert isinstance(item, MessageItem) and item.content == [OutputText(text="hi")]
    assert error_of(parse_input, [{**CALL, "call_id": "c" * 129}]).param == "input[0].call_id"


def test_with_ids_keeps_given_ids_and_statuses() -> None:
    given = [{"role": "assistant", "content": "x", "id": "msg_mine", "status": "incomplete"}, {**CALL, "id": "fc_mine"}]
    items = with_ids(parse_input(given))
    assert [(item.id, item.status) for item in items] == [
        ("msg_mine", "incomplete"),
        ("fc_mine", "completed"),
    ]


# ---- to_messages ---------------------------------------------------------------------------------------------------
def test_roles_become_their_chat_messages_and_parts_join() -> None:
    messages = messages_of(
        [
            {"role": "system", "content": "s"},
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        ]
    )
    assert messages == [
        SystemMessage(content="s"),
        DeveloperMessage(content="d"),
        UserMessage(content="a\nb"),
        AssistantMessage(content="no"),
    ]


def test_function_calls_join_one_assistant_message_and_outputs_become_tool_messages() -> None:
    second = {**CALL, "call_id": "c2", "name": "put"}
    messages = messages_of(
        [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "calling"},
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
            CALL,
            second,
            RESULT,
            {**RESULT, "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]},
        ]
    )
    assert len(messages) == 4
    assistant = messages[1]
    assert isinstance(assistant, AssistantMessage)
    assert assistant.content == "calling"
    assert assistant.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in assistant.tool_calls] == [
        ("c1", "get", '{"x": 1}'),
        ("c2", "put", '{"x": 1}'),
    ]
    assert messages[2:] == [ToolMessage(content="42", tool_call_id="c1"), ToolMessage(content="ok", tool_call_id="c2")]


def test_calls_after_a_tool_message_start_a_new_assistant_message() -> None:
    messages = messages_of([{"role": "user", "content": "go"}, CALL, RESULT, {**CALL, "call_id": "c2"}])
    assert [type(m) for m in messages] == [UserMessage, AssistantMessage, ToolMessage, AssistantMessage]
    assert messages[1].content is None


def test_an_output_without_its_call_is_refused() -> None:
    err = error_of(messages_of, [{"role": "user", "content": "go"}, RESULT])
    assert err.param == "input[1].call_id"
    assert "c1" in err.message
    late = error_of(messages_of, [{"role": "user", "content": "go"}, RESULT, CALL])
    assert late.param == "input[1].call_id"


def test_history_items_are_named_previous_response_id() -> None:
    history = with_ids(parse_input([{"role": "user", "content": "x"}, RESULT]))
    new = with_ids(parse_input([{"role": "user", "content": "y"}, RESULT]))
    assert error_of(to_messages, history + new, len(history)).param == "previous_response_id"
    called = with_ids(parse_input([{"role": "user", "content": "x"}, CALL]))
    assert len(to_messages(called + new[1:], len(called))) == 3
    stray = with_ids(parse_input([{**RESULT, "call_id": "c9"}]))
    assert error_of(to_messages, called + stray, len(called)).param == "input[0].call_id"
    image = with_ids(parse_input([{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]))
    assert error_of(to_messages, image + new[:1], 1).param == "previous_response_id"


@pytest.mark.parametrize("part", [{"type": "input_image", "image_url": "http://x/y.png"}, {"type": "input_file"}])
def test_images_and_files_are_unsupported(part: dict[str, Any]) -> None:
    content = [{"type": "input_text", "text": "look"}, part]
    err = error_of(messages_of, [{"role": "user", "content": "hi"}, {"role": "user", "content": content}])
    assert (err.param, err.code) == ("input[1].content[1].type", "unsupported_parameter")
    assert part["type"] in err.message


def test_a_conversation_longer_than_the_limit_is_refused() -> None:
    history = with_ids(parse_input([{"role": "user", "content": "x"}] * MAX_INPUT_ITEMS))
    new = with_ids(parse_input("y"))
    err = error_of(to_messages, history + new, len(history))
    assert (err.param, err.code) == ("input", "array_above_max_length")
    assert len(to_messages(history[1:] + new, len(history) - 1)) == MAX_INPUT_ITEMS


def test_a_conversation_of_reasoning_only_is_refused() -> None:
    assert error_of(messages_of, [{"type": "reasoning"}]).param == "input"


def test_output_given_back_as_input_is_the_assistant_message_with_its_calls() -> None:
    message = ChatCompletionMessage(
        content="let me look",
        reasoning_content="think",
        tool_calls=[
            ToolCall(id="c1", function=FunctionCall(name="get", arguments="{}")),
            ToolCall(id="c2", function=FunctionCall(name="put", arguments='{"a": 2}')),
        ],
    )
    output = output_of(message, truncated=False)
    items = output_as_input(output)
    assert [item.id for item in items] == [item.id for item in output[1:]]  # the reasoning is not carried
    assert [type(item) for item in items] == [MessageItem, FunctionCallItem, FunctionCallItem]
    messages = to_messages([*items, *with_ids(parse_input([{**RESULT, "call_id": "c2"}]))], first=len(items))
    assistant, tool = messages
    assert isinstance(assistant, AssistantMessage)
    assert assistant.content == "let me look"
    assert assistant.tool_calls is not None
    assert [(c.id, c.function.name, c.function.arguments) for c in assistant.tool_calls] == [
        ("c1", "get", "{}"),
        ("c2", "put", '{"a": 2}'),
    ]
    assert tool == ToolMessage(content="42", tool_call_id="c2")


# ---- translate -----------------------------------------------------------------------------------------------------
def request(**fields: Any) -> ResponsesRequest:
    return msgspec.convert({"model": "m", "input": "hi", **fields}, ResponsesRequest)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_tool_calls": 3}, "max_tool_calls"),
        ({"prompt": {"id": "p"}}, "prompt"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"context_management": [{"type": "compaction"}]}, "context_management"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"background": True, "stream": True}, "stream"),
    ],
)
def test_unsupported_parameters_are_refused(fields: dict[str, Any], param: str) -> None:
    err = error_of(reject_unsupported, request(**fields))
    assert (err.param, err.code) == (param, "unsupported_parameter")


def test_background_needs_store_and_neutral_values_are_accepted() -> None:
    err = error_of(reject_unsupported, request(background=True, store=False))
    assert (err.param, err.code) == ("background", "invalid_value")
    reject_unsupported(request(reasoning={}, truncation="disabled", include=[], background=True))
    reject_unsupported(request(reasoning={"effort": None}))


def test_function_tools_are_decoded_and_other_tools_refused() -> None:
    spec = {"type": "function", "name": "get", "description": "d", "parameters": {"type": "object"}, "strict": True}
    (tool,) = function_tools([spec])
    assert (tool.name, tool.description, tool.parameters, tool.strict) == ("get", "d", {"type": "object"}, True)
    assert function_tools(None) == []
    hosted = error_of(function_tools, [spec, {"type": "web_search"}])
    assert (hosted.param, hosted.code) == ("tools[1].type", "unsupported_parameter")
    bad = error_of(function_tools, [{**spec, "name": "no spaces"}])
    assert bad.param == "tools[0].name"
    assert "`" not in bad.message
    assert error_of(function_tools, [{"type": "function"}]).param == "tools[0].name"
    many = error_of(function_tools, [spec] * 129)
    assert (many.param, many.code) == ("tools", "array_above_max_length")
    assert len(function_tools([spec] * 128)) == 128


def test_tool_choice() -> None:
    assert [tool_choice(c) for c in (None, "none", "auto", "required")] == [None, "none", "auto", "required"]
    named = tool_choice({"type": "function", "name": "get"})
    assert isinstance(named, NamedToolChoice)
    assert named.function.name == "get"
    assert error_of(tool_choice, "any").param == "tool_choice"
    assert error_of(tool_choice, {"type": "function"}).param == "tool_choice.name"
    hosted = error_of(tool_choice, {"type": "file_search"})
    assert (hosted.param, hosted.code) == ("tool_choice", "unsupported_parameter")


def test_text_format_becomes_response_format() -> None:
    assert response_format(None) is None
    assert response_format(TextFormat(type="text")) == ResponseFormatText()
    assert response_format(TextFormat(type="json_object")) == ResponseFormatJSONObject()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = response_format(TextFormat(type="json_schema", name="out", schema=schema, strict=True, description="d"))
    assert isinstance(fmt, ResponseFormatJSONSchema)
    assert fmt.json_schema is not None
    assert (fmt.json_schema.name, fmt.json_schema.schema, fmt.json_schema.strict) == ("out", schema, True)
    assert fmt.json_schema.description == "d"
    assert error_of(response_format, TextFormat(type="json_schema")).param == "text.format.name"


def test_chat_request_puts_instructions_first_and_maps_limits() -> None:
    req = request(
        instructions="be brief",
        max_output_tokens=7,
        temperature=0.5,
        top_p=0.9,
        stream=True,
        tool_choice="required",
        parallel_tool_calls=False,
        user="u",
        text={"format": {"type": "json_object"}},
    )
    tools = function_tools([{"type": "function", "name": "get"}])
    chat = chat_request(req, [UserMessage(content="hi")], tools)
    assert chat.messages == [SystemMessage(content="be brief"), UserMessage(content="hi")]
    assert (chat.model, chat.max_completion_tokens, chat.max_tokens) == ("m", 7, None)
    assert (chat.temperature, chat.top_p, chat.user, chat.parallel_tool_calls) == (0.5, 0.9, "u", False)
    assert chat.stream is True
    assert chat.stream_options is not None and chat.stream_options.include_usage is True
    assert chat.tools == [FunctionTool(function=FunctionDefinition(name="get"))]
    assert chat.tool_choice == "required"
    assert chat.response_format == ResponseFormatJSONObject()
    plain = chat_request(request(), [UserMessage(content="hi")], [])
    assert plain.messages == [UserMessage(content="hi")]
    assert (plain.stream, plain.stream_options, plain.tools, plain.response_format) == (False, None, None, None)


@pytest.mark.parametrize(
    ("chat_param", "param"),
    [
        ("messages", "input"),
        ("messages[3].content", "input"),
        ("messages[0].content[1].type", "input"),
        ("max_completion_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format.json_schema.name", "text.format.name"),
        ("tools[2].function.parameters", "tools[2].parameters"),
        ("tools[2].function", "tools[2]"),
        ("tool_choice.function.name", "tool_choice.name"),
        ("temperature", "temperature"),
        ("tools", "tools"),
        ("tool_choice", "tool_choice"),
    ],
)
def test_renamed_speaks_the_responses_terms(chat_param: str, param: str) -> None:
    exc = invalid_request("bad", chat_param, "some_code")
    assert renamed(exc) is exc
    assert (exc.param, exc.message, exc.code) == (param, "bad", "some_code")


def test_renamed_leaves_an_error_without_param() -> None:
    exc = invalid_request("bad")
    assert renamed(exc).param is None


# ---- pages ---------------------------------------------------------------------------------------------------------
def five() -> list[InputItem]:
    return [MessageItem(role="user", content=[InputText(text=str(n))], id=f"msg_{n}") for n in range(5)]


def ids_of(listing: InputItemList) -> list[str]:
    return [item["id"] for item in listing.data]


def test_a_page_is_newest_first_by_default() -> None:
    listing = page(five())
    assert ids_of(listing) == ["msg_4", "msg_3", "msg_2", "msg_1", "msg_0"]
    assert (listing.first_id, listing.last_id, listing.has_more) == ("msg_4", "msg_0", False)
    assert listing.data[0] == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "4"}],
        "id": "msg_4",
        "status": None,
    }
    assert ids_of(page(five(), order="asc")) == ["msg_0", "msg_1", "msg_2", "msg_3", "msg_4"]


def test_limit_and_after_walk_forwards() -> None:
    first = page(five(), limit=2)
    assert (ids_of(first), first.has_more) == (["msg_4", "msg_3"], True)
    second = page(five(), limit=2, after=first.last_id)
    assert (ids_of(second), second.has_more) == (["msg_2", "msg_1"], True)
    third = page(five(), limit=2, after=second.last_id)
    assert (ids_of(third), third.has_more, third.last_id) == (["msg_0"], False, "msg_0")
    assert ids_of(page(five(), order="asc", limit=2, after="msg_1")) == ["msg_2", "msg_3"]
    empty = page(five(), after="msg_0")
    assert (empty.data, empty.first_id, empty.last_id, empty.has_more) == ([], None, None, False)


def test_before_walks_backwards_from_its_id() -> None:
    back = page(five(), limit=2, before="msg_1")
    assert (ids_of(back), back.has_more) == (["msg_3", "msg_2"], True)
    assert ids_of(page(five(), limit=2, before=back.first_id)) == ["msg_4"]
    assert ids_of(page(five(), order="asc", before="msg_2")) == ["msg_0", "msg_1"]
    between = page(five(), limit=1, after="msg_4", before="msg_1")
    assert (ids_of(between), between.has_more) == (["msg_3"], True)


@pytest.mark.parametrize("cursor", ["after", "before"])
def test_an_unknown_cursor_is_refused(cursor: str) -> None:
    err = error_of(lambda: page(five(), **{cursor: "msg_9"}))
    assert err.param == cursor
    assert "msg_9" in err.message


@pytest.mark.parametrize("limit", [0, 101])
def test_a_limit_out_of_range_is_refused(limit: int) -> None:
    assert error_of(lambda: page(five(), limit=limit)).param == "limit"
    assert len(page(five() * 30, limit=100).data) == 100
