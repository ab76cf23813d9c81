"""Running admitted requests: one :class:`Choice` per engine request, its events, stop strings and logprobs.

:func:`admit` submits a plan's prompts (``n`` samples each) to the engine; :func:`run_choices` interleaves the
choices' text as it arrives, applies stop strings, and releases logprob entries in step with the text, so that the
entries of a choice always join to exactly its text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from server.engine.base import (
    Engine,
    EngineError,
    EngineOverloaded,
    EngineRequest,
    RequestStream,
    SamplingParams,
    TokenLogprob,
)
from server.errors import OpenAIError, overloaded
from server.serving.reasoning import ReasoningCounter
from server.serving.stops import StopMatcher

log = logging.getLogger("server.serving")


def derived_seed(seed: int | None, sample: int) -> int | None:
    """The seed of sample ``sample`` of a prompt: sample 0 keeps ``seed``, the others get distinct derived ones."""
    if seed is None or sample == 0:
        return seed
    return (seed + sample * 0x9E3779B97F4A7C15) % 2**64  # the golden-ratio increment spreads nearby seeds apart


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
    # A reasoning model's reasoning tokens, counted from the engine's own deltas (None: output is not split).
    reasoning: ReasoningCounter | None = None
    cached_tokens: int = 0  # prompt tokens the engine reused from its prefix cache (reported with the first delta)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def started_at(self) -> float | None:
        """When the engine began prefilling it (the end of its queue time), if it has."""
        return self.stream.started_at if self.stream is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

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
    cache_scope: str = "",
) -> list[Choice]:
    """Submit ``n`` engine requests per prompt (choice ``p * n + s``); all or nothing (503 when the queue is full).

    The ``n`` samples of a prompt go to the engine as one group (:meth:`Engine.generate_group`), which prefills the
    prompt once. Sample ``s`` of a seeded request runs with :func:`derived_seed`, so every choice is reproducible
    alone. ``cache_scope`` bounds which requests' cached prompt prefixes the engine may reuse for them.
    """
    choices: list[Choice] = []
    want_logprobs = params.logprobs is not None
    try:
        for p, ids in enumerate(prompts):
            group = [
                EngineRequest(
                    request_id=f"{request_id}-{p * n + sample}",
                    prompt_token_ids=ids,
                    cache_scope=cache_scope,
                    params=params
                    if sample == 0
                    else dataclasses.replace(params, seed=derived_seed(params.seed, sample)),
                )
                for sample in range(n)
            ]
            for sample, stream in enumerate(engine.generate_group(group)):
                choice = Choice(index=p * n + sample, prompt_tokens=len(ids), stream=stream, stops=stops)
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
            if choice.reasoning is not None:
                choice.reasoning.feed(delta)
            if delta.prompt_logprobs is not None:
                choice.prompt_logprobs = delta.prompt_logprobs
            if delta.cached_tokens is not None:
                choice.cached_tokens = delta.cached_tokens
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
