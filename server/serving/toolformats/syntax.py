"""The call syntax of the bare-JSON tool-call families, and the reader of a ``name[ARGS]{...}`` call's arguments."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Final

from server.serving.jsonlex import JsonLexer
from server.serving.toolparse import ENDED, FAILED

NAME_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_-.")
"""Characters of a function name in the ``name[ARGS]{...}`` form."""


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a family writes its call section.

    Attributes:
        marker: The tag that opens the section.
        anywhere: The section may follow content (Mistral); else it must open the answer (Llama 3).
        bracket: The calls sit in one JSON-like list ``[call, call]`` after the marker (Mistral).
        separator: What separates two calls (after optional whitespace).
        args_keys: The members that may hold a call's arguments.
        args_tag: For the ``name<args_tag>{...}`` form (newer Mistral templates), the tag between the name and the
            arguments object; ``None`` where the family has no such form.
    """

    marker: str
    anywhere: bool
    bracket: bool
    separator: str
    args_keys: tuple[str, ...]
    args_tag: str | None = None


LLAMA3_SYNTAX = CallSyntax("<|python_tag|>", False, False, ";", ("parameters", "arguments"))
MISTRAL_SYNTAX = CallSyntax("[TOOL_CALLS]", True, True, ",", ("arguments",), "[ARGS]")


class ArgsReader:
    """The arguments object of a ``name[ARGS]{...}`` call, checked and compacted as it arrives."""

    __slots__ = ("args", "lexer", "opened", "pos", "raw")

    def __init__(self) -> None:
        self.raw = ""
        self.pos = 0
        self.lexer = JsonLexer()
        self.opened = False
        self.args: list[str] = []

    def scan(self, final: bool) -> tuple[int, int] | None:
        """``None`` (needs more), ``(FAILED, pos)`` or ``(ENDED, resume_pos)``, as ``CallBlock.scan``."""
        for pos in range(self.pos, len(self.raw)):
            ch = self.raw[pos]
            if not self.opened:
                if ch.isspace():
                    continue
                if ch != "{":
                    return FAILED, pos
                self.opened = True
            if not self.lexer.feed(ch):
                return FAILED, pos
            if self.lexer.significant:
                self.args.append(ch)
            if self.lexer.done:
                return ENDED, pos + 1
        self.pos = len(self.raw)
        return (FAILED, len(self.raw)) if final else None


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that could still grow into ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
