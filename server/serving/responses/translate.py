"""A Responses request as the chat completion request a model runs, and chat errors named in Responses terms.

Every model runs a turn as a chat completion: local models through the chat template, remote ones as a chat
request upstream. What the Responses API adds (stored state, items with ids, its output shape and events) lives
around that, so sampling, tools, structured output, limits, the cache and usage behave exactly as on chat.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from schemas.openai.chat import (
    ChatCompletionRequest,
    ChatMessage,
    JSONSchema,
    ResponseFormat,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    ResponseFormatText,
    SystemMessage,
)
from schemas.openai.common import StreamOptions
from schemas.openai.responses import FunctionToolSpec, ResponsesRequest, TextFormat
from schemas.openai.tools import (
    MAX_TOOLS,
    ChatTool,
    FunctionDefinition,
    FunctionTool,
    NamedToolChoice,
    ToolChoice,
    ToolChoiceFunction,
)
from server.errors import OpenAIError, invalid_request, unsupported_param
from server.serving.responses.items import invalid_field


def reject_unsupported(req: ResponsesRequest) -> None:
    """400 for the Responses parameters this server does not implement (never silently accepted)."""
    if req.include:
        raise unsupported_param("include")
    if req.reasoning is not None and any(v is not None for v in req.reasoning.values()):
        raise unsupported_param("reasoning", "Reasoning options ('reasoning')")
    if req.truncation == "auto":
        raise unsupported_param("truncation", "'truncation': 'auto'")
    for name in ("top_logprobs", "max_tool_calls", "prompt", "conversation", "context_management"):
        if getattr(req, name) is not None:
            raise unsupported_param(name)
    if req.text is not None and req.text.verbosity is not None:
        raise unsupported_param("text.verbosity")
    if req.background and req.stream:
        raise unsupported_param("stream", "Streaming a background response")
    if req.background and not req.store:
        raise invalid_request("A background response must be stored: 'background' needs 'store' true.", "background")


def function_tools(raw: list[dict[str, Any]] | None) -> list[FunctionToolSpec]:
    """``tools``: function tools in the Responses shape; hosted tools (web search, files, ...) get a 400."""
    if raw is None:
        return []
    if len(raw) > MAX_TOOLS:
        raise invalid_request(f"'tools' may hold at most {MAX_TOOLS} tools.", "tools", "array_above_max_length")
    tools: list[FunctionToolSpec] = []
    for i, obj in enumerate(raw):
        kind = obj.get("type")
        if kind != "function":
            raise unsupported_param(f"tools[{i}].type", f"Tools of type {kind!r} (only 'function' tools run here)")
        try:
            tools.append(msgspec.convert(obj, FunctionToolSpec))
        except msgspec.ValidationError as exc:
            raise invalid_field(exc, f"tools[{i}]") from None
    return tools


def tool_choice(raw: str | dict[str, Any] | None) -> ToolChoice | None:
    """``tool_choice``: ``none``, ``auto``, ``required`` or ``{"type": "function", "name": ...}``."""
    if raw is None:
        return None
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise invalid_request(f"Invalid 'tool_choice': {raw!r}.", "tool_choice")
        return raw  # type: ignore[return-value]
    if raw.get("type") != "function":
        raise unsupported_param("tool_choice", f"'tool_choice' of type {raw.get('type')!r}")
    name = raw.get("name")
    if not isinstance(name, str):
        raise invalid_request("'tool_choice.name' must name a function.", "tool_choice.name")
    return NamedToolChoice(function=ToolChoiceFunction(name=name))


def response_format(fmt: TextFormat | None) -> ResponseFormat | None:
    """``text.format`` as chat's ``response_format``."""
    if fmt is None or fmt.type == "text":
        return None if fmt is None else ResponseFormatText()
    if fmt.type == "json_object":
        return ResponseFormatJSONObject()
    if fmt.name is None:
        raise invalid_request("'text.format.name' is required for type 'json_schema'.", "text.format.name")
    schema: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET if fmt.schema is None else fmt.schema
    spec = JSONSchema(name=fmt.name, description=fmt.description, schema=schema, strict=fmt.strict)
    return ResponseFormatJSONSchema(json_schema=spec)


def chat_request(
    req: ResponsesRequest, messages: list[ChatMessage], tools: list[FunctionToolSpec]
) -> ChatCompletionRequest:
    """The chat completion request that runs this turn: ``instructions`` first (as a system message), then the
    conversation; usage is always streamed (the final response carries it). Without tools, ``parallel_tool_calls``
    and ``tool_choice: "auto"`` say nothing and are left out (chat refuses them without tools; Responses does not)."""
    if req.instructions is not None:
        messages = [SystemMessage(content=req.instructions), *messages]
    chat_tools: list[ChatTool] = [
        FunctionTool(
            function=FunctionDefinition(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            )
        )
        for t in tools
    ]
    return ChatCompletionRequest(
        messages=messages,
        model=req.model,
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=chat_tools or None,
        tool_choice=tool_choice(req.tool_choice) if chat_tools or req.tool_choice != "auto" else None,
        parallel_tool_calls=req.parallel_tool_calls if chat_tools else None,
        response_format=response_format(req.text.format if req.text is not None else None),
        user=req.user,
        stream=req.stream,
        stream_options=StreamOptions(include_usage=True) if req.stream else None,
    )


_RENAMES = (
    (re.compile(r"^messages\b.*"), "input"),
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^tools(\[\d+\])\.function"), r"tools\1"),
    (re.compile(r"^tool_choice\.function"), "tool_choice"),
)


def renamed(exc: OpenAIError) -> OpenAIError:
    """A chat error's ``param`` in the Responses request's terms (``messages`` -> ``input``, ``response_format``
    -> ``text.format``, ``max_completion_tokens`` -> ``max_output_tokens``, ``tools[i].function.x`` ->
    ``tools[i].x``)."""
    if exc.param is None:
        return exc
    param = exc.param
    for pattern, replacement in _RENAMES:
        param = pattern.sub(replacement, param, count=1)
    exc.param = param
    return exc
