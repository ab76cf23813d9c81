"""The path every generation request takes after validation: admission, cache, engine, accounting.

Handlers build a :class:`Plan` with the serving layer and call :func:`respond`; this module turns it into a
JSON or SSE response with the rate-limit headers, settles the gateway ticket exactly once (success, error,
client disconnect) and queues the request-log row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import msgspec
from litestar import Request, Response
from litestar.response import Stream

from schemas.openai.errors import ErrorResponse
from server.admission.gateway import Ticket
from server.api.common import json_response, sse_response
from server.api.context import context_of
from server.auth.principal import Principal
from server.engine.base import Engine
from server.errors import OpenAIError
from server.exchange.cache import cache_key, encode_results
from server.exchange.shutdown import InFlight, Lifecycle, shutting_down
from server.records.writer import RequestRecord
from server.serving.common import Plan, replay, start
from server.serving.streaming import error_event
from server.wiring.services import Services

T = TypeVar("T")


def observe(services: Services, plan: Plan) -> None:
    """Token counters, finish reasons and the latency histograms of a request that has ended."""
    m, model = services.metrics, plan.model
    for c in plan.choices:
        if c.finish_reason is not None:
            m.request_success_total.labels(model, c.finish_reason).inc()
    if plan.cached:
        return
    started = [c for c in plan.choices if c.stream is not None]
    if not started:
        return
    m.prompt_tokens_total.labels(model).inc(plan.prompt_tokens)
    m.generation_tokens_total.labels(model).inc(sum(c.completion_tokens for c in started))
    ttft, itl, e2e, queue = (
        m.time_to_first_token_seconds.labels(model),
        m.inter_token_latency_seconds.labels(model),
        m.e2e_request_latency_seconds.labels(model),
        m.request_queue_time_seconds.labels(model),
    )
    for c in started:
        engine_started = c.stream.started_at if c.stream is not None else None
        if engine_started is not None:
            queue.observe(max(0.0, engine_started - c.admitted_at))
        if c.first_token_at is not None:
            ttft.observe(c.first_token_at - c.admitted_at)
        for gap in c.token_gaps:
            itl.observe(gap)
        if c.finish_reason is not None and c.last_token_at is not None:
            e2e.observe(c.last_token_at - c.admitted_at)


def record_of(request: Request[Any, Any, Any]) -> RequestRecord | None:
    """The request-log record of a ``/v1`` request (created by the auth guard)."""
    return context_of(request.scope).record


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    return context_of(request.scope).caller()


@dataclass(slots=True, frozen=True)
class Admission:
    """What the gateway reserves for a request: prompt tokens (TPM may count ``tpm_prompt_tokens`` instead)."""

    model: str
    prompt_tokens: int
    max_new_tokens: int
    explicit_max_tokens: bool
    tpm_prompt_tokens: int | None = None
    sequences: int = 1


async def admitted(
    request: Request[Any, Any, Any],
    services: Services,
    admission: Admission,
    prompt_text: Callable[[], str] | None,
) -> tuple[Principal, RequestRecord | None, Lifecycle, InFlight, Ticket]:
    """Request-log fields and gateway admission, with the request registered in the app's lifecycle.

    The handler has passed :func:`gate` already. The caller owns the returned ``InFlight`` handle
    (``lifecycle.leave`` it) and the ticket (settle it once).
    """
    principal = principal_of(request)
    record = record_of(request)
    if record is not None:
        record.model = admission.model
        record.prompt_tokens = admission.tpm_prompt_tokens or admission.prompt_tokens
        if prompt_text is not None:
            record.prompt_text = prompt_text()
    lifecycle: Lifecycle = request.app.state.lifecycle
    handle = lifecycle.enter()
    try:
        ticket = await services.gateway.admit(
            principal,
            prompt_tokens=admission.prompt_tokens,
            max_new_tokens=admission.max_new_tokens,
            explicit_max=admission.explicit_max_tokens,
            tpm_prompt_tokens=admission.tpm_prompt_tokens,
            sequences=admission.sequences,
            rpm_tested=True,  # by server.api.gate before any work on the prompt
        )
    except BaseException:
        lifecycle.leave(handle)
        raise
    return principal, record, lifecycle, handle, ticket


async def respond(
    request: Request[Any, Any, Any],
    engine: Engine,
    services: Services,
    plan: Plan,
    complete: Callable[[Plan], Awaitable[msgspec.Struct]],
    stream: Callable[[Plan], AsyncIterator[msgspec.Struct]],
) -> Response[Any] | Stream:
    """Admit ``plan``, answer from the cache or the engine, and account for it.

    The request is registered with the app's :class:`Lifecycle` until it has settled, so a shutdown can cut it
    when its grace period runs out (503 ``overloaded``, or an error frame for a stream) and then wait for it.
    """
    prompt_text = (
        (lambda: "\n".join(engine.tokenizer.decode(p) for p in plan.prompts))
        if services.settings.store_prompts
        else None
    )
    principal, record, lifecycle, handle, ticket = await admitted(
        request,
        services,
        Admission(
            plan.model,
            plan.prompt_tokens,
            plan.max_new_tokens,
            plan.explicit_max_tokens,
            sequences=len(plan.prompts) * plan.n,
        ),
        prompt_text,
    )
    headers = dict(ticket.headers)
    key = None
    try:
        if services.cache is not None and plan.cacheable:
            key = cache_key(principal.key_id, plan)
            results = await services.cache.get(key)
            if results is not None:
                replay(plan, results)
                headers["x-cache"] = "HIT"
                services.metrics.cache_hits_total.labels(plan.model).inc()
            else:
                services.metrics.cache_misses_total.labels(plan.model).inc()
        if not plan.cached:
            start(engine, plan)
    except BaseException:
        await services.gateway.finish(ticket, used_tokens=0)
        lifecycle.leave(handle)
        raise
    if plan.stream:
        if record is not None:
            record.streaming = True

        async def finish(failed: bool) -> None:
            for choice in plan.choices:  # engine rows of a body never iterated (cut or closed before its start)
                if choice.stream is not None:
                    await choice.stream.aclose()
            await _settle(services, plan, ticket, record, key, ok=plan.choices_finished and not failed)

        return settled_stream(services, stream(plan), record, lifecycle, handle, finish, headers)
    try:
        body = await cuttable(request, handle, complete(plan))
    finally:
        await _settle(services, plan, ticket, record, key, ok=plan.choices_finished)
        lifecycle.leave(handle)
    return json_response(body, headers)


async def cuttable(request: Request[Any, Any, Any], handle: InFlight, work: Awaitable[T]) -> T:
    """Await ``work`` for a request that a client disconnect or a shutdown may cut.

    A client that disconnects meanwhile cancels ``work`` (which closes what it holds: engine rows abort, the
    upstream request is closed and aborts there) and the request ends as 499 ``client_closed_request`` in the
    log. A shutdown whose grace runs out cancels it with 503 ``overloaded``.
    """
    handle.waiting = True
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise client_closed()
        return task.result()
    except asyncio.CancelledError:
        task.cancel()
        if not handle.absorb():
            raise
        raise shutting_down(cut=True) from None
    finally:
        watcher.cancel()
        handle.waiting = False


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Return once the client has gone (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_closed() -> OpenAIError:
    """What a request whose client left before its answer ends as (only the request log sees it)."""
    return OpenAIError(
        499, "invalid_request_error", "The client closed the request before its answer.", code="client_closed_request"
    )


def settled_stream(
    services: Services,
    events: AsyncIterator[msgspec.Struct],
    record: RequestRecord | None,
    lifecycle: Lifecycle,
    handle: InFlight,
    finish: Callable[[bool], Awaitable[None]],
    headers: dict[str, str],
) -> Stream:
    """The SSE response of ``events``; whatever ends it, ``finish(failed)`` runs exactly once, shielded.

    A shutdown may cut the stream between two events or while it waits (an error frame ends it); a client
    disconnect cancels it. When that cancellation lands outside the body (in a blocked send, the body suspended at
    a ``yield``) the body's ``finally`` would run only once it is garbage-collected, and a body never started runs
    none: the response's background task settles then, so an engine row or an upstream slot is never held on.
    """
    settle = _Settlement(finish, lifecycle, handle)
    return sse_response(_settled(services, events, record, handle, settle), headers, after=settle.abandoned)


class _Settlement:
    """``finish`` and leaving the lifecycle, run once by whichever comes first: the body's end or the response's."""

    def __init__(self, finish: Callable[[bool], Awaitable[None]], lifecycle: Lifecycle, handle: InFlight) -> None:
        self._finish, self._lifecycle, self._handle = finish, lifecycle, handle
        self._done = False

    async def __call__(self, failed: bool) -> None:
        if self._done:
            return
        self._done = True
        try:
            with anyio.CancelScope(shield=True):  # after a disconnect every await would be cancelled again
                await self._finish(failed)
        finally:
            self._lifecycle.leave(self._handle)

    async def abandoned(self) -> None:
        """The response is over; settle if the body never ran (a no-op after a body that ended)."""
        await self(True)


async def _settled(
    services: Services,
    events: AsyncIterator[msgspec.Struct],
    record: RequestRecord | None,
    handle: InFlight,
    settle: _Settlement,
) -> AsyncIterator[msgspec.Struct]:
    handle.task = asyncio.current_task()  # the task iterating the body, which a shutdown may cancel
    failed = False
    try:
        while not handle.cut:
            handle.waiting = True
            try:
                event = await anext(events)
            except StopAsyncIteration:
                break
            finally:
                handle.waiting = False
            if isinstance(event, ErrorResponse):
                failed = True
                services.metrics.errors_total.labels(event.error.type).inc()
                if record is not None:
                    record.error_type = event.error.code or event.error.type
            elif record is not None and record.ttft_ms is None:
                record.first_token()
            yield event
        else:  # cut by a shutdown between two events
            failed = True
            yield cut_event(services, record)
    except asyncio.CancelledError:
        if not handle.absorb():
            raise
        failed = True  # cut by a shutdown while waiting for the next event
        yield cut_event(services, record)
    finally:
        with anyio.CancelScope(shield=True):
            closer = getattr(events, "aclose", None)
            if closer is not None:
                await closer()
        await settle(failed)


def cut_event(services: Services, record: RequestRecord | None) -> ErrorResponse:
    """The last frame of a stream cut short by a shutdown (counted, and noted in the request log)."""
    err = shutting_down(cut=True)
    services.metrics.errors_total.labels(err.type).inc()
    if record is not None:
        record.error_type = err.code
    return error_event(err)


async def _settle(
    services: Services, plan: Plan, ticket: Ticket, record: RequestRecord | None, key: str | None, *, ok: bool
) -> None:
    usage = plan.usage
    # A cache hit ran no model: it counts as a request but spends no tokens of the quota.
    used = 0 if plan.cached else usage.total_tokens
    await services.gateway.finish(ticket, used_tokens=used)
    observe(services, plan)
    if record is not None:
        record.end(
            completion_tokens=usage.completion_tokens,
            cached=plan.cached,
            finish_reasons=(c.finish_reason for c in plan.choices),
            ok=ok,
            output_text="\n".join(c.text for c in plan.choices) if services.settings.store_prompts else None,
        )
        if record.streaming:
            services.writer.add_row(record)
    if ok and key is not None and services.cache is not None and not plan.cached:
        services.writer.add_cache(key, ticket.principal.key_id, plan.model, encode_results(plan), services.cache.ttl_s)
