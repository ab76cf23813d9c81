"""The one protocol the exchange runs: a validated request for a local engine or a remote upstream.

A local model's :class:`~server.serving.plan.Plan` implements it as it is; a remote model's call is wrapped by
:class:`~server.exchange.remote.RemoteWork`, which owns the upstream I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Protocol

import msgspec

from server.serving.plan import CacheEntry, Demand, Outcome


class Work(Protocol):
    """One request's work, from admission to its outcome.

    The exchange calls, in order: :meth:`demand` (what to reserve), :meth:`cache_material` and maybe
    :meth:`replay` (a cache hit), then, unless it hit, :meth:`open` and :meth:`complete` or :meth:`events`;
    whatever happened, :meth:`close` once and :meth:`outcome`; :meth:`cache_entry` after a finished run.
    """

    @property
    def model(self) -> str:
        """The served model name."""
        ...

    @property
    def stream(self) -> bool:
        """The client asked for a stream of events."""
        ...

    @property
    def cached(self) -> bool:
        """Answered from the cache (no model ran)."""
        ...

    @property
    def finished(self) -> bool:
        """Every choice ran to a finish reason."""
        ...

    def demand(self) -> Demand: ...

    def prompt_text(self) -> str:
        """The prompt as text, for a request log that stores prompts."""
        ...

    def cache_material(self) -> object | None:
        """Everything that determines the output, or ``None`` when the request is not cacheable."""
        ...

    def cache_entry(self) -> CacheEntry: ...

    def replay(self, entry: CacheEntry) -> bool:
        """Fill the results from a cached entry instead of running (``False``: the entry does not fit)."""
        ...

    def isolate(self, scope: str) -> None:
        """Share the model's cached prompt prefixes only with work of ``scope`` (called before :meth:`open`; a no-op
        where nothing is cached across requests)."""
        ...

    def open(self) -> Awaitable[None] | None:
        """Start generating (engine rows admitted, or the upstream request sent and its headers read).

        What cannot be done at once (a remote request) is returned as an awaitable, which the exchange awaits so
        that a client disconnect or a shutdown can cut it. A stream's headers go out only after it.
        """
        ...

    async def complete(self) -> msgspec.Struct:
        """Run to the end and return the response."""
        ...

    def events(self) -> AsyncIterator[msgspec.Struct]:
        """The stream of chunks (an ``ErrorResponse`` ends a failed one)."""
        ...

    async def close(self) -> None:
        """Release what it holds (engine rows abort, the upstream request is closed); a no-op the second time."""
        ...

    def outcome(self) -> Outcome: ...
