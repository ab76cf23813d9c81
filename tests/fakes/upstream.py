"""A fake OpenAI-compatible upstream in process (``httpx.MockTransport``) and an app that forwards to it.

Shared by the tests of remote (``backend = "openai"``) models: ``MockUpstream`` records every POST it answers and
answers it with a ``Reply`` (canned ones are in ``tests.fakes.replies``); ``build``/``serving`` give an app serving
``remote`` (the mock) and ``local`` (a FakeEngine).
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
from litestar import Litestar
from litestar.testing import TestClient

from server.app import create_app
from server.engine.base import Engine
from server.engine.fake import FakeEngine
from server.models.file import RemoteModel
from server.providers.upstream import Upstream
from server.settings import Settings
from server.wiring.models import ServedModels

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
