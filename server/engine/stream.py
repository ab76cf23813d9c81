"""A :class:`RequestStream` fed from the engine's worker (any thread) and read on the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from server.engine.base import EngineDelta, EngineError

_END = object()


class QueueStream:
    """Per-request queue between an engine worker and the asyncio consumer.

    The worker calls :meth:`put` / :meth:`fail` (thread-safe); the consumer iterates. ``aclose()`` calls
    ``on_abort`` once unless the request already finished, so the worker can drop it within one step.

    Args:
        loop: The event loop the consumer runs on.
        on_abort: Called (on the loop's thread) when the consumer gives up before the last delta.
    """

    __slots__ = ("_closed", "_finished", "_loop", "_on_abort", "_queue", "started_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_abort: Callable[[], None]) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[EngineDelta | BaseException | object] = asyncio.Queue()
        self._on_abort = on_abort
        self._finished = False
        self._closed = False
        self.started_at: float | None = None

    def mark_started(self) -> None:
        """The engine begins prefilling this request (any thread): the end of its queue time."""
        if self.started_at is None:
            self.started_at = time.perf_counter()

    # -- producer side (any thread) -------------------------------------------------------------------
    def put(self, delta: EngineDelta) -> None:
        """Deliver ``delta``; thread-safe."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    def fail(self, exc: BaseException) -> None:
        """End the stream with ``exc`` (raised to the consumer as EngineError); thread-safe."""
        err = exc if isinstance(exc, EngineError) else EngineError(f"{type(exc).__name__}: {exc}")
        self._loop.call_soon_threadsafe(self._queue.put_nowait, err)

    # -- consumer side (event loop) -------------------------------------------------------------------
    def __aiter__(self) -> QueueStream:
        return self

    async def __anext__(self) -> EngineDelta:
        if self._finished or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        assert isinstance(item, EngineDelta)
        if item.finish_reason is not None:
            self._finished = True
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            self._on_abort()

    @property
    def finished(self) -> bool:
        """True once the final delta (or an error) has been read."""
        return self._finished
