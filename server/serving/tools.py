"""OpenAI tool calling over Hermes/Qwen-style chat templates: request validation, the plan, history messages.

Tools reach the model through its chat template (the ``tools`` variable); the model answers with
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, which :mod:`server.serving.toolparse` turns
back into OpenAI ``tool_calls``. ``tool_choice="required"`` and a named function are enforced with a grammar
(:class:`~server.engine.base.Constraint`); ``"auto"`` leaves the choice to the model and ``"none"`` hides the tools.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from server.engine.base import Constraint
from server.errors import invalid_request, unsupported_param
from server.serving.toolparse import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
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
    "MAX_TOOLS",
    "ContentDelta",
    "FunctionTool",
    "ToolCall",
    "ToolCallArguments",
    "ToolCallStart",
    "ToolEvent",
    "ToolHistory",
    "ToolMode",
    "ToolPlan",
    "ToolStreamParser",
    "join_events",
    "parse_tool_calls",
    "plan_tools",
]

MAX_TOOLS: Final = 128
_NAME: Final = re.compile(r"[a-zA-Z0-9_-]{1,64}")

ToolMode = Literal["none", "auto", "required", "function"]


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A validated ``{"type": "function", "function": {...}}`` tool.

    Attributes:
        name: Function name (``^[a-zA-Z0-9_-]{1,64}$``).
        description: What the function does, for the model.
        parameters: JSON Schema of the arguments object (``{"type": "object", "properties": {}}`` when omitted).
        strict: The arguments must follow ``parameters`` exactly (OpenAI's ``strict``).
    """

    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool

    def template_dict(self) -> dict[str, Any]:
        """The tool as chat templates expect it (OpenAI's shape, without ``strict``, which means nothing there)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}

    def wire_dict(self) -> dict[str, Any]:
        """The tool in OpenAI's request shape, as validated (what a remote model is sent)."""
        tool = self.template_dict()
        if self.strict:
            tool["function"]["strict"] = True
        return tool

    def call_schema(self) -> dict[str, Any]:
        """JSON Schema of one ``{"name": ..., "arguments": ...}`` call of this tool, name first."""
        arguments = self.parameters if "type" in self.parameters else {"type": "object", **self.parameters}
        return {
            "type": "object",
            "properties": {"name": {"const": self.name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request uses tools.

    Attributes:
        mode: ``"none"`` (no tools, or ``tool_choice="none"``), ``"auto"``, ``"required"`` or ``"function"``
            (a named function).
        tools: The request's validated tools (also in ``"none"`` mode; empty without tools).
        template_tools: What to hand the chat template as ``tools``; ``None`` to render without tools.
        call_names: Names that count as calls in the output (only the named one in ``"function"`` mode).
        max_calls: Most calls per answer: 1 without ``parallel_tool_calls`` or with a named function.
        constraint: The grammar that forces calls (``"required"`` and ``"function"`` modes), else ``None``.
    """

    mode: ToolMode
    tools: tuple[FunctionTool, ...] = ()
    template_tools: list[dict[str, Any]] | None = None
    call_names: frozenset[str] = frozenset()
    max_calls: int | None = None
    constraint: Constraint | None = None

    @property
    def parses_calls(self) -> bool:
        """Whether the output must be searched for tool calls."""
        return self.mode != "none"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Content and calls of finished output (see :func:`parse_tool_calls`)."""
        return parse_tool_calls(text, self.call_names, max_calls=self.max_calls)

    def stream_parser(self) -> ToolStreamParser:
        """A parser for one streamed choice."""
        return ToolStreamParser(self.call_names, max_calls=self.max_calls)


def plan_tools(tools: Sequence[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan:
    """Validate ``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a chat request and plan their use.

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
    if len(tools) > MAX_TOOLS:
        raise invalid_request(f"'tools' has {len(tools)} entries; at most {MAX_TOOLS} are allowed.", "tools")
    checked: list[FunctionTool] = []
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
    parallel = parallel_tool_calls is not False
    chosen = [t for t in checked if t.name == named] if named else checked
    constraint = None
    if mode in ("required", "function"):
        schemas = [t.call_schema() for t in chosen]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        constraint = Constraint(
            json_schema=json.dumps(schema, separators=(",", ":"), ensure_ascii=False),
            lenient=not any(t.strict for t in chosen),
            prefix=TOOL_CALL_OPEN + "\n",
            suffix="\n" + TOOL_CALL_CLOSE,
            separator="\n",
            min_items=1,
            max_items=None if parallel and mode == "required" else 1,
        )
    return ToolPlan(
        mode,
        tuple(checked),
        [t.template_dict() for t in checked],
        frozenset(t.name for t in chosen),
        None if parallel and mode != "function" else 1,
        constraint,
    )


def _check_tool(tool: Any, param: str) -> FunctionTool:
    if not isinstance(tool, dict):
        raise invalid_request("Each tool must be an object.", param, "invalid_type")
    kind = tool.get("type")
    if kind == "custom":
        raise unsupported_param(f"{param}.type", "Tools of type 'custom'")
    if kind != "function":
        raise invalid_request(f"Invalid tool type {kind!r}; expected 'function'.", f"{param}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise invalid_request("Missing or invalid 'function' object.", f"{param}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise invalid_request(
            f"Invalid function name {name!r}: expected 1 to 64 characters of a-z, A-Z, 0-9, '_' and '-'.",
            f"{param}.function.name",
        )
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid_request("'description' must be a string.", f"{param}.function.description", "invalid_type")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    elif not isinstance(parameters, dict):
        raise invalid_request("'parameters' must be a JSON Schema object.", f"{param}.function.parameters")
    elif parameters.get("type", "object") != "object":
        raise invalid_request(
            f"Invalid schema for function '{name}': 'parameters' must be a JSON Schema of type 'object', "
            f"got {parameters.get('type')!r}.",
            f"{param}.function.parameters",
        )
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request("'strict' must be a boolean.", f"{param}.function.strict", "invalid_type")
    return FunctionTool(name, description, parameters, bool(strict))


def _check_choice(choice: Any, names: set[str]) -> tuple[ToolMode, str | None]:
    if choice is None or choice == "auto":
        return "auto", None
    if choice in ("none", "required"):
        return choice, None
    if isinstance(choice, dict):
        if choice.get("type") in ("allowed_tools", "custom"):
            raise unsupported_param("tool_choice", f"tool_choice of type '{choice['type']}'")
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") == "function" and isinstance(name, str):
            if name not in names:
                raise invalid_request(f"tool_choice names function '{name}', which is not in 'tools'.", "tool_choice")
            return "function", name
    raise invalid_request(
        "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
        "tool_choice",
    )


class ToolHistory:
    """Converts the tool calls and tool results of earlier turns into chat-template messages, in order.

    HF templates expect a call's ``arguments`` as a mapping (OpenAI sends JSON text), and a tool result must
    answer a call made earlier in the conversation. One instance per request; call it for each message in order.
    """

    def __init__(self) -> None:
        self._calls: dict[str, str] = {}  # id -> function name

    def assistant(self, index: int, content: str | None, tool_calls: Sequence[Any] | None) -> dict[str, Any]:
        """An assistant message, with its ``tool_calls`` (if any) in the template's shape.

        Args:
            index: Position in ``messages`` (for error parameters).
            content: The message's text, already flattened; ``None`` when it has none.
            tool_calls: The message's ``tool_calls`` as sent.
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

    def _call(self, call: Any, param: str) -> dict[str, Any]:
        if not isinstance(call, dict):
            raise invalid_request("Each tool call must be an object.", param, "invalid_type")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid_request("A tool call needs a string 'id'.", f"{param}.id")
        if call.get("type", "function") != "function":
            raise invalid_request(f"Invalid tool call type {call.get('type')!r}; expected 'function'.", f"{param}.type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise invalid_request("Missing or invalid 'function' object.", f"{param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_request("A tool call needs a string function 'name'.", f"{param}.function.name")
        arguments = _call_arguments(function.get("arguments"), f"{param}.function.arguments")
        self._calls[call_id] = name
        return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _call_arguments(arguments: Any, param: str) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}  # some clients send "" for a call without arguments
    if isinstance(arguments, str):
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
