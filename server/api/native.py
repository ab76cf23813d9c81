"""Native ``/v1/generate`` and ``/v1/stream``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.params import JSONBody
from litestar.response import Stream

from schemas.native.generate import GenerateRequest, GenerateResponse, StreamEvent
from server.api.apidoc import WITH_BODY, ApiOperation, StreamOperation, errors, stream_of
from server.api.common import BODY_TYPE
from server.api.gate import gate, prepared
from server.api.generation import respond
from server.exchange.remote import RemoteWork
from server.providers.upstream import Upstream
from server.serving import generate, remote
from server.wiring.state import app_state


async def _run(request: Request[Any, Any, Any], body: GenerateRequest, stream: bool) -> Any:
    state = app_state(request.app)
    name, backend = state.models.resolve(body.model)
    cap = await gate(request, name, requested=body.max_new_tokens, param="max_new_tokens")
    if isinstance(backend, Upstream):
        call = await prepared(
            request, lambda: remote.prepare_generate(body, backend.entry, stream=stream, max_tokens_cap=cap)
        )
        return await respond(request, state.exchange, RemoteWork(call, backend))
    engine = state.models.ready_engine(backend)
    plan = await prepared(request, lambda: generate.prepare(engine, body, stream=stream, max_tokens_cap=cap))
    return await respond(request, state.exchange, plan)


@post(
    "/v1/generate",
    status_code=200,
    opt={BODY_TYPE: GenerateRequest},
    tags=["native"],
    responses=errors(*WITH_BODY, 404),
    operation_class=ApiOperation,
)
async def generate_text(
    request: Request[Any, Any, Any],
    data: JSONBody[GenerateRequest],
) -> Response[GenerateResponse]:
    """Generate text for one prompt."""
    return await _run(request, data, stream=False)  # type: ignore[no-any-return]


@post(
    "/v1/stream",
    status_code=200,
    opt={BODY_TYPE: GenerateRequest},
    tags=["native"],
    responses={**errors(*WITH_BODY, 404), **stream_of(StreamEvent)},
    operation_class=StreamOperation,
)
async def stream_text(
    request: Request[Any, Any, Any],
    data: JSONBody[GenerateRequest],
) -> Stream:
    """Stream the text for one prompt as Server-Sent Events; the last event has ``finish_reason`` and ``usage``."""
    return await _run(request, data, stream=True)  # type: ignore[no-any-return]
