"""``/v1/completions``: prompts (text or token ids) -> engine -> OpenAI ``text_completion`` objects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.openai.completions import Completion, CompletionChoice, CompletionRequest
from server.engine.base import Engine, EngineError, Tokenizer
from server.errors import invalid_request, unsupported_param
from server.serving.common import (
    Choice,
    admit,
    check_model,
    collect,
    engine_failure,
    new_id,
    now,
    parse_stops,
    resolve_max_tokens,
    run_choices,
    sampling_params,
    usage_of,
)
from server.serving.streaming import error_event

MAX_PROMPTS = 128


@dataclass(slots=True)
class PreparedCompletion:
    """A validated, admitted completion request (one choice per prompt)."""

    id: str
    created: int
    model: str
    choices: list[Choice]
    include_usage: bool


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


def prepare(engine: Engine, req: CompletionRequest) -> PreparedCompletion:
    """Validate, tokenize, check the context and admit every prompt."""
    model = check_model(engine, req.model)
    reject_unsupported(req)
    stops = parse_stops(req.stop)
    if req.stream_options is not None and not req.stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    prompts = tokenize_prompts(engine.tokenizer, req.prompt)
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(engine, longest, req.max_tokens, "max_tokens")
    params = sampling_params(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
    )
    rid = new_id("cmpl")
    choices = admit(engine, rid, prompts, params, stops)
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    return PreparedCompletion(id=rid, created=now(), model=model, choices=choices, include_usage=include_usage)


async def complete(prep: PreparedCompletion) -> Completion:
    """Run every prompt to the end and build the response."""
    try:
        await collect(prep.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    return Completion(
        id=prep.id,
        created=prep.created,
        model=prep.model,
        choices=[
            CompletionChoice(index=c.index, text="".join(c.text_parts), finish_reason=c.finish_reason or "stop")
            for c in prep.choices
        ],
        usage=usage_of(prep.choices),
    )


async def stream(prep: PreparedCompletion) -> AsyncIterator[msgspec.Struct]:
    """Stream chunks; each choice's last chunk carries its finish reason; usage last when asked."""
    usage: Any = None if prep.include_usage else msgspec.UNSET
    try:
        async for ev in run_choices(prep.choices):
            if ev.text or ev.finish_reason is not None:
                choice = CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason)
                yield Completion(id=prep.id, created=prep.created, model=prep.model, choices=[choice], usage=usage)
    except EngineError as exc:
        yield error_event(engine_failure(exc))
        return
    if prep.include_usage:
        yield Completion(id=prep.id, created=prep.created, model=prep.model, choices=[], usage=usage_of(prep.choices))
