"""A turn's chat completion chunks as Responses stream events, numbered in order.

The events follow what OpenAI sends and its SDK expects: ``response.created`` and ``response.in_progress``; for
each output item ``response.output_item.added``, its content part (``response.content_part.added``), text deltas
(``response.output_text.delta`` or ``response.reasoning_text.delta``) or argument deltas
(``response.function_call_arguments.delta``), then the matching ``.done`` events; finally ``response.completed``
(``response.incomplete`` when ``max_output_tokens`` cut it) with the whole response. A failure after the stream
began is an ``error`` event followed by ``response.failed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from schemas.openai.chat import ChatCompletionChunk, ChoiceDeltaToolCall
from schemas.openai.common import CompletionUsage
from schemas.openai.errors import ErrorResponse
from schemas.openai.responses import (
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    FunctionCallArgumentsDelta,
    FunctionCallArgumentsDone,
    OutputFunctionCall,
    OutputItem,
    OutputItemAdded,
    OutputItemDone,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTextDelta,
    OutputTextDone,
    ReasoningText,
    ReasoningTextDelta,
    ReasoningTextDone,
    Response,
    ResponseCompleted,
    ResponseCreated,
    ResponseError,
    ResponseEvent,
    ResponseFailed,
    ResponseIncomplete,
    ResponseInProgress,
)
from server.serving.responses.items import item_id
from server.serving.responses.turn import Turn, usage_of

ItemStatus = Literal["in_progress", "completed", "incomplete"]


@dataclass(slots=True)
class _Open:
    """The output item being streamed: its kind, index, text (or arguments) so far."""

    item: OutputItem
    index: int
    text: list[str] = field(default_factory=list)


class TurnEvents:
    """Turns the chunks of one choice into events; :attr:`response` is the response as it stands."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.output: list[OutputItem] = []
        self.response: Response = turn.response("in_progress")
        self._seq = 0
        self._open: _Open | None = None
        self._calls: dict[int, _Open] = {}  # the function calls streamed so far, by their chat tool-call index
        self._finish: str | None = None
        self._usage: CompletionUsage | None = None

    def start(self) -> list[ResponseEvent]:
        """``response.created`` and ``response.in_progress``."""
        return [
            self._n(ResponseCreated(response=self.response)),
            self._n(ResponseInProgress(response=self.response)),
        ]

    def push(self, chunk: ChatCompletionChunk) -> list[ResponseEvent]:
        """The events of one chunk (none for the role chunk and the usage chunk)."""
        events: list[ResponseEvent] = []
        if isinstance(chunk.usage, CompletionUsage):
            self._usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            if delta.reasoning_content:
                events += self._text(OutputReasoning, delta.reasoning_content)
            if delta.content:
                events += self._text(OutputMessage, delta.content)
            for call in delta.tool_calls or []:
                events += self._call(call)
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
        return events

    def finish(self) -> list[ResponseEvent]:
        """Close the last item and end with ``response.completed`` (or ``response.incomplete``)."""
        truncated = self._finish == "length"
        events = self._close(truncated)
        if not self.output:  # no text, no call: one empty message, as the non-streamed response has
            events += self._add(OutputMessage(id=item_id("msg"), status="in_progress", content=[]))
            events += self._close(truncated)
        usage = usage_of(self._usage) if self._usage is not None else None
        if truncated:
            self.response = self.turn.response("incomplete", self.output, usage, incomplete="max_output_tokens")
            return [*events, self._n(ResponseIncomplete(response=self.response))]
        self.response = self.turn.response("completed", self.output, usage)
        return [*events, self._n(ResponseCompleted(response=self.response))]

    def fail(self, error: ErrorResponse) -> list[ResponseEvent]:
        """An ``error`` event and ``response.failed`` (items still open end ``incomplete``)."""
        events = self._close(True)
        err = error.error
        code = err.code or err.type
        events.append(self._n(ErrorEvent(code=code, message=err.message, param=err.param)))
        usage = usage_of(self._usage) if self._usage is not None else None
        failure = ResponseError(code=code, message=err.message)
        self.response = self.turn.response("failed", self.output, usage, error=failure)
        events.append(self._n(ResponseFailed(response=self.response)))
        return events

    # -- items ------------------------------------------------------------------------------------------------------
    def _text(self, kind: type[OutputMessage] | type[OutputReasoning], text: str) -> list[ResponseEvent]:
        events: list[ResponseEvent] = []
        current = self._open
        if current is None or not isinstance(current.item, kind):
            events += self._close()
            if kind is OutputMessage:
                events += self._add(OutputMessage(id=item_id("msg"), status="in_progress", content=[]))
            else:
                events += self._add(OutputReasoning(id=item_id("rs"), content=[], status="in_progress"))
            current = self._open
        assert current is not None
        current.text.append(text)
        item_id_, index = current.item.id, current.index
        if kind is OutputMessage:
            events.append(self._n(OutputTextDelta(item_id=item_id_, output_index=index, content_index=0, delta=text)))
        else:
            events.append(
                self._n(ReasoningTextDelta(item_id=item_id_, output_index=index, content_index=0, delta=text))
            )
        return events

    def _call(self, call: ChoiceDeltaToolCall) -> list[ResponseEvent]:
        """A piece of tool call ``call.index``. The first starts its item (closing the text or the call before it,
        so calls follow each other as OpenAI streams them); later ones fill in an id or a name it lacked and add
        argument fragments. A fragment for a call already closed (an upstream interleaving its calls) still reaches
        the call's arguments, and its delta is sent."""
        events: list[ResponseEvent] = []
        function = call.function
        name = function.name if function is not None and function.name else ""
        current = self._calls.get(call.index)
        if current is None:
            events += self._close()
            item = OutputFunctionCall(
                id=item_id("fc"), call_id=call.id or "", name=name, arguments="", status="in_progress"
            )
            events += self._add(item)
            current = self._calls[call.index] = self._open = _Open(item, len(self.output) - 1)
        started = current.item
        assert isinstance(started, OutputFunctionCall)
        started.call_id = started.call_id or call.id or ""
        started.name = started.name or name
        fragment = function.arguments if function is not None else None
        if fragment:
            if current is self._open:
                current.text.append(fragment)
            else:
                started.arguments += fragment
            delta = FunctionCallArgumentsDelta(item_id=started.id, output_index=current.index, delta=fragment)
            events.append(self._n(delta))
        return events

    def _add(self, item: OutputItem) -> list[ResponseEvent]:
        """Add ``item`` to the output as the item being streamed."""
        index = len(self.output)
        self.output.append(item)
        self._open = _Open(item, index)
        events: list[ResponseEvent] = [self._n(OutputItemAdded(output_index=index, item=_copy(item)))]
        part = _empty_part(item)
        if part is not None:
            events.append(self._n(ContentPartAdded(item_id=item.id, output_index=index, content_index=0, part=part)))
        return events

    def _close(self, truncated: bool = False) -> list[ResponseEvent]:
        """End the item being streamed (``incomplete`` when ``truncated``)."""
        current, self._open = self._open, None
        return self._end(current, truncated) if current is not None else []

    def _end(self, current: _Open, truncated: bool) -> list[ResponseEvent]:
        """The ``.done`` events of one item (``incomplete`` when ``truncated``)."""
        item, index, text = current.item, current.index, "".join(current.text)
        status: ItemStatus = "incomplete" if truncated else "completed"
        events: list[ResponseEvent] = []
        if isinstance(item, OutputFunctionCall):
            item.arguments, item.status = text, status
            done = FunctionCallArgumentsDone(item_id=item.id, output_index=index, name=item.name, arguments=text)
            events.append(self._n(done))
        elif isinstance(item, OutputMessage):
            part = OutputText(text=text)
            item.content, item.status = [part], status
            events.append(self._n(OutputTextDone(item_id=item.id, output_index=index, content_index=0, text=text)))
            events.append(self._n(ContentPartDone(item_id=item.id, output_index=index, content_index=0, part=part)))
        else:
            thought = ReasoningText(text=text)
            item.content, item.status = [thought], status
            events.append(self._n(ReasoningTextDone(item_id=item.id, output_index=index, content_index=0, text=text)))
            events.append(self._n(ContentPartDone(item_id=item.id, output_index=index, content_index=0, part=thought)))
        events.append(self._n(OutputItemDone(output_index=index, item=_copy(item))))
        return events

    def _n(self, event: ResponseEvent) -> ResponseEvent:
        """``event`` with the next sequence number."""
        event.sequence_number = self._seq
        self._seq += 1
        return event


def _empty_part(item: OutputItem) -> OutputText | ReasoningText | None:
    if isinstance(item, OutputMessage):
        return OutputText(text="")
    if isinstance(item, OutputReasoning):
        return ReasoningText(text="")
    return None


def _copy(item: OutputItem) -> OutputItem:
    """A snapshot of ``item`` (the item itself changes as its text arrives)."""
    return msgspec.structs.replace(item)
