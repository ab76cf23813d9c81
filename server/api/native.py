"""Native ``/v1/generate`` and ``/v1/stream``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from schemas.native.generate import GenerateRequest, GenerateResponse
from server.api.common import BODY_TYPE, json_response, sse_response
from server.engine.base import Engine
from server.serving import generate


@post("/v1/generate", status_code=200, opt={BODY_TYPE: GenerateRequest}, tags=["native"])
async def generate_text(
    request: Request[Any, Any, Any], data: JSONBody[GenerateRequest], engine: NamedDependency[Engine]
) -> Response[GenerateResponse]:
    """Generate text for one prompt."""
    prep = generate.prepare(engine, request.state.body)
    return json_response(await generate.complete(prep))  # type: ignore[return-value]


@post("/v1/stream", status_code=200, opt={BODY_TYPE: GenerateRequest}, tags=["native"])
async def stream_text(
    request: Request[Any, Any, Any], data: JSONBody[GenerateRequest], engine: NamedDependency[Engine]
) -> Stream:
    """Stream the text for one prompt as Server-Sent Events; the last event has ``finish_reason`` and ``usage``."""
    prep = generate.prepare(engine, request.state.body)
    return sse_response(generate.stream(prep))
