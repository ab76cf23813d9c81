"""Upstream answers re-framed into this server's exact wire format (the stream format docs/REFERENCE.md documents).

Whatever the upstream's stream looks like (a role chunk or none, empty deltas, usage inside the last chunk or
after it), the client sees our ids, our ``created`` and our model name; one role chunk per choice first, then
content or tool-call chunks, exactly one finish chunk per choice, the usage chunk only when it asked, and an
error frame (502 ``upstream_error`` / 504 ``upstream_timeout``) if the upstream breaks off mid-stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from schemas.native.generate import GenerateResponse, StreamEvent
from schemas.openai.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceLogprobs,
    ChunkChoice,
    ToolCall,
)
from schemas.openai.common import CompletionTokensDetails, CompletionUsage, PromptTokensDetails
from schemas.openai.completions import Completion, CompletionChoice, CompletionLogprobs
from server.errors import OpenAIError
from server.serving.remote import RESPONSES_PATH, RemoteCall
from server.serving.responses.upstream import chat_answer, chat_chunks
from server.serving.streaming import error_event


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the name newer vLLM versions use


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    message: _Message | None = None
    text: str | None = None
    logprobs: Any = None
    finish_reason: str | None = None


class _Body(msgspec.Struct):
    """A chunk or a whole response, of either family (fields the other family has are absent)."""

    choices: list[_Choice] = []
    usage: Any = None
    error: Any = None


_decoder = msgspec.json.Decoder(_Body)


def malformed(name: str, what: str) -> OpenAIError:
    return OpenAIError(
        502, "server_error", f"The upstream serving '{name}' sent a malformed {what}.", code="upstream_error"
    )


MAX_USAGE_TOKENS = 2**53
"""Counts at or above this are not counts (an upstream that says so is treated as reporting nothing)."""


def _count(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value < MAX_USAGE_TOKENS else None


def _usage(value: Any) -> CompletionUsage | None:
    """The upstream's usage, or ``None`` (estimate instead) unless both counts are there as whole numbers ≥ 0:
    ``{}``, ``null``, a missing count, ``"11"``, ``1.5``, ``true`` or ``-3`` bill nothing on the upstream's word."""
    if not isinstance(value, dict):
        return None
    prompt, completion = _count(value.get("prompt_tokens")), _count(value.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    usage = CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
    prompt_details = value.get("prompt_tokens_details")
    cached = _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    if cached is not None and cached <= prompt:  # the upstream's prefix cache, passed on as it reported it
        usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached)
    details = value.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    if reasoning is not None:  # a reasoning model's count, passed on as the upstream gave it
        usage.completion_tokens_details = CompletionTokensDetails(reasoning_tokens=reasoning)
    return usage


def _thought(part: _Delta | _Message | None) -> str | None:
    """The reasoning text of an upstream message or delta, under either name vLLM has used."""
    if part is None:
        return None
    return part.reasoning_content if part.reasoning_content is not None else part.reasoning


def _convert(value: Any, kind: type[Any]) -> Any:
    """``value`` as ``kind`` (the upstream's logprobs / tool calls), or ``None`` when it does not fit."""
    if value is None:
        return None
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return None


# -- non-streaming ---------------------------------------------------------------------------------------------
def complete(call: RemoteCall, raw: bytes) -> msgspec.Struct:
    """Our response from the upstream's whole answer ``raw``."""
    if call.path == RESPONSES_PATH:
        raw = chat_answer(raw)
    try:
        body = _decoder.decode(raw)
    except msgspec.DecodeError:
        raise malformed(call.model, "response") from None
    if not body.choices:
        raise malformed(call.model, "response (no choices)")
    call.first_token_at = call.last_token_at = time.perf_counter()
    for ch in body.choices:
        r = call.choice(ch.index)
        content = ch.message.content if ch.message is not None else ch.text
        if content:
            r.text_parts.append(content)
        thought = _thought(ch.message)
        if thought is not None:
            r.reasoning_parts = [thought]
        r.finish_reason = ch.finish_reason or "stop"
        r.logprobs = ch.logprobs
        if ch.message is not None and ch.message.tool_calls:
            r.tool_calls = _convert(ch.message.tool_calls, list[ToolCall])
            if r.tool_calls is None:
                raise malformed(call.model, "tool call")
    call.upstream_usage = _usage(body.usage)
    return render(call)


def render(call: RemoteCall) -> msgspec.Struct:
    """The non-streaming response of a finished call (also a cache hit's)."""
    results = sorted(call.results.items())
    usage = call.usage
    if call.family == "chat":
        choices = [
            ChatChoice(
                index=i,
                message=ChatCompletionMessage(
                    content=r.text if r.text or not r.tool_calls else None,
                    tool_calls=r.tool_calls if r.tool_calls else msgspec.UNSET,
                    reasoning_content=msgspec.UNSET if r.reasoning_parts is None else "".join(r.reasoning_parts),
                ),
                logprobs=_convert(r.logprobs, ChoiceLogprobs),
                finish_reason=r.finish_reason or "stop",
            )
            for i, r in results
        ]
        return ChatCompletion(id=call.id, created=call.created, model=call.model, choices=choices, usage=usage)
    if call.family == "completions":
        texts = [
            CompletionChoice(
                index=i,
                text=r.text,
                logprobs=_convert(r.logprobs, CompletionLogprobs),
                finish_reason=r.finish_reason or "stop",
            )
            for i, r in results
        ]
        return Completion(id=call.id, created=call.created, model=call.model, choices=texts, usage=usage)
    (_, only), *_ = results
    return GenerateResponse(
        model=call.model, output=only.text, finish_reason=only.finish_reason or "stop", usage=usage, cached=call.cached
    )


# -- streaming -------------------------------------------------------------------------------------------------
async def stream(
    call: RemoteCall, payloads: AsyncIterator[bytes], scrub: Callable[[str], str] = str
) -> AsyncIterator[msgspec.Struct]:
    """Our stream of the upstream's SSE ``payloads``: re-framed chunks, then usage when asked; an error frame if it
    breaks (``payloads`` raising an :class:`OpenAIError` when the upstream stalls or the connection breaks)."""
    out = _Framer(call)
    if call.path == RESPONSES_PATH:
        payloads = chat_chunks(payloads)
    try:
        async for data in payloads:
            if data.strip() == b"[DONE]":
                break
            try:
                chunk = _decoder.decode(data)
            except msgspec.DecodeError:
                yield error_event(malformed(call.model, "stream chunk"))
                return
            if chunk.error is not None:
                yield error_event(_stream_error(call.model, chunk.error, scrub))
                return
            try:
                events = out.push(chunk)
            except OpenAIError as exc:  # a chunk we cannot re-frame (a malformed tool call)
                yield error_event(exc)
                return
            for event in events:
                yield event
    except OpenAIError as exc:
        yield error_event(exc)
        return
    if not call.finished:
        yield error_event(malformed(call.model, "stream (it ended before every choice finished)"))
        return
    for event in out.end():
        yield event


def replay_stream(call: RemoteCall) -> AsyncIterator[msgspec.Struct]:
    """A cache hit as a stream."""
    out = _Framer(call)
    results = sorted(call.results.items())
    call.results = {}

    async def events() -> AsyncIterator[msgspec.Struct]:
        for i, r in results:
            piece = _Choice(index=i, delta=_Delta(content=r.text), text=r.text, finish_reason=r.finish_reason)
            for event in out.push(_Body(choices=[piece])):
                yield event
        call.results = dict(results)
        for event in out.end():
            yield event

    return events()


def _stream_error(name: str, error: Any, scrub: Callable[[str], str]) -> OpenAIError:
    message = scrub(str(error.get("message") if isinstance(error, dict) else error))
    return OpenAIError(
        502, "server_error", f"The upstream serving '{name}' failed mid-stream: {message}", code="upstream_error"
    )


class _Framer:
    """Turns upstream chunks into our chunks, recording each choice's output in ``call.results``."""

    def __init__(self, call: RemoteCall) -> None:
        self.call = call
        self.usage: Any = None if call.include_usage else msgspec.UNSET

    def push(self, chunk: _Body) -> list[msgspec.Struct]:
        call = self.call
        usage = _usage(chunk.usage)
        if usage is not None:  # vLLM sends ``"usage": null`` on every chunk before the last
            call.upstream_usage = usage
        out: list[msgspec.Struct] = []
        for ch in chunk.choices:
            r = call.results.get(ch.index)
            if r is None:
                r = call.choice(ch.index)
                if call.family == "chat":
                    out.append(self._chat(ChunkChoice(index=ch.index, delta=ChoiceDelta(role="assistant", content=""))))
            if r.finish_reason is not None:
                continue  # one finish chunk per choice, whatever the upstream repeats
            text = (ch.delta.content if ch.delta is not None else ch.text) or ""
            calls = ch.delta.tool_calls if ch.delta is not None else None
            thought = _thought(ch.delta) if call.family == "chat" else None
            if text or calls or thought:
                r.pieces += 1
                self._timing()
            r.text_parts.append(text)
            r.finish_reason = ch.finish_reason
            if thought:
                if r.reasoning_parts is None:
                    r.reasoning_parts = []
                r.reasoning_parts.append(thought)
                out.append(self._chat(ChunkChoice(index=ch.index, delta=ChoiceDelta(reasoning_content=thought))))
            out += self._pieces(ch, text, calls)
        return out

    def _timing(self) -> None:
        call, t = self.call, time.perf_counter()
        if call.first_token_at is None:
            call.first_token_at = t
        elif call.last_token_at is not None:
            call.token_gaps.append(t - call.last_token_at)
        call.last_token_at = t

    def _chat(self, choice: ChunkChoice) -> ChatCompletionChunk:
        c = self.call
        return ChatCompletionChunk(id=c.id, created=c.created, model=c.model, choices=[choice], usage=self.usage)

    def _pieces(self, ch: _Choice, text: str, calls: list[dict[str, Any]] | None) -> list[msgspec.Struct]:
        c = self.call
        if c.family == "chat":
            logprobs = _convert(ch.logprobs, ChoiceLogprobs)
            out: list[msgspec.Struct] = []
            if text or (logprobs is not None and not calls):
                out.append(self._chat(ChunkChoice(index=ch.index, delta=ChoiceDelta(content=text), logprobs=logprobs)))
                logprobs = None
            if calls:
                deltas = _convert(calls, list[ChoiceDeltaToolCall])
                if deltas is None:
                    raise malformed(c.model, "tool-call chunk")
                out.append(
                    self._chat(ChunkChoice(index=ch.index, delta=ChoiceDelta(tool_calls=deltas), logprobs=logprobs))
                )
            if ch.finish_reason is not None:
                out.append(self._chat(ChunkChoice(index=ch.index, delta=ChoiceDelta(), finish_reason=ch.finish_reason)))
            return out
        if c.family == "completions":
            if not text and ch.logprobs is None and ch.finish_reason is None:
                return []
            piece = CompletionChoice(
                index=ch.index,
                text=text,
                logprobs=_convert(ch.logprobs, CompletionLogprobs),
                finish_reason=ch.finish_reason,
            )
            return [Completion(id=c.id, created=c.created, model=c.model, choices=[piece], usage=self.usage)]
        # native: the last event (after the upstream's usage arrives) carries the finish reason
        return [StreamEvent(output=text)] if text else []

    def end(self) -> list[msgspec.Struct]:
        """What follows the last upstream chunk: the usage chunk (chat, completions) or the native last event."""
        c = self.call
        if c.family == "generate":
            (_, only), *_ = sorted(c.results.items())
            return [StreamEvent(output="", finish_reason=only.finish_reason or "stop", usage=c.usage)]
        if not c.include_usage:
            return []
        if c.family == "chat":
            return [ChatCompletionChunk(id=c.id, created=c.created, model=c.model, choices=[], usage=c.usage)]
        return [Completion(id=c.id, created=c.created, model=c.model, choices=[], usage=c.usage)]
