"""``/v1/responses`` through the official SDK: plain and streamed turns, structured output and the 4xx answers.

A turn runs as a chat completion, so its usage must be exactly what the same conversation costs on
``/v1/chat/completions``; its stream must be the event sequence OpenAI sends, numbered from 0, with the stored
response equal to the final event's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from pydantic import BaseModel, ConfigDict, Field

from server.app import create_app
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import ready_client, sdk
from tests.fakes.templates import QWEN3_LIKE, TemplateTokenizer, templated_engine

if TYPE_CHECKING:
    from server.engine.hf import HFEngine

SCRIPT = ["Hel", "lo", ",", " wor", "ld", "!"]
TEXT = "Hello, world!"
STREAM_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len(SCRIPT),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def http(make_app: Callable[..., Litestar], authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(make_app(script=SCRIPT))) as client:
        yield client


@pytest.fixture
def client(http: TestClient[Litestar], api_key: str) -> openai.OpenAI:
    return sdk(http, api_key)


def chat_usage(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[int, int, int]:
    usage = client.chat.completions.create(model="fake", messages=messages).usage  # type: ignore[arg-type]
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


def usage_of(response: Any) -> tuple[int, int, int]:
    assert response.usage is not None
    return response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens


# ---- create -----------------------------------------------------------------------------------------------------


def test_string_and_item_input_cost_what_the_chat_costs(client: openai.OpenAI) -> None:
    expected = chat_usage(client, [{"role": "user", "content": "hi"}])
    assert expected[1] == len(SCRIPT) + 1  # the pieces and the end of text
    items: Any = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
    for given in ("hi", items, [{"type": "message", "role": "user", "content": "hi"}]):
        out = client.responses.create(model="fake", input=given)
        assert out.status == "completed" and out.output_text == TEXT, out
        assert out.id.startswith("resp_") and out.object == "response" and out.error is None
        assert [item.type for item in out.output] == ["message"]
        assert out.completed_at is not None and out.completed_at >= out.created_at
        assert usage_of(out) == expected


def test_instructions_are_a_system_message_and_echoed(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out = client.responses.create(model="fake", input="hi", instructions="Be brief.")
    assert out.instructions == "Be brief." and out.output_text == TEXT
    assert usage_of(out) == chat_usage(client, messages)
    assert usage_of(out)[0] > usage_of(client.responses.create(model="fake", input="hi"))[0]


def test_sampling_and_tool_options_are_echoed(client: openai.OpenAI) -> None:
    out = client.responses.create(
        model="fake",
        input="hi",
        temperature=0.5,
        top_p=0.9,
        metadata={"run": "7"},
        parallel_tool_calls=False,  # without tools as well: Responses accepts it (chat would not)
        tool_choice="auto",
    )
    assert (out.temperature, out.top_p, out.metadata) == (0.5, 0.9, {"run": "7"})
    assert out.parallel_tool_calls is False and out.tool_choice == "auto" and out.tools == []
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="fake", input="hi", tool_choice="required")
    assert err.value.param == "tool_choice"


def test_max_output_tokens_cut_is_incomplete(client: openai.OpenAI) -> None:
    out = client.responses.create(model="fake", input="hi", max_output_tokens=3)
    assert out.status == "incomplete" and out.incomplete_details is not None
    assert out.incomplete_details.reason == "max_output_tokens"
    assert out.output_text == "Hello," and out.max_output_tokens == 3
    assert out.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert usage_of(out)[1] == 3
    assert client.responses.retrieve(out.id).status == "incomplete"
    events = list(client.responses.create(model="fake", input="hi", max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"  # as OpenAI ends such a stream (not response.completed)
    final = events[-1].response
    assert final.status == "incomplete" and final.output_text == "Hello,"
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    for stream in (False, True):
        if stream:
            with client.responses.stream(model="fake", input="hi", store=False) as events:
                out = events.get_final_response()
        else:
            out = client.responses.create(model="fake", input="hi", store=False)
        assert out.store is False and out.output_text == TEXT
        with pytest.raises(openai.NotFoundError) as err:
            client.responses.retrieve(out.id)
        assert err.value.code == "not_found"
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="fake", input="more", previous_response_id=out.id)


# ---- streaming --------------------------------------------------------------------------------------------------


def test_stream_events_in_order_and_the_stored_response_matches(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="fake", input="hi", stream=True))
    assert [e.type for e in events] == STREAM_ORDER
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == SCRIPT
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == TEXT
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    final = events[-1].response  # type: ignore[union-attr]
    assert item_ids == {final.output[0].id}
    assert events[0].response.status == "in_progress" and final.status == "completed"  # type: ignore[union-attr]
    assert final.output_text == TEXT
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == TEXT and stored.usage == final.usage and stored.output == final.output
    assert usage_of(stored) == usage_of(client.responses.create(model="fake", input="hi"))


def test_stream_helper_and_raw_frames(client: openai.OpenAI, http: TestClient[Litestar]) -> None:
    with client.responses.stream(model="fake", input="hi", instructions="Be brief.") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert [t for t in types if not t.startswith("response.output_text.")] == [
        t for t in STREAM_ORDER if not t.startswith("response.output_text.")
    ]
    assert final.output_text == TEXT and final.instructions == "Be brief."
    assert client.responses.retrieve(final.id).usage == final.usage

    r = http.post("/v1/responses", json={"model": "fake", "input": "hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("\n\n") and "[DONE]" not in r.text
    frames = r.text[:-2].split("\n\n")
    names = []
    for frame in frames:
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == event_line[len("event: ") :]
        names.append(data["type"])
    assert names == STREAM_ORDER


# ---- reasoning and failures -------------------------------------------------------------------------------------


def test_reasoning_is_its_own_item_and_not_prompted_again(
    settings: Settings, authed: Callable[[Any], Any], api_key: str
) -> None:
    engine = templated_engine(QWEN3_LIKE, ["<think>", "hm", "</think>", "Hi"])
    with authed(TestClient(create_app(settings, engine=engine))) as http:
        client = sdk(http, api_key)
        out = client.responses.create(model="fake", input="hi")
        assert [item.type for item in out.output] == ["reasoning", "message"]
        assert out.output[0].content[0].text == "hm" and out.output_text == "Hi"  # type: ignore[union-attr,index]
        assert out.usage is not None and out.usage.output_tokens_details.reasoning_tokens == 3

        events = list(client.responses.create(model="fake", input="hi", stream=True))
        types = [e.type for e in events]
        assert types == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.reasoning_text.delta",
            "response.reasoning_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"] == [  # type: ignore[union-attr]
            (0, "reasoning"),
            (1, "message"),
        ]
        final = events[-1].response  # type: ignore[union-attr]
        assert final.usage == out.usage and [i.type for i in final.output] == ["reasoning", "message"]

        nxt = client.responses.create(model="fake", input="again", previous_response_id=out.id)
        tokenizer = engine.tokenizer
        assert isinstance(tokenizer, TemplateTokenizer)
        assert tokenizer.rendered[-1].startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>")
        assert "hm" not in tokenizer.rendered[-1]  # earlier thinking is left out of the prompt, and of the stored
        kinds = [i.type for i in client.responses.input_items.list(nxt.id, order="asc")]  # conversation: never
        assert kinds == ["message", "message", "message"]  # read again, it would be storage no token pays for
        # The client keeping the state itself (earlier output items given back as input) prompts the same.
        chained = tokenizer.rendered[-1]
        given: Any = [{"role": "user", "content": "hi"}, *out.output, {"role": "user", "content": "again"}]
        manual = client.responses.create(model="fake", input=given, store=False)
        assert tokenizer.rendered[-1] == chained and manual.usage == nxt.usage


def test_a_model_failure_fails_the_response(settings: Settings, authed: Callable[[Any], Any], api_key: str) -> None:
    with authed(TestClient(create_app(settings, engine=FakeEngine(["a"] * 10, fail_after=3)))) as http:
        client = sdk(http, api_key)
        events = list(client.responses.create(model="fake", input="hi", stream=True))
        assert [e.type for e in events[-5:]] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "error",
            "response.failed",
        ]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        failed = events[-1].response  # type: ignore[union-attr]
        assert failed.status == "failed" and failed.error is not None and failed.error.code == "server_error"
        assert failed.output_text == "aaa" and failed.output[0].status == "incomplete"  # type: ignore[union-attr]
        assert client.responses.retrieve(failed.id).status == "failed"
        with pytest.raises(openai.InternalServerError):
            client.responses.create(model="fake", input="hi")
        queued = client.responses.create(model="fake", input="hi", background=True)
        deadline = time.monotonic() + 10
        while (got := client.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert got.status == "failed" and got.error is not None and got.error.code == "server_error"


# ---- structured output (the tiny random model: only the grammar makes its noise valid JSON) ---------------------


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


# Bounded fields, so that even noise reaches the end of the JSON within max_output_tokens.
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(engine_app: tuple[HFEngine, Litestar, str]) -> Iterator[openai.OpenAI]:
    with ready_client(engine_app) as http:
        yield sdk(http, engine_app[2])


@pytest.mark.slow
def test_json_schema_and_json_object_formats(tiny: openai.OpenAI) -> None:
    fmt: Any = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
    prompt = "Describe someone."
    for _ in range(3):  # sampled: three different noises, each one a person
        out = tiny.responses.create(model="tiny", input=prompt, text=fmt, max_output_tokens=200, temperature=1.0)
        assert out.status == "completed", out
        Person.model_validate_json(out.output_text, strict=True)
        assert out.text is not None and out.text.format is not None and out.text.format.type == "json_schema"
    with tiny.responses.stream(model="tiny", input=prompt, text=fmt, max_output_tokens=200) as stream:
        streamed = stream.get_final_response()
    Person.model_validate_json(streamed.output_text, strict=True)
    obj = tiny.responses.create(
        model="tiny", input=prompt, text={"format": {"type": "json_object"}}, max_output_tokens=300, temperature=0.0
    )
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)
    else:  # cut by max_output_tokens: still a prefix of one JSON object
        assert obj.incomplete_details is not None and obj.output_text.startswith("{")
    parsed = tiny.responses.parse(model="tiny", input=prompt, text_format=Person, max_output_tokens=200)
    assert isinstance(parsed.output_parsed, Person) and 0 <= parsed.output_parsed.age <= 120
    bad: Any = {"format": {"type": "json_schema", "name": "bad name!", "schema": PERSON}}
    with pytest.raises(openai.BadRequestError) as err:
        tiny.responses.create(model="tiny", input=prompt, text=bad)
    assert err.value.param is not None and err.value.param.startswith("text.format")


# ---- errors -----------------------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="nope", input="hi")
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"background": True, "stream": True}, "stream"),
        ({"background": True, "store": False}, "background"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "computer_call"}]}, "input[0].type"),
    ],
)
def test_unsupported_parameters_are_a_400_naming_them(client: openai.OpenAI, extra: Any, param: str) -> None:
    body: Any = {"model": "fake", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(**body)
    assert err.value.param == param, err.value.body


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"role": "robot", "content": "hi"}, "input[0].role"),
        ({"role": "user"}, "input[0].content"),
        ({"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}, "input[0].call_id"),
        ({"type": "function_call_output", "call_id": "nowhere", "output": "x"}, "input[0].call_id"),
    ],
)
def test_malformed_input_items_are_a_400_naming_the_item(client: openai.OpenAI, item: Any, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="fake", input=[item])
    assert err.value.param == param, err.value.body
    assert err.value.param is not None and err.value.param.startswith("input[0]")


def test_unknown_previous_response_id_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="fake", input="hi", previous_response_id="resp_nothing")
    assert err.value.param == "previous_response_id" and err.value.code == "not_found"


@pytest.mark.parametrize(
    "metadata",
    [
        {"k" * 65: "v"},  # a key over 64 characters
        {"k": "v" * 513},  # a value over 512 characters
        {f"k{i}": "v" for i in range(17)},  # more than 16 pairs
    ],
)
def test_metadata_over_its_bounds_names_metadata_and_keeps_nothing(
    client: openai.OpenAI, http: TestClient[Litestar], metadata: dict[str, str]
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="fake", input="hi", metadata=metadata)
    assert err.value.param == "metadata", err.value.body
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="fake", input="hi", metadata=metadata, background=True)


def test_metadata_at_its_bounds_is_kept_whole(client: openai.OpenAI) -> None:
    widest = {f"{i:02d}".ljust(64, "k"): "v" * 512 for i in range(16)}
    out = client.responses.create(model="fake", input="hi", metadata=widest)
    assert out.metadata == widest and client.responses.retrieve(out.id).metadata == widest
