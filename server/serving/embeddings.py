"""``/v1/embeddings``: inputs checked and tokenized, run by the embedding model, answered as OpenAI's list.

An :class:`EmbedPlan` is exchange work like a chat plan: the gateway reserves its input tokens (against TPM and the
monthly quota; nothing is generated), the request log and the metrics count them, and a client that leaves cancels
the wait. Its inputs are embedded in the model's thread, batched with other requests' inputs there.
"""

from __future__ import annotations

import base64
import math
import sys
import time
from array import array
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from schemas.openai.common import CompletionUsage
from schemas.openai.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from server.engine.base import Embedder, EngineError, EngineOverloaded
from server.errors import OpenAIError, invalid_request, overloaded
from server.serving.checks import check_token_ids, prompt_list
from server.serving.common import check_prompt_bytes, utf8_length
from server.serving.plan import CacheEntry, Demand, Outcome

MAX_INPUTS = 2048
"""Most inputs in one request (OpenAI's bound)."""


def prepare(embedder: Embedder, req: EmbeddingRequest) -> EmbedPlan:
    """Check and tokenize the inputs (400 naming ``input`` or ``dimensions``); nothing is admitted yet."""
    tokenizer = embedder.tokenizer
    window = embedder.info.max_model_len
    inputs: list[list[int]] = []
    texts: list[str | list[int]] = list(prompt_list(req.input, tokenizer.vocab_size, param="input", limit=MAX_INPUTS))
    for i, item in enumerate(texts):
        param = "input" if len(texts) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise invalid_request("An input must not be an empty string.", param, "empty_input")
            check_prompt_bytes(embedder, utf8_length(item), None, param)
            ids = tokenizer.encode(item)
            check_token_ids(ids, i, len(texts), tokenizer.vocab_size, "input")
        else:
            ids = item
        if len(ids) > window:
            raise OpenAIError(
                400,
                "invalid_request_error",
                f"This model's maximum context length is {window} tokens, however you requested {len(ids)} tokens "
                "in the input. Please reduce your input.",
                param=param,
                code="context_length_exceeded",
            )
        inputs.append(ids)
    dimensions = req.dimensions
    if dimensions is not None and dimensions != embedder.dimensions:
        if not embedder.truncatable:
            raise invalid_request(
                f"The model '{embedder.name}' does not support 'dimensions' (its vectors have "
                f"{embedder.dimensions}; it was not trained to be cut shorter).",
                "dimensions",
                "unsupported_parameter",
            )
        if dimensions > embedder.dimensions:
            raise invalid_request(
                f"'dimensions' is at most {embedder.dimensions} for the model '{embedder.name}'.", "dimensions"
            )
    return EmbedPlan(
        model=embedder.name,
        embedder=embedder,
        inputs=inputs,
        base64=req.encoding_format == "base64",
        dimensions=None if dimensions == embedder.dimensions else dimensions,
    )


@dataclass(slots=True)
class EmbedPlan:
    """Checked embedding inputs for one model, ready for admission (exchange work)."""

    model: str
    embedder: Embedder
    inputs: list[list[int]]
    base64: bool = False
    dimensions: int | None = None
    vectors: list[array[float]] | None = None
    admitted_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    stream: bool = False
    cached: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)

    @property
    def finished(self) -> bool:
        return self.vectors is not None

    def demand(self) -> Demand:
        """Its input tokens; one sequence in flight however many inputs (they are queued as one call)."""
        return Demand(self.prompt_tokens, 0, True)

    def prompt_text(self) -> str:
        return "\n".join(self.embedder.tokenizer.decode(ids) for ids in self.inputs)

    def cache_material(self) -> object | None:
        return None

    def cache_entry(self) -> CacheEntry:
        return CacheEntry(self.prompt_tokens, [])  # never asked for: it has no cache material

    def replay(self, entry: CacheEntry) -> bool:
        return False

    def isolate(self, scope: str) -> None:
        """Embedding keeps nothing between requests."""

    def open(self) -> None:
        self.admitted_at = time.perf_counter()

    async def complete(self) -> msgspec.Struct:
        """Embed every input (in the model's thread) and build the response."""
        try:
            vectors = await self.embedder.embed(self.inputs)
        except EngineOverloaded:
            raise overloaded() from None
        except ValueError as exc:  # the model's own bounds, past the tokenizer's (an id with no embedding row)
            raise invalid_request(f"The input cannot be embedded: {exc}.", "input") from None
        except EngineError as exc:
            raise OpenAIError(500, "server_error", f"The embedding model failed: {exc}", code="model_error") from exc
        self.last_token_at = time.perf_counter()
        self.vectors = vectors
        data = [Embedding(index=i, embedding=self._encoded(v)) for i, v in enumerate(vectors)]
        usage = EmbeddingUsage(prompt_tokens=self.prompt_tokens, total_tokens=self.prompt_tokens)
        return EmbeddingList(data=data, model=self.model, usage=usage)

    def _encoded(self, vector: array[float]) -> list[float] | str:
        if self.dimensions is not None:
            vector = _shortened(vector, self.dimensions, self.embedder.normalized)
        if not self.base64:
            return vector.tolist()
        if sys.byteorder != "little":
            vector = array("f", vector)
            vector.byteswap()
        return base64.b64encode(vector.tobytes()).decode("ascii")

    async def events(self) -> AsyncIterator[msgspec.Struct]:
        """Embeddings are not streamed: the whole response as the one event (never asked for: ``stream`` is off)."""
        yield await self.complete()

    async def close(self) -> None:
        return None

    def outcome(self) -> Outcome:
        ran = self.vectors is not None
        tokens = self.prompt_tokens
        usage = CompletionUsage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
        return Outcome(
            usage=usage,
            charged_tokens=tokens if ran else 0,
            finish_reasons=["stop"] if ran else [None],
            texts=[],
            runs=[self] if ran else [],
        )


def _shortened(vector: array[float], dimensions: int, normalized: bool) -> array[float]:
    """The first ``dimensions`` values (Matryoshka truncation), scaled to unit length again when the model's
    vectors are."""
    head = vector[:dimensions]
    if not normalized:
        return head
    norm = math.sqrt(sum(x * x for x in head))
    return array("f", (x / norm for x in head)) if norm > 0 else head
