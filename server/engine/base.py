"""The engine boundary: what serving code may know about a model runtime.

Handlers and serving code never touch torch. They hand an engine an :class:`EngineRequest` (prompt token ids
plus per-request sampling parameters) and read :class:`EngineDelta` objects from the async iterator that
:meth:`Engine.generate` returns. Closing that iterator (``aclose()``, or the consumer being cancelled) aborts
the request inside the engine within one decode step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """The engine failed while running a request (not a client mistake)."""


class EngineOverloaded(EngineError):
    """The engine's queue is full or it is shutting down; the client should retry later."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding parameters; every request in a batch may differ.

    Attributes:
        max_tokens: Hard cap on generated tokens (EOS included).
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass in (0, 1]; 1 disables it.
        top_k: Keep the k most likely tokens; 0 (or -1) disables it.
        min_p: Drop tokens whose probability is below ``min_p`` times the top token's; 0 disables it.
        seed: Seed of this request's own random generator; ``None`` draws one at random.
        ignore_eos: Keep generating past EOS (benchmarks).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request as the engine sees it."""

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams


@dataclass(slots=True)
class EngineDelta:
    """What one step produced for one request.

    Attributes:
        token_ids: Tokens generated in this step (usually one).
        text: Newly decoded text; may be empty while a multi-byte character is incomplete.
        finish_reason: Set on the last delta: ``"stop"`` for EOS, ``"length"`` for max tokens or context end.
    """

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None


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
    ) -> list[int]:
        """Token ids of ``messages`` rendered through the model's own chat template.

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
    def info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def ready(self) -> bool:
        """True once the model is loaded and requests can be served."""
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
