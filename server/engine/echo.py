"""``builtin:echo``: streams the last user message back, one character per token, with no torch at all.

It exists to load-test the gateway (auth, limits, logging, streaming) without a model's cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from server.engine.base import (
    EngineDelta,
    EngineError,
    EngineOverloaded,
    EngineRequest,
    ModelInfo,
    RequestStream,
    TokenLogprob,
)
from server.engine.chartok import CharTokenizer, last_user_message


class ScriptedStream:
    """A :class:`RequestStream` that emits a fixed list of token ids, optionally paced and failing."""

    def __init__(
        self,
        request: EngineRequest,
        token_ids: list[int],
        tokenizer: CharTokenizer,
        *,
        eos_id: int,
        delay_s: float = 0.0,
        fail_after: int | None = None,
        on_close: Callable[[ScriptedStream, bool], None] | None = None,
    ) -> None:
        self.request = request
        params = request.params
        budget = params.max_tokens
        self._ids = token_ids[:budget]
        self._finish = "length" if len(token_ids) >= budget else "stop"
        if self._finish == "stop" and not params.ignore_eos:
            self._ids.append(eos_id)
        elif self._finish == "stop":  # ignore_eos: keep going with spaces up to max_tokens
            self._ids += [ord(" ")] * (budget - len(self._ids))
            self._finish = "length"
        self._eos_id = eos_id
        self._tokenizer = tokenizer
        self._pos = 0
        self._delay = delay_s
        self._fail_after = fail_after
        self._on_close = on_close
        self._done = False
        self._closed = False
        self.started_at: float | None = None

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> EngineDelta:
        if self._done or self._closed:
            raise StopAsyncIteration
        if self.started_at is None:
            self.started_at = time.perf_counter()
        if self._delay:
            await asyncio.sleep(self._delay)
        if self._fail_after is not None and self._pos >= self._fail_after:
            self._done = True
            raise EngineError("injected engine failure")
        tid = self._ids[self._pos]
        self._pos += 1
        last = self._pos == len(self._ids)
        text = "" if tid == self._eos_id else self._tokenizer.decode([tid])
        if last:
            self._done = True
        delta = EngineDelta(token_ids=[tid], text=text, finish_reason=self._finish if last else None)  # type: ignore[arg-type]
        params = self.request.params
        if params.logprobs is not None:
            # A scripted reply is certain: probability 1 for the token it emits, and no alternatives worth naming.
            entry = TokenLogprob(tid, 0.0, ((tid, 0.0),) if params.logprobs else ())
            delta.logprobs, delta.token_texts = ([], []) if tid == self._eos_id else ([entry], [text])
        if self._pos == 1 and params.prompt_logprobs is not None:
            prompt = self.request.prompt_token_ids
            top = params.prompt_logprobs
            delta.prompt_logprobs = [TokenLogprob(t, 0.0, ((t, 0.0),) if top else ()) for t in prompt[1:]]
        return delta

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close(self, not self._done)


class EchoEngine:
    """The ``builtin:echo`` engine.

    Args:
        served_model_name: The model id clients use.
        max_model_len: Context window used for validation.
        max_queue_size: Requests admitted at once before answering 503.
        token_delay_s: Pause before each token (a stand-in for a real model's pace).
    """

    def __init__(
        self,
        served_model_name: str = "echo",
        *,
        max_model_len: int = 32768,
        max_queue_size: int = 1024,
        token_delay_s: float = 0.0,
    ):
        self._tokenizer = CharTokenizer()
        self._info = ModelInfo(
            name=served_model_name, source="builtin:echo", max_model_len=max_model_len, created=int(time.time())
        )
        self._max_queue = max_queue_size
        self._delay = token_delay_s
        self._active: set[ScriptedStream] = set()
        self._ready = False
        self._stopping = False

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def failure(self) -> str | None:
        """A scripted engine never fails for good."""
        return None

    @property
    def tokenizer(self) -> CharTokenizer:
        return self._tokenizer

    @property
    def supports_constraints(self) -> bool:
        """A scripted reply cannot follow a grammar."""
        return False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def active_requests(self) -> int:
        """Requests admitted and not yet closed."""
        return len(self._active)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self._active if s.started_at is not None)

    @property
    def num_waiting(self) -> int:
        return sum(1 for s in self._active if s.started_at is None)

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._stopping = True
        self._ready = False

    def reply_ids(self, request: EngineRequest) -> list[int]:
        """Token ids this engine answers ``request`` with (before EOS / max_tokens)."""
        prompt = self._tokenizer.decode(request.prompt_token_ids)
        return self._tokenizer.encode(last_user_message(prompt))

    def generate(self, request: EngineRequest) -> RequestStream:
        return self.generate_group([request])[0]

    def generate_group(self, requests: Sequence[EngineRequest]) -> list[RequestStream]:
        """One scripted stream per request (nothing to share without a model); all admitted or none."""
        if self._stopping:
            raise EngineOverloaded("The server is shutting down.")
        if len(self._active) + len(requests) > self._max_queue:
            raise EngineOverloaded("The request queue is full; retry shortly.")
        return [self._track(self._make_stream(request)) for request in requests]

    def _make_stream(self, request: EngineRequest) -> ScriptedStream:
        return ScriptedStream(
            request,
            self.reply_ids(request),
            self._tokenizer,
            eos_id=next(iter(self._tokenizer.eos_token_ids)),
            delay_s=self._delay,
        )

    def _track(self, stream: ScriptedStream) -> ScriptedStream:
        self._active.add(stream)
        previous = stream._on_close

        def closed(s: ScriptedStream, aborted: bool) -> None:
            self._active.discard(s)
            if previous is not None:
                previous(s, aborted)

        stream._on_close = closed
        return stream
