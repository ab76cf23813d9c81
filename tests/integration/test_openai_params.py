"""Every OpenAI sampling and output parameter through the official SDK (and LangChain) on the tiny random model.

The model's weights are random, so its text is noise: that is the point for structured outputs and forced tool
calls, which must still parse and validate because decoding is constrained by a grammar.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.engine.hf import HFEngine
from tests.conftest import ready_client

pytestmark = pytest.mark.slow

MESSAGES: Any = [{"role": "user", "content": "Tell me about the for statement."}]

# Bounded fields, so that even noise reaches the end of the JSON within max_tokens.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "active", "tags"],
    "additionalProperties": False,
}

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def valid_person(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == set(PERSON["required"])
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 120
        and value["role"] in ("admin", "user", "guest")
        and isinstance(value["active"], bool)
        and isinstance(value["tags"], list)
        and len(value["tags"]) <= 3
        and all(isinstance(t, str) and len(t) <= 6 for t in value["tags"])
    )


@pytest.fixture(scope="module")
def http(engine_app: tuple[HFEngine, Litestar, str]) -> Iterator[TestClient[Litestar]]:
    with ready_client(engine_app, authed=False) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(engine_app: tuple[HFEngine, Litestar, str], http: TestClient[Litestar]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key=engine_app[2], http_client=http, max_retries=0)


# ---- n ------------------------------------------------------------------------------------------------------


def test_n_samples_are_independent_reproducible_and_streamed_by_index(sdk: openai.OpenAI) -> None:
    args: Any = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    out = sdk.chat.completions.create(n=3, **args)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1, texts  # derived seeds: the samples differ ...
    again = sdk.chat.completions.create(n=3, **args)
    assert [c.message.content for c in again.choices] == texts  # ... and are reproducible
    assert sdk.chat.completions.create(**args).choices[0].message.content == texts[0]  # sample 0 keeps the seed
    single = sdk.chat.completions.create(**args)
    assert out.usage is not None and single.usage is not None
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is billed once
    assert out.usage.completion_tokens == 3 * 8  # summed over the choices

    chunks = list(sdk.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **args))
    streamed = {i: "" for i in range(3)}
    finishes: dict[int, list[str]] = {i: [] for i in range(3)}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert [streamed[i] for i in range(3)] == texts
    assert all(len(f) == 1 for f in finishes.values())
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == out.usage.total_tokens

    comp = sdk.completions.create(model="tiny", prompt=["ab", "cd"], n=2, max_tokens=4, temperature=0.0)
    assert [c.index for c in comp.choices] == [0, 1, 2, 3]
    assert comp.choices[0].text == comp.choices[1].text  # greedy samples of one prompt agree


# ---- logprobs -----------------------------------------------------------------------------------------------


def test_chat_logprobs_join_to_the_content_streamed_and_not(sdk: openai.OpenAI) -> None:
    args: Any = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 0.0}
    out = sdk.chat.completions.create(logprobs=True, top_logprobs=4, **args)
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    assert out.usage is not None and len(content) == out.usage.completion_tokens - (choice.finish_reason == "stop")
    for t in content:
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 4
        assert t.logprob <= 0.0
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert abs(values[0] - t.logprob) < 1e-4  # greedy: the chosen token is the most likely
    zero = sdk.chat.completions.create(logprobs=True, **args).choices[0].logprobs
    assert zero is not None and zero.content is not None and all(t.top_logprobs == [] for t in zero.content)
    assert sdk.chat.completions.create(**args).choices[0].logprobs is None

    chunks = list(sdk.chat.completions.create(logprobs=True, top_logprobs=4, stream=True, **args))
    streamed = [
        t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content for t in ch.logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_chat_logprobs_respect_stop_strings(sdk: openai.OpenAI) -> None:
    args: Any = {"model": "tiny", "messages": MESSAGES, "max_tokens": 30, "temperature": 0.0}
    full = sdk.chat.completions.create(**args).choices[0].message.content or ""
    stop = full[7:10]
    assert len(stop) == 3
    cut = sdk.chat.completions.create(logprobs=True, stop=[stop], **args).choices[0]
    assert cut.message.content == full[: full.index(stop)]
    assert cut.logprobs is not None and cut.logprobs.content is not None
    assert "".join(t.token for t in cut.logprobs.content) == cut.message.content


def test_completion_logprobs_and_echo(sdk: openai.OpenAI) -> None:
    prompt = "The for statement"
    out = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.0, logprobs=3, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first prompt token
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(top is not None and 1 <= len(top) <= 4 for top in lp.top_logprobs[1:])
    assert out.usage is not None
    prompt_len = out.usage.prompt_tokens
    assert len(lp.tokens) == prompt_len + out.usage.completion_tokens - (choice.finish_reason == "stop")

    plain = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.0, logprobs=3)
    assert plain.choices[0].text == choice.text[len(prompt) :]
    assert plain.choices[0].logprobs is not None
    assert plain.choices[0].logprobs.tokens == lp.tokens[prompt_len:]
    assert plain.choices[0].logprobs.text_offset == [o - len(prompt) for o in lp.text_offset[prompt_len:]]

    echo_only = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0.0, echo=True)
    assert echo_only.choices[0].text.startswith(prompt) and echo_only.choices[0].logprobs is None

    stream = sdk.completions.create(
        model="tiny", prompt=prompt, max_tokens=10, temperature=0.0, logprobs=3, echo=True, stream=True
    )
    tokens: list[str] = []
    offsets: list[int] = []
    text = ""
    for chunk in stream:
        for ch in chunk.choices:
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens or []
                offsets += ch.logprobs.text_offset or []
    assert (text, tokens, offsets) == (choice.text, lp.tokens, lp.text_offset)


# ---- logit_bias and penalties -------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(sdk: openai.OpenAI, engine_app: tuple[HFEngine, Litestar, str]) -> None:
    tokenizer = engine_app[0].tokenizer
    args: Any = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0.0}
    base = sdk.completions.create(logprobs=0, **args).choices[0]
    assert base.logprobs is not None and base.logprobs.tokens
    forced_id = tokenizer.encode(" for")[-1]
    forced = sdk.completions.create(logit_bias={str(forced_id): 100}, **args).choices[0]
    assert forced.text == tokenizer.decode([forced_id]) * 5
    streamed = sdk.completions.create(logit_bias={str(forced_id): 100}, stream=True, **args)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == forced.text
    first = tokenizer.encode(base.logprobs.tokens[0])
    banned = sdk.completions.create(logit_bias={str(t): -100 for t in first}, logprobs=0, **args).choices[0]
    assert (
        banned.logprobs is not None and banned.logprobs.tokens and banned.logprobs.tokens[0] != base.logprobs.tokens[0]
    )


def test_penalties_change_greedy_output(sdk: openai.OpenAI) -> None:
    args: Any = {"model": "tiny", "messages": MESSAGES, "max_tokens": 30, "temperature": 0.0}
    plain = sdk.chat.completions.create(**args).choices[0].message.content
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 3.0}}):
        out = sdk.chat.completions.create(**args, **extra).choices[0].message.content
        assert out != plain, extra
        chunks = sdk.chat.completions.create(stream=True, **args, **extra)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out, extra


# ---- structured outputs -------------------------------------------------------------------------------------


def test_json_schema_output_parses_and_validates_streamed_and_not(sdk: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(4):
        args: Any = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200, "temperature": 1.0, "seed": seed}
        out = sdk.chat.completions.create(response_format=fmt, **args)
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        assert valid_person(json.loads(choice.message.content or "")), choice.message.content
        chunks = list(sdk.chat.completions.create(response_format=fmt, stream=True, **args))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    obj = sdk.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=300, temperature=0.0, response_format={"type": "json_object"}
    ).choices[0]
    if obj.finish_reason == "stop":
        assert isinstance(json.loads(obj.message.content or ""), dict)
    else:  # cut by max_tokens: still a prefix of one JSON object
        assert (obj.message.content or "").startswith("{")


def test_unsupported_schema_features_are_a_clear_400(sdk: openai.OpenAI) -> None:
    bad: Any = {"type": "object", "properties": {"a": {"type": "string", "format": "nonsense-format"}}}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": bad, "strict": True}}
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, response_format=fmt)
    assert err.value.param == "response_format.json_schema.schema"
    broken: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, response_format=broken)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "bad name!", "schema": PERSON}},
        )
    assert err.value.param == "response_format.json_schema.name"


# ---- tools --------------------------------------------------------------------------------------------------


def test_required_tool_calls_parse_and_validate_streamed_and_not(sdk: openai.OpenAI) -> None:
    for seed in range(3):
        args: Any = {
            "model": "tiny",
            "messages": MESSAGES,
            "max_tokens": 200,
            "temperature": 1.0,
            "seed": seed,
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "tool_choice": "required",
        }
        out = sdk.chat.completions.create(**args)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
            else:
                assert call.function.name == "get_time" and arguments == {"zone": arguments["zone"]}
        chunks = list(sdk.chat.completions.create(stream=True, **args))
        pieces: dict[int, dict[str, str]] = {}
        for chunk in chunks:
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    entry = pieces.setdefault(tc.index, {"name": "", "arguments": "", "id": ""})
                    if tc.id:
                        entry["id"] = tc.id
                    if tc.function and tc.function.name:
                        entry["name"] += tc.function.name
                    if tc.function and tc.function.arguments:
                        entry["arguments"] += tc.function.arguments
        assert [(p["name"], p["arguments"]) for _, p in sorted(pieces.items())] == [
            (c.function.name, c.function.arguments) for c in calls
        ]
        assert all(p["id"].startswith("call_") for p in pieces.values())
        finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
        assert finishes == ["tool_calls"]


def test_named_tool_choice_and_no_parallel_calls(sdk: openai.OpenAI) -> None:
    out = sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=200,
        temperature=1.0,
        seed=3,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = out.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1 and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")
    single = sdk.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=300,
        temperature=1.0,
        seed=4,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )
    assert len(single.choices[0].message.tool_calls or []) == 1


def test_tool_results_go_back_in(sdk: openai.OpenAI) -> None:
    history: Any = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3 degrees"},
    ]
    out = sdk.chat.completions.create(
        model="tiny", messages=history, max_tokens=5, tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    auto = sdk.chat.completions.create(model="tiny", messages=history, max_tokens=5, tools=[WEATHER_TOOL])
    assert auto.choices[0].message.content is not None or auto.choices[0].message.tool_calls


def test_constrained_and_unconstrained_rows_share_a_batch(
    sdk: openai.OpenAI, engine_app: tuple[HFEngine, Litestar, str]
) -> None:
    plain: Any = {"model": "tiny", "messages": MESSAGES, "max_tokens": 40, "temperature": 0.0}
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    alone = sdk.chat.completions.create(**plain).choices[0].message.content

    def run(kind: int) -> str | None:
        if kind % 2:
            sampled = {**plain, "temperature": 1.0, "max_tokens": 200}
            choice = sdk.chat.completions.create(response_format=fmt, seed=kind, **sampled).choices[0]
            assert valid_person(json.loads(choice.message.content or ""))
            return None
        return sdk.chat.completions.create(**plain).choices[0].message.content

    async def together() -> list[str | None]:
        return await asyncio.gather(*(asyncio.to_thread(run, k) for k in range(6)))

    scheduler = engine_app[0]._scheduler
    assert scheduler is not None
    scheduler.peak_rows = 0
    results = asyncio.run(together())
    assert [r for r in results if r is not None] == [alone] * 3
    assert scheduler.peak_rows >= 2  # they did run side by side


# ---- LangChain ----------------------------------------------------------------------------------------------


def test_langchain_structured_output_and_bind_tools(
    engine_app: tuple[HFEngine, Litestar, str], http: TestClient[Litestar]
) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)
        active: bool

    llm = ChatOpenAI(
        model="tiny",
        base_url="http://testserver.local/v1",
        api_key=engine_app[2],  # type: ignore[arg-type]
        http_client=http,
        max_retries=0,
        temperature=1.0,
        seed=1,
        max_completion_tokens=200,  # type: ignore[call-arg]
    )
    person = llm.with_structured_output(Person, method="json_schema", strict=True).invoke("Describe someone.")
    assert isinstance(person, Person) and 0 <= person.age <= 120

    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city.

        Args:
            city: The city.
            unit: celsius or fahrenheit.
        """
        return f"{city}: 3 {unit}"

    message = llm.bind_tools([get_weather], tool_choice="required", strict=True).invoke("Weather in Oslo?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert set(message.tool_calls[0]["args"]) == {"city", "unit"}
