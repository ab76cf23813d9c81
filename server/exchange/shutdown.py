"""The process's shutdown state: draining, the grace period, and the in-flight generation requests it may cut.

On SIGTERM the server (``server.cli.runner``) stops accepting connections and calls :meth:`Lifecycle.begin`: new
requests that still reach the app get 503 ``overloaded``; in-flight ones run on for the grace period. When it
runs out, :meth:`Lifecycle.expire` cuts every request still registered: one waiting on the engine is cancelled
at once (its task gets a ``CancelledError`` that :meth:`InFlight.absorb` turns back into a normal return), one
busy elsewhere (e.g. writing to a slow client) stops at its next step. The cut request answers 503, or ends
its stream with an error frame, and settles its accounting before the engine and the request log stop.

A fatal start-up failure (the model does not load) is reported here too, so the runner can exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from server.errors import OpenAIError, overloaded

#: Seconds between the end of the grace period and uvicorn cancelling whatever still runs (a cut request
#: only needs to send its last frame and settle; this bounds one stuck on a client that stopped reading).
CANCEL_MARGIN_S = 5.0
_CANCEL_MESSAGE = "shutdown grace period over"


@dataclass(eq=False, slots=True, weakref_slot=True)
class InFlight:
    """One generation request the drain may cut.

    Attributes:
        task: The task that runs it (rebound by a stream to the task iterating its body).
        waiting: True while the task is suspended on the engine: cancelling it there is safe.
        cut: The grace period ran out; stop at the next step.
        cancelled: The drain cancelled ``task``; the next ``CancelledError`` is the drain's.
    """

    task: asyncio.Task[Any] | None
    waiting: bool = False
    cut: bool = False
    cancelled: bool = False

    @contextlib.contextmanager
    def cancellable(self) -> Iterator[None]:
        """Around an await on the model or the upstream: there a shutdown whose grace ran out may cancel the task."""
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False

    def absorb(self) -> bool:
        """After a ``CancelledError``: True (and the cancellation withdrawn) when the drain caused it."""
        if not self.cancelled or self.task is None:
            return False
        self.cancelled = False
        self.task.uncancel()
        return True


class Lifecycle:
    """Shared by the app (which registers requests) and the runner (which begins the drain)."""

    def __init__(self) -> None:
        self.draining = False
        self.expired = False
        self.failure: str | None = None
        self.loaded = False
        """Every local model has started (:meth:`models_loaded`)."""
        self.on_loaded: Callable[[], None] | None = None
        """Called once every local model has started (``serve`` freezes its start-up heap then)."""
        self._inflight: weakref.WeakSet[InFlight] = weakref.WeakSet()

    # -- the runner ------------------------------------------------------------------------------------
    def begin(self, grace_s: float) -> None:
        """Start draining (on the event loop): refuse new requests, cut the in-flight ones after ``grace_s``."""
        if self.draining:
            return
        self.draining = True
        asyncio.get_running_loop().call_later(grace_s, self.expire)

    def expire(self) -> None:
        """The grace period is over: cut every in-flight request."""
        self.draining = self.expired = True
        for handle in list(self._inflight):
            handle.cut = True
            task = handle.task
            if handle.waiting and task is not None and not task.done() and not handle.cancelled:
                handle.cancelled = True
                task.cancel(_CANCEL_MESSAGE)

    def models_loaded(self) -> None:
        """Every local model has started; runs :attr:`on_loaded` on the event loop, in the same step."""
        self.loaded = True
        if self.on_loaded is not None:
            self.on_loaded()

    def fail(self, message: str) -> None:
        """A fatal error (the model did not load): the runner stops the server and exits non-zero."""
        self.failure = message

    # -- the app ---------------------------------------------------------------------------------------
    def enter(self) -> InFlight:
        """Register the current task's request (503 once the grace period is over: admit nothing new)."""
        if self.expired:
            raise shutting_down()
        handle = InFlight(asyncio.current_task())
        self._inflight.add(handle)
        return handle

    def leave(self, handle: InFlight) -> None:
        """The request has ended and settled its accounting."""
        self._inflight.discard(handle)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is registered (at most ``timeout_s``); False if some still are."""
        deadline = time.monotonic() + timeout_s
        while self._inflight:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def shutting_down(cut: bool = False) -> OpenAIError:
    """The 503 ``overloaded`` of a request refused (or, with ``cut``, cut short) because the server stops."""
    if cut:
        return overloaded("The server is shutting down; the response was cut short. Retry the request.")
    return overloaded("The server is shutting down; retry the request.")
