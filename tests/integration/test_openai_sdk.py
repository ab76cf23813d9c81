"""The official openai SDK and LangChain against the in-process app (fake engine)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient, TestClient

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def app(make_app: Callable[..., Litestar]) -> Litestar:
    return make_app(script=["Hel", "lo", ",", " wor", "ld", "!"])


@pytest.fixture
def sync_client(app: Litestar, authed: Callable[[Any], Any], api_key: str) -> Iterator[openai.OpenAI]:
    with authed(TestClient(app)) as http:
        yield openai.OpenAI(base_url="http://testserver.local/v1", api_key=api_key, http_client=http, max_retries=0)


def test_sync_non_stream(sync_client: openai.OpenAI) -> None:
    out = sync_client.chat.completions.create(model="fake", messages=MESSAGES)  # type: ignore[arg-type]
    assert out.choices[0].message.content == "Hello, world!"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.completion_tokens == 7
    comp = sync_client.completions.create(model="fake", prompt="ab", max_tokens=3)
    assert comp.choices[0].text == "Hello,"
    assert comp.choices[0].finish_reason == "length"


def test_sync_stream_with_usage(sync_client: openai.OpenAI) -> None:
    stream = sync_client.chat.completions.create(
        model="fake",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 7
    assert [c.choices[0].finish_reason for c in chunks if c.choices].count("stop") == 1


def test_sync_errors_map_to_sdk_exceptions(sync_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        sync_client.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        sync_client.chat.completions.create(model="fake", messages=MESSAGES, top_logprobs=3)  # type: ignore[arg-type]
    assert br.value.param == "top_logprobs"
    assert br.value.response.headers["x-request-id"]
    assert sync_client.models.list().data[0].id == "fake"
    assert sync_client.models.retrieve("fake").id == "fake"


@pytest.mark.anyio
async def test_async_stream_and_non_stream(app: Litestar, authed: Callable[[Any], Any], api_key: str) -> None:
    async with authed(AsyncTestClient(app)) as http:
        client = openai.AsyncOpenAI(
            base_url="http://testserver.local/v1", api_key=api_key, http_client=http, max_retries=0
        )
        out = await client.chat.completions.create(model="fake", messages=MESSAGES, stop=[", w"])  # type: ignore[arg-type]
        assert out.choices[0].message.content == "Hello"
        stream = await client.chat.completions.create(model="fake", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        parts = [c.choices[0].delta.content or "" async for c in stream]
        assert "".join(parts) == "Hello, world!"
        comp_stream = await client.completions.create(model="fake", prompt=["a", "b"], stream=True, max_tokens=50)
        texts: dict[int, str] = {0: "", 1: ""}
        async for chunk in comp_stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.text
        assert texts == {0: "Hello, world!", 1: "Hello, world!"}


def test_langchain_invoke_and_stream(app: Litestar, authed: Callable[[Any], Any], api_key: str) -> None:
    from langchain_openai import ChatOpenAI

    with authed(TestClient(app)) as http:
        llm = ChatOpenAI(
            model="fake",
            base_url="http://testserver.local/v1",
            api_key=api_key,  # type: ignore[arg-type]
            http_client=http,
            max_retries=0,
            temperature=0,
            stream_usage=True,
            max_completion_tokens=64,  # type: ignore[call-arg]
        )
        msg = llm.invoke("hi")
        assert msg.content == "Hello, world!"
        chunks = list(llm.stream("hi"))
        assert "".join(str(c.content) for c in chunks) == "Hello, world!"
        usage = [c.usage_metadata for c in chunks if c.usage_metadata]
        assert usage and usage[-1]["output_tokens"] == 7
