"""Incremental detokenization shared by every engine.

Decoding token by token breaks multi-byte characters and byte-level BPE merges; decoding a short window of
recent tokens and emitting only the part that grew (the prefix/read-offset scheme TGI and vLLM use) keeps the
streamed text identical to decoding the whole sequence at once.
"""

from __future__ import annotations

from server.engine.base import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Args:
        tokenizer: Decodes token ids (special tokens skipped).
        prompt_tail: The last few prompt token ids; decoding starts with them as context so that a leading
            space or merge of the first generated token comes out as in a full decode.
    """

    __slots__ = ("_ids", "_prefix_offset", "_read_offset", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, prompt_tail: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_tail or [])[-5:]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the sequence (an incomplete character decodes as U+FFFD)."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
