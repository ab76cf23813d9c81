"""Tool-call formats beyond Hermes: parsers and constraints per model family, chosen from the chat template."""

from server.serving.toolformats.formats import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    FormatName,
    ToolFormat,
    ToolParser,
    call_schema,
    detect_format,
    model_tool_format,
    tool_format,
)

__all__ = [
    "FORMATS",
    "HERMES",
    "LLAMA3_JSON",
    "MISTRAL",
    "FormatName",
    "ToolFormat",
    "ToolParser",
    "call_schema",
    "detect_format",
    "model_tool_format",
    "tool_format",
]
