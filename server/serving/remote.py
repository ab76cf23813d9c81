"""Requests for remote models: what is sent upstream, what the gateway reserves, and how usage is counted.

The client's own JSON body is forwarded (unknown fields included, as an OpenAI-compatible proxy should) with
three changes: ``model`` becomes the upstream's name, a stream always asks the upstream for
``stream_options.include_usage``, and a request without max tokens gets the role's cap when the role has one.

Nothing here has the upstream's tokenizer, so the prompt is measured twice before the request: an upper bound
(its UTF-8 bytes as JSON: a byte-level BPE token covers at least one byte, and the JSON punctuation outweighs
a chat template's few special tokens per message) reserved against the monthly quota, and an estimate (about
four bytes per token) counted against TPM. Both are reconciled to the upstream's reported usage at the end;
when the upstream reports none, usage is counted from the stream (one token per content piece) or estimated
from the text, and marked as estimated.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from schemas.native.generate import DEFAULT_MAX_NEW_TOKENS, GenerateRequest
from schemas.openai.chat import ChatCompletionRequest, ToolCall
from schemas.openai.common import CompletionUsage
from schemas.openai.completions import CompletionRequest
from server.models_file import RemoteModel
from server.serving.common import new_id, now

DEFAULT_RESERVE_TOKENS = 4096
"""Completion tokens reserved for a request without max tokens when the entry sets no ``max_model_len``."""
BYTES_PER_TOKEN = 4
PER_MESSAGE_TOKENS = 4
_CACHE_VERSION = 1

Family = Literal["chat", "completions", "generate"]


@dataclass(slots=True)
class ChoiceResult:
    """What one choice produced so far."""

    text_parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[ToolCall] | None = None
    logprobs: Any = None
    pieces: int = 0
    """Upstream pieces that carried output (about one token each in vLLM's and llm-server's streams)."""

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


def estimate_tokens(text: str) -> int:
    """About four UTF-8 bytes per token (what OpenAI suggests for English)."""
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def _reserve(entry: RemoteModel, bound: int, requested: int | None, n: int) -> int:
    if requested is not None:
        return requested * n
    if entry.max_model_len is not None:
        return max(0, entry.max_model_len - bound) * n
    return DEFAULT_RESERVE_TOKENS * n


def _call(
    family: Family,
    entry: RemoteModel,
    payload: dict[str, Any],
    *,
    prompt_bytes: int,
    prompt_text: str,
    messages: int,
    requested: int | None,
    cap: int | None,
    n: int,
    stream: bool,
    include_usage: bool,
    deterministic: bool,
) -> RemoteCall:
    payload["model"] = entry.target_model
    if requested is None and cap is not None:
        payload["max_tokens"] = requested = cap
    if stream:
        options = payload.get("stream_options")
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    prefix = {"chat": "chatcmpl", "completions": "cmpl", "generate": "gen"}[family]
    estimate = estimate_tokens(prompt_text) + PER_MESSAGE_TOKENS * messages
    return RemoteCall(
        family=family,
        id=new_id(prefix),
        created=now(),
        model=entry.name,
        path="chat/completions" if family == "chat" else "completions",
        payload=payload,
        stream=stream,
        include_usage=include_usage,
        prompt_bound=max(prompt_bytes, estimate),
        prompt_estimate=estimate,
        max_new_tokens=_reserve(entry, prompt_bytes, requested, n),
        explicit_max_tokens=requested is not None,
        cacheable=deterministic and not payload.get("logprobs") and not payload.get("tools"),
        prompt_text=prompt_text,
    )


def prepare_chat(
    raw: dict[str, Any], req: ChatCompletionRequest, entry: RemoteModel, *, max_tokens_cap: int | None
) -> RemoteCall:
    """A chat request for ``entry``'s upstream (``raw`` is the client's decoded JSON body)."""
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    measured = msgspec.json.encode([raw.get("messages"), raw.get("tools"), raw.get("functions")])
    text = "\n".join(_message_text(m) for m in req.messages)
    return _call(
        "chat",
        entry,
        dict(raw),
        prompt_bytes=len(measured),
        prompt_text=text,
        messages=len(req.messages),
        requested=requested,
        cap=max_tokens_cap,
        n=req.n or 1,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        deterministic=req.temperature == 0 or req.seed is not None,
    )


def prepare_completion(
    raw: dict[str, Any], req: CompletionRequest, entry: RemoteModel, *, max_tokens_cap: int | None
) -> RemoteCall:
    """A text-completion request for ``entry``'s upstream."""
    prompts = req.prompt if isinstance(req.prompt, list) else [req.prompt]
    token_ids = sum(1 if isinstance(p, int) else len(p) for p in prompts if not isinstance(p, str))
    texts = [p for p in prompts if isinstance(p, str)]
    text = "\n".join(texts)
    payload = dict(raw)
    if req.max_tokens is not None:
        payload["max_tokens"] = req.max_tokens  # OpenAI's default of 16 when the client sent none
    n = (req.n or 1) * max(1, len([p for p in prompts if not isinstance(p, int)]))
    call = _call(
        "completions",
        entry,
        payload,
        prompt_bytes=len(text.encode()) + token_ids,
        prompt_text=text,
        messages=0,
        requested=req.max_tokens,
        cap=max_tokens_cap,
        n=n,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        deterministic=req.temperature == 0 or req.seed is not None,
    )
    call.prompt_estimate += token_ids
    return call


def prepare_generate(
    req: GenerateRequest, entry: RemoteModel, *, stream: bool, max_tokens_cap: int | None = None
) -> RemoteCall:
    """A native ``/v1/generate`` or ``/v1/stream`` request, sent upstream as a text completion."""
    max_new_tokens = req.max_new_tokens
    if max_new_tokens is None:  # the native default, within the role's cap
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, max_tokens_cap or DEFAULT_MAX_NEW_TOKENS)
    payload: dict[str, Any] = {
        "prompt": req.prompt,
        "max_tokens": max_new_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": stream,
    }
    if req.top_k > 0:
        payload["top_k"] = req.top_k  # vLLM's and llm-server's extension
    if req.min_p > 0:
        payload["min_p"] = req.min_p
    if req.stop is not None:
        payload["stop"] = req.stop
    if req.seed is not None:
        payload["seed"] = req.seed
    return _call(
        "generate",
        entry,
        payload,
        prompt_bytes=len(req.prompt.encode()),
        prompt_text=req.prompt,
        messages=0,
        requested=max_new_tokens,
        cap=None,
        n=1,
        stream=stream,
        include_usage=True,
        deterministic=req.temperature == 0 or req.seed is not None,
    )


def _message_text(message: Any) -> str:
    content = getattr(message, "content", None)
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(getattr(part, "text", "") or "" for part in content)
    return ""


# -- completion cache ----------------------------------------------------------------------------------------
def cache_key(key_id: str, call: RemoteCall) -> str:
    """sha256 over the caller's key, the model, the family and the whole forwarded body (stream fields aside)."""
    body = {k: v for k, v in call.payload.items() if k not in ("stream", "stream_options", "user")}
    material = msgspec.msgpack.encode([_CACHE_VERSION, "remote", key_id, call.model, call.family, body], order="sorted")
    return hashlib.sha256(material).hexdigest()


def encode_results(call: RemoteCall) -> bytes:
    """``[prompt_tokens, [[text, finish_reason, completion_tokens], …]]`` of a finished call."""
    usage = call.usage
    per_choice = [
        [r.text, r.finish_reason or "stop", max(r.pieces, estimate_tokens(r.text))]
        for _, r in sorted(call.results.items())
    ]
    if len(per_choice) == 1:
        per_choice[0][2] = usage.completion_tokens
    return msgspec.msgpack.encode([usage.prompt_tokens, per_choice])


def replay(call: RemoteCall, blob: bytes) -> bool:
    """Fill ``call`` from a cached entry; ``False`` when the entry is not one of ours."""
    try:
        prompt_tokens, per_choice = msgspec.msgpack.decode(blob)
        results = {i: ChoiceResult([str(t)], str(f), pieces=int(c)) for i, (t, f, c) in enumerate(per_choice)}
    except (msgspec.DecodeError, TypeError, ValueError):
        return False
    completion = sum(r.pieces for r in results.values())
    call.results = results
    call.upstream_usage = CompletionUsage(
        prompt_tokens=int(prompt_tokens), completion_tokens=completion, total_tokens=int(prompt_tokens) + completion
    )
    call.cached = True
    return True
