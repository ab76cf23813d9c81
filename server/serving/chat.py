"""``/v1/chat/completions``: messages -> chat template -> engine -> OpenAI objects."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from schemas.openai.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    ChoiceDeltaFunction,
    ChoiceDeltaToolCall,
    ChunkChoice,
    DeveloperMessage,
    FunctionCall,
    FunctionMessage,
    RefusalPart,
    ResponseFormat,
    SystemMessage,
    TextPart,
    ToolCall,
    ToolMessage,
    UserMessage,
)
from server.engine.base import Constraint, Engine, EngineError
from server.engine.grammar import GrammarError
from server.engine.grammar import check as check_constraint
from server.errors import invalid_request, unsupported_param
from server.serving.choices import Choice, collect, engine_failure, run_choices
from server.serving.common import (
    Plan,
    check_model,
    check_prompt_bytes,
    make_plan,
    parse_stops,
    resolve_max_tokens,
    sampling_params,
    utf8_length,
)
from server.serving.logprobs import TokenTexts, chat_logprobs
from server.serving.streaming import error_event
from server.serving.toolparse import ContentDelta, ToolCallStart, ToolEvent
from server.serving.toolparse import ToolCall as ParsedCall
from server.serving.tools import ToolHistory, plan_tools


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


def prepare(
    engine: Engine, req: ChatCompletionRequest, *, max_tokens_cap: int | None = None, max_messages: int | None = None
) -> Plan:
    """Validate, render the chat template and check the context window (nothing is admitted yet).

    ``max_messages`` bounds ``messages`` (the ``MAX_MESSAGES`` setting; ``None``: no bound).
    """
    model = check_model(engine, req.model)
    if max_messages is not None and len(req.messages) > max_messages:
        raise invalid_request(
            f"Invalid 'messages': array too long. Expected an array with maximum length {max_messages}, but got an "
            f"array with length {len(req.messages)} instead.",
            "messages",
            "array_above_max_length",
        )
    reject_unsupported(req)
    stops = parse_stops(req.stop)
    if req.stream_options is not None and not req.stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    messages = template_messages(req.messages)
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise invalid_request(
            "'continue_final_message' needs the last message to be from the assistant.", "continue_final_message"
        )
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    text_bytes = sum(utf8_length(m["content"]) for m in messages if isinstance(m.get("content"), str))
    check_prompt_bytes(engine, text_bytes, requested, "messages")
    tokenizer = engine.tokenizer
    if not tokenizer.has_chat_template:
        raise invalid_request(
            f"The model '{model}' has no chat template; use /v1/completions with a raw prompt.",
            "messages",
            "chat_template_missing",
        )
    try:
        prompt = tokenizer.render_chat(
            messages,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            tools=tools.template_tools,
        )
    except ValueError as exc:
        raise invalid_request(
            f"The chat template rejected the messages: {exc}", "messages", "chat_template_error"
        ) from None
    max_tokens = resolve_max_tokens(engine, len(prompt), requested, param, max_tokens_cap)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_request("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    constraint = output_constraint(engine, req.response_format)
    if tools.constraint is not None:
        if constraint is not None:
            raise invalid_request(
                "'response_format' cannot be combined with a required or named 'tool_choice'.", "response_format"
            )
        constraint = checked(engine, tools.constraint, "tools")
    params = sampling_params(
        req,
        max_tokens=max_tokens,
        vocab_size=tokenizer.vocab_size,
        penalties=req,
        ignore_eos=req.ignore_eos,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        constraint=constraint,
    )
    return make_plan(
        "chat",
        "chatcmpl",
        model,
        [prompt],
        params,
        tokenizer=tokenizer,
        stops=stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        explicit_max_tokens=requested is not None,
        n=req.n or 1,
        tools=tools if tools.parses_calls else None,
    )


_JSON_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def output_constraint(engine: Engine, fmt: ResponseFormat | None) -> Constraint | None:
    """The grammar ``response_format`` asks for (``None`` for plain text), checked before admission."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return checked(engine, Constraint(json_schema='{"type":"object"}'), "response_format")
    spec = fmt.json_schema
    if not isinstance(spec, dict):
        raise invalid_request("'response_format.json_schema' is required for type 'json_schema'.", "response_format")
    name = spec.get("name")
    if not isinstance(name, str) or not _JSON_NAME.match(name):
        raise invalid_request(
            "'response_format.json_schema.name' must be 1-64 letters, digits, underscores or dashes.",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    strict = spec.get("strict")
    if not isinstance(schema, dict):
        raise invalid_request(
            "'response_format.json_schema.schema' must be an object.", "response_format.json_schema.schema"
        )
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request(
            "'response_format.json_schema.strict' must be a boolean.", "response_format.json_schema.strict"
        )
    constraint = Constraint(json_schema=msgspec.json.encode(schema).decode(), lenient=not strict)
    return checked(engine, constraint, "response_format.json_schema.schema")


def checked(engine: Engine, constraint: Constraint, param: str) -> Constraint:
    """``constraint`` if this engine can enforce it, else a 400 naming ``param``."""
    if not engine.supports_constraints:
        raise invalid_request(
            f"The model '{engine.info.name}' cannot constrain its output (structured outputs and required tool "
            "calls need a Transformers model).",
            param,
            "unsupported_parameter",
        )
    try:
        check_constraint(constraint)
    except GrammarError as exc:
        raise invalid_request(f"Invalid schema: {exc}", param, "invalid_json_schema") from None
    return constraint


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def _finish(choice: Choice, called: bool) -> str:
    """``tool_calls`` when the choice called a tool and was not cut short by ``max_tokens``."""
    reason = choice.finish_reason or "stop"
    return "tool_calls" if called and reason == "stop" else reason


async def complete(plan: Plan) -> ChatCompletion:
    """Run to the end and build the non-streaming response (tool calls parsed out of the text)."""
    try:
        await collect(plan.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    texts = TokenTexts(plan.tokenizer) if plan.tokenizer is not None else None
    choices = []
    for c in plan.choices:
        content: str | None = c.text
        calls: list[ParsedCall] = []
        if plan.tools is not None and plan.tools.parses_calls:
            content, calls = plan.tools.parse(c.text)
        message = ChatCompletionMessage(content=content, tool_calls=_tool_calls(calls) if calls else msgspec.UNSET)
        logprobs = chat_logprobs(c.logprobs, texts) if c.logprobs is not None and texts is not None else None
        choices.append(
            ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=_finish(c, bool(calls)))
        )
    return ChatCompletion(id=plan.id, created=plan.created, model=plan.model, choices=choices, usage=plan.usage)


def _deltas(events: list[ToolEvent]) -> list[ChoiceDelta]:
    """Stream deltas of tool-parser events: content text, a call's id and name, then its argument fragments."""
    out: list[ChoiceDelta] = []
    for ev in events:
        if isinstance(ev, ContentDelta):
            if ev.text:
                out.append(ChoiceDelta(content=ev.text))
        elif isinstance(ev, ToolCallStart):
            call = ChoiceDeltaToolCall(
                index=ev.index, id=ev.id, type="function", function=ChoiceDeltaFunction(name=ev.name, arguments="")
            )
            out.append(ChoiceDelta(tool_calls=[call]))
        else:
            fragment = ChoiceDeltaToolCall(index=ev.index, function=ChoiceDeltaFunction(arguments=ev.text))
            out.append(ChoiceDelta(tool_calls=[fragment]))
    return out


async def stream(plan: Plan) -> AsyncIterator[msgspec.Struct]:
    """Stream chunks: role first, then content or tool-call pieces, one finish chunk per choice, then usage."""
    usage: Any = None if plan.include_usage else msgspec.UNSET
    texts = TokenTexts(plan.tokenizer) if plan.tokenizer is not None else None
    tools = plan.tools if plan.tools is not None and plan.tools.parses_calls else None
    parsers = {c.index: tools.stream_parser() for c in plan.choices} if tools else {}

    def chunk(choices: list[ChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.model, choices=choices, usage=usage)

    for c in plan.choices:
        yield chunk([ChunkChoice(index=c.index, delta=ChoiceDelta(role="assistant", content=""))])
    try:
        async for ev in run_choices(plan.choices):
            parser = parsers.get(ev.index)
            if parser is None:
                deltas = [ChoiceDelta(content=ev.text)] if ev.text else []
            else:
                deltas = _deltas(parser.push(ev.text) + (parser.finish() if ev.finish_reason is not None else []))
            logprobs = chat_logprobs(ev.logprobs, texts) if ev.logprobs and texts is not None else None
            if logprobs is not None and not deltas:
                deltas = [ChoiceDelta(content="")]  # logprobs of text the stop matcher or tool parser still holds
            for j, delta in enumerate(deltas):
                yield chunk([ChunkChoice(index=ev.index, delta=delta, logprobs=logprobs if j == 0 else None)])
            if ev.finish_reason is not None:
                called = parser is not None and parser.calls > 0
                finish = _finish(plan.choices[ev.index], called)
                yield chunk([ChunkChoice(index=ev.index, delta=ChoiceDelta(), finish_reason=finish)])
    except EngineError as exc:
        yield error_event(engine_failure(exc))
        return
    if plan.include_usage:
        yield ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.model, choices=[], usage=plan.usage)
