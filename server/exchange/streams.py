"""A streamed answer's events, wrapped so that whatever ends the stream settles it exactly once.

A shutdown may cut the stream between two events or while it waits (an error frame ends it); a client disconnect
cancels it. When that cancellation lands outside the body (in a blocked send, the body suspended at a ``yield``)
the body's ``finally`` would run only once it is garbage-collected, and a body never started runs none: the
response's ``after`` hook settles then, so an engine row or an upstream slot is never held on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import msgspec

from schemas.openai.errors import ErrorResponse
from server.exchange.shutdown import InFlight, Lifecycle, shutting_down
from server.metrics import Metrics
from server.records.record import RequestRecord
from server.serving.streaming import error_event


class Settlement:
    """``finish(failed)`` and leaving the lifecycle, run once by whichever comes first: the end of the body, the
    end of the response, or a failure before the answer; shielded, since after a disconnect every await would be
    cancelled again."""

    def __init__(self, finish: Callable[[bool], Awaitable[None]], lifecycle: Lifecycle, handle: InFlight) -> None:
        self._finish, self._lifecycle, self._handle = finish, lifecycle, handle
        self._done = False

    async def __call__(self, failed: bool, *, shield: bool = True) -> None:
        """Settle unless already settled. ``shield=False`` only where nothing can cancel the caller meanwhile (a
        handler that has its answer: neither a disconnect nor the drain cancels it then), which saves a cancel scope
        on the hot path."""
        if self._done:
            return
        self._done = True
        try:
            if shield:
                with anyio.CancelScope(shield=True):
                    await self._finish(failed)
            else:
                await self._finish(failed)
        finally:
            self._lifecycle.leave(self._handle)

    async def abandoned(self) -> None:
        """The response is over; settle if the body never ran (a no-op after a body that ended)."""
        await self(True)


async def settled_events(
    events: AsyncIterator[msgspec.Struct],
    metrics: Metrics,
    record: RequestRecord | None,
    handle: InFlight,
    settle: Settlement,
) -> AsyncIterator[msgspec.Struct]:
    """``events`` as sent: error frames counted and noted in the log, a cut by a shutdown ended with an error frame,
    the time to the first token noted; settled when it ends."""
    handle.task = asyncio.current_task()  # the task iterating the body, which a shutdown may cancel
    failed = False
    try:
        while not handle.cut:
            try:
                with handle.cancellable():
                    event = await anext(events)
            except StopAsyncIteration:
                break
            if isinstance(event, ErrorResponse):
                failed = True
                metrics.errors_total.labels(event.error.type).inc()
                if record is not None:
                    record.error_type = event.error.code or event.error.type
            elif record is not None and record.ttft_ms is None:
                record.first_token()
            yield event
        else:  # cut by a shutdown between two events
            failed = True
            yield _cut_event(metrics, record)
    except asyncio.CancelledError:
        if not handle.absorb():
            raise
        failed = True  # cut by a shutdown while waiting for the next event
        yield _cut_event(metrics, record)
    finally:
        with anyio.CancelScope(shield=True):
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()
        await settle(failed)


def _cut_event(metrics: Metrics, record: RequestRecord | None) -> ErrorResponse:
    """The last frame of a stream cut short by a shutdown (counted, and noted in the request log)."""
    err = shutting_down(cut=True)
    metrics.errors_total.labels(err.type).inc()
    if record is not None:
        record.error_type = err.code
    return error_event(err)
