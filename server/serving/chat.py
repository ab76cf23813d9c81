"""``/v1/chat/completions``: messages -> chat template -> engine -> OpenAI objects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from schemas.openai.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceDeltaFunction,
    ChoiceDeltaToolCall,
    ChunkChoice,
    FunctionCall,
    ToolCall,
)
from server.engine.base import Engine, EngineError
from server.errors import invalid_request
from server.serving.chat_checks import ChatChecks, check_chat
from server.serving.checks import local_target
from server.serving.choices import Choice, collect, engine_failure, run_choices
from server.serving.common import (
    check_prompt_bytes,
    resolve_max_tokens,
    sampling_params,
    utf8_length,
)
from server.serving.logprobs import TokenTexts, chat_logprobs
from server.serving.plan import Plan, make_plan
from server.serving.reasoning import ReasoningSplitter, reasoning_for, split
from server.serving.streaming import error_event
from server.serving.toolformats import model_tool_format
from server.serving.toolparse import ContentDelta, ToolCallStart, ToolEvent
from server.serving.toolparse import ToolCall as ParsedCall


def prepare(
    engine: Engine,
    req: ChatCompletionRequest,
    *,
    max_tokens_cap: int | None = None,
    max_messages: int | None = None,
    reasoning_parser: str = "auto",
    tool_parser: str = "auto",
) -> Plan:
    """Validate, render the chat template and check the context window (nothing is admitted yet).

    The checks every model shares (:func:`~server.serving.chat_checks.check_chat`) run first, so a remote model
    answers the same body with the same 400; ``max_messages`` bounds ``messages`` (``None``: no bound);
    ``reasoning_parser`` (the ``REASONING_PARSER`` setting) says whether a reasoning model's thinking is split off
    (:mod:`server.serving.reasoning`), in which case an output constraint applies after it; ``tool_parser`` (the
    ``TOOL_CALL_PARSER`` setting) is the tool-call format (``"auto"``: the one the chat template shows).
    """
    model = engine.name  # the route resolved the request's model to this engine (404 there otherwise)
    checks, prompt = render(engine, req, max_messages=max_messages, tool_parser=tool_parser)
    tokenizer = engine.tokenizer
    reasoning = reasoning_for(reasoning_parser, tokenizer, prompt)
    constraint = checks.constraint
    if constraint is not None and reasoning is not None:
        constraint = reasoning.constrain(constraint)
    requested = checks.max_tokens
    max_tokens = resolve_max_tokens(engine, len(prompt), requested, checks.max_tokens_param, max_tokens_cap)
    params = sampling_params(
        req,
        max_tokens=max_tokens,
        logit_bias=checks.logit_bias,
        penalties=req,
        ignore_eos=req.ignore_eos,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        constraint=constraint,
    )
    tools = checks.tools
    return make_plan(
        "chat",
        "chatcmpl",
        model,
        [prompt],
        params,
        engine=engine,
        complete=complete,
        stream_events=stream,
        stops=checks.stops,
        stream=bool(req.stream),
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        explicit_max_tokens=requested is not None,
        n=req.n or 1,
        tools=tools if tools.parses_calls else None,
        reasoning=reasoning,
    )


def render(
    engine: Engine, req: ChatCompletionRequest, *, max_messages: int | None, tool_parser: str = "auto"
) -> tuple[ChatChecks, list[int]]:
    """The checks of a chat request and its prompt's token ids, rendered through the model's chat template (what
    ``usage.prompt_tokens`` counts; ``/tokenize`` answers with the same ids)."""
    model = engine.name
    tool_format = model_tool_format(engine.tokenizer, tool_parser)
    checks = check_chat(req, local_target(engine), max_messages=max_messages, tool_format=tool_format)
    text_bytes = sum(utf8_length(m["content"]) for m in checks.messages if isinstance(m.get("content"), str))
    check_prompt_bytes(engine, text_bytes, checks.max_tokens, "messages")
    tokenizer = engine.tokenizer
    if not tokenizer.has_chat_template:
        raise invalid_request(
            f"The model '{model}' has no chat template; use /v1/completions with a raw prompt.",
            "messages",
            "chat_template_missing",
        )
    try:
        prompt = tokenizer.render_chat(
            checks.messages,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            tools=checks.tools.template_tools,
            chat_template_kwargs=checks.template_kwargs,
        )
    except ValueError as exc:
        raise invalid_request(
            f"The chat template rejected the messages: {exc}", "messages", "chat_template_error"
        ) from None
    return checks, prompt


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def _finish(choice: Choice, called: bool) -> str:
    """``tool_calls`` when the choice called a tool and was not cut short by ``max_tokens``."""
    reason = choice.finish_reason or "stop"
    return "tool_calls" if called and reason == "stop" else reason


async def complete(plan: Plan) -> ChatCompletion:
    """Run to the end and build the non-streaming response (reasoning split off, tool calls parsed out of the
    rest)."""
    try:
        await collect(plan.choices)
    except EngineError as exc:
        raise engine_failure(exc) from exc
    texts = TokenTexts(plan.tokenizer) if plan.tokenizer is not None else None
    choices = []
    for c in plan.choices:
        content: str | None = c.text
        thought: str | msgspec.UnsetType | None = msgspec.UNSET
        if plan.reasoning is not None:
            thought, content = split(c.text, plan.reasoning)
        calls: list[ParsedCall] = []
        if plan.tools is not None and plan.tools.parses_calls and content is not None:
            content, calls = plan.tools.parse(content)
        message = ChatCompletionMessage(
            content=content, tool_calls=_tool_calls(calls) if calls else msgspec.UNSET, reasoning_content=thought
        )
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


def _segments(splitter: ReasoningSplitter, text: str, done: bool) -> list[tuple[bool, str]]:
    """``(is_reasoning, text)`` of one event's text, adjacent pieces of one kind joined (one delta each)."""
    out: list[tuple[bool, str]] = []
    for is_reasoning, piece in splitter.push(text) + (splitter.finish() if done else []):
        if out and out[-1][0] == is_reasoning:
            out[-1] = (is_reasoning, out[-1][1] + piece)
        else:
            out.append((is_reasoning, piece))
    return out


async def stream(plan: Plan) -> AsyncIterator[msgspec.Struct]:
    """Stream chunks: role first, then reasoning, content or tool-call pieces, one finish chunk per choice, then
    usage."""
    usage: Any = None if plan.include_usage else msgspec.UNSET
    texts = TokenTexts(plan.tokenizer) if plan.tokenizer is not None else None
    tools = plan.tools if plan.tools is not None and plan.tools.parses_calls else None
    parsers = {c.index: tools.stream_parser() for c in plan.choices} if tools else {}
    splitters = {c.index: ReasoningSplitter(plan.reasoning) for c in plan.choices} if plan.reasoning else {}

    def chunk(choices: list[ChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=plan.id, created=plan.created, model=plan.model, choices=choices, usage=usage)

    for c in plan.choices:
        yield chunk([ChunkChoice(index=c.index, delta=ChoiceDelta(role="assistant", content=""))])
    try:
        async for ev in run_choices(plan.choices):
            parser = parsers.get(ev.index)
            done = ev.finish_reason is not None
            splitter = splitters.get(ev.index)
            segments = [(False, ev.text)] if splitter is None else _segments(splitter, ev.text, done)
            deltas: list[ChoiceDelta] = []
            for is_reasoning, text in segments:
                if is_reasoning:
                    deltas.append(ChoiceDelta(reasoning_content=text))
                elif parser is None:
                    deltas += [ChoiceDelta(content=text)] if text else []
                else:
                    deltas += _deltas(parser.push(text))
            if parser is not None and done:
                deltas += _deltas(parser.finish())
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
