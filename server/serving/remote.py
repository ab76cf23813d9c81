"""Requests for remote models: the local checks, what is sent upstream, what is reserved, how usage is counted.

A request for a remote model passes exactly the checks a local model's does (the same body gets the same 400),
and what goes upstream is built from the validated request (:mod:`server.serving.forward`): unknown fields are
dropped, ``model`` is the upstream's name, a stream always asks for ``stream_options.include_usage``, and max
tokens is one value, always sent: the client's (within the role's cap) or the gateway's reservation, so the
upstream can never generate more than was reserved against the quota.

Nothing here has the upstream's tokenizer, so the prompt is measured twice before the request: an upper bound
(its UTF-8 bytes as JSON: a byte-level token covers at least one byte; plus room for what a chat template adds)
reserved against the monthly quota, and an estimate (about four bytes per token) counted against TPM. Both are
reconciled to the upstream's reported usage at the end; when the upstream reports none (or nonsense), usage is
counted from the stream (one token per content piece) or estimated from the text, and marked as estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from schemas.native.generate import GenerateRequest
from schemas.openai.chat import ChatCompletionRequest, ToolCall
from schemas.openai.common import CompletionUsage, PromptTokensDetails
from schemas.openai.completions import CompletionRequest
from server.models.file import RemoteModel
from server.serving.chat_checks import ChatChecks, check_chat
from server.serving.checks import Target, check_completion, check_generate, empty_prompt, generate_max_tokens
from server.serving.common import new_id, now
from server.serving.forward import chat_body, completion_body
from server.serving.plan import CacheEntry, Demand
from server.serving.responses.turn import Turn
from server.serving.responses.upstream import responses_body

DEFAULT_RESERVE_TOKENS = 4096
"""Max tokens per choice of a request without one when neither the role's cap nor the entry's ``max_model_len``
bounds it (sent upstream too)."""
BYTES_PER_TOKEN = 4
CHAT_TEMPLATE_TOKENS = 256
"""Room in a chat prompt's upper bound for what an upstream's template adds to the messages and tools (a default
system prompt, a tool-calling preamble, the special tokens of each turn)."""
PROMPT_EXTRA_TOKENS = 2
"""Room in a raw prompt's upper bound for the special tokens an upstream may add (BOS, EOS)."""

Family = Literal["chat", "completions", "generate"]
RESPONSES_PATH = "responses"
"""Where a turn for an upstream with ``responses_api`` goes (its answers are read as chat: ``family`` is chat)."""


@dataclass(slots=True)
class ChoiceResult:
    """What one choice produced so far."""

    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None
    logprobs: Any = None
    pieces: int = 0
    """Upstream pieces that carried output (about one token each in vLLM's and llm-server's streams)."""
    reasoning_parts: list[str] | None = None
    """A reasoning model's ``reasoning_content`` as the upstream sent it (``None``: it sent none)."""

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass(slots=True)
class RemoteCall:
    """A validated request for a remote model, ready for admission."""

    family: Family
    id: str
    created: int
    model: str
    path: str
    payload: dict[str, Any]
    stream: bool
    include_usage: bool
    prompt_bound: int
    prompt_estimate: int
    max_new_tokens: int
    explicit_max_tokens: bool
    cacheable: bool
    prompt_text: str
    sequences: int = 1
    """Choices the upstream generates (``n`` per prompt), counted against the key's sequences in flight."""
    results: dict[int, ChoiceResult] = field(default_factory=dict)
    upstream_usage: CompletionUsage | None = None
    cached: bool = False
    admitted_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)

    def choice(self, index: int) -> ChoiceResult:
        found = self.results.get(index)
        if found is None:
            found = self.results[index] = ChoiceResult()
        return found

    @property
    def usage_estimated(self) -> bool:
        return self.upstream_usage is None and not self.cached

    @property
    def usage(self) -> CompletionUsage:
        """The upstream's usage, else the counted / estimated one."""
        if self.upstream_usage is not None:
            return self.upstream_usage
        completion = sum(max(r.pieces, estimate_tokens(r.text)) for r in self.results.values())
        return CompletionUsage(
            prompt_tokens=self.prompt_estimate,
            completion_tokens=completion,
            total_tokens=self.prompt_estimate + completion,
        )

    @property
    def finished(self) -> bool:
        return bool(self.results) and all(r.finish_reason is not None for r in self.results.values())

    def demand(self) -> Demand:
        """The prompt's upper bound against the quota, its estimate against TPM (the upstream's tokenizer is not
        here), and the max tokens sent upstream."""
        return Demand(
            self.prompt_bound,
            self.max_new_tokens,
            self.explicit_max_tokens,
            tpm_prompt_tokens=self.prompt_estimate,
            sequences=self.sequences,
        )


def estimate_tokens(text: str) -> int:
    """About four UTF-8 bytes per token (what OpenAI suggests for English)."""
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def per_choice_max_tokens(requested: int | None, cap: int | None, window: int | None, bound: int, estimate: int) -> int:
    """The one max-tokens value sent upstream for each choice, which is what the gateway reserves for it.

    What the client asked for, within the role's ``cap``. Without that, as many as fit in the upstream's
    ``window`` (within the ``cap``): the room the prompt's upper ``bound`` leaves, which can never make the upstream
    refuse a prompt that fits, or half the room its ``estimate`` leaves, whichever is larger (at least 1). The half
    keeps text of two bytes per token (code, CJK) within the window, where the bound's room is small or gone for a
    long prompt; past the window the upstream refuses the prompt, as it would without max tokens.
    ``DEFAULT_RESERVE_TOKENS`` when neither a window nor a cap is known.
    """
    if requested is not None:
        return requested if cap is None else min(requested, cap)
    room = None if window is None else max(window - bound, (window - estimate) // 2, 1)
    limits = [v for v in (cap, room) if v is not None]
    return min(limits) if limits else DEFAULT_RESERVE_TOKENS


def _call(
    family: Family,
    entry: RemoteModel,
    payload: dict[str, Any],
    *,
    bound: int,
    estimate: int,
    prompt_text: str,
    per_choice: int,
    choices: int,
    explicit: bool,
    stream: bool,
    include_usage: bool,
    deterministic: bool,
    responses_wire: bool = False,
) -> RemoteCall:
    if responses_wire:  # the Responses API's own names; its streams always end with the usage
        payload["max_output_tokens"] = per_choice
        if stream:
            payload["stream"] = True
    else:
        payload["max_tokens"] = per_choice
        if family == "chat":
            payload["max_completion_tokens"] = (
                per_choice  # an upstream honours one name or the other: both say the same
            )
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
    prefix = {"chat": "chatcmpl", "completions": "cmpl", "generate": "gen"}[family]
    return RemoteCall(
        family=family,
        id=new_id(prefix),
        created=now(),
        model=entry.name,
        path=RESPONSES_PATH if responses_wire else "chat/completions" if family == "chat" else "completions",
        payload=payload,
        stream=stream,
        include_usage=include_usage,
        prompt_bound=max(bound, estimate),
        prompt_estimate=estimate,
        max_new_tokens=per_choice * choices,
        explicit_max_tokens=explicit,
        cacheable=deterministic and not payload.get("logprobs") and not payload.get("tools"),
        prompt_text=prompt_text,
        sequences=choices,
    )


def prepare_chat(
    req: ChatCompletionRequest, entry: RemoteModel, *, max_tokens_cap: int | None, max_messages: int | None
) -> RemoteCall:
    """A chat request for ``entry``'s upstream: the local checks, then the validated body (400 as a local model)."""
    checks = check_chat(req, Target(entry.name), max_messages=max_messages)
    payload = chat_body(req, checks, entry.target_model)
    return _chat_call(
        req,
        checks,
        entry,
        payload,
        [payload["messages"], payload.get("tools")],
        max_tokens_cap=max_tokens_cap,
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )


def prepare_responses(
    turn: Turn, entry: RemoteModel, *, max_tokens_cap: int | None, max_messages: int | None
) -> RemoteCall:
    """A Responses turn forwarded to an upstream that serves ``/v1/responses`` (``responses_api`` in the models
    file): the checks of the chat request it amounts to (the same 400s as a translated turn), then the whole
    conversation sent statelessly (:mod:`server.serving.responses.upstream`)."""
    req = turn.chat
    checks = check_chat(req, Target(entry.name), max_messages=max_messages)
    payload = responses_body(turn, entry.target_model)
    measured = [payload.get("instructions"), payload["input"], payload.get("tools")]
    return _chat_call(
        req, checks, entry, payload, measured, max_tokens_cap=max_tokens_cap, include_usage=True, responses_wire=True
    )


def _chat_call(
    req: ChatCompletionRequest,
    checks: ChatChecks,
    entry: RemoteModel,
    payload: dict[str, Any],
    measured: list[Any],
    *,
    max_tokens_cap: int | None,
    include_usage: bool,
    responses_wire: bool = False,
) -> RemoteCall:
    """A checked chat-shaped call, its prompt measured on ``measured`` (the conversation and tools as sent, in
    JSON: a byte-level token covers at least one byte, and the JSON punctuation stands in for a template's few
    tokens per message; the estimate is a quarter of it)."""
    size = len(msgspec.json.encode(measured))
    bound, estimate = size + CHAT_TEMPLATE_TOKENS, math.ceil(size / BYTES_PER_TOKEN)
    return _call(
        "chat",
        entry,
        payload,
        bound=bound,
        estimate=estimate,
        prompt_text="\n".join(m["content"] or "" for m in checks.messages),
        per_choice=per_choice_max_tokens(checks.max_tokens, max_tokens_cap, entry.max_model_len, bound, estimate),
        choices=req.n or 1,
        explicit=checks.max_tokens is not None,
        stream=bool(req.stream),
        include_usage=include_usage,
        deterministic=req.temperature == 0 or req.seed is not None,
        responses_wire=responses_wire,
    )


def prepare_completion(req: CompletionRequest, entry: RemoteModel, *, max_tokens_cap: int | None) -> RemoteCall:
    """A text-completion request for ``entry``'s upstream (the local checks first)."""
    checks = check_completion(req, Target(entry.name))
    sizes: list[tuple[int, int]] = []  # (upper bound, estimate) of each prompt
    for i, prompt in enumerate(checks.prompts):
        if isinstance(prompt, str):
            if not prompt:
                raise empty_prompt(i, len(checks.prompts))
            sizes.append((len(prompt.encode()) + PROMPT_EXTRA_TOKENS, estimate_tokens(prompt)))
        else:
            sizes.append((len(prompt) + PROMPT_EXTRA_TOKENS, len(prompt)))
    longest = max(sizes)
    texts = [p for p in checks.prompts if isinstance(p, str)]
    return _call(
        "completions",
        entry,
        completion_body(req, checks.logit_bias, entry.target_model),
        bound=sum(b for b, _ in sizes),
        estimate=sum(e for _, e in sizes),
        prompt_text="\n".join(texts),
        per_choice=per_choice_max_tokens(req.max_tokens, max_tokens_cap, entry.max_model_len, *longest),
        choices=checks.n * len(checks.prompts),
        explicit=req.max_tokens is not None,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        deterministic=req.temperature == 0 or req.seed is not None,
    )


def prepare_generate(
    req: GenerateRequest, entry: RemoteModel, *, stream: bool, max_tokens_cap: int | None
) -> RemoteCall:
    """A native ``/v1/generate`` or ``/v1/stream`` request, sent upstream as a text completion."""
    stops = check_generate(req)
    if not req.prompt:
        raise empty_prompt(0, 1)
    payload: dict[str, Any] = {
        "model": entry.target_model,
        "prompt": req.prompt,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": stream,
    }
    if req.top_k > 0:
        payload["top_k"] = req.top_k  # vLLM's and llm-server's extension
    if req.min_p > 0:
        payload["min_p"] = req.min_p
    if stops:
        payload["stop"] = stops
    if req.seed is not None:
        payload["seed"] = req.seed
    return _call(
        "generate",
        entry,
        payload,
        bound=len(req.prompt.encode()) + PROMPT_EXTRA_TOKENS,
        estimate=estimate_tokens(req.prompt),
        prompt_text=req.prompt,
        per_choice=generate_max_tokens(req, max_tokens_cap),
        choices=1,
        explicit=True,
        stream=stream,
        include_usage=True,
        deterministic=req.temperature == 0 or req.seed is not None,
    )


# -- completion cache ----------------------------------------------------------------------------------------
def cache_material(call: RemoteCall) -> object | None:
    """What determines the output: the family and the whole forwarded body (stream fields and ``user`` aside),
    or ``None`` when the call is not cacheable."""
    if not call.cacheable:
        return None
    body = {k: v for k, v in call.payload.items() if k not in ("stream", "stream_options", "user")}
    return ["remote", call.family, body]


def cache_entry(call: RemoteCall) -> CacheEntry:
    """The prompt tokens and each choice's ``(text, finish_reason, completion_tokens)`` of a finished call."""
    usage = call.usage
    per_choice = [
        (r.text, r.finish_reason or "stop", max(r.pieces, estimate_tokens(r.text)))
        for _, r in sorted(call.results.items())
    ]
    if len(per_choice) == 1:
        text, finish, _ = per_choice[0]
        per_choice[0] = (text, finish, usage.completion_tokens)
    return CacheEntry(usage.prompt_tokens, per_choice)


def replay(call: RemoteCall, entry: CacheEntry) -> bool:
    """Fill ``call`` from a cached entry."""
    results = {i: ChoiceResult([text], finish, pieces=tokens) for i, (text, finish, tokens) in enumerate(entry.results)}
    completion = sum(r.pieces for r in results.values())
    call.results = results
    call.upstream_usage = CompletionUsage(
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=completion,
        total_tokens=entry.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=entry.prompt_tokens),  # nothing was computed again
    )
    call.cached = True
    return True
