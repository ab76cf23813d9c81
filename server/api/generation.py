"""What the generation routes share: run a request's work through the exchange and wrap its reply for HTTP."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.response import Stream

from server.api.common import json_response, sse_response
from server.api.context import context_of
from server.exchange.exchange import Exchange
from server.exchange.work import Work


async def respond(request: Request[Any, Any, Any], exchange: Exchange, work: Work) -> Response[Any] | Stream:
    """Run ``work`` for the request's caller: a JSON response, or an SSE stream that settles when it ends."""
    context = context_of(request.scope)

    async def disconnected() -> None:
        """Return once the client has gone (the body has been read: the next ASGI message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    reply = await exchange.run(work, context.caller(), context.record, disconnected)
    if reply.events is not None:
        return sse_response(reply.events, reply.headers, after=reply.after)
    assert reply.body is not None
    return json_response(reply.body, reply.headers)
