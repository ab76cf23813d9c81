"""The tool-call formats of the main open model families: how calls are parsed and how a forced call is constrained.

======================  =====================================================================  =================
format                  the model writes                                                        detected from
======================  =====================================================================  =================
``hermes``              ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` per call  ``<tool_call>``
``llama3_json``         ``{"name": ..., "parameters": {...}}``, calls joined by ``;``           ``<|python_tag|>``,
                        (optionally after ``<|python_tag|>``)                                  ``ipython``
``mistral``             ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``               ``[TOOL_CALLS]``
======================  =====================================================================  =================

The format comes from the chat template (what it tells the model to write) or from the ``TOOL_CALL_PARSER``
setting. Newer Mistral templates write ``[TOOL_CALLS]name[ARGS]{...}`` per call: that form is parsed too, but a
forced call is written in the JSON-list form (the grammar repeats one JSON value, and the name outside it could not
be tied to its arguments' schema).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from schemas.openai.tools import FunctionDefinition
from server.engine.base import Constraint, Tokenizer
from server.serving.toolformats.jsoncalls import LLAMA3_SYNTAX, MISTRAL_SYNTAX, CallSyntax, JsonCallsParser
from server.serving.toolparse import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolEvent,
    ToolStreamParser,
    join_events,
)

FormatName = Literal["hermes", "llama3_json", "mistral"]


class ToolParser(Protocol):
    """What every format's stream parser offers (see :class:`~server.serving.toolparse.ToolStreamParser`)."""

    broken_calls: list[int]

    @property
    def calls(self) -> int:
        """Number of calls announced so far."""
        ...

    def push(self, text: str) -> list[ToolEvent]:
        """Add generated text; return the events it completes."""
        ...

    def finish(self) -> list[ToolEvent]:
        """End of output: return the last events."""
        ...


def call_schema(function: FunctionDefinition, args_key: str = "arguments") -> dict[str, Any]:
    """JSON Schema of one ``{"name": ..., <args_key>: ...}`` call of ``function``, name first."""
    parameters = function.parameters
    if parameters is None:
        arguments: dict[str, Any] = {"type": "object", "properties": {}}
    else:
        arguments = parameters if "type" in parameters else {"type": "object", **parameters}
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, args_key: arguments},
        "required": ["name", args_key],
        "additionalProperties": False,
    }


def _dumps(schema: dict[str, Any]) -> str:
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ToolFormat:
    """One family's tool-call format.

    Attributes:
        name: The ``TOOL_CALL_PARSER`` value that names it.
        args_key: The member a forced call writes its arguments under.
        syntax: The bare-JSON syntax, or ``None`` for Hermes ``<tool_call>`` blocks.
    """

    name: FormatName
    args_key: str
    syntax: CallSyntax | None

    def stream_parser(self, names: Iterable[str], *, max_calls: int | None = None, eager: bool = True) -> ToolParser:
        """A parser of one streamed choice (``eager=False``: calls announced only once complete)."""
        if self.syntax is None:
            return ToolStreamParser(names, max_calls=max_calls, eager=eager)
        return JsonCallsParser(names, self.syntax, max_calls=max_calls, eager=eager)

    def parse(
        self, text: str, names: Iterable[str], *, max_calls: int | None = None
    ) -> tuple[str | None, list[ToolCall]]:
        """Content (stripped, ``None`` if empty) and calls of finished output; what is no valid call is content."""
        parser = self.stream_parser(names, max_calls=max_calls, eager=False)
        return join_events([*parser.push(text), *parser.finish()])

    def constraint(self, functions: Sequence[FunctionDefinition], *, max_calls: int | None) -> Constraint:
        """The grammar that forces at least one and at most ``max_calls`` calls (``None``: any number) of
        ``functions``, written the way this family writes them (compact JSON)."""
        schemas = [call_schema(f, self.args_key) for f in functions]
        one = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        lenient = not any(f.strict for f in functions)
        if self.name == "hermes":
            return Constraint(
                json_schema=_dumps(one),
                lenient=lenient,
                prefix=TOOL_CALL_OPEN + "\n",
                suffix="\n" + TOOL_CALL_CLOSE,
                separator="\n",
                min_items=1,
                max_items=max_calls,
            )
        if self.name == "llama3_json":
            return Constraint(
                json_schema=_dumps(one), lenient=lenient, separator="; ", min_items=1, max_items=max_calls
            )
        # Mistral: the calls are one JSON list after the marker.
        listing: dict[str, Any] = {"type": "array", "items": one, "minItems": 1}
        if max_calls is not None:
            listing["maxItems"] = max_calls
        return Constraint(json_schema=_dumps(listing), lenient=lenient, prefix=MISTRAL_SYNTAX.marker)


HERMES = ToolFormat("hermes", "arguments", None)
LLAMA3_JSON = ToolFormat("llama3_json", "parameters", LLAMA3_SYNTAX)
MISTRAL = ToolFormat("mistral", "arguments", MISTRAL_SYNTAX)
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def detect_format(template: str | None) -> ToolFormat | None:
    """The format a chat template tells its model to write, or ``None`` when it shows no tool-call format."""
    if not template:
        return None
    if MISTRAL_SYNTAX.marker in template:
        return MISTRAL
    if TOOL_CALL_OPEN in template:
        return HERMES
    if LLAMA3_SYNTAX.marker in template or "ipython" in template:
        return LLAMA3_JSON
    if "<|start_header_id|>" in template and '"parameters"' in template:  # Llama 3.2/3.3 JSON instructions
        return LLAMA3_JSON
    return None


def tool_format(setting: str, template: str | None) -> ToolFormat | None:
    """The format to use: the one ``setting`` names, or for ``"auto"`` the one the template shows (else ``None``).

    Raises:
        ValueError: ``setting`` names no format.
    """
    if setting == "auto":
        return detect_format(template)
    try:
        return FORMATS[setting]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {setting!r}; expected auto, {', '.join(FORMATS)}") from None


def model_tool_format(tokenizer: Tokenizer, setting: str) -> ToolFormat | None:
    """The format of a local model's tool calls (see :func:`tool_format`).

    A tokenizer with no template text is either the built-in ChatML renderer, whose tool instructions are Hermes
    ``<tool_call>`` blocks, or a model without a chat template, which chat requests refuse on their own: Hermes
    stands in for ``"auto"`` there.
    """
    template = tokenizer.chat_template
    if template is None and setting == "auto":
        return HERMES
    return tool_format(setting, template)
