"""``/v1/embeddings`` on embedding models, and the vLLM-compatible ``/tokenize`` and ``/detokenize``."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.params import JSONBody

from schemas.openai.embeddings import (
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingList,
    EmbeddingRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from server.api.apidoc import WITH_BODY, ApiOperation, errors
from server.api.common import BODY_TYPE
from server.api.gate import counted, gate, prepared
from server.api.generation import respond
from server.engine.base import Embedder, Engine
from server.errors import invalid_request, unsupported_param
from server.providers.upstream import Upstream
from server.serving import embeddings
from server.serving.checks import check_token_ids
from server.serving.tokenize import token_ids
from server.wiring.models import ServedModels
from server.wiring.state import app_state


@post(
    "/v1/embeddings",
    status_code=200,
    opt={BODY_TYPE: EmbeddingRequest},
    summary="Create embeddings",
    tags=["openai"],
    responses=errors(*WITH_BODY, 404),
    operation_class=ApiOperation,
)
async def create_embeddings(request: Request[Any, Any, Any], data: JSONBody[EmbeddingRequest]) -> EmbeddingList:
    state = app_state(request.app)
    name, backend = state.models.resolve(data.model)
    embedder = state.models.ready_embedder(name, backend)
    await gate(request, name, requested=None, param="input")
    plan = await prepared(request, lambda: embeddings.prepare(embedder, data))
    return await respond(request, state.exchange, plan)  # type: ignore[return-value]


@post(
    "/tokenize",
    status_code=200,
    opt={BODY_TYPE: TokenizeRequest},
    summary="Tokenize a prompt or chat messages (vLLM-compatible)",
    tags=["tokenizer"],
    responses=errors(*WITH_BODY, 404),
    operation_class=ApiOperation,
)
async def tokenize(request: Request[Any, Any, Any], data: JSONBody[TokenizeRequest]) -> TokenizeResponse:
    """``prompt``: its ids as a completion counts them; ``messages``: the chat prompt's ids, exactly what a chat
    request's ``usage.prompt_tokens`` counts (the same template, tools and ``chat_template_kwargs``)."""
    state = app_state(request.app)
    name, backend = state.models.resolve(data.model)
    local = _local(name, backend, state.models)
    if data.add_special_tokens is False:
        raise unsupported_param("add_special_tokens", "'add_special_tokens': false")
    if (data.prompt is None) == (data.messages is None):
        raise invalid_request("Give exactly one of 'prompt' and 'messages'.", "prompt")
    settings, embeds = state.settings, name in state.models.embedders
    async with counted(request, name):
        tokens = await prepared(
            request,
            lambda: token_ids(
                local, data, embeds=embeds, max_messages=settings.max_messages, tool_parser=settings.tool_call_parser
            ),
        )
    return TokenizeResponse(count=len(tokens), max_model_len=local.info.max_model_len, tokens=tokens)


@post(
    "/detokenize",
    status_code=200,
    opt={BODY_TYPE: DetokenizeRequest},
    summary="Token ids back to text (vLLM-compatible)",
    tags=["tokenizer"],
    responses=errors(*WITH_BODY, 404),
    operation_class=ApiOperation,
)
async def detokenize(request: Request[Any, Any, Any], data: JSONBody[DetokenizeRequest]) -> DetokenizeResponse:
    """At most the model's ``max_model_len`` ids (no sequence of the model is longer): a list of millions would
    hold the GIL for a second while the tokenizer decodes it."""
    state = app_state(request.app)
    name, backend = state.models.resolve(data.model)
    local = _local(name, backend, state.models)
    tokenizer, window = local.tokenizer, local.info.max_model_len
    if len(data.tokens) > window:
        raise invalid_request(
            f"At most {window} token ids (the model's maximum context length), not {len(data.tokens)}.", "tokens"
        )

    def decoded() -> str:
        check_token_ids(data.tokens, 0, 1, tokenizer.vocab_size, "tokens")
        return tokenizer.decode(data.tokens)

    async with counted(request, name):
        return DetokenizeResponse(prompt=await prepared(request, decoded))


def _local(name: str, backend: Engine | Embedder | Upstream, models: ServedModels) -> Engine | Embedder:
    """The in-process model (its tokenizer is here), ready; 400 for a remote one, 503 while it is not ready.

    Its kind comes from the registry: ``isinstance`` against the ``Embedder`` protocol reads every property, and an
    embedder's raise until it has loaded."""
    if isinstance(backend, Upstream):
        raise invalid_request(f"The model '{name}' is remote: its tokenizer is not on this server.", "model")
    if name in models.embedders:
        return models.ready_embedder(name, backend)
    return models.ready_engine(backend)


EMBEDDING_HANDLERS = [create_embeddings, tokenize, detokenize]
