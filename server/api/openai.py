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
from server.api.flow import max_tokens_cap, respond
from server.api.remote import respond_remote
from server.providers.upstream import Upstream
from server.served import ServedModels
from server.services import Services
from server.serving import chat, completions, remote


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
) -> Response[ChatCompletion]:
    body: ChatCompletionRequest = request.state.body
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    cap = max_tokens_cap(request, services, requested, param)
    backend = models.lookup(body.model)
    if isinstance(backend, Upstream):
        call = remote.prepare_chat(body, backend.entry, max_tokens_cap=cap, max_messages=services.settings.max_messages)
        return await respond_remote(request, backend, services, call)  # type: ignore[return-value]
    engine = models.ready_engine(backend)
    plan = chat.prepare(engine, body, max_tokens_cap=cap, max_messages=services.settings.max_messages)
    return await respond(request, engine, services, plan, chat.complete, chat.stream)  # type: ignore[return-value]


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
) -> Response[Completion]:
    body: CompletionRequest = request.state.body
    cap = max_tokens_cap(request, services, body.max_tokens, "max_tokens")
    backend = models.lookup(body.model)
    if isinstance(backend, Upstream):
        call = remote.prepare_completion(body, backend.entry, max_tokens_cap=cap)
        return await respond_remote(request, backend, services, call)  # type: ignore[return-value]
    engine = models.ready_engine(backend)
    plan = completions.prepare(engine, body, max_tokens_cap=cap)
    return await respond(request, engine, services, plan, completions.complete, completions.stream)  # type: ignore[return-value]
