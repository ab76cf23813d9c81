"""Native ``/v1/generate`` and ``/v1/stream`` formats."""

from __future__ import annotations

import msgspec

from schemas.openai.common import CompletionUsage, MaxTokens, MinP, Seed, Stop, Temperature, TopK, TopP

DEFAULT_MAX_NEW_TOKENS = 256
"""Tokens generated when a request sets no ``max_new_tokens`` (within the role's cap and the context)."""


class GenerateRequest(msgspec.Struct, kw_only=True):
    """One prompt in, one text out; ``model`` defaults to the served model.

    ``max_new_tokens`` defaults to :data:`DEFAULT_MAX_NEW_TOKENS`, or fewer when the caller's role caps max tokens
    lower or the context has less room left.
    """

    prompt: str
    max_new_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    stop: Stop | None = None
    seed: Seed | None = None
    model: str | None = None


class GenerateResponse(msgspec.Struct, kw_only=True):
    """The generated text."""

    model: str
    output: str
    finish_reason: str
    usage: CompletionUsage
    cached: bool = False


class StreamEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One ``/v1/stream`` event: new text; the last one has ``finish_reason`` and ``usage``."""

    output: str
    finish_reason: str | None = None
    usage: CompletionUsage | None = None
