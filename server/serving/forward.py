"""The bodies sent to a remote model's upstream, built from the validated request (never from the client's JSON).

Only fields this server knows and has checked go upstream: an unknown client field (a vLLM ``chat_template``, a
``guided_json``, anything the gateway cannot account for) is dropped (``chat_template_kwargs``, a known field, goes
as is), a field left at its default is not sent, and
the parts the checks normalised (tools, tool calls of earlier turns, ``tool_choice``, ``response_format``,
``logit_bias``) are rebuilt from what was validated. ``model`` is the upstream's name and max tokens is the one
value the gateway reserved (set by :mod:`server.serving.remote`), under both names a chat upstream may honour.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.openai.chat import AssistantMessage, ChatCompletionRequest, ChatMessage, DeveloperMessage, ResponseFormat
from schemas.openai.completions import CompletionRequest
from schemas.openai.tools import MessageToolCall, NamedToolChoice, ToolChoice
from server.serving.chat_checks import ChatChecks
from server.serving.tools import wire_tool

# Fields rebuilt below, or never forwarded: unsupported ones that passed at a no-op value (``functions: []``,
# ``function_call: "none"``, ``modalities: ["text"]``), ``best_of`` (equal to ``n`` here) and the max tokens.
_CHAT_REBUILT = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "logit_bias",
        "max_tokens",
        "max_completion_tokens",
        "stream_options",
        "functions",
        "function_call",
        "modalities",
        "audio",
    }
)
_COMPLETION_REBUILT = frozenset({"model", "max_tokens", "logit_bias", "stream_options", "best_of", "suffix"})


def set_fields(req: msgspec.Struct, skip: frozenset[str]) -> dict[str, Any]:
    """``req``'s fields that are not at their default (not in ``skip``), as JSON values."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(req):
        if f.name in skip:
            continue
        value = getattr(req, f.name)
        default = f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory()
        if f.required or value != default:
            out[f.name] = msgspec.to_builtins(value)
    return out


def chat_body(req: ChatCompletionRequest, checks: ChatChecks, model: str) -> dict[str, Any]:
    """The upstream body of a chat request that passed :func:`~server.serving.chat_checks.check_chat` (the caller
    adds the max tokens)."""
    body: dict[str, Any] = {"model": model, "messages": [_message(m) for m in req.messages]}
    body.update(set_fields(req, _CHAT_REBUILT))
    if checks.tools.tools:
        body["tools"] = [wire_tool(t) for t in checks.tools.tools]
        if req.tool_choice is not None:
            body["tool_choice"] = _tool_choice(req.tool_choice)
    if req.response_format is not None:
        body["response_format"] = _response_format(req.response_format)
    if checks.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in checks.logit_bias}
    return body


def completion_body(req: CompletionRequest, logit_bias: tuple[tuple[int, float], ...], model: str) -> dict[str, Any]:
    """The upstream body of a completions request that passed :func:`~server.serving.checks.check_completion`
    (the caller adds the max tokens)."""
    body: dict[str, Any] = {"model": model}
    body.update(set_fields(req, _COMPLETION_REBUILT))
    if logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in logit_bias}
    return body


def _message(message: ChatMessage) -> dict[str, Any]:
    """One message as validated: ``None`` fields left out, ``developer`` sent as ``system`` (as a local model
    renders it), earlier tool calls in OpenAI's shape with ``arguments`` as JSON text."""
    out = {k: v for k, v in msgspec.to_builtins(message).items() if v is not None and k != "function_call"}
    if isinstance(message, DeveloperMessage):
        out["role"] = "system"
    if isinstance(message, AssistantMessage):
        out.pop("tool_calls", None)
        if message.tool_calls:
            out["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
    return out


def _tool_call(call: MessageToolCall) -> dict[str, Any]:
    arguments = call.function.arguments
    if not (isinstance(arguments, str) and arguments.strip()):
        arguments = msgspec.json.encode(arguments or {}).decode()  # a mapping, or nothing (checked before)
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    # The checks refused the other kinds, and a named choice without its function.
    assert isinstance(choice, NamedToolChoice)
    assert choice.function is not None
    return {"type": "function", "function": {"name": choice.function.name}}


def _response_format(fmt: ResponseFormat) -> dict[str, Any]:
    """The format as validated: its type, and for ``json_schema`` the schema's fields that were given non-null."""
    out: dict[str, Any] = msgspec.to_builtins(fmt)
    spec = out.pop("json_schema", None)
    if spec is not None:
        out["json_schema"] = {k: v for k, v in spec.items() if v is not None}
    return out
