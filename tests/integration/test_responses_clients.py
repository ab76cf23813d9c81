"""Function calling on ``/v1/responses``, and the clients that speak it: the official SDK (whole and streamed),
LangChain's ``ChatOpenAI(use_responses_api=True)`` and the OpenAI Agents SDK running an agent with a tool.

The model is a FakeEngine rendering the Hermes test template: it calls the tool when its prompt holds no tool result
and answers with the result once it does, so every round trip shows what the server put in the prompt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient, TestClient

from server.app import create_app
from server.engine.base import EngineRequest
from server.engine.fake import FakeEngine
from server.settings import Settings
from tests.conftest import sdk
from tests.fakes.replies import CHAT_STREAM, chat_chunk, chat_json, sse, usage_chunk
from tests.fakes.templated import HERMES_TEMPLATE, templated_engine
from tests.fakes.upstream import MockUpstream, serving
from tests.integration.test_tool_formats import ANSWERS, EXPECTED

BASE_URL = "http://testserver.local/v1"
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = ["<tool_", 'call>\n{"name": "get_', 'weather", "arguments": ', '{"city": "Pa', 'ris"}}\n</tool_call>']
ARGUMENTS = '{"city":"Paris"}'
TOOL_RESULT = re.compile(r"<\|tool\|>(.*?)(?=<\||$)")


def weather_model() -> FakeEngine:
    """Calls ``get_weather`` for Paris, or, once a tool result is in the prompt, reports the last one."""
    engine: FakeEngine

    def answer(request: EngineRequest) -> list[str]:
        prompt = engine.tokenizer.decode(list(request.prompt_token_ids))
        results = TOOL_RESULT.findall(prompt)
        if not results:
            return CALL
        return ["In Paris", ": ", results[-1], "."]

    engine = templated_engine(HERMES_TEMPLATE, answer)
    return engine


@pytest.fixture
def app(settings: Settings) -> Litestar:
    return create_app(settings, engine=weather_model())


@pytest.fixture
def http(app: Litestar, authed: Callable[[Any], Any]) -> Iterator[TestClient[Litestar]]:
    with authed(TestClient(app)) as client:
        yield client


@pytest.fixture
def client(http: TestClient[Litestar], api_key: str) -> openai.OpenAI:
    return sdk(http, api_key)


# ---- function calling through the SDK ---------------------------------------------------------------------------


def test_function_call_then_its_output_through_previous_response_id(client: openai.OpenAI) -> None:
    first = client.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER])
    assert first.status == "completed" and first.output_text == ""
    assert [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.type == "function_call"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    assert first.tools[0].name == "get_weather"  # type: ignore[union-attr]

    second = client.responses.create(
        model="fake",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}],
        tools=[WEATHER],
    )
    assert second.status == "completed" and second.output_text == "In Paris: sunny, 21C."
    items = list(client.responses.input_items.list(second.id, order="asc"))
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]
    assert items[0].content[0].text == "Weather in Paris?"  # type: ignore[union-attr]
    assert (items[1].call_id, items[1].name, items[1].id) == (call.call_id, "get_weather", call.id)  # type: ignore[union-attr]
    assert (items[2].call_id, items[2].output) == (call.call_id, "sunny, 21C")  # type: ignore[union-attr]

    # The same conversation given whole, without stored state, is prompted the same way.
    whole = client.responses.create(
        model="fake",
        store=False,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": call.arguments},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
        ],
    )
    assert whole.output_text == second.output_text
    assert whole.usage is not None and second.usage is not None
    assert whole.usage.input_tokens == second.usage.input_tokens


def test_streamed_function_call_events(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER], stream=True))
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(types[3:-3]) == {"response.function_call_arguments.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added, done = events[2], events[-2]
    assert added.item.type == "function_call" and added.item.status == "in_progress"  # type: ignore[union-attr]
    assert added.item.name == "get_weather" and added.item.arguments == ""  # type: ignore[union-attr]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    arguments_done = events[-3]
    assert arguments_done.arguments == deltas and json.loads(deltas) == {"city": "Paris"}  # type: ignore[union-attr]
    assert done.item.arguments == deltas and done.item.status == "completed"  # type: ignore[union-attr]
    assert done.item.call_id == added.item.call_id  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output[0].arguments == deltas
    stored = client.responses.retrieve(final.id)
    assert stored.output == final.output and stored.usage == final.usage

    with client.responses.stream(
        model="fake",
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": done.item.call_id, "output": "rain"}],  # type: ignore[union-attr]
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        answer = stream.get_final_response()
    assert text == answer.output_text == "In Paris: rain."


def test_parallel_calls_and_text_before_a_call(settings: Settings, authed: Callable[[Any], Any], api_key: str) -> None:
    answer = ["Let me check. ", *ANSWERS["hermes"]]

    def script(request: EngineRequest) -> list[str]:
        prompt = engine.tokenizer.decode(list(request.prompt_token_ids))
        return ["Both ", "done."] if prompt.count("<|tool|>") == 2 else answer

    engine = templated_engine(HERMES_TEMPLATE, script)
    tools: Any = [WEATHER, {"type": "function", "name": "add", "parameters": {"type": "object", "properties": {}}}]
    with authed(TestClient(create_app(settings, engine=engine))) as http:
        client = sdk(http, api_key)
        whole = client.responses.create(model="fake", input="Weather and sum?", tools=tools)
        assert [item.type for item in whole.output] == ["message", "function_call", "function_call"]
        assert whole.output_text == "Let me check."
        calls = [(o.name, o.arguments) for o in whole.output if o.type == "function_call"]
        assert calls == EXPECTED

        events = list(client.responses.create(model="fake", input="Weather and sum?", tools=tools, stream=True))
        added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
        done = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.done"]
        assert added == done == [(0, "message"), (1, "function_call"), (2, "function_call")]
        final = events[-1].response  # type: ignore[union-attr]
        assert [(o.name, o.arguments) for o in final.output[1:]] == EXPECTED
        assert final.output_text.strip() == whole.output_text
        for index in (1, 2):
            joined = "".join(
                e.delta
                for e in events
                if e.type == "response.function_call_arguments.delta" and e.output_index == index
            )
            assert joined == final.output[index].arguments

        outputs: Any = [
            {"type": "function_call_output", "call_id": o.call_id, "output": "ok"} for o in final.output[1:]
        ]
        last = client.responses.create(model="fake", previous_response_id=final.id, input=outputs, tools=tools)
        assert last.output_text == "Both done."
        prompt = engine.tokenizer.decode(list(engine.requests[-1].prompt_token_ids))
        assert prompt.count("<tool_call>") == 2 + 1  # both calls in one assistant turn, and the template's hint


def test_tool_choice(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="fake", input="hi", tools=[WEATHER], tool_choice={"type": "file_search"})  # type: ignore[arg-type]
    assert err.value.param == "tool_choice"
    plain = client.responses.create(model="fake", input="Weather in Paris?", tools=[WEATHER], tool_choice="none")
    assert [item.type for item in plain.output] == ["message"] and plain.tool_choice == "none"
    assert plain.output_text.startswith("<tool_call>")  # no tools offered: the model's text stays text


# ---- LangChain --------------------------------------------------------------------------------------------------


def test_langchain_responses_api_invoke_stream_and_tools(http: TestClient[Litestar], api_key: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="fake",
        base_url=BASE_URL,
        api_key=api_key,  # type: ignore[arg-type]
        http_client=http,
        max_retries=0,
        use_responses_api=True,
    )
    with_tools = llm.bind_tools([WEATHER])
    asked = with_tools.invoke("Weather in Paris?")
    assert asked.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": asked.tool_calls[0]["id"], "type": "tool_call"}
    ]
    conversation = [
        HumanMessage("Weather in Paris?"),
        asked,
        ToolMessage("cloudy", tool_call_id=asked.tool_calls[0]["id"]),
    ]
    answered = with_tools.invoke(conversation)
    assert answered.text == "In Paris: cloudy."
    assert answered.usage_metadata is not None and answered.usage_metadata["output_tokens"] == 5

    chunks = list(with_tools.stream(conversation))
    assert "".join(c.text for c in chunks) == "In Paris: cloudy."
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] == 5
    streamed_call = None
    for chunk in with_tools.stream("Weather in Paris?"):
        streamed_call = chunk if streamed_call is None else streamed_call + chunk
    assert streamed_call is not None and streamed_call.tool_calls[0]["args"] == {"city": "Paris"}  # type: ignore[attr-defined]

    # use_previous_response_id: LangChain sends only the messages after its last response, the server the rest.
    chained = ChatOpenAI(
        model="fake",
        base_url=BASE_URL,
        api_key=api_key,  # type: ignore[arg-type]
        http_client=http,
        max_retries=0,
        use_responses_api=True,
        use_previous_response_id=True,
    ).bind_tools([WEATHER])
    sent: list[dict[str, Any]] = []
    http.event_hooks["request"] = [lambda request: sent.append(json.loads(request.content))]
    first = chained.invoke("Weather in Paris?")
    result = ToolMessage("hail", tool_call_id=first.tool_calls[0]["id"])
    assert chained.invoke([HumanMessage("Weather in Paris?"), first, result]).text == "In Paris: hail."
    assert sent[-1]["previous_response_id"] == first.response_metadata["id"]
    assert [item["type"] for item in sent[-1]["input"]] == ["function_call_output"]


# ---- the OpenAI Agents SDK --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_agents_sdk_runs_a_tool_through_the_server(app: Litestar, api_key: str) -> None:
    import agents
    from agents import Agent, ModelSettings, Runner, function_tool
    from agents.models.openai_responses import OpenAIResponsesModel

    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        seen.append(city)
        return f"foggy in {city}"

    async with AsyncTestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {api_key}"
        model = OpenAIResponsesModel(
            model="fake",
            openai_client=openai.AsyncOpenAI(base_url=BASE_URL, api_key=api_key, http_client=http, max_retries=0),
        )
        agent = Agent(name="forecaster", instructions="Use the tool.", model=model, tools=[get_weather])
        result = await Runner.run(agent, "Weather in Paris?")
        assert seen == ["Paris"]
        assert result.final_output == "In Paris: foggy in Paris."
        kinds = [item.type for item in result.new_items]
        assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
        assert len(result.raw_responses) == 2
        assert all(r.response_id is not None and r.response_id.startswith("resp_") for r in result.raw_responses)

        # Streamed, with settings agents set, continuing on the server through previous_response_id.
        settings = ModelSettings(temperature=0.2, max_tokens=64, parallel_tool_calls=False, store=True)
        tuned = agent.clone(model_settings=settings)
        streamed = Runner.run_streamed(tuned, "Weather in Paris?", previous_response_id=result.last_response_id)
        deltas = [
            event.data.delta
            async for event in streamed.stream_events()
            if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"
        ]
        assert "".join(deltas) == streamed.final_output == "In Paris: foggy in Paris."
        # The earlier turn's tool result is in the prompt (the server rebuilt the conversation): no new call.
        assert seen == ["Paris"] and [item.type for item in streamed.new_items] == ["message_output_item"]
        assert streamed.last_response_id is not None and streamed.last_response_id != result.last_response_id

        fresh = Runner.run_streamed(tuned, "Weather in Paris?")
        types = [event.data.type async for event in fresh.stream_events() if event.type == "raw_response_event"]
        assert "response.function_call_arguments.delta" in types and types.count("response.completed") == 2
        assert fresh.final_output == "In Paris: foggy in Paris." and seen == ["Paris", "Paris"]


# ---- a remote model ---------------------------------------------------------------------------------------------


def remote_tool_call(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    """The upstream calls ``get_weather`` until a tool result is in the conversation, then answers in text."""
    if body["messages"][-1]["role"] == "tool":
        if body.get("stream"):
            return sse(*CHAT_STREAM)
        return httpx.Response(200, json=chat_json())
    call = {"id": "call_up1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    chunks = [
        chat_chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}, "tool_calls"),
        usage_chunk(),
    ]
    if body.get("stream"):
        return sse(*chunks)
    message = {**call, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    return httpx.Response(200, json=chat_json(None, "tool_calls", tool_calls=[message]))


def test_a_remote_model_runs_turns_as_chat_upstream(settings: Settings, api_key: str) -> None:
    mock = MockUpstream(remote_tool_call)
    with serving(settings, mock, api_key) as (http, _):
        client = sdk(http, api_key)
        first = client.responses.create(model="remote", input="Weather?", instructions="Be brief.", tools=[WEATHER])
        call = first.output[0]
        assert call.type == "function_call" and call.call_id == "call_up1" and call.arguments == '{"city": "Paris"}'
        assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (11, 2)
        sent = mock.posts[-1].body
        assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
        assert sent["tools"][0]["function"]["name"] == "get_weather" and not sent.get("stream")

        events = list(
            client.responses.create(
                model="remote",
                previous_response_id=first.id,
                input=[{"type": "function_call_output", "call_id": "call_up1", "output": "warm"}],
                tools=[WEATHER],
                stream=True,
            )
        )
        sent = mock.posts[-1].body
        assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]  # no earlier instructions
        assert sent["messages"][1]["tool_calls"][0]["id"] == "call_up1" and sent["messages"][2]["content"] == "warm"
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo", "!"]
        final = events[-1].response  # type: ignore[union-attr]
        assert events[-1].type == "response.completed" and final.output_text == "Hello!"
        assert final.usage is not None and final.usage.total_tokens == 13
        assert client.responses.retrieve(final.id).output_text == "Hello!"

        streamed_call = list(client.responses.create(model="remote", input="Weather?", tools=[WEATHER], stream=True))
        deltas = [e.delta for e in streamed_call if e.type == "response.function_call_arguments.delta"]
        assert deltas == ['{"city": ', '"Paris"}']
        done = streamed_call[-1].response  # type: ignore[union-attr]
        assert done.output[0].call_id == "call_up1" and done.output[0].arguments == '{"city": "Paris"}'
