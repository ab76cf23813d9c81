"""Types shared by the OpenAI endpoint families."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

Temperature = Annotated[float, Meta(ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, Meta(ge=0.0, le=1.0, description="Nucleus sampling probability mass.")]
TopK = Annotated[int, Meta(ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 disables.")]
MinP = Annotated[float, Meta(ge=0.0, le=1.0, description="Extension: minimum probability relative to the top token.")]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
# At least 0.01: dividing logits by a vanishing penalty overflows them to infinity.
RepetitionPenalty = Annotated[
    float,
    Meta(ge=0.01, le=10.0, description="Extension: divide (or multiply, if negative) seen tokens' logits; 1 = off."),
]
LogitBias = dict[str, float]  # keys and the -100..100 range are checked against the vocabulary in serving
MaxTokens = Annotated[int, Meta(ge=1, description="Maximum number of tokens to generate.")]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
N = Annotated[int, Meta(ge=1, le=128)]
Stop = str | list[str]


class StreamOptions(msgspec.Struct, kw_only=True):
    """Options for streaming responses."""

    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class CompletionTokensDetails(msgspec.Struct, kw_only=True):
    """A breakdown of ``completion_tokens``.

    Attributes:
        reasoning_tokens: Tokens of the model's reasoning (``reasoning_content``), its markers included.
    """

    reasoning_tokens: int


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    """A breakdown of ``prompt_tokens``.

    Attributes:
        cached_tokens: Prompt tokens whose computation was reused from an earlier request with the same prefix
            (the engine's prefix cache), or all of them for a response replayed from the completion cache.
    """

    cached_tokens: int


class CompletionUsage(msgspec.Struct, kw_only=True):
    """Token counts measured with the model's tokenizer.

    ``prompt_tokens_details`` is present for local models and for upstreams that report it;
    ``completion_tokens_details`` only for a model whose reasoning is parsed out of its output.
    """

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | msgspec.UnsetType = msgspec.UNSET
    completion_tokens_details: CompletionTokensDetails | msgspec.UnsetType = msgspec.UNSET
