"""The typed ``tools``, ``tool_choice``, tool calls and ``response_format``: the decoder's 400s name the parameter
path, what it accepts decodes to the tagged Structs, and what a template or an upstream gets from them."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from schemas.openai.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatText,
)
from schemas.openai.tools import (
    AllowedToolsChoice,
    CustomTool,
    CustomToolChoice,
    FunctionTool,
    MessageToolCall,
    NamedToolChoice,
)
from server.api.exceptions import from_msgspec
from server.errors import OpenAIError
from server.serving.chat_checks import check_chat
from server.serving.checks import Target
from server.serving.forward import chat_body

USER = {"role": "user", "content": "hi"}
M = "missing_required_parameter"
V = "invalid_value"


def fn(name: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **extra}}


def decode(**fields: Any) -> ChatCompletionRequest:
    """A chat request with ``fields`` decoded as the app decodes a body (strictly); a type error is the app's 400."""
    body = {"model": "m", "messages": [USER], **fields}
    try:
        return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest, strict=True)
    except msgspec.ValidationError as exc:
        raise from_msgspec(exc) from None


def decode_error(**fields: Any) -> tuple[int, str, str | None, str | None]:
    with pytest.raises(OpenAIError) as excinfo:
        decode(**fields)
    err = excinfo.value
    return err.status, err.type, err.param, err.code


def with_calls(*calls: Any) -> dict[str, Any]:
    return {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": list(calls)}]}


# ---- the decoder's 400s ------------------------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # tools
    ("tools not an array", {"tools": {"type": "function"}}, "tools", V),
    ("129 tools", {"tools": [fn(f"f{i}") for i in range(129)]}, "tools", V),
    ("tool not an object", {"tools": [fn("f"), "g"]}, "tools[1]", V),
    ("bad tool type", {"tools": [{"type": "retrieval"}]}, "tools[0].type", V),
    ("tool without type", {"tools": [{"function": {"name": "f"}}]}, "tools[0].type", M),
    ("missing function", {"tools": [{"type": "function"}]}, "tools[0].function", M),
    ("function not an object", {"tools": [{"type": "function", "function": "f"}]}, "tools[0].function", V),
    ("missing name", {"tools": [{"type": "function", "function": {"description": "d"}}]}, "tools[0].function.name", M),
    ("name with a space", {"tools": [fn("a b")]}, "tools[0].function.name", V),
    ("empty name", {"tools": [fn("")]}, "tools[0].function.name", V),
    ("name of 65", {"tools": [fn("x" * 65)]}, "tools[0].function.name", V),
    ("name with a final newline", {"tools": [fn("f\n")]}, "tools[0].function.name", V),
    ("name not a string", {"tools": [fn(5)]}, "tools[0].function.name", V),
    ("description", {"tools": [fn("f", description=3)]}, "tools[0].function.description", V),
    ("parameters", {"tools": [fn("f", parameters=[])]}, "tools[0].function.parameters", V),
    ("strict", {"tools": [fn("f", strict="yes")]}, "tools[0].function.strict", V),
    # tool_choice
    ("choice word", {"tool_choice": "sometimes"}, "tool_choice", V),
    ("choice number", {"tool_choice": 5}, "tool_choice", V),
    ("choice type", {"tool_choice": {"type": "retrieval"}}, "tool_choice.type", V),
    ("choice without type", {"tool_choice": {"function": {"name": "f"}}}, "tool_choice.type", M),
    ("choice without name", {"tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", M),
    ("choice name", {"tool_choice": {"type": "function", "function": {"name": 5}}}, "tool_choice.function.name", V),
    # tool calls of earlier turns
    (
        "tool_calls not an array",
        {"messages": [USER, {"role": "assistant", "tool_calls": {}}]},
        "messages[1].tool_calls",
        V,
    ),
    ("call not an object", with_calls("c1"), "messages[1].tool_calls[0]", V),
    ("call type", with_calls({"id": "c1", "type": "custom", "custom": {}}), "messages[1].tool_calls[0].type", V),
    ("empty id", with_calls({"id": "", "function": {"name": "f"}}), "messages[1].tool_calls[0].id", V),
    ("id not a string", with_calls({"id": 1, "function": {"name": "f"}}), "messages[1].tool_calls[0].id", V),
    ("call without function", with_calls({"id": "c1"}), "messages[1].tool_calls[0].function", M),
    ("call without name", with_calls({"id": "c1", "function": {}}), "messages[1].tool_calls[0].function.name", M),
    (
        "call empty name",
        with_calls({"id": "c1", "function": {"name": ""}}),
        "messages[1].tool_calls[0].function.name",
        V,
    ),
    (
        "arguments a number",
        with_calls({"id": "c1", "function": {"name": "f", "arguments": 5}}),
        "messages[1].tool_calls[0].function.arguments",
        V,
    ),
    # response_format
    ("format not an object", {"response_format": "json"}, "response_format", V),
    ("format type", {"response_format": {"type": "yaml"}}, "response_format.type", V),
    ("format without type", {"response_format": {}}, "response_format.type", M),
    (
        "json_schema not an object",
        {"response_format": {"type": "json_schema", "json_schema": "x"}},
        "response_format.json_schema",
        V,
    ),
    (
        "schema name missing",
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
        "response_format.json_schema.name",
        M,
    ),
    (
        "schema name",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        "response_format.json_schema.name",
        V,
    ),
    (
        "schema name of 65",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x" * 65}}},
        "response_format.json_schema.name",
        V,
    ),
    (
        "schema description",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "description": 1}}},
        "response_format.json_schema.description",
        V,
    ),
    (
        "schema an array",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
        "response_format.json_schema.schema",
        V,
    ),
    (
        "schema null",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": None}}},
        "response_format.json_schema.schema",
        V,
    ),
    (
        "schema strict",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}},
        "response_format.json_schema.strict",
        V,
    ),
]


@pytest.mark.parametrize(("fields", "param", "code"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_the_decoder_names_the_parameter_path(fields: dict[str, Any], param: str, code: str) -> None:
    assert decode_error(**fields) == (400, "invalid_request_error", param, code)


# ---- what decodes, to which Struct -------------------------------------------------------------------------------


def test_tools_decode_by_type() -> None:
    req = decode(tools=[fn("f", description="d", parameters={"type": "object"}, strict=True, x=1), {"type": "custom"}])
    assert req.tools is not None
    function, custom = req.tools
    assert isinstance(function, FunctionTool) and isinstance(custom, CustomTool)
    assert msgspec.structs.asdict(function.function) == {
        "name": "f",
        "description": "d",
        "parameters": {"type": "object"},
        "strict": True,
    }
    assert len(decode(tools=[fn(f"{i:03d}" + "x" * 61) for i in range(128)]).tools or []) == 128


@pytest.mark.parametrize(
    ("choice", "kind"),
    [
        ("none", str),
        ("auto", str),
        ("required", str),
        ({"type": "function", "function": {"name": "f"}}, NamedToolChoice),
        ({"type": "function"}, NamedToolChoice),  # refused when the tools are planned, naming tool_choice
        ({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, AllowedToolsChoice),
        ({"type": "custom", "custom": {"name": "x"}}, CustomToolChoice),
    ],
)
def test_tool_choice_shapes(choice: Any, kind: type) -> None:
    assert isinstance(decode(tool_choice=choice).tool_choice, kind)


def test_history_calls_decode_leniently() -> None:
    """``type`` may be left out and ``arguments`` be a mapping, empty or missing, as clients send them."""
    req = decode(
        **with_calls(
            {"id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
            {"id": "c3", "type": "function", "function": {"name": "f"}},
            {"type": "function", "function": {"name": "f", "arguments": ""}},  # refused when rendered, naming id
        )
    )
    message = req.messages[1]
    assert isinstance(message, AssistantMessage) and message.tool_calls is not None
    assert all(isinstance(c, MessageToolCall) and c.type == "function" for c in message.tool_calls)
    assert [c.function.arguments for c in message.tool_calls] == ['{"a": 1}', {"a": 1}, None, ""]
    assert [c.id for c in message.tool_calls] == ["c1", "c2", "c3", None]


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [
        ({"type": "text"}, ResponseFormatText),
        ({"type": "json_object"}, ResponseFormatJSONObject),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}, ResponseFormatJSONSchema),
        ({"type": "json_schema"}, ResponseFormatJSONSchema),  # refused by the checks, naming response_format
    ],
)
def test_response_format_shapes(fmt: dict[str, Any], kind: type) -> None:
    assert isinstance(decode(response_format=fmt).response_format, kind)


# ---- what an upstream and a template get -------------------------------------------------------------------------


def upstream(**fields: Any) -> dict[str, Any]:
    req = decode(**fields)
    return chat_body(req, check_chat(req, Target("remote"), max_messages=None), "up")


def test_tools_and_choice_go_upstream_as_validated() -> None:
    sent = upstream(
        tools=[
            fn("f", description="d", parameters={"type": "object"}, strict=True, x=1) | {"extra": 1},
            fn("g", description=None, parameters=None, strict=False),
        ],
        tool_choice={"type": "function", "function": {"name": "g", "x": 1}},
    )
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True},
        },
        {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "g"}}
    assert upstream(tools=[fn("f")], tool_choice="required")["tool_choice"] == "required"
    assert "tool_choice" not in upstream(tools=[fn("f")])


def test_history_calls_go_upstream_with_arguments_as_json_text() -> None:
    sent = upstream(
        messages=[
            USER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}, "x": 1},
                    {"id": "c2", "type": "function", "function": {"name": "f", "arguments": ""}},
                    {"id": "c3", "type": "function", "function": {"name": "f", "arguments": '{"b": 2}'}},
                ],
            },
            {"role": "tool", "content": "r", "tool_call_id": "c1"},
        ]
    )
    assert sent["messages"][1] == {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": '{"b": 2}'}},
        ],
    }


@pytest.mark.parametrize(
    ("fmt", "sent"),
    [
        ({"type": "text", "json_schema": {"name": "ignored"}}, {"type": "text"}),
        ({"type": "json_object"}, {"type": "json_object"}),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "description": None, "strict": None}},
            {"type": "json_schema", "json_schema": {"name": "x"}},
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"strict": False, "schema": {"type": "object"}, "description": "d", "name": "x", "y": 1},
            },
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "description": "d", "schema": {"type": "object"}, "strict": False},
            },
        ),
    ],
)
def test_response_format_goes_upstream_as_validated(fmt: dict[str, Any], sent: dict[str, Any]) -> None:
    forwarded = upstream(response_format=fmt)["response_format"]
    assert forwarded == sent
    assert list(forwarded.get("json_schema", {})) == list(sent.get("json_schema", {}))  # OpenAI's field order


def test_the_template_gets_tools_and_calls_as_mappings() -> None:
    req = decode(
        tools=[fn("f", description="d", strict=True)],
        messages=[
            USER,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
            {"role": "tool", "content": "r", "tool_call_id": "c1"},
        ],
    )
    checks = check_chat(req, Target("m"), max_messages=None)
    assert checks.tools.template_tools == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    assert checks.messages[1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {}}}],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "r"},
    ]
