"""OpenAI's Responses API: ``/v1/responses`` (create, retrieve, delete, input items, cancel), stored per key."""

from __future__ import annotations

from typing import Any, Literal

from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, FromQuery, JSONBody

from schemas.openai.responses import DeletedResponse, InputItemList, ResponseEvent, ResponsesRequest
from schemas.openai.responses import Response as ResponseObject
from server.api.apidoc import KEYED, WITH_BODY, ApiOperation, JsonOrStreamOperation, errors, stream_of
from server.api.common import BODY_TYPE, json_response
from server.api.context import context_of
from server.api.gate import gate, prepared
from server.api.generation import disconnected_of, http_reply
from server.auth.principal import Principal
from server.engine.base import Embedder, Engine
from server.errors import OpenAIError, unsupported_param
from server.exchange.remote import RemoteWork
from server.exchange.responses import History
from server.exchange.work import Work
from server.models.file import RemoteModel
from server.providers.upstream import Upstream
from server.serving import chat, remote
from server.serving.remote import RemoteCall
from server.serving.responses.pages import page
from server.serving.responses.translate import renamed
from server.serving.responses.turn import Turn, begin_turn, new_response_id
from server.sse import named_frames
from server.wiring.state import AppState, app_state


@post(
    "/v1/responses",
    status_code=200,
    opt={BODY_TYPE: ResponsesRequest},
    summary="Create a model response",
    response_description="A response object, or a text/event-stream of response events",
    tags=["openai"],
    responses={**errors(*WITH_BODY, 404), **stream_of(ResponseEvent)},  # type: ignore[arg-type]
    operation_class=JsonOrStreamOperation,
)
async def create_response(request: Request[Any, Any, Any], data: JSONBody[ResponsesRequest]) -> Response[Any]:
    state, body = app_state(request.app), data
    name, backend = state.models.resolve(body.model)
    cap = await gate(request, name, requested=body.max_output_tokens, param="max_output_tokens")
    context = context_of(request.scope)
    caller = context.caller()
    history = await state.responses.history(caller, body.previous_response_id)
    engine = None if isinstance(backend, Upstream) else state.models.ready_engine(backend)
    turn, work = await prepared(
        request, lambda: _prepare(state, body, name, backend, engine, history, cap), extra_bytes=history.size
    )
    if body.background:
        response, headers = await state.responses.start_background(turn, work, caller, context.record)
        return json_response(response, headers)
    reply = await state.responses.run(turn, work, caller, context.record, disconnected_of(request))
    return http_reply(reply, named_frames)


def _prepare(
    state: AppState,
    body: ResponsesRequest,
    name: str,
    backend: Engine | Embedder | Upstream,
    engine: Engine | None,
    history: History,
    cap: int | None,
) -> tuple[Turn, Work]:
    """The turn and the chat work that runs it (chat's 400s named in the Responses request's terms), the earlier
    turn decoded first."""
    settings = state.settings
    try:
        turn = begin_turn(body, name, history.items(), new_response_id())
        if isinstance(backend, Upstream):
            entry, limit = backend.entry, settings.max_messages
            forward = remote.prepare_responses if entry.responses_api else _translated
            return turn, RemoteWork(forward(turn, entry, max_tokens_cap=cap, max_messages=limit), backend)
        assert engine is not None
        plan = chat.prepare(
            engine,
            turn.chat,
            max_tokens_cap=cap,
            max_messages=settings.max_messages,
            reasoning_parser=settings.reasoning_parser,
            tool_parser=settings.tool_call_parser,
        )
        return turn, plan
    except OpenAIError as exc:
        raise renamed(exc) from None


def _translated(turn: Turn, entry: RemoteModel, *, max_tokens_cap: int | None, max_messages: int) -> RemoteCall:
    """A turn for an upstream without ``/v1/responses``: sent as the chat completion it amounts to."""
    return remote.prepare_chat(turn.chat, entry, max_tokens_cap=max_tokens_cap, max_messages=max_messages)


@get(
    "/v1/responses/{response_id:str}",
    summary="Retrieve a stored response",
    tags=["openai"],
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
async def retrieve_response(
    request: Request[Any, Any, Any], response_id: FromPath[str], stream: FromQuery[bool] = False
) -> Response[ResponseObject]:
    if stream:
        raise unsupported_param("stream", "Streaming a stored response again")
    _refuse_include(request)
    state = app_state(request.app)
    raw = await state.responses.get(await _counted(request), response_id)
    return Response(content=raw, media_type="application/json")  # type: ignore[arg-type]


@delete(
    "/v1/responses/{response_id:str}",
    status_code=200,
    summary="Delete a stored response",
    tags=["openai"],
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
async def delete_response(request: Request[Any, Any, Any], response_id: FromPath[str]) -> DeletedResponse:
    await app_state(request.app).responses.delete(await _counted(request), response_id)
    return DeletedResponse(id=response_id)


@get(
    "/v1/responses/{response_id:str}/input_items",
    summary="List a stored response's input items",
    tags=["openai"],
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
async def list_input_items(
    request: Request[Any, Any, Any],
    response_id: FromPath[str],
    limit: FromQuery[int] = 20,
    order: FromQuery[Literal["asc", "desc"]] = "desc",
    after: FromQuery[str | None] = None,
    before: FromQuery[str | None] = None,
    include: FromQuery[list[str] | None] = None,
) -> InputItemList:
    _refuse_include(request)
    items = await app_state(request.app).responses.input_items(await _counted(request), response_id)
    return page(items, limit=limit, order=order, after=after, before=before)


async def _counted(request: Request[Any, Any, Any]) -> Principal:
    """The caller, with this request counted in its requests-per-minute window (429 when full)."""
    caller = context_of(request.scope).caller()
    await app_state(request.app).services.gateway.count_request(caller)
    return caller


def _refuse_include(request: Request[Any, Any, Any]) -> None:
    """400 for ``include``, as ``include=`` or as the official SDK spells a list in a query (``include[]=``)."""
    if any(request.query_params.getall(name, []) for name in ("include", "include[]")):
        raise unsupported_param("include")


@post(
    "/v1/responses/{response_id:str}/cancel",
    status_code=200,
    summary="Cancel a background response",
    tags=["openai"],
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
async def cancel_response(request: Request[Any, Any, Any], response_id: FromPath[str]) -> Response[ResponseObject]:
    raw = await app_state(request.app).responses.cancel(await _counted(request), response_id)
    return Response(content=raw, media_type="application/json")  # type: ignore[arg-type]


RESPONSES_HANDLERS = [create_response, retrieve_response, delete_response, list_input_items, cancel_response]
