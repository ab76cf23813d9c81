"""``/tokenize``: a prompt's ids as a completion counts them, or chat messages' ids as a chat request renders them."""

from __future__ import annotations

from schemas.openai.chat import ChatCompletionRequest
from schemas.openai.embeddings import TokenizeRequest
from server.engine.base import Embedder, Engine
from server.errors import invalid_request
from server.serving import chat
from server.serving.common import check_prompt_bytes, utf8_length


def token_ids(
    local: Engine | Embedder, data: TokenizeRequest, *, embeds: bool, max_messages: int, tool_parser: str
) -> list[int]:
    """The ids of ``data.prompt`` (what a completion's ``usage.prompt_tokens`` counts) or of ``data.messages``
    rendered exactly as a chat request renders them (its template, tools, ``chat_template_kwargs`` and tool-call
    format), so the count is what chat bills. ``embeds``: ``local`` is an embedding model (it renders no chat)."""
    if data.prompt is not None:
        check_prompt_bytes(local, utf8_length(data.prompt), None, "prompt")
        return local.tokenizer.encode(data.prompt)
    if embeds:
        raise invalid_request("An embedding model renders no chat messages; tokenize a 'prompt'.", "messages")
    req = ChatCompletionRequest(
        messages=data.messages or [],
        model=local.name,
        tools=data.tools,
        add_generation_prompt=data.add_generation_prompt,
        chat_template_kwargs=data.chat_template_kwargs,
    )
    engine: Engine = local  # type: ignore[assignment]
    return chat.render(engine, req, max_messages=max_messages, tool_parser=tool_parser)[1]
