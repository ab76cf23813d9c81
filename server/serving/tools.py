"""OpenAI tool calling over the chat template: the checks types cannot make, the plan, history messages.

Tools reach the model through its chat template (the ``tools`` variable); the model answers in its family's format
(Hermes ``<tool_call>`` blocks, Llama 3 JSON, Mistral ``[TOOL_CALLS]``; see :mod:`server.serving.toolformats`),
which the format's parser turns back into OpenAI ``tool_calls``. ``tool_choice="required"`` and a named function are
enforced with a grammar (:class:`~server.engine.base.Constraint`) in that format; ``"auto"`` leaves the choice to
the model and ``"none"`` hides the tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from schemas.openai.tools import ChatTool, CustomTool, FunctionDefinition, MessageToolCall, NamedToolChoice, ToolChoice
from server.engine.base import Constraint
from server.errors import invalid_request, unsupported_param
from server.serving.toolformats import HERMES, ToolFormat, ToolParser, call_schema
from server.serving.toolparse import (
    ContentDelta,
    ToolCall,
    ToolCallArguments,
    ToolCallStart,
    ToolEvent,
    ToolStreamParser,
    join_events,
    parse_tool_calls,
)

__all__ = [
    "ContentDelta",
    "ToolCall",
    "ToolCallArguments",
    "ToolCallStart",
    "ToolEvent",
    "ToolFormat",
    "ToolHistory",
    "ToolMode",
    "ToolParser",
    "ToolPlan",
    "ToolStreamParser",
    "call_schema",
    "join_events",
    "parse_tool_calls",
    "plan_tools",
    "template_tool",
    "wire_tool",
]

ToolMode = Literal["none", "auto", "required", "function"]


def template_tool(function: FunctionDefinition) -> dict[str, Any]:
    """The tool as chat templates expect it: OpenAI's shape, ``parameters`` always there (``{"type": "object",
    "properties": {}}`` when omitted), without ``strict``, which means nothing there."""
    out: dict[str, Any] = {"name": function.name}
    if function.description is not None:
        out["description"] = function.description
    out["parameters"] = {"type": "object", "properties": {}} if function.parameters is None else function.parameters
    return {"type": "function", "function": out}


def wire_tool(function: FunctionDefinition) -> dict[str, Any]:
    """The tool in OpenAI's request shape, as validated (what a remote model is sent): the template's shape plus
    ``strict`` when it is true."""
    tool = template_tool(function)
    if function.strict:
        tool["function"]["strict"] = True
    return tool


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request uses tools.

    Attributes:
        mode: ``"none"`` (no tools, or ``tool_choice="none"``), ``"auto"``, ``"required"`` or ``"function"``
            (a named function).
        tools: The request's validated functions (also in ``"none"`` mode; empty without tools).
        template_tools: What to hand the chat template as ``tools``; ``None`` to render without tools.
        call_names: Names that count as calls in the output (only the named one in ``"function"`` mode).
        max_calls: Most calls per answer: 1 without ``parallel_tool_calls`` or with a named function.
        constraint: The grammar that forces calls (``"required"`` and ``"function"`` modes), else ``None``.
        format: How the model writes calls (what parses them and what the constraint forces).
    """

    mode: ToolMode
    tools: tuple[FunctionDefinition, ...] = ()
    template_tools: list[dict[str, Any]] | None = None
    call_names: frozenset[str] = frozenset()
    max_calls: int | None = None
    constraint: Constraint | None = None
    format: ToolFormat = HERMES

    @property
    def parses_calls(self) -> bool:
        """Whether the output must be searched for tool calls."""
        return self.mode != "none"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Content and calls of finished output (see :func:`parse_tool_calls`), in the plan's format."""
        return self.format.parse(text, self.call_names, max_calls=self.max_calls)

    def stream_parser(self) -> ToolParser:
        """A parser for one streamed choice."""
        return self.format.stream_parser(self.call_names, max_calls=self.max_calls)


def plan_tools(
    tools: Sequence[ChatTool] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None,
    fmt: ToolFormat | None = HERMES,
) -> ToolPlan:
    """Check what the types of ``tools``, ``tool_choice`` and ``parallel_tool_calls`` cannot, and plan their use.

    The decoder has checked their shapes (names, types, at most 128 tools); this refuses what needs the request as
    a whole or is not supported: an empty ``tools``, custom tools, duplicate names, a ``parameters`` schema that is
    not of an object, a ``tool_choice`` (or ``parallel_tool_calls``) without tools or naming no tool of the request,
    and tools the model cannot be offered (``fmt`` is ``None``: its chat template shows no tool-call format).

    Raises:
        OpenAIError: 400 naming the offending parameter, as OpenAI words it where it can.
    """
    if tools is None:
        if tool_choice is not None and tool_choice != "none":
            raise invalid_request("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        if parallel_tool_calls is not None:
            raise invalid_request(
                "'parallel_tool_calls' is only allowed when 'tools' are specified.", "parallel_tool_calls"
            )
        return ToolPlan("none")
    if not tools:
        raise invalid_request("'tools' must not be an empty array; omit it instead.", "tools", "empty_array")
    checked: list[FunctionDefinition] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        checked.append(_check_tool(tool, f"tools[{i}]"))
        if checked[-1].name in seen:
            raise invalid_request(
                f"Duplicate function name '{checked[-1].name}' in 'tools'.", f"tools[{i}].function.name"
            )
        seen.add(checked[-1].name)
    mode, named = _check_choice(tool_choice, seen)
    if mode == "none":
        return ToolPlan("none", tuple(checked))  # the tools are kept (a remote model is sent them), never rendered
    if fmt is None:
        raise invalid_request(
            "This model's chat template shows no tool-call format, so it cannot be offered 'tools'; start the "
            "server with --tool-call-parser (hermes, llama3_json or mistral) if the model does write tool calls.",
            "tools",
            "tools_unsupported",
        )
    parallel = parallel_tool_calls is not False
    chosen = [t for t in checked if t.name == named] if named else checked
    constraint = None
    if mode in ("required", "function"):
        constraint = fmt.constraint(chosen, max_calls=None if parallel and mode == "required" else 1)
    return ToolPlan(
        mode,
        tuple(checked),
        [template_tool(t) for t in checked],
        frozenset(t.name for t in chosen),
        None if parallel and mode != "function" else 1,
        constraint,
        fmt,
    )


def _check_tool(tool: ChatTool, param: str) -> FunctionDefinition:
    if isinstance(tool, CustomTool):
        raise unsupported_param(f"{param}.type", "Tools of type 'custom'")
    function = tool.function
    parameters = function.parameters
    if parameters is not None and parameters.get("type", "object") != "object":
        raise invalid_request(
            f"Invalid schema for function '{function.name}': 'parameters' must be a JSON Schema of type 'object', "
            f"got {parameters.get('type')!r}.",
            f"{param}.function.parameters",
        )
    return function


def _check_choice(choice: ToolChoice | None, names: set[str]) -> tuple[ToolMode, str | None]:
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        return choice, None
    if not isinstance(choice, NamedToolChoice):
        raise unsupported_param("tool_choice", f"tool_choice of type '{choice.__struct_config__.tag}'")
    if choice.function is None:
        raise invalid_request(
            "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
            '{"type": "function", "function": {"name": ...}}.',
            "tool_choice",
        )
    name = choice.function.name
    if name not in names:
        raise invalid_request(f"tool_choice names function '{name}', which is not in 'tools'.", "tool_choice")
    return "function", name


class ToolHistory:
    """Converts the tool calls and tool results of earlier turns into chat-template messages, in order.

    HF templates expect a call's ``arguments`` as a mapping (OpenAI sends JSON text), and a tool result must
    answer a call made earlier in the conversation. One instance per request; call it for each message in order.
    """

    def __init__(self) -> None:
        self._calls: dict[str, str] = {}  # id -> function name

    def assistant(
        self, index: int, content: str | None, tool_calls: Sequence[MessageToolCall] | None
    ) -> dict[str, Any]:
        """An assistant message, with its ``tool_calls`` (if any) in the template's shape.

        Args:
            index: Position in ``messages`` (for error parameters).
            content: The message's text, already flattened; ``None`` when it has none.
            tool_calls: The message's ``tool_calls`` as decoded.
        """
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = [
                self._call(call, f"messages[{index}].tool_calls[{j}]") for j, call in enumerate(tool_calls)
            ]
        return message

    def tool(self, index: int, content: str, tool_call_id: str) -> dict[str, Any]:
        """A ``tool`` message (its text already flattened) answering an earlier call."""
        name = self._calls.get(tool_call_id)
        if name is None:
            raise invalid_request(
                f"Invalid 'messages[{index}]': messages with role 'tool' must answer a preceding assistant "
                f"message's tool call, and no earlier call has id {tool_call_id!r}.",
                f"messages[{index}].tool_call_id",
            )
        return {"role": "tool", "tool_call_id": tool_call_id, "name": name, "content": content}

    def _call(self, call: MessageToolCall, param: str) -> dict[str, Any]:
        if call.id is None:
            raise invalid_request("A tool call needs a string 'id'.", f"{param}.id")
        name = call.function.name
        arguments = _call_arguments(call.function.arguments, f"{param}.function.arguments")
        self._calls[call.id] = name
        return {"id": call.id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_arguments(arguments: str | dict[str, Any] | None, param: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or not arguments.strip():
        return {}  # some clients send "" for a call without arguments
    try:
        # msgspec, not json: it refuses lone surrogates and NaN/Infinity, which tokenizers, databases and
        # upstreams choke on later.
        decoded = msgspec.json.decode(arguments)
    except msgspec.DecodeError as exc:
        detail = "a lone UTF-16 surrogate or a truncated value" if "truncated" in str(exc) else str(exc)
        raise invalid_request(f"The tool call's 'arguments' is not valid JSON: {detail}.", param) from None
    except RecursionError:
        raise invalid_request("The tool call's 'arguments' is nested too deeply.", param) from None
    if isinstance(decoded, dict):
        return decoded
    raise invalid_request("The tool call's 'arguments' must be JSON text of an object.", param)
