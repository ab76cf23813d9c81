"""One request's life, local or remote alike: admit -> cache -> run -> settle -> observe.

:meth:`Exchange.run` takes a request's :class:`~server.exchange.work.Work` (a local plan or a remote call), the
caller and a "client gone" awaitable, and returns a :class:`Reply`: a response body, or a stream of events with a
hook for when the response has ended. It never sees HTTP, so it is tested without a server.

- The gateway admits the request (tokens per minute, sequences, concurrency, quota reservation) and answers with a
  ticket; the ticket is settled exactly once, with what the request used, however it ends (success, error, client
  disconnect, shutdown).
- The request is registered with the :class:`~server.exchange.shutdown.Lifecycle` until it has settled, so a
  shutdown can cut it when its grace period runs out (503 ``overloaded``, or an error frame ending a stream) and
  then wait for it before the engines and the writer stop.
- A deterministic request is answered from the completion cache when it can be (``x-cache: HIT``); a finished run
  is written to it.
- A stream's headers go out only once the work has opened (a remote upstream has answered), so a failure before is
  a proper error status rather than an error frame.
- What the request used is counted in the metrics and noted in its request-log row.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from server import tracing
from server.admission.gateway import Gateway, Ticket
from server.auth.principal import Principal
from server.errors import OpenAIError
from server.exchange.cache import CompletionCache, cache_key, encode_entry
from server.exchange.observe import log_outcome, observe, trace_outcome, trace_request
from server.exchange.shutdown import InFlight, Lifecycle, shutting_down
from server.exchange.streams import Settlement, settled_events
from server.exchange.work import Work
from server.metrics import Metrics
from server.records.record import RequestRecord
from server.records.writer import BatchWriter
from server.serving.plan import Outcome

T = TypeVar("T")

Disconnected = Callable[[], Awaitable[None]]
"""Returns (once awaited) when the client has gone."""


@dataclass(slots=True)
class Reply:
    """What the API sends: ``body`` as JSON, or ``events`` as a stream, then ``after`` once the response has ended."""

    headers: dict[str, str]
    body: msgspec.Struct | None = None
    events: AsyncIterator[msgspec.Struct] | None = None
    after: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)


@dataclass(slots=True)
class Exchange:
    """Runs requests through the gateway, the cache and their model, and accounts for them.

    Args:
        gateway: Admission and settlement of tickets.
        cache: The completion cache (``None``: disabled).
        writer: Where request-log rows and cache entries are queued.
        metrics: The Prometheus metrics.
        lifecycle: The process's shutdown state.
        store_prompts: Request-log rows keep prompt and output text.
        prefix_cache_scope: Who shares the engine's cached prompt prefixes: ``key``, ``role`` or ``global``.
    """

    gateway: Gateway
    cache: CompletionCache | None
    writer: BatchWriter
    metrics: Metrics
    lifecycle: Lifecycle
    store_prompts: bool = False
    prefix_cache_scope: str = "key"

    async def run(
        self,
        work: Work,
        caller: Principal,
        record: RequestRecord | None,
        disconnected: Disconnected,
        admitted: Callable[[dict[str, str]], None] | None = None,
    ) -> Reply:
        """Admit ``work``, answer it from the cache or its model, and account for it.

        ``admitted`` is called with the rate-limit headers once the gateway has admitted it (a background response
        answers its client then); it must not raise.

        Raises:
            OpenAIError: refused by the gateway (429, 403 ...), the model failed or is overloaded, a shutdown cut it
                (503), or the client left before the answer (499, seen only by the request log).
        """
        demand = work.demand()
        if record is not None:
            record.model = work.model
            record.prompt_tokens = demand.tpm_prompt_tokens or demand.prompt_tokens
            if self.store_prompts:
                record.prompt_text = work.prompt_text()
        tracer = tracing.TRACER
        span = trace_request(work) if tracer is not None else None
        handle = self.lifecycle.enter()
        admission = tracer.start_span("admission") if tracer is not None else None
        try:
            ticket = await self.gateway.admit(
                caller,
                prompt_tokens=demand.prompt_tokens,
                max_new_tokens=demand.max_new_tokens,
                explicit_max=demand.explicit_max_tokens,
                tpm_prompt_tokens=demand.tpm_prompt_tokens,
                sequences=demand.sequences,
                rpm_tested=True,  # by the API's gate, before any work on the prompt
            )
        except BaseException as exc:
            self.lifecycle.leave(handle)
            if admission is not None:
                admission.record_exception(exc)
            raise
        finally:
            if admission is not None:
                admission.end()
        headers = dict(ticket.headers)
        if admitted is not None:
            admitted(headers)
        key: list[str] = []  # the cache key, once looked up

        estimated = False

        async def finish(failed: bool) -> None:
            nonlocal estimated
            await work.close()
            outcome = await self._settle(work, ticket, record, key[0] if key else None, ok=work.finished and not failed)
            estimated = outcome.usage_estimated
            if span is not None:
                trace_outcome(span, work, outcome, record.error_type if record is not None else None)

        settle = Settlement(finish, self.lifecycle, handle)
        work.isolate(prefix_scope(caller, self.prefix_cache_scope))
        try:
            if (found := await self._lookup(work, caller, headers)) is not None:
                key.append(found)
            if not work.stream:
                body = await cuttable(handle, _to_the_end(work), disconnected)
            elif not work.cached and (opening := work.open()) is not None:
                await cuttable(handle, opening, disconnected)
        except BaseException:
            await settle(True)
            raise
        if work.stream:
            if record is not None:
                record.streaming = True
            events = settled_events(work.events(), self.metrics, record, handle, settle)
            return Reply(headers, events=events, after=settle.abandoned)
        await settle(False, shield=False)
        if estimated:
            headers["x-usage-estimated"] = "true"
        return Reply(headers, body=body)

    async def _lookup(self, work: Work, caller: Principal, headers: dict[str, str]) -> str | None:
        """The cache key of a cacheable request, with ``work`` filled from the cache on a hit."""
        material = work.cache_material() if self.cache is not None else None
        if self.cache is None or material is None:
            return None
        key = cache_key(caller.key_id, work.model, material)
        entry = await self.cache.get(key)
        if entry is not None and work.replay(entry):
            headers["x-cache"] = "HIT"
            self.metrics.child(self.metrics.cache_hits_total, work.model).inc()
        else:
            self.metrics.child(self.metrics.cache_misses_total, work.model).inc()
        return key

    async def _settle(
        self, work: Work, ticket: Ticket, record: RequestRecord | None, key: str | None, *, ok: bool
    ) -> Outcome:
        outcome = work.outcome()
        await self.gateway.finish(ticket, used_tokens=outcome.charged_tokens)
        observe(self.metrics, work.model, outcome)
        if record is not None:
            log_outcome(record, outcome, cached=work.cached, ok=ok, store_text=self.store_prompts)
            if record.streaming:
                self.writer.add_row(record)
        if ok and key is not None and self.cache is not None and not work.cached:
            entry = encode_entry(work.cache_entry())
            self.writer.add_cache(key, ticket.principal.key_id, work.model, entry, self.cache.ttl_s)
        return outcome


def prefix_scope(caller: Principal, share: str) -> str:
    """The scope within which ``caller``'s requests reuse cached prompt prefixes (kinds never collide)."""
    if share == "global":
        return ""
    return f"role:{caller.role.name}" if share == "role" else f"key:{caller.key_id}"


async def _to_the_end(work: Work) -> msgspec.Struct:
    if not work.cached and (opening := work.open()) is not None:
        await opening
    return await work.complete()


async def cuttable(handle: InFlight, work: Awaitable[T], disconnected: Disconnected) -> T:
    """Await ``work`` for a request that a client disconnect or a shutdown may cut.

    A client that disconnects meanwhile cancels ``work`` (which closes what it holds: engine rows abort, the
    upstream request is closed and aborts there) and the request ends as 499 ``client_closed_request`` in the
    log. A shutdown whose grace runs out cancels it with 503 ``overloaded``.

    ``work`` runs in the calling task; one watcher task waits for the disconnect and cancels the caller (no task
    per request for the work itself, nor a wait over both: a request pays one task, not three).
    """
    current = asyncio.current_task()
    assert current is not None
    watching = True
    left = False

    def on_disconnect(watcher: asyncio.Future[None]) -> None:
        nonlocal left
        # Only while the work runs: a callback already scheduled when the work ended must not cancel later steps.
        if watching and not watcher.cancelled() and watcher.exception() is None:
            left = True
            current.cancel()

    watcher = asyncio.ensure_future(disconnected())
    watcher.add_done_callback(on_disconnect)
    try:
        with handle.cancellable():
            result = await work
        if left:  # the work finished although it was cancelled: the cancellation is spent
            current.uncancel()
        return result
    except asyncio.CancelledError:
        if left:
            current.uncancel()
            raise client_closed() from None
        if not handle.absorb():
            raise
        raise shutting_down(cut=True) from None
    finally:
        watching = False
        watcher.cancel()


def client_closed() -> OpenAIError:
    """What a request whose client left before its answer ends as (only the request log sees it)."""
    return OpenAIError(
        499, "invalid_request_error", "The client closed the request before its answer.", code="client_closed_request"
    )
