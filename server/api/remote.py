"""The path of a request for a remote model: the same admission, cache, log and accounting as a local one.

After validation the request passes the gateway exactly as a local request does (allowlist, RPM/TPM,
concurrency, quota reservation of the prompt's upper bound + max tokens), takes one of the upstream's
concurrency slots, and is sent upstream. A stream's headers go out only once the upstream has answered, so a
failure before its first byte is still a proper 502/503/504 (after the retries) rather than an error frame.
The ticket is settled exactly once with the upstream's usage (success, error, client disconnect), and a client
that disconnects closes the upstream request, which aborts it there.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import msgspec
from litestar import Request, Response
from litestar.response import Stream

from server.admission.gateway import Ticket
from server.api.common import json_response
from server.api.flow import Admission, admitted, cuttable, settled_stream
from server.providers.upstream import Upstream
from server.records.writer import RequestRecord
from server.serving import reframe
from server.serving.remote import RemoteCall, cache_key, encode_results, replay
from server.wiring.services import Services


async def respond_remote(
    request: Request[Any, Any, Any], upstream: Upstream, services: Services, call: RemoteCall
) -> Response[Any] | Stream:
    """Admit ``call``, answer it from the cache or the upstream, and account for it."""
    admission = Admission(
        call.model,
        call.prompt_bound,
        call.max_new_tokens,
        call.explicit_max_tokens,
        call.prompt_estimate,
        sequences=call.sequences,
    )
    prompt_text = (lambda: call.prompt_text) if services.settings.store_prompts else None
    principal, record, lifecycle, handle, ticket = await admitted(request, services, admission, prompt_text)
    call.admitted_at = time.perf_counter()
    headers = dict(ticket.headers)
    key = None

    async def send() -> httpx.Response:
        """Take an upstream slot and open the request (the slot is given back if that fails)."""
        await upstream.acquire()
        call.started_at = time.perf_counter()
        try:
            return await upstream.open(call.path, call.payload)
        except BaseException:
            upstream.release()
            raise

    async def closed(response: httpx.Response) -> None:
        with anyio.CancelScope(shield=True):
            await response.aclose()  # closes the upstream connection: the upstream aborts an unfinished request
        upstream.release()

    async def answer() -> msgspec.Struct:
        if call.cached:
            return reframe.render(call)
        response = await send()
        try:
            return await reframe.complete(call, response)
        finally:
            await closed(response)

    try:
        if services.cache is not None and call.cacheable:
            key = cache_key(principal.key_id, call)
            blob = await services.cache.get_raw(key)
            if blob is not None and replay(call, blob):
                headers["x-cache"] = "HIT"
                services.metrics.cache_hits_total.labels(call.model).inc()
            else:
                services.metrics.cache_misses_total.labels(call.model).inc()
        if not call.stream:
            body = await cuttable(request, handle, answer())
        elif not call.cached:
            # A stream's headers go out only once the upstream has answered: a failure before is a plain error.
            response = await cuttable(request, handle, send())
    except BaseException:
        await _settle(services, call, ticket, record, key, ok=False)
        lifecycle.leave(handle)
        raise
    if call.stream:
        if record is not None:
            record.streaming = True
        stream_response = None if call.cached else response

        async def finish(failed: bool) -> None:
            if stream_response is not None:
                await closed(stream_response)
            await _settle(services, call, ticket, record, key, ok=call.finished and not failed)

        source = (
            reframe.replay_stream(call)
            if stream_response is None
            else reframe.stream(call, stream_response, upstream.scrub)
        )
        return settled_stream(services, source, record, lifecycle, handle, finish, headers)
    await _settle(services, call, ticket, record, key, ok=call.finished)
    lifecycle.leave(handle)
    if call.usage_estimated:
        headers["x-usage-estimated"] = "true"
    return json_response(body, headers)


def observe(services: Services, call: RemoteCall) -> None:
    """Token counters, finish reasons and latency histograms, labelled with our served model name."""
    m, model = services.metrics, call.model
    for r in call.results.values():
        if r.finish_reason is not None:
            m.request_success_total.labels(model, r.finish_reason).inc()
    if call.cached or not call.results or call.started_at is None or call.admitted_at is None:
        return
    usage = call.usage
    m.prompt_tokens_total.labels(model).inc(usage.prompt_tokens)
    m.generation_tokens_total.labels(model).inc(usage.completion_tokens)
    m.request_queue_time_seconds.labels(model).observe(max(0.0, call.started_at - call.admitted_at))
    if call.first_token_at is not None:
        m.time_to_first_token_seconds.labels(model).observe(call.first_token_at - call.admitted_at)
    itl = m.inter_token_latency_seconds.labels(model)
    for gap in call.token_gaps:
        itl.observe(gap)
    if call.finished and call.last_token_at is not None:
        m.e2e_request_latency_seconds.labels(model).observe(call.last_token_at - call.admitted_at)


async def _settle(
    services: Services, call: RemoteCall, ticket: Ticket, record: RequestRecord | None, key: str | None, *, ok: bool
) -> None:
    usage = call.usage
    ran = call.started_at is not None and not call.cached
    used = usage.total_tokens if ran and call.results else 0
    await services.gateway.finish(ticket, used_tokens=used)
    observe(services, call)
    if record is not None:
        if call.results:
            record.prompt_tokens = usage.prompt_tokens
            record.usage_estimated = call.usage_estimated
        texts = "\n".join(r.text for _, r in sorted(call.results.items()))
        record.end(
            completion_tokens=usage.completion_tokens if call.results else 0,
            cached=call.cached,
            finish_reasons=(r.finish_reason for r in call.results.values()),
            ok=ok,
            output_text=texts if services.settings.store_prompts else None,
        )
        if record.streaming:
            services.writer.add_row(record)
    if ok and key is not None and services.cache is not None and not call.cached:
        services.writer.add_cache(key, ticket.principal.key_id, call.model, encode_results(call), services.cache.ttl_s)
