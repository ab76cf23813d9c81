"""Turns forwarded to an upstream that serves ``/v1/responses`` itself (``responses_api = true`` in the models
file): the body sent, and its answers read back in the chat shape the rest of the remote path re-frames.

The state stays here: the upstream gets the whole conversation with ``store: false`` and never a
``previous_response_id``, so a turn's stored items, its usage and its 404s across keys do not depend on the upstream
keeping anything. Item ids and statuses are this server's and are not sent; reasoning items are not sent either (an
upstream cannot take them back without its own encrypted state).

The upstream's response (or its stream of events) is read as a chat completion (or chat chunks): output text as
content, reasoning text as ``reasoning_content``, function calls as tool calls, ``incomplete`` as finish reason
``length`` and its usage under chat's names. The usage checks, the estimate when it reports none, the upstream's
errors mid-stream and the accounting are then exactly those of a chat upstream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from schemas.openai.responses import ReasoningItem
from server.serving.responses.turn import Turn

_encode = msgspec.json.encode


def responses_body(turn: Turn, model: str) -> dict[str, Any]:
    """The body sent upstream for ``turn`` (the caller adds ``max_output_tokens`` and ``stream``)."""
    req = turn.request
    items = [
        {k: v for k, v in msgspec.to_builtins(item).items() if k not in ("id", "status") and v is not None}
        for item in turn.items
        if not isinstance(item, ReasoningItem)
    ]
    body: dict[str, Any] = {"model": model, "input": items, "store": False}
    if req.instructions is not None:
        body["instructions"] = req.instructions
    if turn.tools:
        body["tools"] = [{k: v for k, v in msgspec.to_builtins(t).items() if v is not None} for t in turn.tools]
    optional = {
        "tool_choice": req.tool_choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    if req.text is not None and req.text.format is not None:
        body["text"] = {"format": {k: v for k, v in msgspec.to_builtins(req.text.format).items() if v is not None}}
    return body


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Item(msgspec.Struct):
    type: str = ""
    content: list[_Part] | None = None
    summary: list[_Part] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None


class _Response(msgspec.Struct):
    status: str | None = None
    output: list[_Item] = []
    usage: Any = None
    error: Any = None
    incomplete_details: Any = None


class _Event(msgspec.Struct):
    type: str = ""
    delta: str | None = None
    item: _Item | None = None
    response: _Response | None = None
    message: str | None = None
    code: str | None = None


_response = msgspec.json.Decoder(_Response)
_event = msgspec.json.Decoder(_Event)


def chat_answer(raw: bytes) -> bytes:
    """An upstream response object as the chat completion body it amounts to (``raw`` as is when it is not one:
    the chat re-framing then calls it malformed)."""
    try:
        response = _response.decode(raw)
    except msgspec.DecodeError:
        return raw
    if response.error is not None or response.status == "failed":
        return _encode({"error": response.error or {"message": "the response failed"}})
    text: list[str] = []
    thought: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response.output:
        if item.type == "message":
            text += [p.text or "" for p in item.content or [] if p.type == "output_text"]
        elif item.type == "reasoning":
            thought += [p.text or "" for p in item.content or item.summary or []]
        elif item.type == "function_call":
            function = {"name": item.name or "", "arguments": item.arguments or ""}
            calls.append({"id": item.call_id or "", "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if thought:
        message["reasoning_content"] = "".join(thought)
    if calls:
        message["tool_calls"] = calls
    choice = {"index": 0, "message": message, "finish_reason": _finish(response, bool(calls))}
    return _encode({"choices": [choice], "usage": chat_usage(response.usage)})


async def chat_chunks(payloads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An upstream's stream of response events as chat chunk payloads (events that add no output are skipped)."""
    calls = 0
    async for data in payloads:
        try:
            event = _event.decode(data)
        except msgspec.DecodeError:
            yield data  # the chat re-framing answers a malformed chunk
            return
        kind = event.type
        delta: dict[str, Any] | None = None
        if kind == "response.output_text.delta":
            delta = {"content": event.delta or ""}
        elif kind in ("response.reasoning_text.delta", "response.reasoning_summary_text.delta"):
            delta = {"reasoning_content": event.delta or ""}
        elif kind == "response.output_item.added" and event.item is not None and event.item.type == "function_call":
            function = {"name": event.item.name or "", "arguments": ""}
            delta = {
                "tool_calls": [
                    {"index": calls, "id": event.item.call_id or "", "type": "function", "function": function}
                ]
            }
            calls += 1
        elif kind == "response.function_call_arguments.delta" and calls:
            delta = {"tool_calls": [{"index": calls - 1, "function": {"arguments": event.delta or ""}}]}
        elif kind in ("response.completed", "response.incomplete") and event.response is not None:
            finish = _finish(event.response, calls > 0)
            yield _encode({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            yield _encode({"choices": [], "usage": chat_usage(event.response.usage)})
            return
        elif kind in ("response.failed", "error"):
            failure = event.response.error if event.response is not None else None
            yield _encode({"error": failure or {"message": event.message or "the response failed"}})
            return
        if delta is not None:
            yield _encode({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


def _finish(response: _Response, called: bool) -> str:
    details = response.incomplete_details
    if response.status == "incomplete" and isinstance(details, dict):
        reason = details.get("reason")
        if reason in _INCOMPLETE:
            return _INCOMPLETE[reason]
    return "tool_calls" if called else "stop"


_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def chat_usage(usage: Any) -> Any:
    """Responses usage under chat's names (anything else as is, for the chat checks to judge)."""
    if not isinstance(usage, dict) or "input_tokens" not in usage:
        return usage
    out: dict[str, Any] = {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    cached = usage.get("input_tokens_details")
    if isinstance(cached, dict) and "cached_tokens" in cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached["cached_tokens"]}
    details = usage.get("output_tokens_details")
    if isinstance(details, dict) and "reasoning_tokens" in details:
        out["completion_tokens_details"] = {"reasoning_tokens": details["reasoning_tokens"]}
    return out
