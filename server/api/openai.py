"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.params import JSONBody

from schemas.openai.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from schemas.openai.completions import Completion, CompletionRequest
from server.api.apidoc import WITH_BODY, JsonOrStreamOperation, errors, stream_of
from server.api.common import BODY_TYPE
from server.api.gate import gate, prepared
from server.api.generation import respond
from server.exchange.remote import RemoteWork
from server.providers.upstream import Upstream
from server.serving import chat, completions, remote
from server.wiring.state import app_state


@post(
    "/v1/chat/completions",
    status_code=200,
    opt={BODY_TYPE: ChatCompletionRequest},
    summary="Create a chat completion",
    response_description="A chat.completion object, or a text/event-stream of chat.completion.chunk objects",
    tags=["openai"],
    responses={**errors(*WITH_BODY, 404), **stream_of(ChatCompletionChunk)},
    operation_class=JsonOrStreamOperation,
)
async def create_chat_completion(
    request: Request[Any, Any, Any],
    data: JSONBody[ChatCompletionRequest],
) -> Response[ChatCompletion]:
    state, body = app_state(request.app), data
    requested, param = body.requested_max_tokens
    name, backend = state.models.resolve(body.model)
    cap = await gate(request, name, requested=requested, param=param, n=body.n or 1)
    max_messages = state.settings.max_messages
    if isinstance(backend, Upstream):
        entry = backend.entry
        call = await prepared(
            request, lambda: remote.prepare_chat(body, entry, max_tokens_cap=cap, max_messages=max_messages)
        )
        return await respond(request, state.exchange, RemoteWork(call, backend))  # type: ignore[return-value]
    engine = state.models.ready_engine(backend)
    reasoning, tool_parser = state.settings.reasoning_parser, state.settings.tool_call_parser
    plan = await prepared(
        request,
        lambda: chat.prepare(
            engine,
            body,
            max_tokens_cap=cap,
            max_messages=max_messages,
            reasoning_parser=reasoning,
            tool_parser=tool_parser,
        ),
    )
    return await respond(request, state.exchange, plan)  # type: ignore[return-value]


@post(
    "/v1/completions",
    status_code=200,
    opt={BODY_TYPE: CompletionRequest},
    summary="Create a text completion",
    response_description="A text_completion object, or a text/event-stream of them",
    tags=["openai"],
    responses={**errors(*WITH_BODY, 404), **stream_of(Completion)},
    operation_class=JsonOrStreamOperation,
)
async def create_completion(
    request: Request[Any, Any, Any],
    data: JSONBody[CompletionRequest],
) -> Response[Completion]:
    state, body = app_state(request.app), data
    name, backend = state.models.resolve(body.model)
    prompts = completions.prompt_count(body.prompt)
    cap = await gate(request, name, requested=body.max_tokens, param="max_tokens", n=body.n or 1, prompts=prompts)
    if isinstance(backend, Upstream):
        entry = backend.entry
        call = await prepared(request, lambda: remote.prepare_completion(body, entry, max_tokens_cap=cap))
        return await respond(request, state.exchange, RemoteWork(call, backend))  # type: ignore[return-value]
    engine = state.models.ready_engine(backend)
    plan = await prepared(request, lambda: completions.prepare(engine, body, max_tokens_cap=cap))
    return await respond(request, state.exchange, plan)  # type: ignore[return-value]
