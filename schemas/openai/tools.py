"""``tools``, ``tool_choice`` and the tool calls of earlier assistant turns in ``/v1/chat/completions`` requests.

Tagged by ``type``, with OpenAI's constraints in the types, so a malformed one is refused by the decoder with its
parameter path. What types cannot say (an empty ``tools``, duplicate names, a choice naming no tool, unsupported
kinds) is checked when the tools are planned (``server.serving.tools``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# ---- tools and tool_choice -----------------------------------------------------------------------------

FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$(?!\n)")]
"""A function (or JSON schema) name as OpenAI allows it: 1 to 64 of a-z, A-Z, 0-9, ``_`` and ``-``. Python's ``$``
also matches before a final newline: the lookahead keeps a name ending in one out, as a JSON Schema reader would."""

MAX_TOOLS = 128
"""The most ``tools`` one request may carry (OpenAI's limit)."""


class FunctionDefinition(msgspec.Struct, kw_only=True):
    """A function the model may call: ``parameters`` is the JSON Schema of its arguments object."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(msgspec.Struct, tag_field="type", tag="function", kw_only=True):
    """A ``{"type": "function", "function": {...}}`` tool."""

    function: FunctionDefinition


class CustomTool(msgspec.Struct, tag_field="type", tag="custom", kw_only=True):
    """A custom (free-form input) tool: decoded so the server can answer that it is unsupported."""

    custom: dict[str, Any] | None = None


ChatTool = FunctionTool | CustomTool


class ToolChoiceFunction(msgspec.Struct, kw_only=True):
    """The function a named ``tool_choice`` forces."""

    name: str


class NamedToolChoice(msgspec.Struct, tag_field="type", tag="function", kw_only=True):
    """``{"type": "function", "function": {"name": ...}}``: the model must call that function.

    ``function`` is optional in the type only so that a choice without it is refused like any other malformed
    ``tool_choice`` (naming ``tool_choice``) when the tools are planned.
    """

    function: ToolChoiceFunction | None = None


class AllowedToolsChoice(msgspec.Struct, tag_field="type", tag="allowed_tools", kw_only=True):
    """``{"type": "allowed_tools", ...}``: decoded so the server can answer that it is unsupported."""

    allowed_tools: dict[str, Any] | None = None


class CustomToolChoice(msgspec.Struct, tag_field="type", tag="custom", kw_only=True):
    """``{"type": "custom", ...}``: decoded so the server can answer that it is unsupported."""

    custom: dict[str, Any] | None = None


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | CustomToolChoice


# ---- tool calls of earlier assistant turns (``messages[].tool_calls``) ---------------------------------


class MessageToolCallFunction(msgspec.Struct, kw_only=True):
    """The function an earlier tool call invoked.

    ``arguments`` is OpenAI's JSON text of an object; a mapping, ``""`` or nothing are taken as well (some clients
    send them) and mean the same object. The text is parsed when the conversation is rendered.
    """

    name: Annotated[str, Meta(min_length=1)]
    arguments: str | dict[str, Any] | None = None


class MessageToolCall(msgspec.Struct, kw_only=True):
    """A tool call in an assistant message of the history.

    ``type`` can only be ``"function"`` and may be left out. It is a plain field, not a msgspec tag: a lone tagged
    Struct decodes without its tag, while the API document would call it required. ``id`` is optional in the type
    only so that a missing one gets the answer it always got (a 400 naming it, raised where the conversation is
    rendered); every call needs one, for a ``tool`` message to answer.
    """

    id: Annotated[str, Meta(min_length=1)] | None = None
    type: Literal["function"] = "function"
    function: MessageToolCallFunction
