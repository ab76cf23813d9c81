"""Reasoning models: the text between ``<think>`` and ``</think>`` goes to ``reasoning_content``, not ``content``.

:func:`reasoning_for` decides, per request, whether a chat's output is parsed (the ``REASONING_PARSER`` setting;
``auto`` looks for the marker in the chat template) and whether the output begins inside the reasoning because
the rendered prompt already opened it (DeepSeek-R1 distills end their generation prompt with ``<think>``).
:class:`ReasoningSplitter` splits text as it streams, markers cut across pieces included; a whole answer is split
by the same code, so streamed and non-streamed output agree. :class:`ReasoningCounter` counts the reasoning's
tokens as the engine produces them: every token up to and including the one that completes the end marker (the
markers are tokens the model generated; vLLM counts them the same way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from server.engine.base import Constraint, EngineDelta, Tokenizer
from server.errors import invalid_request

THINK_START: Final = "<think>"
THINK_END: Final = "</think>"

_PROMPT_TAIL_TOKENS: Final = 16
"""Prompt tokens decoded to see whether the generation prompt ends inside an open reasoning block."""

RESERVED_TEMPLATE_KWARGS: Final = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
"""Names ``chat_template_kwargs`` may not use: arguments of the rendering itself, which the server sets."""


@dataclass(frozen=True, slots=True)
class Reasoning:
    """How a request's output is split into reasoning and content.

    Attributes:
        start: The marker that opens the reasoning.
        end: The marker that closes it.
        inside: The prompt opened the reasoning: the output begins inside it.
    """

    start: str = THINK_START
    end: str = THINK_END
    inside: bool = False

    def constrain(self, constraint: Constraint) -> Constraint:
        """``constraint`` applied after the reasoning: free text up to the end marker first."""
        return dataclasses.replace(
            constraint, reasoning_start="" if self.inside else self.start, reasoning_end=self.end
        )


def check_template_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``chat_template_kwargs`` as the template gets them, or a 400 naming a key the server sets itself."""
    if not kwargs:
        return None
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS:
            raise invalid_request(
                f"'chat_template_kwargs' cannot set '{key}': the server sets it.", f"chat_template_kwargs.{key}"
            )
    return dict(kwargs)


def reasoning_for(setting: str, tokenizer: Tokenizer, prompt: Sequence[int]) -> Reasoning | None:
    """The reasoning split of a chat whose rendered prompt is ``prompt``, or ``None`` when output is not split.

    Args:
        setting: ``REASONING_PARSER``: ``think`` (always), ``none`` (never) or ``auto`` (when the chat template
            mentions either marker, as Qwen3's and DeepSeek-R1's do).
        tokenizer: The model's tokenizer (its chat template and decoding).
        prompt: The rendered prompt's token ids.
    """
    if setting == "none":
        return None
    template = tokenizer.chat_template or ""
    if setting == "auto" and THINK_START not in template and THINK_END not in template:
        return None
    tail = tokenizer.decode(list(prompt[-_PROMPT_TAIL_TOKENS:])).rstrip()
    # Only a marker at the very end counts: a closed block (``enable_thinking=False``) or a marker inside a user's
    # message leaves the model free to start its own.
    return Reasoning(inside=tail.endswith(THINK_START))


class ReasoningSplitter:
    """Splits one choice's text, piece by piece, into reasoning and content.

    Without a reasoning block at the start (after whitespace) the text is content, unchanged. Inside the block,
    text that could be the start of the end marker is held back until the next piece decides. Whitespace right
    after the end marker is dropped (models write a blank line there).
    """

    __slots__ = ("_buffer", "_r", "_state", "reasoned")

    def __init__(self, reasoning: Reasoning) -> None:
        self._r = reasoning
        self._buffer = ""
        self._state = "start"
        self.reasoned = False
        """A reasoning block was opened (``reasoning_content`` is then a string, else ``None``)."""

    @property
    def phase(self) -> str:
        """``start`` (undecided), ``reasoning``, ``gap`` (after the end marker) or ``content``."""
        return self._state

    def push(self, text: str) -> list[tuple[bool, str]]:
        """``(is_reasoning, text)`` segments now certain, in order."""
        self._buffer += text
        out: list[tuple[bool, str]] = []
        while self._buffer:
            buffer = self._buffer
            if self._state == "start":
                head = buffer.lstrip()
                if not head or (self._r.start.startswith(head) and head != self._r.start):
                    break  # whitespace or a partial start marker: the next piece decides
                if head.startswith(self._r.start):
                    self._buffer, self._state, self.reasoned = head[len(self._r.start) :], "reasoning", True
                elif self._r.inside:
                    self._state, self.reasoned = "reasoning", True
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                at = buffer.find(self._r.end)
                if at >= 0:
                    if at:
                        out.append((True, buffer[:at]))
                    self._buffer, self._state = buffer[at + len(self._r.end) :], "gap"
                    continue
                keep = _partial_suffix(buffer, self._r.end)
                if len(buffer) > keep:
                    out.append((True, buffer[: len(buffer) - keep]))
                self._buffer = buffer[len(buffer) - keep :]
                break
            elif self._state == "gap":
                self._buffer = buffer.lstrip()
                if self._buffer:
                    self._state = "content"
            else:
                out.append((False, buffer))
                self._buffer = ""
        return out

    def finish(self) -> list[tuple[bool, str]]:
        """The segments still held back, once the text has ended."""
        buffer, self._buffer = self._buffer, ""
        if not buffer or self._state == "gap":
            return []
        if self._state == "start" and self._r.inside:
            self.reasoned = True
            return [(True, buffer)]
        return [(self._state == "reasoning", buffer)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that begins ``marker`` (it may complete in the next piece)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def split(text: str, reasoning: Reasoning) -> tuple[str | None, str | None]:
    """``(reasoning_content, content)`` of a whole answer.

    ``reasoning_content`` is ``None`` when the model did not reason; ``content`` is ``None`` when it reasoned and
    wrote nothing after (or never closed its reasoning).
    """
    splitter = ReasoningSplitter(reasoning)
    segments = splitter.push(text) + splitter.finish()
    thought = "".join(t for is_reasoning, t in segments if is_reasoning)
    content = "".join(t for is_reasoning, t in segments if not is_reasoning)
    if not splitter.reasoned:
        return None, content
    return thought, content or None


class ReasoningCounter:
    """Counts one choice's reasoning tokens from the engine's deltas (before stop strings are applied)."""

    __slots__ = ("_pending", "_splitter", "_text", "count")

    def __init__(self, reasoning: Reasoning) -> None:
        self._splitter: ReasoningSplitter | None = ReasoningSplitter(reasoning)
        self._pending = 0  # tokens seen while undecided whether the output reasons at all
        self._text = ""
        self.count = 0

    def feed(self, delta: EngineDelta) -> None:
        """Account for one delta's tokens; the EOS token ending the row is never reasoning."""
        splitter = self._splitter
        if splitter is None:
            return
        tokens = len(delta.token_ids) - (1 if delta.finish_reason == "stop" and delta.token_ids else 0)
        splitter.push(delta.text)
        state = splitter.phase
        if state == "start":
            self._pending += tokens
            return
        if state == "content" and not splitter.reasoned:
            self._splitter = None  # no reasoning block: nothing to count
            return
        self.count += self._pending + tokens
        self._pending = 0
        if state in ("gap", "content"):
            self._splitter = None  # the token that completed the end marker was the last one counted


def replayed_count(text: str, reasoning: Reasoning, tokenizer: Tokenizer) -> int:
    """Reasoning tokens of a cached answer (the cache keeps texts): its reasoning, markers included, re-tokenized."""
    thought, _ = split(text, reasoning)
    if thought is None:
        return 0
    spelled = ("" if reasoning.inside else reasoning.start) + thought + reasoning.end
    return max(0, len(tokenizer.encode(spelled)) - len(tokenizer.encode("")))
