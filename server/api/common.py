"""Helpers the controllers share: JSON responses, SSE responses, reading and decoding bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.background_tasks import BackgroundTask
from litestar.enums import ScopeType
from litestar.response import Stream
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send

from server.api.exceptions import from_msgspec
from server.errors import OpenAIError
from server.sse import HEADERS, sse_frames

_encoder = msgspec.json.Encoder()
BODY_TYPE = "body_type"


def json_response(obj: msgspec.Struct, headers: dict[str, str] | None = None) -> Response[bytes]:
    """A 200 with ``obj`` encoded by msgspec."""
    return Response(content=_encoder.encode(obj), media_type="application/json", headers=headers)


def sse_response(
    events: AsyncIterator[msgspec.Struct],
    headers: dict[str, str] | None = None,
    after: Callable[[], Awaitable[None]] | None = None,
) -> Stream:
    """A ``text/event-stream`` response of ``data:`` frames; ``after`` runs once the response has ended."""
    return Stream(
        sse_frames(events),
        media_type="text/event-stream",
        headers={**HEADERS, **(headers or {})},
        background=BackgroundTask(after) if after is not None else None,
    )


async def strict_body(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: decode the body strictly (OpenAI rejects ``"stream": 0``; Litestar would not).

    The decoded value is kept in ``request.state.body`` for the handler.
    """
    body_type = request.route_handler.opt.get(BODY_TYPE)
    if body_type is None:
        return
    raw = await request.body()
    try:
        request.state.body = msgspec.json.decode(raw, type=body_type, strict=True)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_msgspec(exc) from None


def read_timeout_middleware(timeout_s: float) -> Any:
    """Litestar middleware factory: 408 when the request body stalls for ``timeout_s`` (a stuck or slow client).

    Only reads of the body are timed (each ``receive`` until the last body chunk, before the response starts);
    the wait of a stream for the client's disconnect is not. The 408 closes the connection, since the rest of
    the body may still be on its way.
    """

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            reading = True

            async def timed_receive() -> ReceiveMessage:
                nonlocal reading
                if not reading:
                    return await receive()
                try:
                    async with asyncio.timeout(timeout_s):
                        message = await receive()
                except TimeoutError:
                    reading = False
                    raise OpenAIError(
                        408,
                        "invalid_request_error",
                        f"The request body stalled: nothing arrived for {timeout_s:g} s.",
                        code="request_timeout",
                        headers={"connection": "close"},
                    ) from None
                if message["type"] != "http.request" or not message.get("more_body", False):
                    reading = False
                return message

            async def watched_send(message: Message) -> None:
                nonlocal reading
                if message["type"] == "http.response.start":
                    reading = False
                await send(message)

            await app(scope, timed_receive, watched_send)

        return middleware

    return factory
