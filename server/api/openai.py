"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/completions``."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from schemas.openai.chat import ChatCompletion, ChatCompletionRequest
from schemas.openai.completions import Completion, CompletionRequest
from server.api.common import BODY_TYPE, json_response, sse_response
from server.engine.base import Engine
from server.serving import chat, completions

_DOC = {
    "responses": None,
}


@post(
    "/v1/chat/completions",
    status_code=200,
    opt={BODY_TYPE: ChatCompletionRequest},
    summary="Create a chat completion",
    response_description="A chat.completion object, or a text/event-stream of chat.completion.chunk objects",
    tags=["openai"],
)
async def create_chat_completion(
    request: Request[Any, Any, Any], data: JSONBody[ChatCompletionRequest], engine: NamedDependency[Engine]
) -> Response[ChatCompletion]:
    body: ChatCompletionRequest = request.state.body
    prep = chat.prepare(engine, body)
    if body.stream:
        return sse_response(chat.stream(prep))  # type: ignore[return-value]
    return json_response(await chat.complete(prep))  # type: ignore[return-value]


@post(
    "/v1/completions",
    status_code=200,
    opt={BODY_TYPE: CompletionRequest},
    summary="Create a text completion",
    response_description="A text_completion object, or a text/event-stream of them",
    tags=["openai"],
)
async def create_completion(
    request: Request[Any, Any, Any], data: JSONBody[CompletionRequest], engine: NamedDependency[Engine]
) -> Response[Completion]:
    body: CompletionRequest = request.state.body
    prep = completions.prepare(engine, body)
    if body.stream:
        return sse_response(completions.stream(prep))  # type: ignore[return-value]
    return json_response(await completions.complete(prep))  # type: ignore[return-value]
