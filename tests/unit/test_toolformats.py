"""Tool-call formats: detection from chat templates, the Llama 3 JSON and Mistral parsers (whole and streamed), and
each format's constraint (its grammar, and random decoding through it parsing back into valid calls)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from schemas.openai.tools import FunctionDefinition, FunctionTool, NamedToolChoice, ToolChoiceFunction
from server.engine.grammar import GrammarCompiler, check
from server.engine.grammar_mask import apply_masks
from server.serving.toolformats import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolFormat,
    detect_format,
    model_tool_format,
    tool_format,
)
from server.serving.toolparse import join_events
from server.serving.tools import plan_tools
from tests.fakes.engines import NoChatTemplate
from tests.fakes.templated import (
    HERMES_TEMPLATE,
    LLAMA3_TEMPLATE,
    MISTRAL_TEMPLATE,
    NO_TOOLS_TEMPLATE,
)
from tests.fakes.templates import TemplateTokenizer

NAMES = frozenset({"get_weather", "add"})


# ---- detection ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (HERMES_TEMPLATE, "hermes"),
        (LLAMA3_TEMPLATE, "llama3_json"),
        (MISTRAL_TEMPLATE, "mistral"),
        ("{{ '<|python_tag|>' }}{{ tools }}", "llama3_json"),  # Llama 3.1: built-in tools after the python tag
        ('<|start_header_id|>{{ tools }} {"name": ..., "parameters": ...}', "llama3_json"),  # Llama 3.2 JSON idiom
        ("{% for m in messages %}[TOOL_CALLS]{% endfor %}<tool_call>", "mistral"),
        (NO_TOOLS_TEMPLATE, None),
        ("{{ tools | tojson }}{{ messages }}", None),  # renders tools but shows no format
        ("", None),
        (None, None),
    ],
)
def test_the_format_is_detected_from_the_template(template: str | None, expected: str | None) -> None:
    found = detect_format(template)
    assert (found.name if found else None) == expected
    assert tool_format("auto", template) is found


def test_a_named_parser_wins_and_an_unknown_one_is_refused() -> None:
    assert tool_format("mistral", HERMES_TEMPLATE) is MISTRAL
    assert tool_format("llama3_json", None) is LLAMA3_JSON
    assert set(FORMATS) == {"hermes", "llama3_json", "mistral"}
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_format("pythonic", HERMES_TEMPLATE)


def test_model_formats() -> None:
    assert model_tool_format(TemplateTokenizer(MISTRAL_TEMPLATE, trim_blocks=True), "auto") is MISTRAL
    assert model_tool_format(TemplateTokenizer(NO_TOOLS_TEMPLATE, trim_blocks=True), "auto") is None
    assert model_tool_format(TemplateTokenizer(NO_TOOLS_TEMPLATE, trim_blocks=True), "hermes") is HERMES
    # The built-in ChatML renderer writes Hermes instructions; a model without a template is refused elsewhere.
    from server.engine.chartok import CharTokenizer

    assert model_tool_format(CharTokenizer(), "auto") is HERMES
    assert model_tool_format(NoChatTemplate(), "auto") is HERMES


# ---- parsing -----------------------------------------------------------------------------------------------------

CASES: list[tuple[ToolFormat, str, str | None, list[tuple[str, str]]]] = [
    (LLAMA3_JSON, '{"name": "add", "parameters": {"a": 1}}', None, [("add", '{"a":1}')]),
    (LLAMA3_JSON, ' <|python_tag|>{"name": "add", "arguments": {"a": 1}} ', None, [("add", '{"a":1}')]),
    (
        LLAMA3_JSON,
        '{"name": "add", "parameters": {"a": 1}};\n{"name": "get_weather", "parameters": "{\\"city\\": \\"P\\"}"}',
        None,
        [("add", '{"a":1}'), ("get_weather", '{"city":"P"}')],
    ),
    (LLAMA3_JSON, '{"name": "add"}', None, [("add", "{}")]),
    (LLAMA3_JSON, 'Sure: {"name": "add", "parameters": {}}', 'Sure: {"name": "add", "parameters": {}}', []),
    (LLAMA3_JSON, '{"name": "sub", "parameters": {}}', '{"name": "sub", "parameters": {}}', []),
    (LLAMA3_JSON, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA3_JSON, "<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    (LLAMA3_JSON, '{"name": "add", "parameters": {}} done.', "done.", [("add", "{}")]),
    (LLAMA3_JSON, '{"name": "add", "parameters": {}}; oops', "; oops", [("add", "{}")]),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]', None, [("add", '{"a":1}')]),
    (MISTRAL, '[TOOL_CALLS] [ {"name": "add", "arguments": {}} ,{"name":"add"} ]', None, [("add", "{}")] * 2),
    (MISTRAL, '[{"name": "add", "arguments": {}}]', None, [("add", "{}")]),  # marker dropped as a special token
    (MISTRAL, 'Hm. [TOOL_CALLS][{"name": "add", "arguments": {}}] ok', "Hm.  ok", [("add", "{}")]),
    (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {}}', None, [("add", "{}")]),  # no closing bracket
    (MISTRAL, "[1, 2] and [TOOL_CALLS]", "[1, 2] and [TOOL_CALLS]", []),
    # The newer Mistral form, markers kept or dropped as special tokens.
    (MISTRAL, "[TOOL_CALLS]add[ARGS]{}", None, [("add", "{}")]),
    (
        MISTRAL,
        'Ok.[TOOL_CALLS]get_weather[ARGS]{"city": "P"}\n[TOOL_CALLS]add[ARGS] {"a": [1, 2]}',
        "Ok.",
        [("get_weather", '{"city":"P"}'), ("add", '{"a":[1,2]}')],
    ),
    (MISTRAL, 'get_weather{"city": "P"}add{"a": 1}', None, [("get_weather", '{"city":"P"}'), ("add", '{"a":1}')]),
    (MISTRAL, 'add[ARGS]{"a": 1} done', "done", [("add", '{"a":1}')]),
    (MISTRAL, "add more salt", "add more salt", []),
    (MISTRAL, "address", "address", []),
    (MISTRAL, "[TOOL_CALLS]nope[ARGS]{}", "[TOOL_CALLS]nope[ARGS]{}", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "nope", "arguments": {}}]', '[TOOL_CALLS][{"name": "nope", "arguments": {}}]', []),
    (HERMES, '<tool_call>{"name": "add", "arguments": {}}</tool_call>', None, [("add", "{}")]),
]


def stream(fmt: ToolFormat, text: str, step: int, **kwargs: Any) -> tuple[str | None, list[tuple[str, str]]]:
    parser = fmt.stream_parser(NAMES, **kwargs)
    events = [e for i in range(0, len(text), step) for e in parser.push(text[i : i + step])]
    content, calls = join_events([*events, *parser.finish()])
    return content, [(c.name, c.arguments) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_whole_and_streamed_parses_agree(
    fmt: ToolFormat, text: str, content: str | None, calls: list[tuple[str, str]]
) -> None:
    whole_content, whole_calls = fmt.parse(text, NAMES)
    assert (whole_content, [(c.name, c.arguments) for c in whole_calls]) == (content, calls)
    for step in (1, 2, 3, 5, len(text)):
        assert stream(fmt, text, step) == (content, calls)
        assert stream(fmt, text, step, eager=False) == (content, calls)


@pytest.mark.parametrize(
    ("fmt", "text", "rest"),
    [
        (LLAMA3_JSON, '{"name": "add", "parameters": {}}; {"name": "add", "parameters": {}}', '; {"name": "add"'),
        (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {}}, {"name": "add", "arguments": {}}]', ', {"name"'),
        (MISTRAL, "[TOOL_CALLS]add[ARGS]{}[TOOL_CALLS]add[ARGS]{}", "[TOOL_CALLS]add"),
    ],
)
def test_calls_beyond_max_calls_are_content(fmt: ToolFormat, text: str, rest: str) -> None:
    content, calls = fmt.parse(text, NAMES, max_calls=1)
    assert len(calls) == 1 and content is not None and content.startswith(rest)
    assert stream(fmt, text, 4, max_calls=1) == (content, [("add", "{}")])


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (LLAMA3_JSON, '{"name": "add", "parameters": {"a": 1'),
        (MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a'),
    ],
)
def test_a_call_cut_after_its_announcement_is_broken(fmt: ToolFormat, text: str) -> None:
    parser = fmt.stream_parser(NAMES)
    events = parser.push(text) + parser.finish()
    assert parser.calls == 1 and parser.broken_calls == [0]
    assert join_events(events)[1][0].name == "add"
    assert fmt.parse(text, NAMES)[1] == []  # the whole-text parse never announced it: all content


# ---- constraints -------------------------------------------------------------------------------------------------

WEATHER = FunctionDefinition(
    name="get_weather",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
ADD = FunctionDefinition(
    name="add",
    parameters={
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
)


def test_the_hermes_constraint_is_unchanged() -> None:
    constraint = HERMES.constraint([WEATHER], max_calls=1)
    assert (constraint.prefix, constraint.suffix, constraint.separator) == ("<tool_call>\n", "\n</tool_call>", "\n")
    assert (constraint.min_items, constraint.max_items, constraint.lenient) == (1, 1, True)
    assert json.loads(constraint.json_schema)["required"] == ["name", "arguments"]


def test_the_constraints_of_each_format() -> None:
    llama = LLAMA3_JSON.constraint([WEATHER, ADD], max_calls=None)
    assert (llama.prefix, llama.suffix, llama.separator, llama.max_items) == ("", "", "; ", None)
    assert [s["required"] for s in json.loads(llama.json_schema)["anyOf"]] == [["name", "parameters"]] * 2
    mistral = MISTRAL.constraint([ADD], max_calls=1)
    assert (mistral.prefix, mistral.suffix, mistral.min_items, mistral.max_items) == ("[TOOL_CALLS]", "", 1, 1)
    schema = json.loads(mistral.json_schema)
    assert (schema["type"], schema["minItems"], schema["maxItems"]) == ("array", 1, 1)
    assert schema["items"]["properties"]["name"] == {"const": "add"}
    for fmt in FORMATS.values():
        check(fmt.constraint([WEATHER, ADD], max_calls=None))
        check(fmt.constraint([ADD], max_calls=1))


def test_a_forced_call_plan_uses_the_format() -> None:
    tools = [FunctionTool(function=WEATHER), FunctionTool(function=ADD)]
    plan = plan_tools(tools, "required", None, MISTRAL)
    assert plan.format is MISTRAL and plan.constraint == MISTRAL.constraint([WEATHER, ADD], max_calls=None)
    named = plan_tools(tools, NamedToolChoice(function=ToolChoiceFunction(name="add")), None, LLAMA3_JSON)
    assert named.constraint == LLAMA3_JSON.constraint([ADD], max_calls=1)


# ---- random decoding through each format's grammar parses back into valid calls ----------------------------------

CITY = FunctionDefinition(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def sample(tokenizer: Any, constraint: Any, seed: int, rows: int = 6) -> list[str]:
    """Texts of ``rows`` decodings with random logits through the constraint's masks, each until EOS."""
    eos = frozenset({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"), 0})
    compiler = GrammarCompiler(tokenizer, len(tokenizer), eos)
    grammars = [compiler.matcher(constraint) for _ in range(rows)]
    generator = torch.Generator().manual_seed(seed)
    tokens: list[list[int]] = [[] for _ in grammars]
    live = list(range(rows))
    for _ in range(3000):
        logits = torch.randn(len(live), len(tokenizer), generator=generator)
        apply_masks(logits, [grammars[i] for i in live])
        picks = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).flatten().tolist()
        for i, token in zip(live, picks, strict=True):
            grammars[i].consume(token)
            if token not in eos:
                tokens[i].append(token)
        live = [i for i, token in zip(live, picks, strict=True) if token not in eos]
        if not live:
            return [tokenizer.decode(t) for t in tokens]
    raise AssertionError("a row did not finish")


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
@pytest.mark.parametrize("max_calls", [1, None])
def test_forced_calls_parse_back(hf_tokenizer: Any, fmt: ToolFormat, max_calls: int | None) -> None:
    constraint = fmt.constraint([CITY, ADD], max_calls=max_calls)
    for text in sample(hf_tokenizer, constraint, seed=11):
        content, calls = fmt.parse(text, NAMES)
        assert content is None and calls, text
        assert max_calls is None or len(calls) <= max_calls
        for call in calls:
            args = json.loads(call.arguments)
            if call.name == "add":
                assert set(args) == {"a", "b"} and all(type(v) is int for v in args.values()), text
            else:
                assert args in ({"city": "Paris"}, {"city": "Oslo"}), text
        assert stream(fmt, text, 3) == (None, [(c.name, c.arguments) for c in calls])
