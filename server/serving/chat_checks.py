"""The checks of a chat request that need no model: the same 400 for a local model and a remote one.

Unsupported OpenAI parameters, message count, stops, content parts, tool history, tools and ``tool_choice``,
``response_format`` (its grammar compiled here, which needs no tokenizer), ``top_logprobs`` and ``logit_bias``.
:func:`server.serving.chat.prepare` adds the chat template and the context window; a remote model's request is
forwarded only once :func:`check_chat` passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from schemas.openai.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    DeveloperMessage,
    FunctionMessage,
    RefusalPart,
    ResponseFormat,
    ResponseFormatJSONObject,
    ResponseFormatText,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
)
from server.engine.base import Constraint
from server.engine.grammar import GrammarError
from server.engine.grammar import check as check_constraint
from server.errors import invalid_request, unsupported_param
from server.serving.checks import Target, stream_options_need_stream
from server.serving.common import parse_logit_bias, parse_stops
from server.serving.reasoning import check_template_kwargs
from server.serving.toolformats import HERMES, ToolFormat
from server.serving.tools import ToolHistory, ToolPlan, plan_tools


@dataclass(frozen=True, slots=True)
class ChatChecks:
    """A chat request that passed the checks every model shares.

    Attributes:
        stops: The stop strings.
        messages: The messages as chat templates take them (content parts flattened, tool calls as mappings).
        tools: How the request uses tools (the validated tools even when ``tool_choice`` is ``"none"``).
        constraint: The grammar the output must follow (``response_format`` or a forced tool call), or ``None``.
        logit_bias: ``(token id, bias)`` pairs.
        max_tokens: What the client asked for (``max_completion_tokens``, else ``max_tokens``), or ``None``.
        max_tokens_param: The name of the field ``max_tokens`` came from (errors name it).
        template_kwargs: ``chat_template_kwargs``, none of them an argument of the rendering itself.
    """

    stops: list[str]
    messages: list[dict[str, Any]]
    tools: ToolPlan
    constraint: Constraint | None
    logit_bias: tuple[tuple[int, float], ...]
    max_tokens: int | None
    max_tokens_param: str
    template_kwargs: dict[str, Any] | None = None


def check_chat(
    req: ChatCompletionRequest,
    target: Target,
    *,
    max_messages: int | None,
    tool_format: ToolFormat | None = HERMES,
) -> ChatChecks:
    """Everything about a chat request that needs no tokenizer, in the order a local model has always checked it.

    ``max_messages`` bounds ``messages`` (the ``MAX_MESSAGES`` setting; ``None``: no bound). ``tool_format`` is how
    the model writes tool calls (a remote model parses its own: Hermes stands in, so the same tools get the same
    checks); ``None`` refuses ``tools`` (a template that shows no tool-call format).

    Raises:
        OpenAIError: 400 naming the offending parameter.
    """
    if max_messages is not None and len(req.messages) > max_messages:
        raise invalid_request(
            f"Invalid 'messages': array too long. Expected an array with maximum length {max_messages}, but got an "
            f"array with length {len(req.messages)} instead.",
            "messages",
            "array_above_max_length",
        )
    reject_unsupported(req)
    stops = parse_stops(req.stop)
    stream_options_need_stream(req.stream_options, req.stream)
    messages = template_messages(req.messages)
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, tool_format)
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise invalid_request(
            "'continue_final_message' needs the last message to be from the assistant.", "continue_final_message"
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    constraint = output_constraint(target, req.response_format)
    if tools.constraint is not None:
        if constraint is not None:
            raise invalid_request(
                "'response_format' cannot be combined with a required or named 'tool_choice'.", "response_format"
            )
        constraint = checked(target, tools.constraint, "tools")
    logit_bias = parse_logit_bias(req.logit_bias, target.vocab_size)
    max_tokens, max_tokens_param = req.requested_max_tokens
    template_kwargs = check_template_kwargs(req.chat_template_kwargs)
    return ChatChecks(
        stops=stops,
        messages=messages,
        tools=tools,
        constraint=constraint,
        logit_bias=logit_bias,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        template_kwargs=template_kwargs,
    )


def reject_unsupported(req: ChatCompletionRequest) -> None:
    """400 for the OpenAI parameters this server does not implement (never silently accepted)."""
    if req.functions:
        raise unsupported_param("functions", "The deprecated 'functions' parameter (use 'tools')")
    if req.function_call is not None and req.function_call != "none":
        raise unsupported_param("function_call", "The deprecated 'function_call' parameter (use 'tool_choice')")
    if req.audio is not None or (req.modalities is not None and req.modalities != ["text"]):
        raise unsupported_param("modalities", "Output modalities other than text")
    if req.prediction is not None:
        raise unsupported_param("prediction")
    if req.web_search_options is not None:
        raise unsupported_param("web_search_options")
    # Options of OpenAI's reasoning and moderated models; OpenAI itself answers 400 for models without them.
    if req.reasoning_effort is not None:
        raise unsupported_param("reasoning_effort", "'reasoning_effort' (this model does not reason)")
    if req.verbosity is not None:
        raise unsupported_param("verbosity")
    if req.moderation is not None:
        raise unsupported_param("moderation")


def _text_of(content: str | list[Any] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        else:
            kind = msgspec.inspect.type_info(type(part))
            tag = getattr(kind, "tag", type(part).__name__)
            raise unsupported_param(f"{param}[{j}].type", f"Content parts of type '{tag}'")
    return "\n".join(texts)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the plain dicts ``apply_chat_template`` expects; content parts flattened to text."""
    if not messages:
        raise invalid_request("'messages' must contain at least one message.", "messages", "empty_array")
    out: list[dict[str, Any]] = []
    history = ToolHistory()
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if isinstance(msg, FunctionMessage):
            raise unsupported_param(f"{param}.role", "Messages with the deprecated role 'function' (use 'tool')")
        if isinstance(msg, ToolMessage):
            out.append(history.tool(i, _text_of(msg.content, f"{param}.content"), msg.tool_call_id))
            continue
        if isinstance(msg, AssistantMessage) and msg.function_call:
            raise unsupported_param(f"{param}.function_call", "The deprecated 'function_call' (use 'tool_calls')")
        role = "system" if isinstance(msg, DeveloperMessage) else str(msg.__struct_config__.tag)
        text = _text_of(msg.content, f"{param}.content")
        if isinstance(msg, AssistantMessage):
            item = history.assistant(i, text if msg.content is not None else None, msg.tool_calls)
        else:
            item = {"role": role, "content": text}
        if isinstance(msg, SystemMessage | DeveloperMessage | UserMessage | AssistantMessage) and msg.name:
            item["name"] = msg.name
        out.append(item)
    return out


def output_constraint(target: Target, fmt: ResponseFormat | None) -> Constraint | None:
    """The grammar ``response_format`` asks for (``None`` for plain text), checked before admission.

    The decoder has checked its shape (the type, the schema's name, ``schema`` an object, ``strict`` a boolean);
    this requires ``json_schema`` for that type and compiles the grammar.
    """
    if fmt is None or isinstance(fmt, ResponseFormatText):
        return None
    if isinstance(fmt, ResponseFormatJSONObject):
        return checked(target, Constraint(json_schema='{"type":"object"}'), "response_format")
    spec = fmt.json_schema
    if spec is None:
        raise invalid_request("'response_format.json_schema' is required for type 'json_schema'.", "response_format")
    schema = {} if isinstance(spec.schema, msgspec.UnsetType) else spec.schema
    constraint = Constraint(json_schema=msgspec.json.encode(schema).decode(), lenient=not spec.strict)
    return checked(target, constraint, "response_format.json_schema.schema")


def checked(target: Target, constraint: Constraint, param: str) -> Constraint:
    """``constraint`` if the model can enforce it and it compiles, else a 400 naming ``param``."""
    if not target.constrains:
        raise invalid_request(
            f"The model '{target.name}' cannot constrain its output (structured outputs and required tool "
            "calls need a Transformers model).",
            param,
            "unsupported_parameter",
        )
    try:
        check_constraint(constraint)
    except GrammarError as exc:
        raise invalid_request(f"Invalid schema: {exc}", param, "invalid_json_schema") from None
    return constraint
