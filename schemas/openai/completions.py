"""``/v1/completions`` (legacy text completions) request, response and stream chunk."""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas.openai.common import (
    CompletionUsage,
    MaxTokens,
    MinP,
    N,
    Penalty,
    Seed,
    Stop,
    StreamOptions,
    Temperature,
    TopK,
    TopP,
)

# A string, a list of strings, a list of token ids, or a list of token-id lists. msgspec allows one array
# type per union, so the element union is checked for homogeneity by the serving layer.
Prompt = str | list[str | int | list[int]]


class CompletionRequest(msgspec.Struct, kw_only=True):
    """The body of ``POST /v1/completions``; unknown fields are ignored."""

    model: str
    prompt: Prompt
    best_of: int | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: MaxTokens | None = 16
    n: N | None = None
    presence_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None
    # Extensions (vLLM-compatible names).
    top_k: TopK | None = None
    min_p: MinP | None = None
    ignore_eos: bool = False


class CompletionChoice(msgspec.Struct, kw_only=True):
    """One completion choice (also the shape of a stream chunk's choice)."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class Completion(msgspec.Struct, kw_only=True):
    """The non-streaming response and each stream chunk (``usage`` unset on chunks unless requested)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | msgspec.UnsetType | None = msgspec.UNSET
