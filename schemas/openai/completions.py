"""``/v1/completions`` (legacy text completions) request, response and stream chunk."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from schemas.openai.common import (
    CompletionUsage,
    LogitBias,
    MaxTokens,
    MinP,
    N,
    Penalty,
    RepetitionPenalty,
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
    logit_bias: LogitBias | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
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
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool = False


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    """Legacy logprobs: parallel lists over the choice's tokens (echoed prompt tokens first).

    ``text_offset`` is each token's character offset in the choice's whole text; ``top_logprobs`` maps token text
    to log probability (the chosen token included); the first prompt token has ``None`` in both lists.
    """

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    """One completion choice (also the shape of a stream chunk's choice)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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
