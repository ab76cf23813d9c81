"""Tool calls in generated text: Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks.

One scanner serves both the finished text (:func:`parse_tool_calls`) and streams (:class:`ToolStreamParser`), so
the two agree (but for a streamed call that breaks after it was announced; see the parser). A block is a call when,
after its opening tag and optional whitespace, comes a JSON object whose ``"name"`` is one of the request's tools
and whose ``"arguments"`` is an object (absent or ``null`` means ``{}``; a string holding a JSON object is accepted
too). The closing tag is optional (a model cut by EOS, or a sloppy one, may omit it): a block ends with its object,
plus whitespace and ``</tool_call>`` when they follow. Any other block stays content, tag and all, so no text is
ever lost.

Arguments are returned as the model wrote them minus the whitespace between JSON tokens: compact, valid JSON that
can be streamed as it arrives (a ``json.loads``/``json.dumps`` round trip could not be: it rewrites numbers, escapes
and duplicate keys only once the value is complete).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from server.serving.jsonlex import BEGIN, KEY_BEGIN, KEY_END, JsonLexer, compact_json_object

TOOL_CALL_OPEN: Final = "<tool_call>"
TOOL_CALL_CLOSE: Final = "</tool_call>"


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call found in finished output; ``arguments`` is compact JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """Text of the message content (outside tool calls)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A new call (``index`` counts calls from 0); its arguments follow as :class:`ToolCallArguments`."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArguments:
    """The next fragment of call ``index``'s arguments; the fragments joined are its whole arguments."""

    index: int
    text: str


ToolEvent = ContentDelta | ToolCallStart | ToolCallArguments


# ---- one block ------------------------------------------------------------------------------------------

FAILED, ENDED = range(2)


class CallBlock:
    """One call object, read from just after its opening tag (Hermes) or from where a call may start (JSON formats).

    ``raw`` holds everything received since the tag (so a failed block can be handed back as text). The call is
    ``committed`` once it can no longer be content: when its object closes validly or, with ``eager``, as soon as
    a known name is complete before any arguments (so a stream can announce it and stream the arguments).
    """

    __slots__ = (
        "args",
        "args_keys",
        "args_kind",
        "close",
        "closed_at",
        "committed",
        "eager",
        "in_args",
        "key",
        "key_start",
        "lexer",
        "name",
        "names",
        "opened",
        "pos",
        "raw",
        "value_start",
    )

    def __init__(
        self,
        names: frozenset[str],
        eager: bool,
        args_keys: tuple[str, ...] = ("arguments",),
        close: str = TOOL_CALL_CLOSE,
    ) -> None:
        self.names = names
        self.eager = eager
        self.args_keys = args_keys
        self.close = close
        self.raw = ""
        self.pos = 0
        self.lexer = JsonLexer()
        self.opened = False
        self.key: str | None = None
        self.key_start = 0
        self.value_start = 0
        self.name: str | None = None
        self.args_kind: str | None = None  # first character of the arguments value once it began
        self.in_args = False
        self.args: list[str] = []  # compact arguments text, in pieces
        self.committed = False
        self.closed_at: int | None = None  # index in raw just past the object's closing brace

    def scan(self, final: bool) -> tuple[int, int] | None:
        """Read the new part of ``raw``: ``None`` (needs more), ``(FAILED, pos)`` or ``(ENDED, resume_pos)``."""
        raw, lexer = self.raw, self.lexer
        if self.closed_at is None:
            for pos in range(self.pos, len(raw)):
                ch = raw[pos]
                if not self.opened:
                    if ch.isspace():
                        continue
                    if ch != "{":
                        return FAILED, pos
                    self.opened = True
                was_in_args = self.in_args
                if not lexer.feed(ch) or (lexer.events and not self._on_events(ch, pos)):
                    return FAILED, pos
                if (was_in_args or self.in_args) and lexer.significant:
                    self.args.append(ch)
                if lexer.done:
                    if self.name is None:
                        return FAILED, pos
                    if self.args_kind is None:
                        self.args.append("{}")
                    self.committed = True
                    self.closed_at = pos + 1
                    break
            else:
                self.pos = len(raw)
                return (FAILED, len(raw)) if final else None
        if not self.close:
            return ENDED, self.closed_at
        # After the object: optional whitespace and the closing tag; anything else resumes as text.
        after = raw[self.closed_at :]
        tail = after.lstrip()
        if tail.startswith(self.close):
            return ENDED, len(raw) - len(tail) + len(self.close)
        if not final and self.close.startswith(tail):
            return None
        return ENDED, self.closed_at

    def _on_events(self, ch: str, pos: int) -> bool:
        for kind, level in self.lexer.events:
            if level != 1:  # only the members of the block's object matter
                continue
            if kind == KEY_BEGIN:
                self.key_start = pos
            elif kind == KEY_END:
                self.key = json.loads(self.raw[self.key_start : pos + 1])
            elif kind == BEGIN:
                self.value_start = pos
                if self.key == "name" and (ch != '"' or self.name is not None):
                    return False
                if self.key in self.args_keys:
                    if self.args_kind is not None or ch not in ("{", '"', "n"):
                        return False
                    self.args_kind, self.in_args = ch, ch == "{"
            elif self.key == "name":  # END of the name string
                name = json.loads(self.raw[self.value_start : pos + 1])
                if name not in self.names:
                    return False
                self.name = name
                self.committed = self.eager and self.args_kind is None
            elif self.key in self.args_keys:
                self.in_args = False
                if self.args_kind == "n":
                    self.args.append("{}")
                elif self.args_kind == '"':
                    args = compact_json_object(json.loads(self.raw[self.value_start : pos + 1]))
                    if args is None:
                        return False
                    self.args.append(args)
        return True


# ---- the parser -----------------------------------------------------------------------------------------


def _partial_open_tag(text: str) -> int:
    """Length of the longest suffix of ``text`` that could still grow into the opening tag."""
    start = text.rfind("<", max(0, len(text) - len(TOOL_CALL_OPEN) + 1))
    return len(text) - start if start != -1 and TOOL_CALL_OPEN.startswith(text[start:]) else 0


class EventSink:
    """What every format's stream parser shares: content stripped and merged, events queued and merged.

    Content is stripped like the whole-text parse strips it: leading whitespace is dropped and trailing whitespace
    held back until more content follows (:meth:`finish` drops it).
    """

    _out: list[ToolEvent]
    _content_started: bool
    _space: str
    _call_id: str | None  # of the announced call of the current block
    _sent: int  # argument pieces of the current block already emitted
    _calls: int  # calls announced before the current one
    broken_calls: list[int]

    def _init_events(self) -> None:
        self._content_started = False
        self._space = ""  # trailing whitespace of the content, held back
        self._out = []
        self._call_id = None
        self._sent = 0
        self._calls = 0
        self.broken_calls = []
        """Indices of announced calls whose block turned out invalid (their arguments may be cut short)."""

    @property
    def calls(self) -> int:
        """Number of calls announced so far."""
        return self._calls + (self._call_id is not None)

    def _end_call(self, failed: bool) -> None:
        """The announced call is over (``failed``: its block turned out invalid)."""
        if failed:
            self.broken_calls.append(self._calls)
        self._calls += 1
        self._call_id, self._sent = None, 0

    def _content(self, text: str) -> None:
        if not self._content_started:
            text = text.lstrip()
            if not text:
                return
            self._content_started = True
        body = text.rstrip()
        if not body:
            self._space += text
            return
        self._out.append(ContentDelta(self._space + text[: len(body)]))
        self._space = text[len(body) :]

    def _announce(self, block: CallBlock) -> None:
        """Queue the start of ``block``'s call once its name is certain, then each new piece of its arguments."""
        if not block.committed:
            return
        if self._call_id is None:
            assert block.name is not None
            self._call_id = new_call_id()
            self._out.append(ToolCallStart(self._calls, self._call_id, block.name))
        if self._sent < len(block.args):
            self._out.append(ToolCallArguments(self._calls, "".join(block.args[self._sent :])))
            self._sent = len(block.args)

    def _take(self) -> list[ToolEvent]:
        """The pending events, adjacent content and adjacent fragments of one call merged."""
        merged: list[ToolEvent] = []
        for event in self._out:
            last = merged[-1] if merged else None
            if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
                merged[-1] = ContentDelta(last.text + event.text)
            elif (
                isinstance(event, ToolCallArguments)
                and isinstance(last, ToolCallArguments)
                and last.index == event.index
            ):
                merged[-1] = ToolCallArguments(event.index, last.text + event.text)
            else:
                merged.append(event)
        self._out = []
        return merged


class ToolStreamParser(EventSink):
    """Splits streamed output into content and tool calls, announcing each call as soon as its name is known.

    Content is stripped like :func:`parse_tool_calls` strips it: leading whitespace is dropped and trailing
    whitespace held back until more content follows. Text that could still become an opening tag is held back too.
    The events of any split of a text match :func:`parse_tool_calls` on the whole text, except for a block that
    breaks after its call was announced (output cut mid-arguments, or malformed JSON after the name): an announced
    call cannot be taken back, so it keeps the arguments sent so far (then not valid JSON; see
    :attr:`broken_calls`) and the text from the point of failure on is read as content again.

    Args:
        names: The tools whose names count as calls.
        max_calls: Most calls to recognise (``parallel_tool_calls=false`` means 1); later blocks are content.
        eager: ``False`` announces a call only once its block is complete (what :func:`parse_tool_calls` uses).
    """

    def __init__(self, names: Iterable[str], *, max_calls: int | None = None, eager: bool = True) -> None:
        self._names = frozenset(names)
        self._max_calls = max_calls
        self._eager = eager
        self._held = ""  # a possible start of the opening tag
        self._block: CallBlock | None = None
        self._init_events()

    def push(self, text: str) -> list[ToolEvent]:
        """Add generated text; return the events it completes."""
        self._feed(text, final=False)
        return self._take()

    def finish(self) -> list[ToolEvent]:
        """End of output: decide held text and an open block; return the last events."""
        self._feed("", final=True)
        self._space = ""
        return self._take()

    def _feed(self, text: str, final: bool) -> None:
        while True:
            block = self._block
            if block is None:
                rest = self._scan_text(text, final)
                if rest is None:
                    return
                block = self._block = CallBlock(self._names, self._eager)
                text = rest
            block.raw += text
            outcome = block.scan(final)
            self._announce(block)
            if outcome is None:
                return
            kind, pos = outcome
            self._block = None
            if self._call_id is not None:
                self._end_call(kind == FAILED)
                text = block.raw[pos:]
            else:  # failed before its call was announced (an ended block always is): the tag is content
                self._content(TOOL_CALL_OPEN)
                text = block.raw  # and its body is read again as text

    def _scan_text(self, text: str, final: bool) -> str | None:
        """Emit content up to an opening tag and return what follows the tag, or ``None`` if there is none."""
        buf, self._held = self._held + text, ""
        if self._max_calls is None or self._calls < self._max_calls:
            start = buf.find(TOOL_CALL_OPEN)
            if start != -1:
                self._content(buf[:start])
                return buf[start + len(TOOL_CALL_OPEN) :]
            keep = 0 if final else _partial_open_tag(buf)
            if keep:
                buf, self._held = buf[:-keep], buf[-keep:]
        self._content(buf)
        return None


def join_events(events: Iterable[ToolEvent]) -> tuple[str | None, list[ToolCall]]:
    """Content (``None`` if empty) and calls that a sequence of :class:`ToolEvent` adds up to."""
    content: list[str] = []
    starts: list[ToolCallStart] = []
    args: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            starts.append(event)
        else:
            args.setdefault(event.index, []).append(event.text)
    calls = [ToolCall(s.id, s.name, "".join(args.get(s.index, ()))) for s in starts]
    return "".join(content) or None, calls


def parse_tool_calls(
    text: str, names: Iterable[str], *, max_calls: int | None = None
) -> tuple[str | None, list[ToolCall]]:
    """Split finished output into content (stripped, ``None`` if empty) and the calls of tools in ``names``.

    Blocks that are not valid calls (bad JSON, no or unknown name, calls beyond ``max_calls``) stay in the
    content as written. Arguments are compact JSON text of an object.
    """
    parser = ToolStreamParser(names, max_calls=max_calls, eager=False)
    return join_events([*parser.push(text), *parser.finish()])
