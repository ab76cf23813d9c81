"""Pieces every endpoint family shares: model check, sampling parameters, context check, running choices."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from schemas.openai.common import CompletionUsage
from server.engine.base import (
    Constraint,
    Engine,
    EngineError,
    EngineOverloaded,
    EngineRequest,
    RequestStream,
    SamplingParams,
    Tokenizer,
    TokenLogprob,
)
from server.errors import OpenAIError, invalid_request, overloaded
from server.serving.stops import StopMatcher

if TYPE_CHECKING:
    from server.serving.tools import ToolPlan

log = logging.getLogger("server.serving")

MAX_STOPS = 4


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as ``chatcmpl-…``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """``created`` timestamp (integer seconds)."""
    return int(time.time())


def check_model(engine: Engine, model: str | None) -> str:
    """Return the served model name, or raise 404 ``model_not_found``."""
    name = engine.info.name
    if model is not None and model != name:
        raise OpenAIError(
            404,
            "invalid_request_error",
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return name


def parse_stops(stop: str | list[str] | None) -> list[str]:
    """Validate ``stop`` (a string or up to four strings)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise invalid_request(f"'stop' accepts at most {MAX_STOPS} sequences, got {len(stops)}.", "stop")
    if any(s == "" for s in stops):
        raise invalid_request("'stop' sequences must not be empty strings.", "stop")
    return stops


def resolve_max_tokens(
    engine: Engine, prompt_len: int, requested: int | None, param: str, cap: int | None = None
) -> int:
    """Check the context window; ``None`` means "as many as fit" (at most ``cap``, the role's limit)."""
    window = engine.info.max_model_len
    if requested is None:
        if prompt_len >= window:
            raise context_exceeded(window, prompt_len, 0, param)
        return window - prompt_len if cap is None else min(cap, window - prompt_len)
    if prompt_len + requested > window:
        raise context_exceeded(window, prompt_len, requested, param)
    return requested


def context_exceeded(window: int, prompt_len: int, requested: int, param: str) -> OpenAIError:
    """400 ``context_length_exceeded`` with OpenAI's wording."""
    asked = f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion)"
    return OpenAIError(
        400,
        "invalid_request_error",
        f"This model's maximum context length is {window} tokens. However, you requested {asked}. "
        "Please reduce the length of the messages or completion.",
        param=param if requested else "messages",
        code="context_length_exceeded",
    )


LOGIT_BIAS_MAX = 300  # OpenAI's own limit on the number of biased tokens


def parse_logit_bias(bias: Mapping[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """Validate ``logit_bias`` (token id as a string -> -100..100) against the vocabulary."""
    if not bias:
        return ()
    if len(bias) > LOGIT_BIAS_MAX:
        raise invalid_request(f"'logit_bias' may bias at most {LOGIT_BIAS_MAX} tokens, got {len(bias)}.", "logit_bias")
    out: list[tuple[int, float]] = []
    for key, value in bias.items():
        token = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise invalid_request(
                f"Invalid key {key!r} in 'logit_bias': keys must be token ids from 0 to {vocab_size - 1}.",
                "logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise invalid_request(
                f"Invalid value {value} for token {key} in 'logit_bias': values must be between -100 and 100.",
                "logit_bias",
            )
        out.append((token, float(value)))
    return tuple(sorted(out))


def derived_seed(seed: int | None, sample: int) -> int | None:
    """The seed of sample ``sample`` of a prompt: sample 0 keeps ``seed``, the others get distinct derived ones."""
    if seed is None or sample == 0:
        return seed
    return (seed + sample * 0x9E3779B97F4A7C15) % 2**64  # the golden-ratio increment spreads nearby seeds apart


class SamplingFields(Protocol):
    """The sampling fields every request family shares (``None`` = OpenAI's default)."""

    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def min_p(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...


class PenaltyFields(Protocol):
    """The OpenAI families' penalty and bias fields (``None`` = off)."""

    @property
    def presence_penalty(self) -> float | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def logit_bias(self) -> dict[str, float] | None: ...


def sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int,
    vocab_size: int = 0,
    penalties: PenaltyFields | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    constraint: Constraint | None = None,
) -> SamplingParams:
    """Engine parameters from a request's fields (``vocab_size`` validates ``penalties.logit_bias``)."""
    pen = penalties
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None or req.top_k < 0 else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=None if req.seed is None else req.seed % (2**64),
        ignore_eos=ignore_eos,
        logit_bias=parse_logit_bias(pen.logit_bias, vocab_size) if pen else (),
        presence_penalty=(pen.presence_penalty or 0.0) if pen else 0.0,
        frequency_penalty=(pen.frequency_penalty or 0.0) if pen else 0.0,
        repetition_penalty=(pen.repetition_penalty or 1.0) if pen else 1.0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=constraint,
    )


def make_plan(
    kind: str,
    id_prefix: str,
    model: str,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer,
    stops: list[str],
    stream: bool,
    include_usage: bool,
    explicit_max_tokens: bool,
    n: int = 1,
    echo: bool = False,
    tools: ToolPlan | None = None,
) -> Plan:
    """A :class:`Plan` with a fresh id and timestamp."""
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
        tokenizer=tokenizer,
        n=n,
        echo=echo,
        tools=tools,
    )


@dataclass(frozen=True, slots=True)
class LogprobEntry:
    """One output token as the client sees it: the text it added and the engine's log probabilities."""

    text: str
    logprob: TokenLogprob


@dataclass(slots=True)
class Choice:
    """One admitted engine request (or a cached result: ``stream`` is ``None``) and what it produced so far."""

    index: int
    prompt_tokens: int
    stream: RequestStream | None
    stops: list[str]
    completion_tokens: int = 0
    finish_reason: str | None = None
    text_parts: list[str] = field(default_factory=list)
    # Timing (time.perf_counter()): when the engine admitted it, first and last token, gaps between tokens.
    admitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    # With logprobs: entries released so far (their texts join to ``text``), entries whose text is still held
    # back by the stop matcher, and character counts of released text and of text covered by released entries.
    logprobs: list[LogprobEntry] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    held: list[LogprobEntry] = field(default_factory=list)
    released_chars: int = 0
    covered_chars: int = 0

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def release(self, text: str, final: bool) -> list[LogprobEntry]:
        """Entries whose text is now fully released with ``text``; at the end, the rest cut to the text's end."""
        self.released_chars += len(text)
        out: list[LogprobEntry] = []
        while self.held and self.covered_chars + len(self.held[0].text) <= self.released_chars:
            entry = self.held.pop(0)
            self.covered_chars += len(entry.text)
            out.append(entry)
        if final:
            # A stop string cut the text inside this token: keep its released part, drop what follows.
            left = self.released_chars - self.covered_chars
            if self.held and left > 0:
                entry = self.held[0]
                out.append(LogprobEntry(entry.text[:left], entry.logprob))
                self.covered_chars += left
            self.held.clear()
        if self.logprobs is not None:
            self.logprobs += out
        return out


@dataclass(slots=True)
class Plan:
    """A validated request, ready for admission: everything the gateway, the cache and the engine need.

    ``choices`` is empty until :func:`start` (or a cache hit) fills it.
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
    tokenizer: Tokenizer | None = None
    n: int = 1
    echo: bool = False
    tools: ToolPlan | None = None
    choices: list[Choice] = field(default_factory=list)
    cached: bool = False

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
        return self.params.temperature == 0.0 or self.params.seed is not None

    @property
    def cacheable(self) -> bool:
        """Deterministic, and its response is rebuilt from texts alone (the cache keeps no logprobs)."""
        return self.deterministic and self.params.logprobs is None and self.params.prompt_logprobs is None

    @property
    def usage(self) -> CompletionUsage:
        completion = sum(c.completion_tokens for c in self.choices)
        prompt = self.prompt_tokens
        return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @property
    def choices_finished(self) -> bool:
        """Every choice ran to a finish reason (not aborted, not failed)."""
        return bool(self.choices) and all(c.finish_reason is not None for c in self.choices)


def start(engine: Engine, plan: Plan) -> None:
    """Admit every prompt of ``plan`` ``n`` times to the engine (503 ``overloaded`` when its queue is full)."""
    plan.choices = admit(engine, plan.id, plan.prompts, plan.params, plan.stops, n=plan.n)


def replay(plan: Plan, results: Sequence[tuple[str, str, int]]) -> None:
    """Fill ``plan`` with cached ``(text, finish_reason, completion_tokens)`` results instead of running it."""
    plan.cached = True
    prompts = [p for p in plan.prompts for _ in range(plan.n)]
    plan.choices = [
        Choice(
            index=i,
            prompt_tokens=len(prompt),
            stream=None,
            stops=plan.stops,
            completion_tokens=tokens,
            finish_reason=finish,
            text_parts=[text],
        )
        for i, (prompt, (text, finish, tokens)) in enumerate(zip(prompts, results, strict=True))
    ]


@dataclass(frozen=True, slots=True)
class ChoiceEvent:
    """Text produced by one choice; ``finish_reason`` is set on that choice's last event.

    ``logprobs`` (when the request asked for them) covers exactly ``text``.
    """

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[LogprobEntry] | None = None


def admit(
    engine: Engine,
    request_id: str,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stops: list[str],
    *,
    n: int = 1,
) -> list[Choice]:
    """Submit ``n`` engine requests per prompt (choice ``p * n + s``); all or nothing (503 when the queue is full).

    Sample ``s`` of a seeded request runs with :func:`derived_seed`, so every choice is reproducible alone.
    """
    choices: list[Choice] = []
    want_logprobs = params.logprobs is not None
    try:
        for p, ids in enumerate(prompts):
            for sample in range(n):
                i = p * n + sample
                row_params = (
                    params if sample == 0 else dataclasses.replace(params, seed=derived_seed(params.seed, sample))
                )
                req = EngineRequest(request_id=f"{request_id}-{i}", prompt_token_ids=ids, params=row_params)
                choice = Choice(index=i, prompt_tokens=len(ids), stream=engine.generate(req), stops=stops)
                choice.logprobs = [] if want_logprobs else None
                choices.append(choice)
    except EngineOverloaded as exc:
        for c in choices:
            if c.stream is not None:
                abort_soon(c.stream)
        raise overloaded(str(exc) or "The request queue is full; retry shortly.") from exc
    return choices


_closing: set[asyncio.Task[None]] = set()


def abort_soon(stream: RequestStream) -> None:
    """Close a stream from synchronous code or a cancelled context: a task that runs on the next loop turn."""
    task = asyncio.get_running_loop().create_task(stream.aclose())
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def run_choice(choice: Choice) -> AsyncIterator[ChoiceEvent]:
    """Yield the text of one choice with stop strings applied; always closes its engine stream."""
    if choice.stream is None:  # a cached result: replay it as one event
        yield ChoiceEvent(choice.index, choice.text, choice.finish_reason or "stop")
        return
    stream = choice.stream
    matcher = StopMatcher(choice.stops) if choice.stops else None
    try:
        async for delta in stream:
            if delta.token_ids:
                now_ = time.perf_counter()
                if choice.last_token_at is None:
                    choice.first_token_at = now_
                else:
                    choice.token_gaps.append(now_ - choice.last_token_at)
                choice.last_token_at = now_
            choice.completion_tokens += len(delta.token_ids)
            if delta.prompt_logprobs is not None:
                choice.prompt_logprobs = delta.prompt_logprobs
            text = delta.text
            finish = delta.finish_reason
            if matcher is not None:
                text, hit = matcher.push(text)
                if hit:
                    finish = "stop"
                elif finish is not None:
                    text += matcher.flush()
            entries = None
            if choice.logprobs is not None:
                if delta.logprobs and delta.token_texts is not None:
                    choice.held += map(LogprobEntry, delta.token_texts, delta.logprobs)
                entries = choice.release(text, final=finish is not None)
            if finish is not None:
                choice.finish_reason = finish
                choice.text_parts.append(text)
                yield ChoiceEvent(choice.index, text, finish, entries)
                return
            if text or entries:
                choice.text_parts.append(text)
                yield ChoiceEvent(choice.index, text, None, entries)
        raise EngineError("the engine ended a request without a finish reason")
    finally:
        await stream.aclose()


async def run_choices(choices: list[Choice]) -> AsyncIterator[ChoiceEvent]:
    """Interleave the events of several choices as they arrive (one choice: no tasks at all)."""
    if len(choices) == 1:
        async for event in run_choice(choices[0]):
            yield event
        return
    queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for event in run_choice(choice):
                queue.put_nowait(event)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            if c.stream is not None:
                abort_soon(c.stream)


async def collect(choices: list[Choice]) -> None:
    """Run all choices to the end (non-streaming responses)."""
    async for _ in run_choices(choices):
        pass


def engine_failure(exc: Exception) -> OpenAIError:
    """A 500 for an engine failure (logged with its cause; the client sees no internals)."""
    log.error("engine failure: %s", exc, exc_info=exc)
    return OpenAIError(500, "server_error", "The model failed while generating; see the server log.", code=None)
