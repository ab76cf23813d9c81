"""The engine boundary: what serving code may know about a model runtime.

Handlers and serving code never touch torch. They hand an engine an :class:`EngineRequest` (prompt token ids
plus per-request sampling parameters) and read :class:`EngineDelta` objects from the async iterator that
:meth:`Engine.generate` returns. Closing that iterator (``aclose()``, or the consumer being cancelled) aborts
the request inside the engine within one decode step.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]

GREEDY_BELOW = 1e-5
"""Temperatures below this decode greedily (as vLLM does): dividing logits by a tiny temperature overflows them to
infinity, and the limit of sampling as the temperature goes to 0 is the most likely token anyway."""


class EngineError(Exception):
    """The engine failed while running a request (not a client mistake)."""


class EngineOverloaded(EngineError):
    """The engine's queue is full or it is shutting down; the client should retry later."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """A grammar the generated text must follow (structured outputs, forced tool calls).

    The text is ``prefix + value + suffix``, repeated ``min_items``..``max_items`` times with ``separator`` between
    repetitions, where each ``value`` is JSON that validates against ``json_schema``. After the last repetition only
    an EOS token may follow, so a constrained row ends with ``finish_reason="stop"`` (or ``"length"`` when
    ``max_tokens`` cuts it first).

    Attributes:
        json_schema: JSON text of a JSON Schema (``{"type": "object"}`` for ``json_object`` mode).
        lenient: Ignore schema keywords the grammar library cannot enforce instead of rejecting the schema
            (OpenAI's ``strict: false``); a strict constraint with such keywords is a client error.
        prefix: Literal text before each value (e.g. ``"<tool_call>\\n"``).
        suffix: Literal text after each value.
        separator: Literal text between repetitions.
        min_items: Fewest values.
        max_items: Most values; ``None`` means no bound.
        reasoning_start: With ``reasoning_end``: the output may first reason freely between these two markers
            (a reasoning model); the rest above applies after the end marker and any whitespace.
        reasoning_end: The marker that ends a reasoning model's free text; without ``reasoning_start`` the output
            begins inside the reasoning (the prompt opened it) and must close it before the constrained part.
    """

    json_schema: str
    lenient: bool = False
    prefix: str = ""
    suffix: str = ""
    separator: str = "\n"
    min_items: int = 1
    max_items: int | None = 1
    reasoning_start: str = ""
    reasoning_end: str = ""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding parameters; every request in a batch may differ.

    Attributes:
        max_tokens: Hard cap on generated tokens (EOS included).
        temperature: 0 (or anything below :data:`GREEDY_BELOW`) means greedy decoding.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: Keep the k most likely tokens; 0 (or -1) disables it.
        min_p: Drop tokens whose probability is below ``min_p`` times the top token's; 0 disables it.
        seed: Seed of this request's own random generator; ``None`` draws one at random.
        ignore_eos: Keep generating past EOS (benchmarks).
        logit_bias: Token id -> bias added to its logit before sampling (OpenAI's -100..100; +-100 bans/forces).
        presence_penalty: Subtracted once from the logit of every token already generated (OpenAI semantics).
        frequency_penalty: Subtracted from a token's logit once per time it was generated.
        repetition_penalty: Extension (CTRL/Transformers semantics): logits of tokens in the prompt or output are
            divided by it when positive, multiplied when negative; 1 disables it.
        logprobs: Report the chosen token's log probability and this many most likely alternatives (``None``: no
            logprobs at all; ``0``: the chosen token only).
        prompt_logprobs: Also report the log probability of every prompt token after the first, with this many
            alternatives (``None``: not at all).
        constraint: A grammar the output must follow.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None

    @property
    def greedy(self) -> bool:
        """Decode greedily: the temperature is 0 or too small to divide logits by (see :data:`GREEDY_BELOW`)."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request as the engine sees it.

    Attributes:
        request_id: For logs.
        prompt_token_ids: The prompt.
        params: How to decode.
        cache_scope: Requests reuse each other's cached prompt prefixes only within one scope (the gateway makes it
            the API key, so one tenant can neither read nor time another's prompts through the cache).
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    cache_scope: str = ""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log probability under the model and the most likely alternatives at its position.

    ``logprob`` is the model's own distribution (log-softmax of the raw logits), before temperature, penalties,
    bias or grammar masks, as OpenAI reports it. ``top`` holds ``(token_id, logprob)`` pairs, most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class EngineDelta:
    """What one step produced for one request.

    Attributes:
        token_ids: Tokens generated in this step (usually one).
        text: Newly decoded text; may be empty while a multi-byte character is incomplete.
        finish_reason: Set on the last delta: ``"stop"`` for EOS, ``"length"`` for max tokens or context end.
        logprobs: One entry per token of ``token_ids`` when the request asked for logprobs, else ``None``.
        token_texts: With logprobs: the text each token of ``token_ids`` added (joined they equal ``text``; a
            token that only starts a multi-byte character adds ``""``, the one completing it adds the character).
        prompt_logprobs: On the first delta of a request that asked for prompt logprobs: one entry per prompt
            token after the first.
        cached_tokens: On the first delta: how many of the prompt's tokens came from the prefix cache instead of
            being computed (``None`` on later deltas, and from engines without a prefix cache).
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    token_texts: list[str] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters and levels of an engine's KV memory, read at scrape time (see :class:`Instrumented`).

    Attributes:
        prefix_cache_queries: Prompt tokens looked up in the prefix cache, since the start.
        prefix_cache_hits: Of those, tokens found (their prefill was skipped).
        prefix_cache_bytes: Memory the prefix cache holds now.
        kv_usage: The running batch's KV slots (rows x padded width, the prefill in progress included) over its
            budget; above 1 only while one request alone is longer than the budget.
        preemptions: Running requests evicted to fit the KV budget (they are computed again later), since the start.
    """

    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_bytes: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0


@runtime_checkable
class Instrumented(Protocol):
    """An engine that reports :class:`EngineStats` (the Transformers engine; test and echo engines do not)."""

    def stats(self) -> EngineStats: ...


@runtime_checkable
class Tokenizer(Protocol):
    """The tokenizer operations serving code needs."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can decode (valid prompt ids are ``0 <= id < vocab_size``)."""
        ...

    @property
    def has_chat_template(self) -> bool: ...

    @property
    def chat_template(self) -> str | None:
        """The chat template's Jinja source, or ``None`` (no template, or a built-in one that is not Jinja)."""
        ...

    @property
    def max_token_bytes(self) -> int | None:
        """The most UTF-8 bytes of input text one token can stand for (special tokens included), so that a text of
        ``b`` bytes has at least ``b / max_token_bytes`` tokens; ``None`` when no such bound holds (a normalizer
        that may delete characters)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's usual special tokens (e.g. BOS) for a raw prompt."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` with special tokens skipped."""
        ...

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered through the model's own chat template.

        ``tools`` (OpenAI ``{"type": "function", "function": {...}}`` objects) are handed to the template as its
        ``tools`` variable; ``chat_template_kwargs`` become further template variables (``enable_thinking``).

        Raises:
            ValueError: the model has no chat template or the template rejected the messages.
        """
        ...


class RequestStream(Protocol):
    """The deltas of one admitted request; the last one has ``finish_reason`` set.

    Iteration raises :class:`EngineError` if the runtime fails. ``aclose()`` aborts the request (idempotent,
    safe before the first ``__anext__``). ``started_at`` is the ``time.perf_counter()`` at which the engine
    began working on the request (``None`` while it waits): the end of its queue time.
    """

    started_at: float | None

    def __aiter__(self) -> RequestStream: ...

    async def __anext__(self) -> EngineDelta: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Static facts about the served model."""

    name: str
    source: str
    max_model_len: int
    created: int
    owned_by: str = "llm-server"


@runtime_checkable
class Engine(Protocol):
    """A model runtime. One instance serves one model."""

    @property
    def name(self) -> str:
        """The name clients use for the model, known before it has loaded."""
        ...

    @property
    def info(self) -> ModelInfo:
        """What the loaded model is (only once it has loaded)."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def ready(self) -> bool:
        """True once the model is loaded and requests can be served."""
        ...

    @property
    def failure(self) -> str | None:
        """Why a started engine stopped serving for good (it is then not ``ready``), else ``None``."""
        ...

    @property
    def supports_constraints(self) -> bool:
        """Whether requests may carry a :class:`Constraint` (grammar-constrained decoding)."""
        ...

    @property
    def num_running(self) -> int:
        """Requests being generated now."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests admitted and waiting for the engine to start them."""
        ...

    async def start(self) -> None:
        """Load the model (off the event loop) and start the worker."""
        ...

    async def stop(self) -> None:
        """Stop accepting requests, abort running ones and release the worker."""
        ...

    def generate(self, request: EngineRequest) -> RequestStream:
        """Admit ``request`` to the engine's queue and return its stream of deltas.

        Admission is synchronous so that a full queue can still be answered with an HTTP 503 before a
        streaming response starts. The caller must ``aclose()`` the returned stream (also if it never
        iterates it); that aborts the request if it is still queued or running.

        Raises:
            EngineOverloaded: the queue is full or the engine is stopping (raised here, not by the iterator).
        """
        ...

    def generate_group(self, requests: Sequence[EngineRequest]) -> list[RequestStream]:
        """Admit the ``n`` samples of one prompt together and return their streams, in order.

        The requests share ``prompt_token_ids`` (and ``prompt_logprobs``); their other parameters, the seed above
        all, may differ. Admission is all or nothing: either every request is queued or ``EngineOverloaded`` is
        raised and none is. An engine may prefill the shared prompt once and fork it into one row per request;
        each request's output is still what :meth:`generate` would give it alone, and each stream is closed (and
        aborts its own row) independently.

        Raises:
            EngineOverloaded: as for :meth:`generate`, when the whole group does not fit.
            ValueError: the requests do not share one prompt.
        """
        ...


@runtime_checkable
class Embedder(Protocol):
    """An embedding model runtime: token ids in, one vector per input out. One instance serves one model.

    Its ``info.max_model_len`` is the most tokens one input may have. Inputs are batched with other callers' in the
    thread that owns the model (bounded by the batch settings), never on the event loop.
    """

    @property
    def name(self) -> str:
        """The name clients use for the model, known before it has loaded."""
        ...

    @property
    def info(self) -> ModelInfo:
        """What the loaded model is (only once it has loaded)."""
        ...

    @property
    def tokenizer(self) -> Tokenizer:
        """Its tokenizer: ``encode`` adds the special tokens the model expects around an input ([CLS] ... [SEP])."""
        ...

    @property
    def dimensions(self) -> int:
        """Length of each vector (once loaded)."""
        ...

    @property
    def normalized(self) -> bool:
        """Vectors are scaled to unit length (once loaded)."""
        ...

    @property
    def truncatable(self) -> bool:
        """Its vectors keep their meaning cut to fewer dimensions (Matryoshka-trained), so ``dimensions`` applies."""
        ...

    @property
    def ready(self) -> bool: ...

    @property
    def failure(self) -> str | None: ...

    @property
    def num_running(self) -> int:
        """Inputs being embedded now."""
        ...

    @property
    def num_waiting(self) -> int:
        """Inputs queued for the model's thread."""
        ...

    async def start(self) -> None:
        """Load the model (off the event loop) and start its thread."""
        ...

    async def stop(self) -> None:
        """Stop: queued and running calls fail with :class:`EngineError`."""
        ...

    async def embed(self, inputs: Sequence[Sequence[int]]) -> list[array[float]]:
        """One float32 vector per input, in order (each input within ``info.max_model_len`` tokens).

        Raises:
            EngineOverloaded: the queue is full or the embedder is stopping (nothing was run).
            EngineError: the model failed.
        """
        ...
