"""Tool calling: request validation, tool_choice plans, history messages, output parsing and the chat templates."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas.openai.chat import AssistantMessage, ChatCompletionRequest
from schemas.openai.tools import MessageToolCall
from server.api.exceptions import from_msgspec
from server.engine.chartok import CharTokenizer
from server.errors import OpenAIError
from server.serving.jsonlex import compact_json_object
from server.serving.tools import (
    ContentDelta,
    ToolCallArguments,
    ToolCallStart,
    ToolEvent,
    ToolHistory,
    ToolPlan,
    ToolStreamParser,
    join_events,
    parse_tool_calls,
    plan_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = {"get_weather", "get_time"}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def error(excinfo: pytest.ExceptionInfo[OpenAIError]) -> tuple[int, str | None, str | None]:
    return excinfo.value.status, excinfo.value.param, excinfo.value.code


def fn(name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **extra}}


def decode(**fields: Any) -> ChatCompletionRequest:
    """A chat request with ``fields`` (``None`` ones left out) decoded as the app decodes a body; a type error is
    the 400 the app answers with."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body |= {k: v for k, v in fields.items() if v is not None}
    try:
        return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest, strict=True)
    except msgspec.ValidationError as exc:
        raise from_msgspec(exc) from None


def planned(tools: list[Any] | None, tool_choice: Any = None, parallel_tool_calls: bool | None = None) -> ToolPlan:
    """Decode ``tools``, ``tool_choice`` and ``parallel_tool_calls`` in a request, then plan them."""
    req = decode(tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls)
    return plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)


def decoded_calls(*tool_calls: dict[str, Any]) -> list[MessageToolCall]:
    return msgspec.convert(list(tool_calls), list[MessageToolCall])


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([WEATHER, "get_time"], "tools[1]"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([WEATHER, TIME, fn("has space")], "tools[2].function.name"),
        ([fn("")], "tools[0].function.name"),
        ([fn("x" * 65)], "tools[0].function.name"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([fn("f", description=3)], "tools[0].function.description"),
        ([fn("f", parameters=[])], "tools[0].function.parameters"),
        ([fn("f", parameters={"type": "string"})], "tools[0].function.parameters"),
        ([fn("f", strict="yes")], "tools[0].function.strict"),
        ([fn(f"f{i}") for i in range(129)], "tools"),
        ([], "tools"),
    ],
)
def test_invalid_tools_name_the_param(tools: list[Any], param: str) -> None:
    with pytest.raises(OpenAIError) as excinfo:
        planned(tools, None, None)
    assert error(excinfo)[:2] == (400, param)


def test_custom_tools_are_unsupported_not_ignored() -> None:
    with pytest.raises(OpenAIError) as excinfo:
        planned([{"type": "custom", "custom": {"name": "x"}}], None, None)
    assert error(excinfo) == (400, "tools[0].type", "unsupported_parameter")


def test_128_tools_with_long_names_are_fine() -> None:
    plan = planned([fn(f"{i:03d}" + "x" * 61) for i in range(128)], None, None)
    assert len(plan.tools) == 128


@pytest.mark.parametrize(
    ("tools", "choice", "parallel", "param"),
    [
        (None, "auto", None, "tool_choice"),
        (None, "required", None, "tool_choice"),
        (None, {"type": "function", "function": {"name": "get_weather"}}, None, "tool_choice"),
        (None, None, False, "parallel_tool_calls"),
        ([WEATHER], "sometimes", None, "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, None, "tool_choice"),
        ([WEATHER], {"type": "function"}, None, "tool_choice"),
        ([WEATHER], {"type": "function", "name": "get_weather"}, None, "tool_choice"),
    ],
)
def test_invalid_tool_choice(tools: list[Any] | None, choice: Any, parallel: bool | None, param: str) -> None:
    with pytest.raises(OpenAIError) as excinfo:
        planned(tools, choice, parallel)
    assert error(excinfo)[:2] == (400, param)


def test_allowed_tools_choice_is_unsupported() -> None:
    with pytest.raises(OpenAIError) as excinfo:
        planned([WEATHER], {"type": "allowed_tools", "allowed_tools": {}}, None)
    assert error(excinfo) == (400, "tool_choice", "unsupported_parameter")


# -- plans ----------------------------------------------------------------------------------------------------


def test_no_tools_and_choice_none_plan_nothing() -> None:
    for plan in (planned(None, None, None), planned(None, "none", None), planned([WEATHER], "none", True)):
        assert plan.mode == "none"
        assert plan.template_tools is None and plan.constraint is None and not plan.parses_calls


def test_auto_is_the_default_and_unconstrained() -> None:
    plan = planned([WEATHER, TIME], None, None)
    assert plan.mode == "auto" and plan.parses_calls
    assert plan.constraint is None
    assert plan.call_names == NAMES and plan.max_calls is None
    assert plan.template_tools == [
        WEATHER,
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert planned([WEATHER, TIME], "auto", False).max_calls == 1


def test_required_constrains_to_any_tool() -> None:
    plan = planned([WEATHER, TIME], "required", None)
    c = plan.constraint
    assert plan.mode == "required" and c is not None
    assert (c.prefix, c.suffix, c.separator, c.min_items, c.max_items) == (
        "<tool_call>\n",
        "\n</tool_call>",
        "\n",
        1,
        None,
    )
    assert c.lenient
    schema = json.loads(c.json_schema)
    assert [s["properties"]["name"] for s in schema["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
    first = schema["anyOf"][0]
    assert list(first["properties"]) == ["name", "arguments"]
    assert first["properties"]["arguments"] == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert first["required"] == ["name", "arguments"] and first["additionalProperties"] is False
    assert schema["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}
    assert plan.call_names == NAMES and plan.max_calls is None

    single = planned([WEATHER, TIME], "required", False)
    assert single.constraint is not None and single.constraint.max_items == 1 and single.max_calls == 1


def test_named_choice_constrains_to_one_call_of_it() -> None:
    strict_time = fn("get_time", strict=True, parameters={"properties": {"tz": {"type": "string"}}})
    plan = planned([WEATHER, strict_time], {"type": "function", "function": {"name": "get_time"}}, True)
    c = plan.constraint
    assert plan.mode == "function" and c is not None
    assert (c.min_items, c.max_items, c.lenient) == (1, 1, False)
    schema = json.loads(c.json_schema)
    assert schema["properties"]["name"] == {"const": "get_time"}
    # A parameters schema without "type" still describes an object: the grammar must not allow other values.
    assert schema["properties"]["arguments"] == {"type": "object", "properties": {"tz": {"type": "string"}}}
    assert plan.call_names == {"get_time"} and plan.max_calls == 1
    assert plan.template_tools is not None and len(plan.template_tools) == 2  # the model still sees every tool


# -- history messages -----------------------------------------------------------------------------------------


def call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_history_converts_calls_and_results() -> None:
    history = ToolHistory()
    assert history.assistant(0, "Hi", None) == {"role": "assistant", "content": "Hi"}
    message = history.assistant(
        1, None, decoded_calls(call("c1", "get_weather", '{"city": "Paris"}'), call("c2", "get_time", ""))
    )
    assert message == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ],
    }
    assert history.tool(2, "20C", "c1") == {
        "role": "tool",
        "tool_call_id": "c1",
        "name": "get_weather",
        "content": "20C",
    }
    assert history.tool(3, "noon", "c2")["name"] == "get_time"


def fifth_message_history(tool_calls: list[Any]) -> dict[str, Any]:
    """``tool_calls`` decoded as an assistant message at ``messages[4]``, then converted for the template."""
    assistant = {"role": "assistant", "content": "", "tool_calls": tool_calls}
    message = decode(messages=[{"role": "user", "content": "x"}] * 4 + [assistant]).messages[4]
    assert isinstance(message, AssistantMessage)
    return ToolHistory().assistant(4, "", message.tool_calls)


@pytest.mark.parametrize(
    ("tool_call", "param"),
    [
        (call("c1", "f", "{city: Paris}"), "messages[4].tool_calls[1].function.arguments"),
        (call("c1", "f", "[1, 2]"), "messages[4].tool_calls[1].function.arguments"),
        (call("c1", "f", '{"x": NaN}'), "messages[4].tool_calls[1].function.arguments"),
        (call("c1", "f", '{"x": "\\ud800"}'), "messages[4].tool_calls[1].function.arguments"),  # lone surrogate
        (call("c1", "f", '{"x": ' + "[" * 5000 + "]" * 5000 + "}"), "messages[4].tool_calls[1].function.arguments"),
        ({"type": "function", "function": {"name": "f", "arguments": "{}"}}, "messages[4].tool_calls[1].id"),
        ({"id": "c1", "type": "custom", "custom": {}}, "messages[4].tool_calls[1].type"),
        ({"id": "c1", "type": "function"}, "messages[4].tool_calls[1].function"),
        ({"id": "c1", "function": {"arguments": "{}"}}, "messages[4].tool_calls[1].function.name"),
        ("c1", "messages[4].tool_calls[1]"),
    ],
)
def test_invalid_history_calls_name_the_param(tool_call: Any, param: str) -> None:
    with pytest.raises(OpenAIError) as excinfo:
        fifth_message_history([call("c0", "f", "{}"), tool_call])
    assert error(excinfo)[:2] == (400, param)


def test_tool_results_must_answer_an_earlier_call() -> None:
    history = ToolHistory()
    with pytest.raises(OpenAIError) as excinfo:
        history.tool(1, "20C", "c1")
    assert error(excinfo)[:2] == (400, "messages[1].tool_call_id")
    history.assistant(2, None, decoded_calls(call("c1", "get_weather", "{}")))
    with pytest.raises(OpenAIError) as excinfo:
        history.tool(3, "20C", "c9")
    assert error(excinfo)[:2] == (400, "messages[3].tool_call_id")
    history.tool(3, "20C", "c1")


# -- parsing finished output ----------------------------------------------------------------------------------


def calls_of(text: str, **kwargs: Any) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = parse_tool_calls(text, NAMES, **kwargs)
    for c in calls:
        assert CALL_ID.fullmatch(c.id)
        assert isinstance(json.loads(c.arguments), dict)
    return content, [(c.name, c.arguments) for c in calls]


def test_parse_one_call() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert calls_of(text) == (None, [("get_weather", '{"city":"Paris"}')])
    _, calls = parse_tool_calls(text, NAMES)
    assert calls[0].id != parse_tool_calls(text, NAMES)[1][0].id


def test_parse_several_calls_with_text_around() -> None:
    text = (
        "Let me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2.5e1, -0.5]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris", "dst": true, "x": null}}\n</tool_call>\n'
        "One moment.\n"
    )
    assert calls_of(text) == (
        "Let me check.\n\n\nOne moment.",  # the text between and around the blocks
        [
            ("get_weather", '{"city":"Paris","days":[1,2.5e1,-0.5]}'),
            ("get_time", '{"tz":"Europe/Paris","dst":true,"x":null}'),
        ],
    )


def test_arguments_keep_the_models_tokens_without_whitespace() -> None:
    text = '<tool_call>{"name":"get_weather","arguments":{ "q" : "caf\\u00e9 \\"x\\" \\n y" , "n" : 1E+2 }}</tool_call>'
    _, [(_, arguments)] = calls_of(text)
    assert arguments == '{"q":"caf\\u00e9 \\"x\\" \\n y","n":1E+2}'
    assert json.loads(arguments) == {"q": 'café "x" \n y', "n": 100.0}


@pytest.mark.parametrize(
    "block",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",}}\n</tool_call>',  # trailing comma
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',  # unclosed object
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',  # not a tool of the request
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "get_weather", "arguments": {"x": NaN}}\n</tool_call>',  # not JSON
        '<tool_call>\n{"name": "get_weather", "name": "get_time", "arguments": {}}\n</tool_call>',  # duplicate key
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>",
        "<tool_call>",
    ],
)
def test_invalid_blocks_stay_content(block: str) -> None:
    assert calls_of(f"Sure. {block} Done.") == (f"Sure. {block} Done.", [])


def test_unterminated_blocks_and_lenient_shapes() -> None:
    cut = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    assert calls_of(cut) == ("Checking.", [("get_weather", '{"city":"Paris"}')])
    missing_close = (
        '<tool_call>{"name": "get_time"}\n<tool_call>{"arguments": "{\\"tz\\": \\"UTC\\"}", "name": "get_time"}'
    )
    assert calls_of(missing_close) == (None, [("get_time", "{}"), ("get_time", '{"tz":"UTC"}')])
    assert calls_of('<tool_call>{"name": "get_time", "arguments": null, "id": 7}</tool_call>') == (
        None,
        [("get_time", "{}")],
    )


def test_parallel_false_keeps_only_the_first_call() -> None:
    one = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    assert calls_of(one + "\n" + one, max_calls=1) == (one, [("get_time", "{}")])


def test_compact_json_agrees_with_json_loads() -> None:
    valid = ['{"a": [1, -0, 0.5, 1e3, 2E-2, true, false, null, {}, []], "b": {"c": "\\ud83d\\ude00 \\/"}}', " {} "]
    for text in valid:
        compact = compact_json_object(text)
        assert compact is not None and json.loads(compact) == json.loads(text)
        assert json.dumps(json.loads(compact), separators=(",", ":")) == json.dumps(
            json.loads(text), separators=(",", ":")
        )
    assert compact_json_object(valid[0]) == valid[0].replace(", ", ",").replace(": ", ":")
    invalid = ['{"a": 01}', '{"a": 1.}', '{"a": .5}', '{"a": -}', '{"a": tru}', '{"a" 1}', '{"a": "\x01"}', "[1]"]
    invalid += ['{"a": "\\x"}', '{"a": "\\u12g4"}', '{"a": 1} {}', '{"a": [1,]}', "{'a': 1}", '{"a": 1', ""]
    for text in invalid:
        assert compact_json_object(text) is None, text


# -- streaming --------------------------------------------------------------------------------------------------

STREAM_TEXTS = [
    "Just text, no calls at all.  ",
    "  \n<tool_call>\n"
    + '{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, 2.5, "a\\"b"]}}\n</tool_call>',
    'Let me check. <tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>\nDone <tool <toolbox> </tool_call>',
    '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call> after',
    '<tool_call>\n{"name": "unknown_tool", "arguments": {"x": 1}}\n</tool_call>'
    '<tool_call>{"name": "get_time", "arguments": {"x": "<tool_call>"}}</tool_call>',
    '<tool_call> not json <tool_call>{"name": "get_time"}</tool_cal',
    'x <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    '<tool_call>{"nam": "get_time"}</tool_call><tool_call>{"name": 5}</tool_call><tool_call>[]</tool_call>',
    "<tool_call>",
    "a <tool_call>\n{",
]


def stream_events(text: str, sizes: list[int], **kwargs: Any) -> list[ToolEvent]:
    parser = ToolStreamParser(NAMES, **kwargs)
    events: list[ToolEvent] = []
    pos = 0
    for size in sizes:
        events += parser.push(text[pos : pos + size])
        pos += size
    assert pos >= len(text)
    events += parser.finish()
    assert parser.calls == sum(isinstance(e, ToolCallStart) for e in events)
    return events


def splits(text: str) -> list[list[int]]:
    """Pieces of every fixed size, every single cut point, and seeded random pieces of 1..8 characters."""
    n = max(len(text), 1)
    out = [[size] * (n // size + 1) for size in range(1, n + 1)]
    out += [[cut, n - cut] for cut in range(n + 1)]
    rng = random.Random(n)
    out += [[rng.randint(1, 8) for _ in range(n)] for _ in range(30)]
    return out


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("max_calls", [None, 1])
def test_stream_matches_parse_for_every_split(text: str, max_calls: int | None) -> None:
    content, calls = parse_tool_calls(text, NAMES, max_calls=max_calls)
    expected = (content, [(c.name, c.arguments) for c in calls])
    for sizes in splits(text):
        events = stream_events(text, sizes, max_calls=max_calls)
        got_content, got_calls = join_events(events)
        assert (got_content, [(c.name, c.arguments) for c in got_calls]) == expected, sizes
        starts = [e for e in events if isinstance(e, ToolCallStart)]
        assert [s.index for s in starts] == list(range(len(starts)))
        assert all(CALL_ID.fullmatch(s.id) for s in starts)
        assert all(e.text for e in events if isinstance(e, ContentDelta | ToolCallArguments))


def test_stream_announces_the_name_then_streams_arguments() -> None:
    parser = ToolStreamParser(NAMES)
    assert parser.push("I'll check. <tool") == [ContentDelta("I'll check.")]
    assert parser.push('_call>\n{"name": "get_wea') == []
    [start] = parser.push('ther", "arguments": ')
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "get_weather")
    assert parser.push('{"city": "Pa') == [ToolCallArguments(0, '{"city":"Pa')]
    assert parser.push('ris"}') == [ToolCallArguments(0, 'ris"}')]
    assert parser.push("}\n</tool_call>\n\nAnything") == [ContentDelta(" \n\nAnything")]
    assert parser.finish() == []
    assert parser.broken_calls == []


def test_stream_holds_back_only_what_could_be_a_tag() -> None:
    parser = ToolStreamParser(NAMES)
    assert parser.push("a <tool") == [ContentDelta("a")]
    assert parser.push("box>") == [ContentDelta(" <toolbox>")]
    assert parser.push("<") == []
    assert parser.finish() == [ContentDelta("<")]


def test_a_call_broken_after_its_announcement_cannot_be_taken_back() -> None:
    # Cut by max_tokens mid-arguments: parse keeps the text, a stream has already sent the call.
    text = 'ok <tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert calls_of(text) == (text, [])
    parser = ToolStreamParser(NAMES)
    content, calls = join_events([*parser.push(text), *parser.finish()])
    assert content == "ok" and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Par')]
    assert parser.broken_calls == [0]
    # Malformed JSON after the name: the rest reads as content again.
    parser = ToolStreamParser(NAMES)
    events = parser.push('<tool_call>{"name": "get_time", "arguments": {"a": 1,}} x</tool_call>') + parser.finish()
    assert join_events(events)[0] == "}} x</tool_call>"
    assert parser.broken_calls == [0]
    # Not eager: nothing is announced before the block is complete, so it agrees with parse_tool_calls.
    parser = ToolStreamParser(NAMES, eager=False)
    assert join_events([*parser.push(text), *parser.finish()]) == (text, [])


# -- chat templates ---------------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tuple?"}]


def tool_conversation() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    plan = planned([WEATHER, TIME], "auto", None)
    history = ToolHistory()
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather and time in Paris?"},
        history.assistant(
            2,
            "Checking.",
            decoded_calls(
                call("c1", "get_weather", '{"city": "Paris"}'), call("c2", "get_time", '{"tz": "Europe/Paris"}')
            ),
        ),
        history.tool(3, "20°C", "c1"),
        history.tool(4, "12:00", "c2"),
        {"role": "user", "content": "Thanks."},
    ]
    assert plan.template_tools is not None
    return messages, plan.template_tools


EXPECTED_TOOL_PROMPT = (
    "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
    "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER, ensure_ascii=False)
    + "\n"
    + json.dumps(
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    )
    + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "<|im_start|>user\nWeather and time in Paris?<|im_end|>\n"
    "<|im_start|>assistant\nChecking.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n20°C\n</tool_response>\n<tool_response>\n12:00\n</tool_response><|im_end|>\n"
    "<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n"
)


def test_chartok_renders_tools_like_qwen() -> None:
    messages, tools = tool_conversation()
    tok = CharTokenizer()
    text = tok.render_chat_text(messages, add_generation_prompt=True, continue_final_message=False, tools=tools)
    assert text == EXPECTED_TOOL_PROMPT
    assert tok.decode(tok.render_chat(messages, add_generation_prompt=True, continue_final_message=False, tools=tools))
    # The calls rendered into the prompt read back as the same calls.
    body = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert calls_of(body) == (
        "Checking.",
        [("get_weather", '{"city":"Paris"}'), ("get_time", '{"tz":"Europe/Paris"}')],
    )
    plain = tok.render_chat_text(CHAT, add_generation_prompt=True, continue_final_message=False)
    assert plain == tok.render_chat_text(CHAT, add_generation_prompt=True, continue_final_message=False, tools=[])
    assert plain == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a tuple?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.slow
def test_demo_template_renders_tools_like_qwen(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from server.engine.hf_tokenizer import HFTokenizer

    hf: Any = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = HFTokenizer(hf)
    messages, tools = tool_conversation()
    text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED_TOOL_PROMPT
    ids = tok.render_chat(messages, add_generation_prompt=True, continue_final_message=False, tools=tools)
    assert ids == hf.encode(text, add_special_tokens=False)

    # Without a system message the tools get a system turn of their own; a lone tool result closes its turn.
    alone = [messages[1], messages[2], messages[3]]
    text = hf.apply_chat_template(alone, tools=tools, tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert text.endswith("<|im_start|>user\n<tool_response>\n20°C\n</tool_response><|im_end|>\n")
    assert text == CharTokenizer().render_chat_text(
        alone, add_generation_prompt=False, continue_final_message=False, tools=tools
    )


@pytest.mark.slow
def test_demo_template_without_tools_is_plain_chatml(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from server.engine.hf_tokenizer import HFTokenizer

    hf: Any = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok = HFTokenizer(hf)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    cases: list[tuple[list[dict[str, Any]], bool, bool, str]] = [
        (CHAT, True, False, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a tuple?<|im_end|>\n"),
        (parts, True, False, "<|im_start|>user\nab<|im_end|>\n"),
        ([*parts, {"role": "assistant", "content": None}], False, False, ""),
        ([*CHAT, {"role": "assistant", "content": "A tuple is"}], False, True, ""),
    ]
    for messages, generation_prompt, continue_final, prefix in cases:
        expected = "".join(
            f"<|im_start|>{m['role']}\n"
            + (m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"] or []))
            + "<|im_end|>\n"
            for m in messages
        )
        if continue_final:
            expected = expected.removesuffix("<|im_end|>\n")
        elif generation_prompt:
            expected += "<|im_start|>assistant\n"
        assert expected.startswith(prefix)
        text = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, continue_final_message=continue_final
        )
        assert text == expected
        ids = tok.render_chat(messages, add_generation_prompt=generation_prompt, continue_final_message=continue_final)
        assert ids == hf.encode(expected, add_special_tokens=False)
        assert ids == tok.render_chat(
            messages, add_generation_prompt=generation_prompt, continue_final_message=continue_final, tools=None
        )


@pytest.mark.slow
def test_a_template_without_tools_support_is_an_error(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from server.engine.hf_tokenizer import HFTokenizer

    hf: Any = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not support tools"):
        HFTokenizer(hf).render_chat(CHAT, add_generation_prompt=True, continue_final_message=False, tools=[WEATHER])
