"""A remote model's request as exchange :class:`~server.exchange.work.Work`: the upstream slot and its I/O.

Sending takes one of the upstream's concurrency slots (503 ``overloaded`` after waiting) and opens the request;
closing closes the connection (the upstream aborts an unfinished request) and gives the slot back. The request's
validation, forwarded body and re-framing stay in the serving layer (``server.serving.remote`` and
``server.serving.reframe``), which does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable

import anyio
import msgspec

from schemas.openai.common import CompletionUsage
from server.providers.upstream import Answer, Upstream
from server.serving import reframe, remote
from server.serving.plan import CacheEntry, Demand, Outcome
from server.serving.remote import RemoteCall


class RemoteWork:
    """``call`` sent to ``upstream``."""

    __slots__ = ("_answer", "_holds_slot", "call", "upstream")

    def __init__(self, call: RemoteCall, upstream: Upstream) -> None:
        self.call = call
        self.upstream = upstream
        self._answer: Answer | None = None
        self._holds_slot = False

    @property
    def model(self) -> str:
        return self.call.model

    @property
    def stream(self) -> bool:
        return self.call.stream

    @property
    def cached(self) -> bool:
        return self.call.cached

    @property
    def finished(self) -> bool:
        return self.call.finished

    def demand(self) -> Demand:
        return self.call.demand()

    def prompt_text(self) -> str:
        return self.call.prompt_text

    def cache_material(self) -> object | None:
        return remote.cache_material(self.call)

    def cache_entry(self) -> CacheEntry:
        return remote.cache_entry(self.call)

    def replay(self, entry: CacheEntry) -> bool:
        return remote.replay(self.call, entry)

    def isolate(self, scope: str) -> None:
        """An upstream keeps its own prefix cache; nothing of it is shared through this server."""

    def open(self) -> Awaitable[None] | None:
        return self._send()

    async def _send(self) -> None:
        """Take an upstream slot and open the request (the slot is given back by :meth:`close`)."""
        self.call.admitted_at = time.perf_counter()
        await self.upstream.acquire()
        self._holds_slot = True
        self.call.started_at = time.perf_counter()
        self._answer = await self.upstream.open(self.call.path, self.call.payload)

    async def complete(self) -> msgspec.Struct:
        if self.call.cached:
            return reframe.render(self.call)
        if self._answer is None:
            await self._send()
        assert self._answer is not None
        try:
            return reframe.complete(self.call, await self._answer.read())
        finally:
            await self.close()

    def events(self) -> AsyncIterator[msgspec.Struct]:
        if self._answer is None:
            return reframe.replay_stream(self.call)
        return reframe.stream(self.call, self._answer.events(), self.upstream.scrub)

    async def close(self) -> None:
        answer, self._answer = self._answer, None
        if answer is not None:
            with anyio.CancelScope(shield=True):
                await answer.aclose()  # closes the upstream connection: the upstream aborts an unfinished request
        if self._holds_slot:
            self._holds_slot = False
            self.upstream.release()

    def outcome(self) -> Outcome:
        call = self.call
        results = sorted(call.results.items())
        ran = call.started_at is not None and not call.cached and bool(results)
        if results:
            usage = call.usage
        else:  # the estimate admission logged stands
            usage = CompletionUsage(
                prompt_tokens=call.prompt_estimate, completion_tokens=0, total_tokens=call.prompt_estimate
            )
        return Outcome(
            usage=usage,
            charged_tokens=usage.total_tokens if ran else 0,
            finish_reasons=[r.finish_reason for _, r in results],
            texts=[r.text for _, r in results],
            runs=[call] if ran and call.admitted_at is not None else [],
            usage_estimated=call.usage_estimated and bool(results),
        )
