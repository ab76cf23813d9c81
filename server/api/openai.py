"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from schemas.openai.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from schemas.openai.completions import Completion, CompletionRequest
from server.api.apidoc import WITH_BODY, JsonOrStreamOperation, errors, stream_of
from server.api.common import BODY_TYPE
from server.api.gate import gate, prepared
from server.api.generation import respond
from server.exchange.exchange import Exchange
from server.exchange.remote import RemoteWork
from server.providers.upstream import Upstream
from server.serving import chat, completions, remote
from server.wiring.models import ServedModels
from server.wiring.services import Services


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
    models: NamedDependency[ServedModels],
    services: NamedDependency[Services],
    exchange: NamedDependency[Exchange],
) -> Response[ChatCompletion]:
    body = data
    requested, param = body.requested_max_tokens
    name, backend = models.resolve(body.model)
    cap = await gate(request, services, name, requested=requested, param=param, n=body.n or 1)
    max_messages = services.settings.max_messages
    if isinstance(backend, Upstream):
        entry = backend.entry
        call = await prepared(
            request, services, lambda: remote.prepare_chat(body, entry, max_tokens_cap=cap, max_messages=max_messages)
        )
        return await respond(request, exchange, RemoteWork(call, backend))  # type: ignore[return-value]
    engine = models.ready_engine(backend)
    plan = await prepared(
        request, services, lambda: chat.prepare(engine, body, max_tokens_cap=cap, max_messages=max_messages)
    )
    return await respond(request, exchange, plan)  # type: ignore[return-value]


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
    models: NamedDependency[ServedModels],
    services: NamedDependency[Services],
    exchange: NamedDependency[Exchange],
) -> Response[Completion]:
    body = data
    name, backend = models.resolve(body.model)
    prompts = completions.prompt_count(body.prompt)
    cap = await gate(
        request, services, name, requested=body.max_tokens, param="max_tokens", n=body.n or 1, prompts=prompts
    )
    if isinstance(backend, Upstream):
        entry = backend.entry
        call = await prepared(request, services, lambda: remote.prepare_completion(body, entry, max_tokens_cap=cap))
        return await respond(request, exchange, RemoteWork(call, backend))  # type: ignore[return-value]
    engine = models.ready_engine(backend)
    plan = await prepared(request, services, lambda: completions.prepare(engine, body, max_tokens_cap=cap))
    return await respond(request, exchange, plan)  # type: ignore[return-value]
