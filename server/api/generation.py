"""What the generation routes share: run a request's work through the exchange and wrap its reply for HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from server.api.common import json_response, sse_response
from server.api.context import context_of
from server.exchange.exchange import Disconnected, Exchange, Reply
from server.exchange.work import Work
from server.sse import sse_frames

Framing = Callable[[AsyncIterator[msgspec.Struct]], AsyncIterator[bytes]]


async def respond(request: Request[Any, Any, Any], exchange: Exchange, work: Work) -> Response[Any] | Stream:
    """Run ``work`` for the request's caller: a JSON response, or an SSE stream that settles when it ends."""
    context = context_of(request.scope)
    reply = await exchange.run(work, context.caller(), context.record, disconnected_of(request))
    return http_reply(reply)


def disconnected_of(request: Request[Any, Any, Any]) -> Disconnected:
    """An awaitable factory that returns once the request's client has gone."""

    async def disconnected() -> None:
        """Return once the client has gone (the body has been read: the next ASGI message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return disconnected


def http_reply(reply: Reply, framing: Framing = sse_frames) -> Response[Any] | Stream:
    """``reply`` as a JSON response, or as an SSE stream framed by ``framing``."""
    if reply.events is not None:
        return sse_response(reply.events, reply.headers, after=reply.after, framing=framing)
    assert reply.body is not None
    return json_response(reply.body, reply.headers)
