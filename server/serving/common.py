"""Pieces every endpoint family shares: model check, sampling parameters, context check, running choices."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from server.engine.base import (
    Constraint,
    Embedder,
    Engine,
    SamplingParams,
)
from server.errors import OpenAIError, invalid_request

if TYPE_CHECKING:
    pass

log = logging.getLogger("server.serving")

MAX_STOPS = 4


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as ``chatcmpl-…``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    """``created`` timestamp (integer seconds)."""
    return int(time.time())


def parse_stops(stop: str | list[str] | None) -> list[str]:
    """Validate ``stop`` (a string or up to four strings)."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise invalid_request(f"'stop' accepts at most {MAX_STOPS} sequences, got {len(stops)}.", "stop")
    if any(s == "" for s in stops):
        raise invalid_request("'stop' sequences must not be empty strings.", "stop")
    return stops


def resolve_max_tokens(
    engine: Engine, prompt_len: int, requested: int | None, param: str, cap: int | None = None
) -> int:
    """Check the context window; ``None`` means "as many as fit" (at most ``cap``, the role's limit)."""
    window = engine.info.max_model_len
    if requested is None:
        if prompt_len >= window:
            raise context_exceeded(window, prompt_len, 0, param)
        return window - prompt_len if cap is None else min(cap, window - prompt_len)
    if prompt_len + requested > window:
        raise context_exceeded(window, prompt_len, requested, param)
    return requested


def check_prompt_bytes(engine: Engine | Embedder, nbytes: int, requested: int | None, param: str) -> None:
    """400 ``context_length_exceeded`` for a prompt that certainly cannot fit, judged from its UTF-8 length alone.

    One token stands for at most ``tokenizer.max_token_bytes`` bytes of text, so a prompt of ``nbytes`` bytes has at
    least ``nbytes / max_token_bytes`` tokens (a chat template only adds more). Checked before the prompt is
    rendered or tokenized: a multi-megabyte prompt is refused for the cost of measuring it.
    """
    per_token = engine.tokenizer.max_token_bytes
    if per_token is None or nbytes == 0:
        return
    window = engine.info.max_model_len
    at_least = -(-nbytes // per_token)
    if at_least + (requested or 0) > window:
        raise OpenAIError(
            400,
            "invalid_request_error",
            f"This model's maximum context length is {window} tokens. However, your prompt is {nbytes} bytes long, "
            f"which is at least {at_least} tokens. Please reduce the length of the "
            + ("input." if param.startswith("input") else "messages or completion."),
            param=param,
            code="context_length_exceeded",
        )


def utf8_length(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (no copy for ASCII text)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def context_exceeded(window: int, prompt_len: int, requested: int, param: str) -> OpenAIError:
    """400 ``context_length_exceeded`` with OpenAI's wording."""
    asked = f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in the completion)"
    return OpenAIError(
        400,
        "invalid_request_error",
        f"This model's maximum context length is {window} tokens. However, you requested {asked}. "
        "Please reduce the length of the messages or completion.",
        param=param if requested else "messages",
        code="context_length_exceeded",
    )


LOGIT_BIAS_MAX = 300  # OpenAI's own limit on the number of biased tokens
TOKEN_ID_DIGITS = 10
"""Longest accepted token id in ``logit_bias`` keys (no vocabulary comes near 10**10; a longer key is refused
before ``int()``, which would raise on thousands of digits)."""


def parse_logit_bias(bias: Mapping[str, float] | None, vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """Validate ``logit_bias`` (token id as a string -> -100..100).

    ``vocab_size`` ``None`` (a remote model, whose vocabulary is unknown here) checks only the keys' form.
    """
    if not bias:
        return ()
    if len(bias) > LOGIT_BIAS_MAX:
        raise invalid_request(f"'logit_bias' may bias at most {LOGIT_BIAS_MAX} tokens, got {len(bias)}.", "logit_bias")
    out: list[tuple[int, float]] = []
    for key, value in bias.items():
        well_formed = key.isascii() and key.isdigit() and len(key) <= TOKEN_ID_DIGITS
        token = int(key) if well_formed else -1
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            shown = key if len(key) <= 40 else key[:40] + "..."
            ids = f"from 0 to {vocab_size - 1}" if vocab_size is not None else f"of at most {TOKEN_ID_DIGITS} digits"
            raise invalid_request(f"Invalid key {shown!r} in 'logit_bias': keys must be token ids {ids}.", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise invalid_request(
                f"Invalid value {value} for token {key} in 'logit_bias': values must be between -100 and 100.",
                "logit_bias",
            )
        out.append((token, float(value)))
    return tuple(sorted(out))


class SamplingFields(Protocol):
    """The sampling fields every request family shares (``None`` = OpenAI's default)."""

    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def top_k(self) -> int | None: ...
    @property
    def min_p(self) -> float | None: ...
    @property
    def seed(self) -> int | None: ...


class PenaltyFields(Protocol):
    """The OpenAI families' penalty and bias fields (``None`` = off)."""

    @property
    def presence_penalty(self) -> float | None: ...
    @property
    def frequency_penalty(self) -> float | None: ...
    @property
    def repetition_penalty(self) -> float | None: ...
    @property
    def logit_bias(self) -> dict[str, float] | None: ...


def sampling_params(
    req: SamplingFields,
    *,
    max_tokens: int,
    logit_bias: tuple[tuple[int, float], ...] = (),
    penalties: PenaltyFields | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    constraint: Constraint | None = None,
) -> SamplingParams:
    """Engine parameters from a request's fields (``logit_bias`` as :func:`parse_logit_bias` returned it)."""
    pen = penalties
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None or req.top_k < 0 else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=None if req.seed is None else req.seed % (2**64),
        ignore_eos=ignore_eos,
        logit_bias=logit_bias,
        presence_penalty=(pen.presence_penalty or 0.0) if pen else 0.0,
        frequency_penalty=(pen.frequency_penalty or 0.0) if pen else 0.0,
        repetition_penalty=(pen.repetition_penalty or 1.0) if pen else 1.0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        constraint=constraint,
    )
