"""Canned replies of the fake upstream (``tests.fakes.upstream.MockUpstream``): well-behaved answers as vLLM-like
servers send them, and the faults (errors, refused connections, slow or broken bodies) the gateway must survive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx

from tests.fakes.upstream import TARGET, USAGE, Reply

# ---- canned upstream answers -----------------------------------------------------------------------------


def sse_bytes(*chunks: dict[str, Any] | str, done: bool = True) -> bytes:
    out = b"".join(b"data: " + (c if isinstance(c, str) else json.dumps(c)).encode() + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def sse(*chunks: dict[str, Any] | str, done: bool = True) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse_bytes(*chunks, done=done))


def chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "upstream-id-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": TARGET,
        "choices": [choice],
        **extra,
    }


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "upstream-cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": TARGET,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def usage_chunk(obj: str = "chat.completion.chunk") -> dict[str, Any]:
    return {"id": "upstream-id-1", "object": obj, "created": 1, "model": TARGET, "choices": [], "usage": USAGE}


# An upstream chat stream as vLLM-like servers send it, minus the role chunk, with an empty content chunk, the
# last piece of text in the finish chunk, and usage in a final ``choices: []`` chunk.
CHAT_STREAM = [
    chat_chunk({"content": "Hel"}),
    chat_chunk({"content": ""}),
    chat_chunk({"content": "lo"}),
    chat_chunk({"content": "!"}, "stop"),
    usage_chunk(),
]

TEXT_STREAM = [
    text_chunk("Hel"),
    text_chunk(""),
    text_chunk("lo"),
    text_chunk("!", "length"),
    usage_chunk("text_completion"),
]


def chat_json(
    content: str | None = "Hello!", finish: str = "stop", usage: bool = True, **message: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "upstream-id-1",
        "object": "chat.completion",
        "created": 1,
        "model": TARGET,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
    }
    if usage:
        body["usage"] = USAGE
    return body


def text_json(text: str = "Hello!", finish: str = "length", usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "upstream-cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": TARGET,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = USAGE
    return body


def answers(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    """A well-behaved upstream: JSON or SSE by ``stream``, chat or text by path."""
    chat = request.url.path.endswith("/chat/completions")
    if body.get("stream"):
        return sse(*(CHAT_STREAM if chat else TEXT_STREAM))
    return httpx.Response(200, json=chat_json() if chat else text_json())


# ---- faults ----------------------------------------------------------------------------------------------


def openai_error(status: int, message: str, type_: str, param: str | None, code: str | None, **headers: str) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return lambda request, _: httpx.Response(status, json=body, headers=headers)


def sequence(*replies: Reply) -> Reply:
    """The n-th POST gets the n-th reply (the last one repeats)."""
    count = 0

    def reply(request: httpx.Request, body: dict[str, Any]) -> httpx.Response | Awaitable[httpx.Response]:
        nonlocal count
        count += 1
        return replies[min(count, len(replies)) - 1](request, body)

    return reply


def status_only(status: int) -> Reply:
    return lambda request, _: httpx.Response(status, text=f"upstream says {status}")


def refuse_connection(request: httpx.Request, _: dict[str, Any]) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


async def too_slow(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    await asyncio.sleep(2.0)
    return answers(request, body)


async def breaking_body(*chunks: dict[str, Any], exc: Exception) -> AsyncIterator[bytes]:
    yield sse_bytes(*chunks, done=False)
    await asyncio.sleep(0)
    raise exc


async def slow_answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    await asyncio.sleep(0.4)
    return answers(request, body)


async def slow_headers(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    if not body.get("stream"):
        return answers(request, body)
    await asyncio.sleep(0.6)  # the client leaves while the gateway waits for the upstream's headers
    return sse(chat_chunk({"content": "late"}), chat_chunk({}, "stop"))


async def very_slow_answer(request: httpx.Request, body: dict[str, Any]) -> httpx.Response:
    await asyncio.sleep(5)
    return answers(request, body)
