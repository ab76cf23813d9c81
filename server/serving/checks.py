"""Request checks that need no model: the same 400 for the same body, whether the model is local or remote.

A local ``prepare`` runs these first and then adds what only the model itself can answer (the chat template, the
context window, token ids against the vocabulary); :mod:`server.serving.remote` runs exactly these before anything
is forwarded. A rule added here holds for every model at once. Chat's own checks are in
:mod:`server.serving.chat_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.native.generate import DEFAULT_MAX_NEW_TOKENS, GenerateRequest
from schemas.openai.completions import CompletionRequest
from server.engine.base import Engine
from server.errors import OpenAIError, invalid_request, unsupported_param
from server.serving.common import parse_logit_bias, parse_stops

MAX_PROMPTS = 128
MAX_CHOICES = 128  # prompts x n

Prompts = list[str] | list[list[int]]


@dataclass(frozen=True, slots=True)
class Target:
    """What the checks know of the model a request is for.

    Attributes:
        name: The served model name (errors name it).
        vocab_size: Token ids must be below it; ``None`` for a remote model, whose vocabulary is unknown here
            (only the ids' form is checked, the upstream checks the rest).
        constrains: Whether structured outputs and required tool calls can be enforced; a remote upstream is
            trusted to (the grammar is still checked here).
    """

    name: str
    vocab_size: int | None = None
    constrains: bool = True


def local_target(engine: Engine) -> Target:
    """The :class:`Target` of an in-process engine."""
    return Target(engine.info.name, engine.tokenizer.vocab_size, engine.supports_constraints)


def stream_options_need_stream(stream_options: object, stream: bool | None) -> None:
    """400 for ``stream_options`` on a request that does not stream."""
    if stream_options is not None and not stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")


# -- /v1/completions ---------------------------------------------------------------------------------------------
def reject_unsupported_completion(req: CompletionRequest) -> None:
    """400 for the OpenAI parameters this server does not implement (never silently accepted)."""
    if req.best_of is not None and req.best_of not in (1, req.n or 1):
        # best_of == n draws no extra candidates, so it is plain n; ranking extra candidates is not implemented.
        raise unsupported_param("best_of", "'best_of' other than 1 or 'n'")
    if req.suffix is not None:
        raise unsupported_param("suffix")


def prompt_list(
    prompt: str | list[Any], vocab_size: int | None, *, param: str = "prompt", limit: int = MAX_PROMPTS
) -> Prompts:
    """The prompts of a request: a string, strings, token ids or lists of token ids (not mixed), at most ``limit``;
    token-id prompts are checked here (not empty, ids in the vocabulary), texts by the caller. ``param`` names the
    field in errors (``input`` for embeddings)."""
    prompts: Prompts
    if isinstance(prompt, str):
        prompts = [prompt]
    elif not prompt:
        raise invalid_request(f"'{param}' must not be an empty list.", param, "empty_array")
    elif all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise invalid_request(
            f"'{param}' must be a string, a list of strings, a list of token ids or a list of token-id lists.",
            param,
        )
    if len(prompts) > limit:
        raise invalid_request(f"At most {limit} {'prompts' if param == 'prompt' else 'inputs'} per request.", param)
    for i, ids in enumerate(prompts):
        if isinstance(ids, list):
            check_token_ids(ids, i, len(prompts), vocab_size, param)
    return prompts


def check_token_ids(ids: list[int], index: int, count: int, vocab_size: int | None, param: str = "prompt") -> None:
    """400 for an empty prompt or an id outside the vocabulary (below 0 when the vocabulary is unknown)."""
    if not ids:
        raise empty_prompt(index, count, param)
    if vocab_size is None:
        bad = next((t for t in ids if t < 0), None)
        if bad is not None:
            raise invalid_request(f"Token id {bad} is not a token id (ids are 0 or more).", param)
        return
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid_request(f"Token id {bad} is outside the vocabulary (0..{vocab_size - 1}).", param)


def empty_prompt(index: int, count: int, param: str = "prompt") -> OpenAIError:
    """400 for prompt ``index`` of ``count`` that has no tokens."""
    what = "prompt" if param == "prompt" else "input"
    return invalid_request(f"The {what} is empty after tokenization.", param if count == 1 else f"{param}[{index}]")


@dataclass(frozen=True, slots=True)
class CompletionChecks:
    """A ``/v1/completions`` request that passed the checks every model shares."""

    stops: list[str]
    prompts: Prompts
    n: int
    logit_bias: tuple[tuple[int, float], ...]


def check_completion(req: CompletionRequest, target: Target) -> CompletionChecks:
    """Everything about a completions request that needs no tokenizer (400 naming the parameter)."""
    reject_unsupported_completion(req)
    stops = parse_stops(req.stop)
    stream_options_need_stream(req.stream_options, req.stream)
    prompts = prompt_list(req.prompt, target.vocab_size)
    n = req.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise invalid_request(f"At most {MAX_CHOICES} choices per request (prompts x n), got {len(prompts) * n}.", "n")
    return CompletionChecks(stops, prompts, n, parse_logit_bias(req.logit_bias, target.vocab_size))


# -- /v1/generate, /v1/stream ------------------------------------------------------------------------------------
def check_generate(req: GenerateRequest) -> list[str]:
    """The stop strings of a native request (its other fields are bounded by the schema)."""
    return parse_stops(req.stop)


def generate_max_tokens(req: GenerateRequest, cap: int | None) -> int:
    """``max_new_tokens`` (else the native default) within the role's cap (a value above it sent on purpose was
    refused before)."""
    wanted = DEFAULT_MAX_NEW_TOKENS if req.max_new_tokens is None else req.max_new_tokens
    return wanted if cap is None else min(wanted, cap)
