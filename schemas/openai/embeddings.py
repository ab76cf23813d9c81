"""``/v1/embeddings`` request and response, and the vLLM-compatible ``/tokenize`` and ``/detokenize`` bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.openai.chat import ChatMessage
from schemas.openai.tools import MAX_TOOLS, ChatTool


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """The body of ``POST /v1/embeddings``; unknown fields are ignored.

    ``input`` is a string, a list of strings, a list of token ids or a list of token-id lists (checked when the
    request is prepared: one array type in a union is all msgspec decodes).
    """

    input: str | list[Any]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class Embedding(msgspec.Struct, kw_only=True):
    """One input's vector: a list of floats, or base64 of its little-endian float32 bytes."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    """Tokens of the inputs (embeddings generate none)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    """The response of ``POST /v1/embeddings``."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /tokenize``: ``prompt`` as a completion would tokenize it, or ``messages`` as chat renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    tools: Annotated[list[ChatTool], Meta(max_length=MAX_TOOLS)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(msgspec.Struct, kw_only=True):
    """The token ids, how many, and the model's window."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """``POST /detokenize``: token ids back to text."""

    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    """The text of the token ids (special tokens skipped)."""

    prompt: str
