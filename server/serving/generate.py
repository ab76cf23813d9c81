"""Native ``/v1/generate`` and ``/v1/stream``: one prompt, plain text out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from schemas.native.generate import DEFAULT_MAX_NEW_TOKENS, GenerateRequest, GenerateResponse, StreamEvent
from server.engine.base import Engine, EngineError
from server.serving.checks import check_generate
from server.serving.choices import collect, engine_failure, run_choices
from server.serving.common import resolve_max_tokens, sampling_params
from server.serving.completions import tokenize_prompts
from server.serving.plan import Plan, make_plan
from server.serving.streaming import error_event


def prepare(engine: Engine, req: GenerateRequest, *, stream: bool, max_tokens_cap: int | None = None) -> Plan:
    """Validate, tokenize and check the context window (nothing is admitted yet)."""
    model = engine.name  # the route resolved the request's model to this engine (404 there otherwise)
    stops = check_generate(req)
    prompt = tokenize_prompts(engine, [req.prompt])[0]
    if req.max_new_tokens is None:  # the default, within the role's cap and the room the context leaves
        room = resolve_max_tokens(engine, len(prompt), None, "max_new_tokens", max_tokens_cap)
        max_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
    else:
        max_tokens = resolve_max_tokens(engine, len(prompt), req.max_new_tokens, "max_new_tokens", max_tokens_cap)
    return make_plan(
        "generate",
        "gen",
        model,
        [prompt],
        sampling_params(req, max_tokens=max_tokens),
        engine=engine,
        complete=complete,
        stream_events=stream_events,
        stops=stops,
        stream=stream,
        include_usage=True,
        explicit_max_tokens=True,
    )


async def complete(plan: Plan) -> GenerateResponse:
    """Run to the end."""
    try:
        await collect(plan.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    (c,) = plan.choices
    return GenerateResponse(
        model=plan.model,
        output=c.text,
        finish_reason=c.finish_reason or "stop",
        usage=plan.usage,
        cached=plan.cached,
    )


async def stream_events(plan: Plan) -> AsyncIterator[msgspec.Struct]:
    """Events with new text; the last has ``finish_reason`` and ``usage``."""
    try:
        async for ev in run_choices(plan.choices):
            if ev.finish_reason is not None:
                yield StreamEvent(output=ev.text, finish_reason=ev.finish_reason, usage=plan.usage)
            elif ev.text:
                yield StreamEvent(output=ev.text)
    except EngineError as exc:
        yield error_event(engine_failure(exc))
