"""``/v1/completions``: prompts (text or token ids) -> engine -> OpenAI ``text_completion`` objects."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from schemas.openai.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from server.engine.base import Engine, EngineError, TokenLogprob
from server.serving.checks import check_completion, check_token_ids, local_target
from server.serving.choices import Choice, LogprobEntry, collect, engine_failure, run_choices
from server.serving.common import (
    check_prompt_bytes,
    resolve_max_tokens,
    sampling_params,
    utf8_length,
)
from server.serving.logprobs import TokenTexts, completion_logprobs, echo_entries
from server.serving.plan import Plan, make_plan
from server.serving.streaming import error_event


def prompt_count(prompt: str | list[Any]) -> int:
    """How many prompts ``prompt`` holds (a string or token ids: one), without tokenizing anything."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def tokenize_prompts(
    engine: Engine, prompts: Sequence[str | list[int]], requested: int | None = None
) -> list[list[int]]:
    """Token ids of prompts that passed :func:`~server.serving.checks.prompt_list` (texts are encoded and checked).

    A text prompt that certainly exceeds the context with ``requested`` new tokens is refused from its byte length
    before it is tokenized.
    """
    tokenizer = engine.tokenizer
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list):
            out.append(prompt)
            continue
        check_prompt_bytes(engine, utf8_length(prompt), requested, "prompt")
        ids = tokenizer.encode(prompt)
        check_token_ids(ids, i, len(prompts), tokenizer.vocab_size)
        out.append(ids)
    return out


def prepare(engine: Engine, req: CompletionRequest, *, max_tokens_cap: int | None = None) -> Plan:
    """Validate, tokenize and check the context window of every prompt (nothing is admitted yet)."""
    model = engine.name  # the route resolved the request's model to this engine (404 there otherwise)
    checks = check_completion(req, local_target(engine))
    prompts = tokenize_prompts(engine, checks.prompts, req.max_tokens)
    longest = max(len(p) for p in prompts)
    max_tokens = resolve_max_tokens(engine, longest, req.max_tokens, "max_tokens", max_tokens_cap)
    params = sampling_params(
        req,
        max_tokens=max_tokens,
        logit_bias=checks.logit_bias,
        penalties=req,
        ignore_eos=req.ignore_eos,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo else None,
    )
    return make_plan(
        "completion",
        "cmpl",
        model,
        prompts,
        params,
        engine=engine,
        complete=complete,
        stream_events=stream,
        stops=checks.stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        explicit_max_tokens=req.max_tokens is not None,
        n=checks.n,
        echo=bool(req.echo),
    )


class _Rendering:
    """Per-choice text and logprobs as sent: the echoed prompt once, then output, with running text offsets."""

    def __init__(self, plan: Plan) -> None:
        assert plan.tokenizer is not None
        self.plan = plan
        self.texts = TokenTexts(plan.tokenizer)
        self.offsets: dict[int, int] = {}

    def piece(
        self, choice: Choice, text: str, entries: list[LogprobEntry] | None
    ) -> tuple[str, CompletionLogprobs | None]:
        """Text and logprobs of the next piece of ``choice`` (the echoed prompt is prepended to its first piece)."""
        plan = self.plan
        pairs: list[tuple[str, TokenLogprob | None]] = [(e.text, e.logprob) for e in entries or ()]
        if choice.index not in self.offsets:
            self.offsets[choice.index] = 0
            if plan.echo:
                assert plan.tokenizer is not None
                prompt = plan.prompts[choice.index // plan.n]
                echoed = echo_entries(plan.tokenizer, prompt, choice.prompt_logprobs)
                text = "".join(t for t, _ in echoed) + text
                pairs = echoed + pairs
        offset = self.offsets[choice.index]
        self.offsets[choice.index] = offset + len(text)
        if plan.params.logprobs is None:
            return text, None
        return text, completion_logprobs(pairs, self.texts, offset)


async def complete(plan: Plan) -> Completion:
    """Run every prompt to the end and build the response."""
    try:
        await collect(plan.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    rendering = _Rendering(plan)
    choices = []
    for c in plan.choices:
        text, logprobs = rendering.piece(c, c.text, c.logprobs)
        choices.append(
            CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason or "stop")
        )
    return Completion(id=plan.id, created=plan.created, model=plan.model, choices=choices, usage=plan.usage)


async def stream(plan: Plan) -> AsyncIterator[msgspec.Struct]:
    """Stream chunks; each choice's last chunk carries its finish reason; usage last when asked."""
    usage: Any = None if plan.include_usage else msgspec.UNSET
    rendering = _Rendering(plan)
    try:
        async for ev in run_choices(plan.choices):
            c = plan.choices[ev.index]
            if ev.text or ev.logprobs or ev.finish_reason is not None or c.index not in rendering.offsets:
                text, logprobs = rendering.piece(c, ev.text, ev.logprobs)
                choice = CompletionChoice(index=ev.index, text=text, logprobs=logprobs, finish_reason=ev.finish_reason)
                yield Completion(id=plan.id, created=plan.created, model=plan.model, choices=[choice], usage=usage)
    except EngineError as exc:
        yield error_event(engine_failure(exc))
        return
    if plan.include_usage:
        yield Completion(id=plan.id, created=plan.created, model=plan.model, choices=[], usage=plan.usage)
