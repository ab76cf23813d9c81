"""A fake OpenAI-compatible upstream in process (``httpx.MockTransport``) and an app that forwards to it.

Shared by the tests of remote (``backend = "openai"``) models: ``MockUpstream`` records every POST it answers,
``build``/``serving`` give an app serving ``remote`` (the mock) and ``local`` (a FakeEngine), and the canned answers
imitate vLLM-like upstreams.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.base import Engine
from server.engine.fake import FakeEngine
from server.models.file import RemoteModel
from server.providers.upstream import Upstream
from server.settings import Settings
from server.wiring.models import ServedModels
from tests.conftest import add_role_key

UPSTREAM_KEY = "sk-upstream-SECRET-7f3a9c1e5b2d4680"
TARGET = "org/big-model"
MSGS = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}

Reply = Callable[[httpx.Request, dict[str, Any]], "httpx.Response | Awaitable[httpx.Response]"]


# ---- the mock upstream ------------------------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    body: dict[str, Any]
    headers: httpx.Headers


@dataclass
class MockUpstream:
    """An OpenAI-compatible upstream: ``reply`` answers each POST; ``GET /models`` lists ``models``.

    ``models`` ``None`` makes the listing fail with a connection error; ``windows`` adds a ``max_model_len`` to a
    model's listing entry, as vLLM does. With ``honor_timeouts`` the mock acts as a real transport would: a reply
    slower than the request's read timeout raises ``httpx.ReadTimeout``.
    """

    reply: Reply
    models: list[str] | None = field(default_factory=lambda: [TARGET])
    windows: dict[str, int] = field(default_factory=dict)
    honor_timeouts: bool = False
    posts: list[Seen] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.auth_headers.append(request.headers.get("authorization"))
        if request.method == "GET":
            assert request.url.path == "/v1/models"
            if self.models is None:
                raise httpx.ConnectError("connection refused")
            listed = [{"id": m, "object": "model"} | self._window(m) for m in self.models]
            return httpx.Response(200, json={"object": "list", "data": listed})
        body = json.loads(request.content)
        self.posts.append(Seen(request.url.path, body, request.headers))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            result = self.reply(request, body)
            if inspect.isawaitable(result):
                if self.honor_timeouts:
                    limit = request.extensions["timeout"]["read"]
                    try:
                        result = await asyncio.wait_for(result, limit)
                    except TimeoutError:
                        raise httpx.ReadTimeout("timed out", request=request) from None
                else:
                    result = await result
            return result
        finally:
            self.in_flight -= 1

    def _window(self, model: str) -> dict[str, int]:
        return {"max_model_len": self.windows[model]} if model in self.windows else {}

    @property
    def calls(self) -> int:
        return len(self.posts)


def remote_entry(**overrides: Any) -> RemoteModel:
    values: dict[str, Any] = {
        "name": "remote",
        "base_url": "http://upstream.test:8000/v1",
        "upstream_model": TARGET,
        "api_key_env": "UPSTREAM_KEY",
        "timeout_s": 5.0,
        "retries": 2,
        "health_interval_s": 3600.0,
    }
    return RemoteModel(**(values | overrides))


def build(
    settings: Settings, mock: MockUpstream, local: Engine | None = None, **entry: Any
) -> tuple[Litestar, Upstream]:
    """An app serving ``remote`` (the mock upstream) first and ``local`` (a FakeEngine unless given) second."""
    up = Upstream(remote_entry(**entry), UPSTREAM_KEY, transport=httpx.MockTransport(mock.handle))
    served = ServedModels()
    served.add("remote", up)
    served.add("local", local if local is not None else FakeEngine(["Loc", "al"], served_model_name="local"))
    return create_app(settings, models=served), up


@contextmanager
def serving(
    settings: Settings, mock: MockUpstream, key: str, local: Engine | None = None, **entry: Any
) -> Iterator[tuple[TestClient[Litestar], Upstream]]:
    app, up = build(settings, mock, local, **entry)
    with TestClient(app) as http:
        http.headers["Authorization"] = f"Bearer {key}"
        yield http, up


def sdk(http: Any, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key=key, http_client=http, max_retries=0)


def role_key(settings: Settings, role: str, **limits: Any) -> str:
    return asyncio.run(add_role_key(settings, role, **limits))


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


def frames(raw: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON frames of an SSE body and whether it ended with ``[DONE]``; asserts the exact framing."""
    assert raw.endswith("\n\n"), raw[-200:]
    parts = raw[: -len("\n\n")].split("\n\n")
    assert all(p.startswith("data: ") and "\n" not in p for p in parts), parts
    done = parts[-1] == "data: [DONE]"
    assert "data: [DONE]" not in parts[:-1]
    return [json.loads(p[len("data: ") :]) for p in (parts[:-1] if done else parts)], done


def assert_error(r: httpx.Response, status: int, type_: str, code: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code), error
    assert r.headers["x-request-id"]
    return dict(error)


def usage_of(http: TestClient[Litestar], admin_key: str, key_name: str) -> dict[str, int]:
    admin = {"Authorization": f"Bearer {admin_key}"}
    keys = http.get("/admin/keys", headers=admin).json()["data"]
    key_id = next(k["id"] for k in keys if k["name"] == key_name)
    rows = http.get("/admin/usage", params={"key": key_id}, headers=admin).json()["data"]
    return {"tokens": rows[0]["tokens"], "requests": rows[0]["requests"]} if rows else {"tokens": 0, "requests": 0}
