"""``/v1/completions``: prompts (text or token ids) -> engine -> OpenAI ``text_completion`` objects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from schemas.openai.completions import Completion, CompletionChoice, CompletionRequest
from server.engine.base import Engine, EngineError, Tokenizer
from server.errors import invalid_request, unsupported_param
from server.serving.common import (
    Plan,
    check_model,
    collect,
    engine_failure,
    make_plan,
    parse_stops,
    resolve_max_tokens,
    run_choices,
)
from server.serving.streaming import error_event

MAX_PROMPTS = 128


def reject_unsupported(req: CompletionRequest) -> None:
    """400 for every OpenAI parameter not implemented yet."""
    if req.n is not None and req.n != 1:
        raise unsupported_param("n", "'n' other than 1")
    if req.best_of is not None and req.best_of != 1:
        raise unsupported_param("best_of", "'best_of' other than 1")
    if req.echo:
        raise unsupported_param("echo")
    if req.logprobs is not None:
        raise unsupported_param("logprobs")
    if req.logit_bias:
        raise unsupported_param("logit_bias")
    if req.presence_penalty:
        raise unsupported_param("presence_penalty", "A non-zero 'presence_penalty'")
    if req.frequency_penalty:
        raise unsupported_param("frequency_penalty", "A non-zero 'frequency_penalty'")
    if req.suffix is not None:
        raise unsupported_param("suffix")


def tokenize_prompts(tokenizer: Tokenizer, prompt: str | list[Any]) -> list[list[int]]:
    """Token ids for each prompt: a string, strings, token ids, or lists of token ids (not mixed)."""
    if isinstance(prompt, str):
        prompts: list[list[int]] = [tokenizer.encode(prompt)]
    elif not prompt:
        raise invalid_request("'prompt' must not be an empty list.", "prompt", "empty_array")
    elif all(isinstance(p, str) for p in prompt):
        prompts = [tokenizer.encode(p) for p in prompt]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, list) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise invalid_request(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists.",
            "prompt",
        )
    if len(prompts) > MAX_PROMPTS:
        raise invalid_request(f"At most {MAX_PROMPTS} prompts per request.", "prompt")
    vocab = tokenizer.vocab_size
    for i, ids in enumerate(prompts):
        if not ids:
            raise invalid_request(
                "The prompt is empty after tokenization.", "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            )
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_request(f"Token id {bad} is outside the vocabulary (0..{vocab - 1}).", "prompt")
    return prompts


def prepare(engine: Engine, req: CompletionRequest, *, max_tokens_cap: int | None = None) -> Plan:
    """Validate, tokenize and check the context window of every prompt (nothing is admitted yet)."""
    model = check_model(engine, req.model)
    reject_unsupported(req)
    stops = parse_stops(req.stop)
    if req.stream_options is not None and not req.stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    prompts = tokenize_prompts(engine.tokenizer, req.prompt)
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(engine, longest, req.max_tokens, "max_tokens", max_tokens_cap)
    return make_plan(
        "completion",
        "cmpl",
        model,
        prompts,
        req,
        max_tokens=max_tokens,
        stops=stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        explicit_max_tokens=req.max_tokens is not None,
        ignore_eos=req.ignore_eos,
    )


async def complete(plan: Plan) -> Completion:
    """Run every prompt to the end and build the response."""
    try:
        await collect(plan.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    return Completion(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        choices=[
            CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason or "stop") for c in plan.choices
        ],
        usage=plan.usage,
    )


async def stream(plan: Plan) -> AsyncIterator[msgspec.Struct]:
    """Stream chunks; each choice's last chunk carries its finish reason; usage last when asked."""
    usage: Any = None if plan.include_usage else msgspec.UNSET
    try:
        async for ev in run_choices(plan.choices):
            if ev.text or ev.finish_reason is not None:
                choice = CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason)
                yield Completion(id=plan.id, created=plan.created, model=plan.model, choices=[choice], usage=usage)
    except EngineError as exc:
        yield error_event(engine_failure(exc))
        return
    if plan.include_usage:
        yield Completion(id=plan.id, created=plan.created, model=plan.model, choices=[], usage=plan.usage)
