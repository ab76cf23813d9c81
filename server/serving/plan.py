"""A validated request for a local engine, ready for the exchange: what it reserves, runs, caches and used.

The serving layer's ``prepare`` of each family builds a :class:`Plan`; the exchange (``server.exchange``) admits it,
answers it from the cache or the engine through its methods, and settles what it used. A remote model's request
is a :class:`~server.serving.remote.RemoteCall` that the exchange wraps to the same shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec

from schemas.openai.common import CompletionTokensDetails, CompletionUsage, PromptTokensDetails
from server.engine.base import Engine, SamplingParams, Tokenizer
from server.serving.choices import Choice, admit
from server.serving.common import new_id, now
from server.serving.reasoning import Reasoning, ReasoningCounter, replayed_count

if TYPE_CHECKING:
    from server.serving.tools import ToolPlan

CacheResults = list[tuple[str, str, int]]
"""``(text, finish_reason, completion_tokens)`` of each choice, in order."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What the completion cache keeps of a finished request: its prompt tokens and each choice's result."""

    prompt_tokens: int
    results: CacheResults


@dataclass(frozen=True, slots=True)
class Demand:
    """What the gateway reserves for a request before it runs.

    Attributes:
        prompt_tokens: Prompt tokens reserved against the monthly quota (an upper bound for a remote model).
        max_new_tokens: Most tokens all its choices together may generate.
        explicit_max_tokens: The client set max tokens (else the reservation is the context's room).
        tpm_prompt_tokens: Prompt tokens counted against tokens per minute, when not ``prompt_tokens`` (a remote
            model's estimate).
        sequences: Sequences it generates at once (prompts x ``n``), against the key's bound on those in flight.
    """

    prompt_tokens: int
    max_new_tokens: int
    explicit_max_tokens: bool
    tpm_prompt_tokens: int | None = None
    sequences: int = 1


class Run(Protocol):
    """The timing of one generation that reached a model (``time.perf_counter()`` values)."""

    @property
    def admitted_at(self) -> float | None: ...
    @property
    def started_at(self) -> float | None: ...
    @property
    def first_token_at(self) -> float | None: ...
    @property
    def last_token_at(self) -> float | None: ...
    @property
    def token_gaps(self) -> list[float]: ...
    @property
    def finished(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a request used and produced, once it has ended (however it ended).

    Attributes:
        usage: Its usage as logged and counted in the token metrics.
        charged_tokens: Tokens charged to the key (0 for a cache hit or a request that reached no model).
        finish_reasons: Each choice's finish reason (``None``: it did not finish).
        texts: Each choice's text.
        runs: The generations that reached a model, for the latency histograms (none for a cache hit).
        usage_estimated: The usage is an estimate (a remote model that reported none).
    """

    usage: CompletionUsage
    charged_tokens: int
    finish_reasons: list[str | None]
    texts: list[str]
    runs: Sequence[Run] = ()
    usage_estimated: bool = False


Complete = Callable[["Plan"], Awaitable[msgspec.Struct]]
Stream = Callable[["Plan"], AsyncIterator[msgspec.Struct]]


def make_plan(
    kind: str,
    id_prefix: str,
    model: str,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    engine: Engine,
    complete: Complete,
    stream_events: Stream,
    stops: list[str],
    stream: bool,
    include_usage: bool,
    explicit_max_tokens: bool,
    n: int = 1,
    echo: bool = False,
    tools: ToolPlan | None = None,
    reasoning: Reasoning | None = None,
) -> Plan:
    """A :class:`Plan` with a fresh id and timestamp; ``complete`` / ``stream_events`` render its family's answer."""
    return Plan(
        kind=kind,
        id=new_id(id_prefix),
        created=now(),
        model=model,
        prompts=prompts,
        params=params,
        stops=stops,
        stream=stream,
        include_usage=include_usage,
        explicit_max_tokens=explicit_max_tokens,
        engine=engine,
        render=complete,
        render_stream=stream_events,
        tokenizer=engine.tokenizer,
        n=n,
        echo=echo,
        tools=tools,
        reasoning=reasoning,
    )


@dataclass(slots=True)
class Plan:
    """A validated request for a local engine, ready for admission.

    ``choices`` is empty until :meth:`open` (or a cache hit) fills it.
    """

    kind: str
    id: str
    created: int
    model: str
    prompts: list[list[int]]
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    explicit_max_tokens: bool
    engine: Engine
    render: Complete
    render_stream: Stream
    tokenizer: Tokenizer | None = None
    n: int = 1
    echo: bool = False
    tools: ToolPlan | None = None
    reasoning: Reasoning | None = None
    """How a reasoning model's output is split (``None``: it is not); adds ``reasoning_tokens`` to the usage."""
    choices: list[Choice] = field(default_factory=list)
    cached: bool = False
    cache_scope: str = ""
    """Whose cached prompt prefixes the engine may reuse for it (see :meth:`isolate`)."""

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens billed: each prompt once, however many samples ``n`` draws from it (as OpenAI counts)."""
        return sum(len(p) for p in self.prompts)

    @property
    def max_new_tokens(self) -> int:
        """Most tokens all choices together may generate (what the gateway reserves)."""
        return len(self.prompts) * self.n * self.params.max_tokens

    @property
    def deterministic(self) -> bool:
        """Greedy or explicitly seeded: the same request gives the same output."""
        return self.params.greedy or self.params.seed is not None

    @property
    def cacheable(self) -> bool:
        """Deterministic, and its response is rebuilt from texts alone (the cache keeps no logprobs)."""
        return self.deterministic and self.params.logprobs is None and self.params.prompt_logprobs is None

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused rather than computed: each prompt once (its ``n`` samples share one prefill), all of
        them for a completion-cache hit."""
        if self.cached:
            return self.prompt_tokens
        by_prompt: dict[int, int] = {}
        for c in self.choices:
            p = c.index // self.n
            by_prompt[p] = max(by_prompt.get(p, 0), c.cached_tokens)
        return sum(by_prompt.values())

    @property
    def usage(self) -> CompletionUsage:
        completion = sum(c.completion_tokens for c in self.choices)
        prompt = self.prompt_tokens
        usage = CompletionUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )
        if self.reasoning is not None:
            usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=self.reasoning_tokens)
        return usage

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the choices' reasoning (a cache hit's are its cached reasoning re-tokenized)."""
        reasoning = self.reasoning
        if reasoning is None:
            return 0
        if self.cached:
            # Never more than the tokens before the EOS that ended a stopped row.
            tokenizer = self.engine.tokenizer
            return sum(
                max(
                    0,
                    min(
                        replayed_count(c.text, reasoning, tokenizer), c.completion_tokens - (c.finish_reason == "stop")
                    ),
                )
                for c in self.choices
            )
        return sum(c.reasoning.count for c in self.choices if c.reasoning is not None)

    @property
    def finished(self) -> bool:
        """Every choice ran to a finish reason (not aborted, not failed)."""
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices)

    # -- what the exchange calls -------------------------------------------------------------------------------
    def demand(self) -> Demand:
        return Demand(
            self.prompt_tokens, self.max_new_tokens, self.explicit_max_tokens, sequences=len(self.prompts) * self.n
        )

    def prompt_text(self) -> str:
        """The prompts as text, for a request log that stores prompts."""
        return "\n".join(self.engine.tokenizer.decode(p) for p in self.prompts)

    def cache_material(self) -> object | None:
        """Everything that determines the output (every sampling field, penalties, bias and output constraint
        included), or ``None`` when the request is not cacheable."""
        if not self.cacheable:
            return None
        return ["local", self.kind, self.prompts, self.params, self.n, self.stops]

    def cache_entry(self) -> CacheEntry:
        results = [(c.text, c.finish_reason or "stop", c.completion_tokens) for c in self.choices]
        return CacheEntry(self.prompt_tokens, results)

    def replay(self, entry: CacheEntry) -> bool:
        """Fill the choices from a cached entry instead of running (``False``: the entry does not fit)."""
        prompts = [p for p in self.prompts for _ in range(self.n)]
        if len(entry.results) != len(prompts):
            return False
        self.cached = True
        self.choices = [
            Choice(
                index=i,
                prompt_tokens=len(prompt),
                stream=None,
                stops=self.stops,
                completion_tokens=tokens,
                finish_reason=finish,
                text_parts=[text],
            )
            for i, (prompt, (text, finish, tokens)) in enumerate(zip(prompts, entry.results, strict=True))
        ]
        return True

    def isolate(self, scope: str) -> None:
        """Reuse the engine's cached prompt prefixes only of requests with the same ``scope``."""
        self.cache_scope = scope

    def open(self) -> None:
        """Admit every prompt ``n`` times to the engine, at once (503 ``overloaded`` when its queue is full)."""
        self.choices = admit(
            self.engine, self.id, self.prompts, self.params, self.stops, n=self.n, cache_scope=self.cache_scope
        )
        if self.reasoning is not None:
            for choice in self.choices:
                choice.reasoning = ReasoningCounter(self.reasoning)

    async def complete(self) -> msgspec.Struct:
        """Run to the end and render the family's response."""
        return await self.render(self)

    def events(self) -> AsyncIterator[msgspec.Struct]:
        """The family's stream of chunks (a cache hit replays its results)."""
        return self.render_stream(self)

    async def close(self) -> None:
        """Close every engine stream (aborting the rows still running; a no-op for finished ones)."""
        for choice in self.choices:
            if choice.stream is not None:
                await choice.stream.aclose()

    def outcome(self) -> Outcome:
        ran = [c for c in self.choices if c.stream is not None]
        usage = self.usage
        return Outcome(
            usage=usage,
            charged_tokens=usage.total_tokens if ran else 0,
            finish_reasons=[c.finish_reason for c in self.choices],
            texts=[c.text for c in self.choices],
            runs=ran,
        )
