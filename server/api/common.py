"""Helpers the controllers share: JSON responses, SSE responses, body decoding."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from server.api.exceptions import from_msgspec
from server.sse import HEADERS, sse_frames

_encoder = msgspec.json.Encoder()
BODY_TYPE = "body_type"


def json_response(obj: msgspec.Struct, headers: dict[str, str] | None = None) -> Response[bytes]:
    """A 200 with ``obj`` encoded by msgspec."""
    return Response(content=_encoder.encode(obj), media_type="application/json", headers=headers)


def sse_response(events: AsyncIterator[msgspec.Struct], headers: dict[str, str] | None = None) -> Stream:
    """A ``text/event-stream`` response of ``data:`` frames."""
    return Stream(sse_frames(events), media_type="text/event-stream", headers={**HEADERS, **(headers or {})})


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
