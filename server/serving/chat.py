"""``/v1/chat/completions``: messages -> chat template -> engine -> OpenAI objects."""

from __future__ import annotations

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
    ChunkChoice,
    DeveloperMessage,
    FunctionMessage,
    RefusalPart,
    SystemMessage,
    TextPart,
    ToolMessage,
    UserMessage,
)
from server.engine.base import Engine, EngineError
from server.errors import invalid_request, unsupported_param
from server.serving.common import (
    Plan,
    check_model,
    collect,
    engine_failure,
    make_plan,
    parse_stops,
    resolve_max_tokens,
    run_choices,
)
from server.serving.streaming import error_event


def reject_unsupported(req: ChatCompletionRequest) -> None:
    """400 for every OpenAI parameter not implemented yet (never silently accepted)."""
    if req.n is not None and req.n != 1:
        raise unsupported_param("n", "'n' other than 1")
    if req.logprobs:
        raise unsupported_param("logprobs")
    if req.top_logprobs is not None:
        raise unsupported_param("top_logprobs")
    if req.logit_bias:
        raise unsupported_param("logit_bias")
    if req.presence_penalty:
        raise unsupported_param("presence_penalty", "A non-zero 'presence_penalty'")
    if req.frequency_penalty:
        raise unsupported_param("frequency_penalty", "A non-zero 'frequency_penalty'")
    if req.response_format is not None and req.response_format.type != "text":
        raise unsupported_param("response_format", f"response_format '{req.response_format.type}'")
    if req.tools:
        raise unsupported_param("tools")
    if req.tool_choice is not None and req.tool_choice != "none":
        raise unsupported_param("tool_choice")
    if req.functions:
        raise unsupported_param("functions")
    if req.function_call is not None and req.function_call != "none":
        raise unsupported_param("function_call")
    if req.audio is not None or (req.modalities is not None and req.modalities != ["text"]):
        raise unsupported_param("modalities", "Output modalities other than text")
    if req.prediction is not None:
        raise unsupported_param("prediction")
    if req.web_search_options is not None:
        raise unsupported_param("web_search_options")


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
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if isinstance(msg, ToolMessage | FunctionMessage):
            raise unsupported_param(f"{param}.role", f"Messages with role '{msg.__struct_config__.tag}'")
        if isinstance(msg, AssistantMessage) and (msg.tool_calls or msg.function_call):
            raise unsupported_param(f"{param}.tool_calls", "Assistant messages with tool calls")
        role = "system" if isinstance(msg, DeveloperMessage) else str(msg.__struct_config__.tag)
        item: dict[str, Any] = {"role": role, "content": _text_of(msg.content, f"{param}.content")}
        if isinstance(msg, SystemMessage | DeveloperMessage | UserMessage | AssistantMessage) and msg.name:
            item["name"] = msg.name
        out.append(item)
    return out


def prepare(engine: Engine, req: ChatCompletionRequest, *, max_tokens_cap: int | None = None) -> Plan:
    """Validate, render the chat template and check the context window (nothing is admitted yet)."""
    model = check_model(engine, req.model)
    reject_unsupported(req)
    stops = parse_stops(req.stop)
    if req.stream_options is not None and not req.stream:
        raise invalid_request("'stream_options' is only allowed when 'stream' is true.", "stream_options")
    messages = template_messages(req.messages)
    if req.continue_final_message and messages[-1]["role"] != "assistant":
        raise invalid_request(
            "'continue_final_message' needs the last message to be from the assistant.", "continue_final_message"
        )
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
        )
    except ValueError as exc:
        raise invalid_request(
            f"The chat template rejected the messages: {exc}", "messages", "chat_template_error"
        ) from None
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(engine, len(prompt), requested, param, max_tokens_cap)
    return make_plan(
        "chat",
        "chatcmpl",
        model,
        [prompt],
        req,
        max_tokens=max_tokens,
        stops=stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        explicit_max_tokens=requested is not None,
        ignore_eos=req.ignore_eos,
    )


async def complete(plan: Plan) -> ChatCompletion:
    """Run to the end and build the non-streaming response."""
    try:
        await collect(plan.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    return ChatCompletion(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        choices=[
            ChatChoice(
                index=c.index,
                message=ChatCompletionMessage(content=c.text),
                finish_reason=c.finish_reason or "stop",
            )
            for c in plan.choices
        ],
        usage=plan.usage,
    )


async def stream(plan: Plan) -> AsyncIterator[msgspec.Struct]:
    """Stream chunks: role first, then content, one finish chunk per choice, then usage when asked."""
    usage: Any = None if plan.include_usage else msgspec.UNSET

    def chunk(choices: list[ChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.model, choices=choices, usage=usage)

    for c in plan.choices:
        yield chunk([ChunkChoice(index=c.index, delta=ChoiceDelta(role="assistant", content=""))])
    try:
        async for ev in run_choices(plan.choices):
            if ev.text:
                yield chunk([ChunkChoice(index=ev.index, delta=ChoiceDelta(content=ev.text))])
            if ev.finish_reason is not None:
                yield chunk([ChunkChoice(index=ev.index, delta=ChoiceDelta(), finish_reason=ev.finish_reason)])
    except EngineError as exc:
        yield error_event(engine_failure(exc))
        return
    if plan.include_usage:
        yield ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.model, choices=[], usage=plan.usage)
