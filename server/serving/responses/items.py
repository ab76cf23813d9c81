"""Responses API items: decoded one by one, kept with ids, and turned into the chat messages a model renders.

A conversation is a list of input items. A turn's items are the earlier turn's input and output (through
``previous_response_id``) followed by its own ``input``; they are stored as given, each with an id, and become chat
messages only to be rendered: messages keep their role, consecutive ``function_call`` items become one assistant
message's tool calls, a ``function_call_output`` becomes a ``tool`` message, and ``reasoning`` items are left out
(chat templates drop earlier turns' thinking as well).
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from schemas.openai.chat import (
    AssistantMessage,
    ChatMessage,
    DeveloperMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from schemas.openai.responses import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputText,
    ItemReference,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    ReasoningItem,
    Refusal,
)
from schemas.openai.tools import MessageToolCall, MessageToolCallFunction
from server.errors import invalid_request, unsupported_param

MAX_INPUT_ITEMS = 4096
"""Most items one conversation may hold (its earlier turns included)."""

_ITEM_TYPES: dict[str, type[InputItem]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
    "item_reference": ItemReference,
}


def item_id(prefix: str) -> str:
    """An OpenAI-style item id such as ``msg_…``."""
    return f"{prefix}_{secrets.token_hex(16)}"


def parse_input(raw: str | list[dict[str, Any]]) -> list[InputItem]:
    """``input`` as items: a string is one user message; each object is decoded by its ``type`` (a message may
    leave it out), a malformed one refused with a 400 naming it."""
    if isinstance(raw, str):
        return [MessageItem(role="user", content=raw)]
    if not raw:
        raise invalid_request("'input' must contain at least one item.", "input", "empty_array")
    if len(raw) > MAX_INPUT_ITEMS:
        raise invalid_request(f"'input' may hold at most {MAX_INPUT_ITEMS} items.", "input", "array_above_max_length")
    items: list[InputItem] = []
    for i, obj in enumerate(raw):
        kind = obj.get("type", "message")
        item_type = _ITEM_TYPES.get(kind) if isinstance(kind, str) else None
        if item_type is None:
            raise unsupported_param(f"input[{i}].type", f"Input items of type {kind!r}")
        try:
            item = msgspec.convert(obj if "type" in obj else {**obj, "type": kind}, item_type)
        except msgspec.ValidationError as exc:
            _, at, path = str(exc).rpartition(" - at `$")
            path = path.rstrip("`") if at else ""
            param = f"input[{i}]{path}" if path else f"input[{i}]"
            raise invalid_request(f"Invalid 'input[{i}]': {str(exc).partition(' - at ')[0]}", param) from None
        if isinstance(item, ItemReference):
            raise unsupported_param(f"input[{i}]", "Input items of type 'item_reference'")
        items.append(item)
    return items


def with_ids(items: list[InputItem]) -> list[InputItem]:
    """``items`` as stored: every item has an id and every message's content is a list of parts."""
    out: list[InputItem] = []
    for item in items:
        if isinstance(item, MessageItem):
            content: list[ContentPart]
            if isinstance(item.content, str):
                content = [OutputText(text=item.content) if item.role == "assistant" else InputText(text=item.content)]
            else:
                content = item.content
            out.append(MessageItem(role=item.role, content=content, id=item.id or item_id("msg"), status="completed"))
        elif isinstance(item, FunctionCallItem | FunctionCallOutputItem | ReasoningItem) and item.id is None:
            prefix = {FunctionCallItem: "fc", FunctionCallOutputItem: "fco", ReasoningItem: "rs"}[type(item)]
            out.append(msgspec.structs.replace(item, id=item_id(prefix)))
        else:
            out.append(item)
    return out


def output_as_input(output: list[OutputItem]) -> list[InputItem]:
    """An earlier response's output items as the input items of the next turn."""
    items: list[InputItem] = []
    for out in output:
        if isinstance(out, OutputMessage):
            items.append(MessageItem(role="assistant", content=list(out.content), id=out.id, status=out.status))
        elif isinstance(out, OutputFunctionCall):
            items.append(
                FunctionCallItem(
                    call_id=out.call_id, name=out.name, arguments=out.arguments, id=out.id, status=out.status
                )
            )
        elif isinstance(out, OutputReasoning):
            items.append(ReasoningItem(id=out.id, summary=out.summary, content=out.content, status=out.status))
    return items


def to_messages(items: list[InputItem], first: int = 0) -> list[ChatMessage]:
    """The chat messages of a conversation's items.

    ``first`` is the index in ``input`` of the first item (items before it came from earlier turns), for the
    parameter a 400 names; an item of an earlier turn is named by ``previous_response_id``.
    """
    messages: list[ChatMessage] = []
    calls: set[str] = set()
    for i, item in enumerate(items):
        param = f"input[{i - first}]" if i >= first else "previous_response_id"
        if isinstance(item, MessageItem):
            messages.append(_message(item, param))
        elif isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
            call = MessageToolCall(
                id=item.call_id, function=MessageToolCallFunction(name=item.name, arguments=item.arguments)
            )
            last = messages[-1] if messages else None
            if isinstance(last, AssistantMessage):  # the calls of one model turn join its message
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(AssistantMessage(content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise invalid_request(
                    f"No function call with call_id {item.call_id!r} precedes this 'function_call_output' in the "
                    "conversation.",
                    f"{param}.call_id",
                )
            messages.append(ToolMessage(content=_text(item.output, f"{param}.output"), tool_call_id=item.call_id))
    if not messages:
        raise invalid_request("'input' must contain at least one message or function call.", "input")
    return messages


def _message(item: MessageItem, param: str) -> ChatMessage:
    text = _text(item.content, f"{param}.content")
    if item.role == "assistant":
        return AssistantMessage(content=text)
    if item.role == "system":
        return SystemMessage(content=text)
    if item.role == "developer":
        return DeveloperMessage(content=text)
    return UserMessage(content=text)


def _text(content: str | list[ContentPart], param: str) -> str:
    """The text of a message's content; a part that is not text gets a 400 naming it."""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        if isinstance(part, InputText | OutputText):
            texts.append(part.text)
        elif isinstance(part, Refusal):
            texts.append(part.refusal)
        else:
            tag = msgspec.inspect.type_info(type(part)).tag  # type: ignore[attr-defined]
            raise unsupported_param(f"{param}[{j}].type", f"Content parts of type '{tag}'")
    return "\n".join(texts)
