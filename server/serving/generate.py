"""Native ``/v1/generate`` and ``/v1/stream``: one prompt, plain text out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec

from schemas.native.generate import GenerateRequest, GenerateResponse, StreamEvent
from server.engine.base import Engine, EngineError
from server.serving.common import (
    Choice,
    admit,
    check_model,
    collect,
    engine_failure,
    new_id,
    parse_stops,
    resolve_max_tokens,
    run_choices,
    sampling_params,
    usage_of,
)
from server.serving.completions import tokenize_prompts
from server.serving.streaming import error_event


@dataclass(slots=True)
class PreparedGenerate:
    """A validated, admitted native request."""

    model: str
    choice: Choice


def prepare(engine: Engine, req: GenerateRequest) -> PreparedGenerate:
    """Validate, tokenize, check the context and admit."""
    model = check_model(engine, req.model)
    stops = parse_stops(req.stop)
    prompt = tokenize_prompts(engine.tokenizer, req.prompt)[0]
    max_tokens = resolve_max_tokens(engine, len(prompt), req.max_new_tokens, "max_new_tokens")
    params = sampling_params(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
    )
    (choice,) = admit(engine, new_id("gen"), [prompt], params, stops)
    return PreparedGenerate(model=model, choice=choice)


async def complete(prep: PreparedGenerate) -> GenerateResponse:
    """Run to the end."""
    try:
        await collect([prep.choice])
    except EngineError as exc:
        raise engine_failure(exc) from exc
    c = prep.choice
    return GenerateResponse(
        model=prep.model, output="".join(c.text_parts), finish_reason=c.finish_reason or "stop", usage=usage_of([c])
    )


async def stream(prep: PreparedGenerate) -> AsyncIterator[msgspec.Struct]:
    """Events with new text; the last has ``finish_reason`` and ``usage``."""
    try:
        async for ev in run_choices([prep.choice]):
            if ev.finish_reason is not None:
                yield StreamEvent(output=ev.text, finish_reason=ev.finish_reason, usage=usage_of([prep.choice]))
            elif ev.text:
                yield StreamEvent(output=ev.text)
    except EngineError as exc:
        yield error_event(engine_failure(exc))
