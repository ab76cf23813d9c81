"""Tool calls written as bare JSON objects: Llama 3.x JSON and Mistral's ``[TOOL_CALLS]`` list.

Llama 3.x answers a call with ``{"name": ..., "parameters": {...}}`` (``"arguments"`` is accepted too), optionally
after ``<|python_tag|>``, several calls separated by ``;``; the calls must open the answer, or the whole answer is
content. Mistral writes ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``, possibly after some content;
newer Mistral templates write ``[TOOL_CALLS]name[ARGS]{...}`` per call, which is read too. The markers are special
tokens that a detokenizer skipping special tokens drops, so a call may also begin without them at the start of the
answer: ``{`` (Llama), ``[`` or a tool's name followed by ``{`` (Mistral).

Each call object is read by the Hermes parser's :class:`~server.serving.toolparse.CallBlock`, so names, arguments
(compact JSON, streamed as they arrive) and eager announcement work the same way; text that turns out not to be a
call is content, marker and all, so no text is lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from server.serving.toolformats.syntax import (
    LLAMA3_SYNTAX,
    MISTRAL_SYNTAX,
    NAME_CHARS,
    ArgsReader,
    CallSyntax,
    partial_suffix,
)
from server.serving.toolparse import (
    ENDED,
    FAILED,
    CallBlock,
    EventSink,
    ToolCallArguments,
    ToolCallStart,
    ToolEvent,
    new_call_id,
)

__all__ = ["LLAMA3_SYNTAX", "MISTRAL_SYNTAX", "CallSyntax", "JsonCallsParser"]

_Mode = Literal["start", "text", "content", "open", "block", "between", "named", "args"]


class JsonCallsParser(EventSink):
    """Splits (streamed) output into content and the calls of one :class:`CallSyntax`.

    The same interface and guarantees as :class:`~server.serving.toolparse.ToolStreamParser`: events of any split
    of a text equal those of the whole text, but for a call that breaks after it was announced (see
    :attr:`broken_calls`); calls beyond ``max_calls`` stay content.

    Args:
        names: The tools whose names count as calls.
        syntax: The family's call syntax.
        max_calls: Most calls to recognise.
        eager: ``False`` announces a call only once its object is complete.
    """

    def __init__(
        self, names: Iterable[str], syntax: CallSyntax, *, max_calls: int | None = None, eager: bool = True
    ) -> None:
        self._names = frozenset(names)
        self._syntax = syntax
        self._max_calls = max_calls
        self._eager = eager
        self._mode: _Mode = "start"
        self._buf = ""  # text not decided yet
        self._section = ""  # marker and punctuation read since the last call, content again if the next call fails
        self._block: CallBlock | None = None
        self._named: tuple[str, ArgsReader] | None = None  # the name and arguments of a name[ARGS]{...} call
        self._init_events()

    def push(self, text: str) -> list[ToolEvent]:
        """Add generated text; return the events it completes."""
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[ToolEvent]:
        """End of output: decide held text and an open call; return the last events."""
        while self._step(final=True):
            pass
        self._space = ""
        return self._take()

    # ---- the state machine: each step consumes some of ``_buf`` or returns False to wait ----------------------

    def _step(self, final: bool) -> bool:
        mode = self._mode
        if mode == "block":
            return self._step_block(final)
        if mode == "args":
            return self._step_args(final)
        buf = self._buf
        if mode == "content":
            self._content(buf)
            self._buf = ""
            return False
        if mode == "text":
            return self._step_text(final)
        body = buf.lstrip()
        lead = buf[: len(buf) - len(body)]
        if not body:
            if final:  # a section cut before its first call is content; trailing whitespace is dropped
                self._buf = ""
                self._fail_section(lead)
            return False
        if mode == "start":
            return self._step_start(body, lead, final)
        if mode == "named":
            return self._step_named(body, lead, final)
        if mode == "open":
            if body[0] != "[":
                if self._syntax.args_tag is not None:
                    self._mode = "named"
                else:
                    self._fail_section("")
                return True
            self._section += lead + "["
            self._buf = body[1:]
            self._mode = "block"
            return True
        return self._step_between(body, lead)

    def _step_start(self, body: str, lead: str, final: bool) -> bool:
        syntax = self._syntax
        self._content(lead)  # leading whitespace (dropped)
        if body.startswith(syntax.marker):
            self._section, self._buf = syntax.marker, body[len(syntax.marker) :]
            self._mode = "open" if syntax.bracket else "block"
        elif not final and syntax.marker.startswith(body):
            self._buf = body
            return False
        elif body[0] == ("[" if syntax.bracket else "{"):  # the marker dropped as a special token
            self._buf = body
            self._mode = "open" if syntax.bracket else "block"
        elif syntax.args_tag is not None and body[0] in NAME_CHARS:  # name[ARGS]{...}, the marker dropped
            self._buf = body
            self._mode = "named"
        else:
            self._buf = body
            self._mode = "text" if syntax.anywhere else "content"
        return True

    def _step_text(self, final: bool) -> bool:
        buf, marker = self._buf, self._syntax.marker
        if self._max_calls is not None and self.calls >= self._max_calls:
            self._mode = "content"
            return True
        start = buf.find(marker)
        if start != -1:
            self._content(buf[:start])
            self._section, self._buf = marker, buf[start + len(marker) :]
            self._mode = "open"
            return True
        keep = 0 if final else partial_suffix(buf, marker)
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _step_between(self, body: str, lead: str) -> bool:
        syntax = self._syntax
        if body[0] == syntax.separator and (self._max_calls is None or self.calls < self._max_calls):
            self._section = lead + body[0]
            self._buf = body[1:]
            self._mode = "block"
        elif syntax.bracket and body[0] == "]":
            self._section, self._buf = "", body[1:]
            self._mode = "text"
        else:  # anything else after a call (or a call too many) is content
            self._section = ""
            self._mode = "text" if syntax.anywhere else "content"
        return True

    def _step_block(self, final: bool) -> bool:
        block = self._block
        if block is None:
            block = self._block = CallBlock(self._names, self._eager, self._syntax.args_keys, close="")
        block.raw += self._buf
        self._buf = ""
        outcome = block.scan(final)
        self._announce(block)
        if outcome is None:
            return False
        kind, pos = outcome
        self._block = None
        if self._call_id is None:  # failed before it was announced: the section and the block are content
            assert kind == FAILED
            self._buf = block.raw
            self._fail_section("")
            return True
        self._end_call(kind == FAILED)
        self._buf = block.raw[pos:]
        self._section = ""
        self._mode = "between" if kind == ENDED else ("text" if self._syntax.anywhere else "content")
        return True

    def _named_head(self, body: str, final: bool) -> tuple[str, int] | bool:
        """A ``name[ARGS]`` (or bare ``name`` before ``{``) head at the start of ``body``: the name and the head's
        length, ``True`` to wait for more text, ``False`` when there is none."""
        end = 0
        while end < len(body) and body[end] in NAME_CHARS:
            end += 1
        name, rest = body[:end], body[end:]
        if not rest:
            return not final and any(n.startswith(name) for n in self._names)
        if name not in self._names:
            return False
        tag = self._syntax.args_tag or ""
        if rest.startswith(tag):
            return name, end + len(tag)
        if not final and tag.startswith(rest):
            return True
        return (name, end) if rest[0] == "{" else False  # [ARGS] dropped as a special token

    def _step_named(self, body: str, lead: str, final: bool) -> bool:
        head = self._named_head(body, final)
        if head is True:
            return False
        if head is False or (self._max_calls is not None and self.calls >= self._max_calls):
            self._fail_section("")
            return True
        assert not isinstance(head, bool)
        name, size = head
        self._section += lead + body[:size]
        self._buf = body[size:]
        self._named = (name, ArgsReader())
        self._mode = "args"
        if self._eager:
            self._call_id = new_call_id()
            self._out.append(ToolCallStart(self._calls, self._call_id, name))
        return True

    def _step_args(self, final: bool) -> bool:
        assert self._named is not None
        name, reader = self._named
        reader.raw += self._buf
        self._buf = ""
        outcome = reader.scan(final)
        if outcome is None or outcome[0] == ENDED:
            if self._call_id is None and outcome is not None:  # announced only now that it is complete
                self._call_id = new_call_id()
                self._out.append(ToolCallStart(self._calls, self._call_id, name))
            if self._call_id is not None and self._sent < len(reader.args):
                self._out.append(ToolCallArguments(self._calls, "".join(reader.args[self._sent :])))
                self._sent = len(reader.args)
        if outcome is None:
            return False
        kind, pos = outcome
        self._named = None
        if self._call_id is None:  # failed before it was announced: the head and the text are content
            self._buf = reader.raw
            self._fail_section("")
            return True
        self._end_call(kind == FAILED)
        self._buf, self._section = reader.raw[pos:], ""
        # Another call may follow at once (its [TOOL_CALLS] dropped as a special token), else text.
        self._mode = "named" if kind == ENDED else "text"
        return True

    def _fail_section(self, extra: str) -> None:
        """The current section is no call: its text so far is content, and ``_buf`` is read again as text."""
        self._content(self._section + extra)
        self._section = ""
        self._mode = "text" if self._syntax.anywhere else "content"
